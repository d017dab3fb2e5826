"""The ``qswap`` command line: plan, quantize and report; validate configs, schemas, presets, registry.

Bad input never shows a Python traceback: each problem is one message on
stderr and the exit status is 2.

    $ qswap validate examples/configs/*.yaml
    $ qswap plan --model mypkg.models:build --config q.yaml --calib mypkg.data:calib_batches
    $ qswap quantize --model mypkg.models:build --config q.yaml --calib mypkg.data:calib_batches --out out/
    $ qswap report --model mypkg.models:build --quantized out/ --data mypkg.data:test_batches

``--model``/``--calib``/``--data`` name ``MODULE:NAME``: the module is imported (``MODULE``
may also be a path to a ``.py`` file) and ``NAME`` is called when it is callable. Code is
imported only from what these options name.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from qswap.exceptions import (
    CalibrationError,
    FileError,
    PlanError,
    PluginError,
    QSwapError,
    UnsupportedModuleError,
)

__all__ = ["build_parser", "load_object", "main", "render_schema"]

EXIT_OK = 0
EXIT_CHECK = 1  # the command ran and wrote its files, but a check it ran failed
EXIT_INVALID = 2

CONFIG_SCHEMA_NAME = "qswap-config.schema.json"
PACK_SCHEMA_NAME = "qswap-registry-pack.schema.json"


def _schemas() -> dict[str, dict[str, object]]:
    """Return the generated JSON Schemas by file name."""
    from qswap.config import config_json_schema
    from qswap.pack import pack_json_schema

    return {CONFIG_SCHEMA_NAME: config_json_schema(), PACK_SCHEMA_NAME: pack_json_schema()}


def render_schema(schema: dict[str, object]) -> str:
    """Serialise a schema the way ``schemas/`` stores it (stable, diff-friendly)."""
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def _cmd_validate(args: argparse.Namespace) -> int:
    from qswap.config import load_config

    status = EXIT_OK
    for name in args.files:
        try:
            load_config(Path(name))
        except QSwapError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = EXIT_INVALID
        except OSError as exc:
            print(f"error: {name}: cannot read the file: {exc.strerror or exc}", file=sys.stderr)
            status = EXIT_INVALID
        else:
            if not args.quiet:
                print(f"ok: {name}")
    return status


def _cmd_schema(args: argparse.Namespace) -> int:
    from qswap.persist.artifact import write_atomic

    schemas = _schemas()
    if args.write or args.check:
        out = Path(args.dir)
        stale: list[str] = []
        for fname, schema in schemas.items():
            target = out / fname
            text = render_schema(schema)
            current = target.read_text(encoding="utf-8") if target.is_file() else None
            if current == text:
                continue
            if args.check:
                stale.append(str(target))
                continue
            write_atomic(target, text.encode("utf-8"))
            print(f"wrote {target}")
        if stale:
            for path in stale:
                print(
                    f"error: {path} is stale or missing; regenerate it with "
                    f"`qswap schema --write --dir {args.dir}`",
                    file=sys.stderr,
                )
            return EXIT_INVALID
        return EXIT_OK
    which = PACK_SCHEMA_NAME if args.pack else CONFIG_SCHEMA_NAME
    sys.stdout.write(render_schema(schemas[which]))
    return EXIT_OK


def _cmd_presets(args: argparse.Namespace) -> int:
    from qswap.config import list_presets, load_config

    for name in list_presets():
        cfg = load_config(name)
        print(f"{name:<16} backend={cfg.backend:<8} mode={cfg.mode}")
    return EXIT_OK


def _name_parts(entry: str) -> dict[str, str]:
    """The whole parts of a registry entry's name, lowercased, with their spelling.

    ``mapping:x86:torch.nn.Conv2d`` has the parts ``mapping``, ``x86``, ``torch.nn.Conv2d``
    and ``Conv2d``; a fusion's classes (``a+b``) are parts each.
    """
    parts = {entry.lower(): entry}
    for piece in entry.replace("+", ":").split(":"):
        for part in (piece, piece.rpartition(".")[2]):
            if part:
                parts[part.lower()] = part
    return parts


def _cmd_registry_list(args: argparse.Namespace) -> int:
    from qswap.registry import default_registry

    registry = default_registry()
    pattern: str = args.pattern
    if any(c in pattern for c in "*?["):
        found = registry.list(pattern)
    else:  # a bare name: the entries it names whole (Conv2d, minmax, x86), any case
        found = [n for n in registry.list() if pattern.lower() in _name_parts(n)]
    if not found:
        spelled: dict[str, str] = {}
        for name in registry.list():
            spelled.update(_name_parts(name))
        want = pattern.lower()
        close = difflib.get_close_matches(want, list(spelled), n=3, cutoff=0.6)
        close.sort(key=lambda c: (-difflib.SequenceMatcher(None, want, c).ratio(), c))
        hint = f"; did you mean {', '.join(repr(spelled[c]) for c in close)}?" if close else ""
        glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        print(
            f"error: no registry entry matches {pattern!r}{hint} A bare name matches a whole "
            f"part of an entry's name (Conv2d, minmax, x86), any case; a glob such as "
            f"{glob!r} matches within names. `qswap registry list` shows them all",
            file=sys.stderr,
        )
        return EXIT_CHECK
    for line in found:
        print(line)
    return EXIT_OK


# --------------------------------------------------------------------------- factories


@contextlib.contextmanager
def _cwd_importable() -> Iterator[None]:
    """Let ``MODULE`` resolve from the current folder, as ``python -m`` does, for this import only."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


