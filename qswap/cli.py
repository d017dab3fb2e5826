"""The ``qswap`` command line: validate configs, print schemas, presets and registry entries.

Bad input never shows a Python traceback: each problem is one message on
stderr and the exit status is 2.

    $ qswap validate examples/configs/*.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from qswap.exceptions import QSwapError

__all__ = ["main"]

EXIT_OK = 0
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
            out.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(target.suffix + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(target)
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


def _cmd_registry_list(args: argparse.Namespace) -> int:
    from qswap.registry import default_registry

    for line in default_registry().list(args.pattern):
        print(line)
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
    q = reg_sub.add_parser("list", help="list entries, optionally filtered by a glob")
    q.add_argument("pattern", nargs="?", default="*")
    q.set_defaults(func=_cmd_registry_list)
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
    return status


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