_WHAT = {"--model": "model", "--calib": "batches", "--eval": "batches", "--data": "batches"}


def load_object(spec: str, flag: str) -> Any:
    """Import ``MODULE:NAME`` named on the command line and return ``NAME`` (called if callable)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr or not attr.isidentifier():
        raise PluginError(
            f"{flag} {spec!r}: expected MODULE:NAME, e.g. {flag} mypkg.models:build_model "
            "(or path/to/file.py:build_model)"
        )
    try:
        if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise PluginError(f"{flag} {spec!r}: no such file {str(path)!r}")
            name = f"qswap_cli_{path.stem}_{abs(hash(str(path.resolve())))}"
            file_spec = importlib.util.spec_from_file_location(name, path)
            if file_spec is None or file_spec.loader is None:
                raise PluginError(f"{flag} {spec!r}: {str(path)!r} is not a Python module")
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[name] = module
            file_spec.loader.exec_module(module)
        else:
            with _cwd_importable():
                module = importlib.import_module(module_name)
    except PluginError:
        raise
    except SystemExit as exc:
        raise PluginError(
            f"{flag} {spec!r}: importing {module_name!r} called sys.exit({exc.code!r}); a module "
            "named on the command line is imported, so guard its script part with "
            '`if __name__ == "__main__":`'
        ) from exc
    except Exception as exc:
        raise PluginError(
            f"{flag} {spec!r}: importing {module_name!r} failed with {type(exc).__name__}: "
            f"{exc}. Check the module path (it is imported as written, from the current folder "
            "or the installed packages)"
        ) from exc
    if not hasattr(module, attr):
        names = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(attr, names, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise PluginError(f"{flag} {spec!r}: module {module_name!r} has no {attr!r}{hint}")
    obj = getattr(module, attr)
    import torch

    if callable(obj) and not isinstance(obj, torch.nn.Module):
        try:
            obj = obj()
        except SystemExit as exc:  # exit(0) must not pass for success with nothing written
            raise PluginError(
                f"{flag} {spec!r}: calling {attr}() called sys.exit({exc.code!r}) instead of "
                f"returning; {attr}() must return the {_WHAT.get(flag, 'object')}"
            ) from exc
        except Exception as exc:
            raise PluginError(
                f"{flag} {spec!r}: calling {attr}() raised {type(exc).__name__}: {exc}"
            ) from exc
    return obj


def _model(spec: str) -> Any:
    import torch

    model = load_object(spec, "--model")
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModuleError(
            f"--model {spec!r} gave a {type(model).__name__}, not a torch.nn.Module; point it at "
            "a function or class that builds the (trained) float model"
        )
    return model.eval()


def _batches(spec: str, flag: str) -> list[Any]:
    """The batches ``spec`` gives: a tensor (or dict) is one batch, any other iterable yields batches.

    ``qswap.calibrate(prepared, tensor)`` would iterate over the tensor's rows; on the
    command line a tensor is one batch, as ``--calib`` documents.
    """
    import torch

    data = load_object(spec, flag)
    if isinstance(data, (torch.Tensor, dict)):
        return [data]
    if isinstance(data, (str, bytes, torch.nn.Module)) or not hasattr(data, "__iter__"):
        raise CalibrationError(
            f"{flag} {spec!r} gave a {type(data).__name__}; it must give batches: a list or "
            "iterable of model inputs (a tensor, a tuple of arguments or a dict of keyword "
            "arguments per batch), or one tensor"
        )
    try:
        batches = list(data)
    except SystemExit as exc:
        raise CalibrationError(
            f"{flag} {spec!r}: iterating over the batches called sys.exit({exc.code!r}); the "
            "batches must be given, not exit"
        ) from exc
    except Exception as exc:
        raise CalibrationError(
            f"{flag} {spec!r}: iterating over the batches raised {type(exc).__name__}: {exc}"
        ) from exc
    if not batches:
        raise CalibrationError(f"{flag} {spec!r} gave no batch; it must yield at least one")
    return batches


def _example(batches: list[Any]) -> Any:
    first = batches[0]
    return tuple(first) if isinstance(first, list) else first


# --------------------------------------------------------------------------- plan / quantize / report


def _cmd_plan(args: argparse.Namespace) -> int:
    from qswap.plan import plan

    model = _model(args.model)
    example = _example(_batches(args.calib, "--calib")) if args.calib else None
    the_plan = plan(model, args.config, example_inputs=example)
    if args.explain:
        for name in args.explain:
            print(the_plan.explain(name))
    else:
        print(the_plan)
    return EXIT_OK


# what `qswap quantize` writes into --out; a folder of these alone (model.pt and config.yaml
# among them) is one it wrote, and the only kind --force replaces
_WRITTEN = frozenset(
    {
        "calibration.pt",
        "model.pt",
        "config.yaml",
        "plan.txt",
        "report.txt",
        "report.json",
        "report.csv",
        "model.onnx",
        "onnx_check.txt",
    }
)
_CORE = frozenset({"model.pt", "config.yaml"})


def _check_out(out: Path, shown: str, force: bool) -> None:
    """Refuse an --out qswap must not replace; say why, and that nothing was written."""
    if not out.exists() and not out.is_symlink():
        return
    here = Path.cwd().resolve()
    real = out.resolve()
    if real == here or real in here.parents:
        raise FileError(
            f"--out {shown!r} is the current folder or a folder above it; qswap replaces --out "
            f"as a whole, so give it a folder of its own, e.g. --out "
            f"{os.path.join(shown, 'quantized')!r}"
        )
    if not out.is_dir():
        raise FileError(f"--out {shown!r} exists and is not a folder; choose another path")
    if not force:
        raise FileError(
            f"--out {shown!r} already exists; nothing was written. Pass --force to replace it "
            "(a folder `qswap quantize` wrote), or choose another folder"
        )
    entries = list(out.iterdir())
    foreign = sorted(p.name for p in entries if p.name not in _WRITTEN or not p.is_file())
    names = {p.name for p in entries}
    if foreign or (entries and not names >= _CORE):
        shown_names = ", ".join(foreign[:3]) + (
            f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        )
        why = (
            f"holds files `qswap quantize` did not write ({shown_names})"
            if foreign
            else f"lacks {' and '.join(sorted(_CORE - names))}, so `qswap quantize` did not write it"
        )
        raise FileError(
            f"--out {shown!r} {why}; --force replaces only a folder qswap wrote, and nothing was "
            "written. Move those files elsewhere or choose another folder"
        )


def _publish(tmp: Path, out: Path, shown: str, force: bool) -> None:
    """Move the finished folder into place; an old one (with --force) goes only once it is done."""
    from qswap.persist.artifact import sync_folder, temp_path

    sync_folder(tmp)
    if not out.exists() and not out.is_symlink():
        os.replace(tmp, out)
        sync_folder(out.parent)
        return
    _check_out(out, shown, force)  # again: it may have changed while qswap worked
    old = temp_path(out, "old")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)  # put the old folder back as it was
        raise
    sync_folder(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def _make_temp_folder(out: Path) -> Path:
    """An empty folder beside ``out`` named as qswap's (``.<name>.qswap-tmp-XXXXXXXX``)."""
    from qswap.persist.artifact import temp_path

    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = temp_path(out)
        try:
            tmp.mkdir(mode=0o777)  # the umask applies, as for any folder the user makes
        except FileExistsError:
            continue
        return tmp


def _cmd_quantize(args: argparse.Namespace) -> int:
    from torch import nn

    import qswap
    from qswap.calibrate import calibrate
    from qswap.config import dump_config, load_config
    from qswap.persist.artifact import save_calibration, write_atomic
    from qswap.persist.model_file import save
    from qswap.plan import plan
    from qswap.prepare import prepare
    from qswap.report import report
    from qswap.slots import input_method

    shown = args.out
    out = Path(os.path.abspath(args.out))
    _check_out(out, shown, args.force)
    model = _model(args.model)
    calib = _batches(args.calib, "--calib")
    evaluation = _batches(args.eval, "--eval") if args.eval else calib
    cfg = load_config(args.config)
    example = _example(calib)
    the_plan = plan(model, cfg, example_inputs=example)
    prepared = prepare(model, the_plan, example_inputs=example)
    # weight methods (GPTQ, AWQ, SmoothQuant) change the weights, which a calibration file
    # (qparams only) cannot hold: model.pt alone keeps their result
    methods = sorted({type(m).__name__ for m in map(input_method, prepared.modules()) if m})
    if args.calibration:
        qmodel = qswap.convert(prepared, calibration=args.calibration)
    else:
        sequential: bool | Literal["quantized"] = (
            "quantized" if args.sequential == "quantized" else args.sequential == "float"
        )
        calibrate(
            prepared,
            calib,
            max_batches=args.max_batches,
            progress=False,
            sequential=sequential,
        )
    tmp = _make_temp_folder(out)
    with_calibration = bool(args.calibration) or not methods
    written = ["calibration.pt"] if with_calibration else []
    written += ["model.pt", "config.yaml", "plan.txt", "report.txt/json/csv"]
    try:
        if not args.calibration:
            if with_calibration:
                save_calibration(prepared, tmp / "calibration.pt")
            qmodel = qswap.convert(prepared, inplace=True)
        else:
            save_calibration(qmodel, tmp / "calibration.pt")
        save(qmodel, tmp / "model.pt")
        # the plan's config: what it measured (vnni) included, so the folder rebuilds as is
        write_atomic(tmp / "config.yaml", dump_config(the_plan.config).encode("utf-8"))
        write_atomic(tmp / "plan.txt", f"{the_plan}\n".encode())
        rep = report(model, qmodel, evaluation, sensitivity=args.sensitivity)
        write_atomic(tmp / "report.txt", f"{rep}\n".encode())
        rep.to_json(tmp / "report.json")
        rep.to_csv(tmp / "report.csv")
        onnx_rows = None
        # backend onnxruntime: the ONNX model is the quantized model; always written
        want_onnx = args.onnx or isinstance(getattr(qmodel, "torch_twin", None), nn.Module)
        if want_onnx:
            from qswap.export.onnx import compare_layers, export_onnx

            export_onnx(qmodel, example, tmp / "model.onnx")
            # ONNX Runtime on the file against qswap, layer by layer, on the example batch
            try:
                onnx_rows = compare_layers(qmodel, tmp / "model.onnx", example)
                check = "".join(f"{row}\n" for row in onnx_rows)
            except PlanError as exc:  # nothing to compare (no int8-weighted layer in the file)
                check = f"not checked: {exc}\n"
            write_atomic(tmp / "onnx_check.txt", check.encode())
        _publish(tmp, out, shown, args.force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(
        f"wrote {shown.rstrip(os.sep)}/: {', '.join(written)}"
        + (", model.onnx, onnx_check.txt" if want_onnx else "")
    )
    if not with_calibration:
        print(
            f"no calibration.pt: weight method(s) {', '.join(methods)} rounded the weights "
            "themselves, which a calibration file (qparams only) cannot hold; model.pt keeps them"
        )
    print(
        f"output SQNR {rep.output_sqnr_db:.1f} dB over {rep.batches} batch(es); "
        f"{sum(r.params_before for r in rep.rows)} -> {sum(r.params_after for r in rep.rows)} "
        "parameter bytes"
    )
    if onnx_rows is not None:
        bad = [row for row in onnx_rows if not row.ok]
        print(
            f"ONNX Runtime check: {len(onnx_rows) - len(bad)}/{len(onnx_rows)} layers within one "
            "quantization step of qswap on the same input"
            + "".join(f"\n  differs: {row}" for row in bad)
        )
        if bad:
            cause = (
                "the CPU, not the export (see 'likely cause' above)"
                if any(row.saturates for row in bad)
                else "the export or the runtime; see onnx_check.txt"
            )
            print(
                f"qswap: error: the ONNX Runtime check failed on {len(bad)} layer(s), likely "
                f"because of {cause}; the files are in {shown.rstrip(os.sep)}/",
                file=sys.stderr,
            )
            return EXIT_CHECK
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    import qswap
    from qswap.persist.model_file import load
    from qswap.report import report

    if bool(args.quantized) == bool(args.config):
        raise QSwapError(
            "qswap report needs either --quantized DIR (a folder `qswap quantize` wrote) or "
            "--config FILE (quantize in memory, calibrating on --calib or --data)"
        )
    model = _model(args.model)
    data = _batches(args.data, "--data")
    if args.quantized:
        folder = Path(args.quantized)
        path = folder / "model.pt" if folder.is_dir() else folder
        qmodel = load(path, _model(args.model))
    else:
        calib = _batches(args.calib, "--calib") if args.calib else data
        qmodel = qswap.quantize(
            model, args.config, calib_data=calib, example_inputs=_example(calib), progress=False
        )
    rep = report(model, qmodel, data, sensitivity=args.sensitivity, max_batches=args.max_batches)
    if args.sort:
        rep = rep.sorted(args.sort)
    print(rep)
    if args.sensitivity:
        print("most damaging layers first: " + ", ".join(rep.ranking()[:10]))
    if args.json:
        rep.to_json(args.json)
    if args.csv:
        rep.to_csv(args.csv)
    if args.plot:
        rep.plot(args.plot)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="qswap",
        description="Quantize PyTorch models from a declarative config.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check config files; exit 2 if any is invalid")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("schema", help="print or write the JSON Schemas of configs and packs")
    p.add_argument("--pack", action="store_true", help="print the registry-pack schema")
    p.add_argument("--write", action="store_true", help="write both schemas into --dir")
    p.add_argument("--check", action="store_true", help="exit 2 if the files in --dir are stale")
    p.add_argument("--dir", default="schemas", help="folder for --write/--check (default: schemas)")
    p.set_defaults(func=_cmd_schema)

    p = sub.add_parser("presets", help="list the built-in presets usable in `extends`")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("registry", help="inspect the default registry")
    reg_sub = p.add_subparsers(dest="registry_command", required=True, metavar="SUBCOMMAND")
    q = reg_sub.add_parser(
        "list",
        help="list entries: a glob ('*Conv*') or a whole name part (Conv2d, minmax, x86), any "
        "case; exit 1 when none matches",
    )
    q.add_argument("pattern", nargs="?", default="*")
    q.set_defaults(func=_cmd_registry_list)

    factory = "MODULE:NAME (NAME is called if callable; MODULE may be a .py path)"
    p = sub.add_parser("plan", help="print what a config does to each module of a model")
    p.add_argument(
        "--model", required=True, metavar="MODULE:NAME", help=f"the float model: {factory}"
    )
    p.add_argument("--config", required=True, help="config file, YAML text or preset name")
    p.add_argument("--calib", metavar="MODULE:NAME", help="batches; the first is traced for fusion")
    p.add_argument(
        "--explain", action="append", metavar="PATH", help="explain one module (repeatable)"
    )
    p.set_defaults(func=_cmd_plan, runs_user_code=True)

    p = sub.add_parser("quantize", help="calibrate, convert and write artifact, model and report")
    p.add_argument(
        "--model", required=True, metavar="MODULE:NAME", help=f"the float model: {factory}"
    )
    p.add_argument("--config", required=True, help="config file, YAML text or preset name")
    p.add_argument(
        "--calib",
        required=True,
        metavar="MODULE:NAME",
        help="calibration batches: a list or iterable of batches; one tensor is one batch",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace --out if it exists and `qswap quantize` wrote it",
    )
    p.add_argument(
        "--eval", metavar="MODULE:NAME", help="batches for the report (default: --calib)"
    )
    p.add_argument(
        "--calibration", metavar="FILE", help="reuse this artifact instead of calibrating"
    )
    p.add_argument("--max-batches", type=int, help="calibrate on at most this many batches")
    p.add_argument(
        "--sequential",
        choices=["float", "quantized"],
        help="calibrate block by block, one block's weight-method statistics in memory at a "
        "time; 'quantized' feeds each block the rounded blocks' outputs",
    )
    p.add_argument(
        "--sensitivity", action="store_true", help="add per-layer sensitivity to the report"
    )
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (QDQ; extra 'onnx')")
    p.set_defaults(func=_cmd_quantize, runs_user_code=True)

    p = sub.add_parser("report", help="per-layer SQNR, error share and size of a quantized model")
    p.add_argument(
        "--model", required=True, metavar="MODULE:NAME", help=f"the float model: {factory}"
    )
    p.add_argument("--data", required=True, metavar="MODULE:NAME", help="batches to measure on")
    p.add_argument("--quantized", metavar="DIR", help="folder written by `qswap quantize`")
    p.add_argument("--config", help="quantize in memory with this config instead")
    p.add_argument("--calib", metavar="MODULE:NAME", help="calibration batches (default: --data)")
    p.add_argument("--sensitivity", action="store_true", help="quantize one layer at a time too")
    p.add_argument(
        "--sort",
        choices=[
            "model",
            "sqnr",
            "local_sqnr",
            "error_share",
            "sensitivity",
            "params_before",
            "params_after",
        ],
    )
    p.add_argument("--max-batches", type=int, help="measure on at most this many batches")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--csv", metavar="FILE", help="also write the report as CSV")
    p.add_argument("--plot", metavar="FILE", help="also draw per-layer SQNR (extra 'plot')")
    p.set_defaults(func=_cmd_report, runs_user_code=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
    except QSwapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except SystemExit as exc:
        # only user code raises it here: the model's forward, a data loader's iterator
        if not getattr(args, "runs_user_code", False):
            raise
        print(
            f"error: qswap {args.command} failed: the code it ran (the model or the data of "
            f"--model/--calib/--data) called sys.exit({exc.code!r}); nothing was written",
            file=sys.stderr,
        )
        return EXIT_INVALID
    except ImportError as exc:  # a missing optional extra (onnx, plot)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except OSError as exc:
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"error:{where}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_INVALID
    except Exception as exc:
        # plan/quantize/report run the user's model on the user's data: a model that cannot
        # take those batches is bad input too, said in one line (the traceback on request)
        if not getattr(args, "runs_user_code", False) or os.environ.get("QSWAP_TRACEBACK"):
            raise
        print(
            f"error: qswap {args.command} failed: {type(exc).__name__}: {exc} "
            "(set QSWAP_TRACEBACK=1 to see where)",
            file=sys.stderr,
        )
        return EXIT_INVALID
    return status


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
