"""Hostile and odd inputs (issue 12): a clear error or the right result, in bounded time.

One test per item of the issue that concerns planning, configs, calibration and conversion;
files, artifacts and the command line are in ``test_hostile_io.py``. Each test that could
hang bounds itself (``bounded``): a regression fails in seconds instead of stalling CI.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import qswap
from qswap.exceptions import CalibrationError, ConfigError, PlanError


def bounded(seconds: float, fn: Callable[[], Any]) -> Any:
    """``fn()``'s result (or exception), failing the test if it takes more than ``seconds``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    start = time.perf_counter()
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s"
    if "error" in box:
        raise box["error"]
    elapsed = time.perf_counter() - start
    assert elapsed < seconds, f"took {elapsed:.1f} s"
    return box.get("result")


class _LongName(nn.Module):
    """A model whose only layer has a 40-letter name: a long path for a regex to chew on."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({"a" * 40: nn.Linear(2, 2)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers["a" * 40](x)


# --------------------------------------------------------------------------- 3. hangs


def test_a_backtracking_rule_regex_is_stopped_with_the_rule_named() -> None:
    """A regex like (a|aa)+c on long module paths fails in bounded time, naming the rule."""
    rule = {"match": {"regex": r"layers\.(a|aa)+c"}, "skip": True}
    cfg = {"extends": ["w8a8_minmax"], "rules": [rule]}
    with pytest.raises(ConfigError, match=r"rules\[0\]\.match\.regex: the regex .* took too long"):
        bounded(10, lambda: qswap.plan(_LongName(), cfg))


def test_common_redos_patterns_finish_at_once() -> None:
    """(\\w+)+\\. and (a+)+b, exponential in Python's re, finish in milliseconds."""
    for pattern in (r"(\w+)+\.", "(a+)+b"):
        cfg = {"extends": ["w8a8_minmax"], "strict": False,
               "rules": [{"match": {"regex": pattern}, "skip": True}]}  # fmt: skip
        with pytest.warns(UserWarning, match="no module of _LongName matches"):
            bounded(5, lambda cfg=cfg: qswap.plan(_LongName(), cfg))


def test_extends_fan_out_reads_each_parent_once(tmp_path: Path) -> None:
    """15 files each extending the next 30 times resolve in well under a second or two."""
    for i in range(15):
        body = f"extends: [{', '.join([f'c{i + 1}.yaml'] * 30)}]\n" if i < 14 else "backend: fake\n"
        (tmp_path / f"c{i}.yaml").write_text("version: 1\n" + body)
    cfg = bounded(10, lambda: qswap.load_config(tmp_path / "c0.yaml"))
    assert cfg.backend == "fake"


def test_extends_reads_config_files_only_and_never_quotes_one(tmp_path: Path) -> None:
    """extends refuses a non-.yaml path outright, and a .yaml that is no config is not echoed."""
    (tmp_path / "a.yaml").write_text("extends: [../../etc/passwd]\n")
    with pytest.raises(ConfigError, match=r"extends names built-in presets or config files"):
        qswap.load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("extends: [secret.yaml]\n")
    (tmp_path / "secret.yaml").write_text("hunter2 is the password\n")
    with pytest.raises(ConfigError) as err:
        qswap.load_config(tmp_path / "b.yaml")
    assert "hunter2" not in str(err.value) and "It is not a qswap config" in str(err.value)


def test_a_stored_config_extends_presets_only() -> None:
    """A config read from a model or artifact file (files=False) cannot reach the file system."""
    with pytest.raises(ConfigError, match="may extend built-in presets only"):
        qswap.load_config("version: 1\nextends: [base.yaml]\n", files=False)
    assert qswap.load_config("extends: [x86_int8]\n", files=False).backend == "x86"


def test_tilde_in_extends_is_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """extends: ['~/x.yaml'] reads the home folder's file, and says so when it is missing."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "base.yaml").write_text("backend: x86\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text("extends: ['~/base.yaml']\n")
    assert qswap.load_config(tmp_path / "sub" / "c.yaml").backend == "x86"
    (tmp_path / "sub" / "d.yaml").write_text("extends: ['~/nope.yaml']\n")
    with pytest.raises(ConfigError, match=rf"looked for {tmp_path}/nope\.yaml"):
        qswap.load_config(tmp_path / "sub" / "d.yaml")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes (POSIX)")
def test_a_fifo_named_as_a_config_is_refused_without_blocking(tmp_path: Path) -> None:
    """A named pipe is refused before it is opened (opening it would block forever)."""
    fifo = tmp_path / "q.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="is not a regular file"):
        bounded(5, lambda: qswap.load_config(fifo))


def test_a_near_limit_config_is_refused_quickly(tmp_path: Path) -> None:
    """0.8 MB of rules is refused in a few seconds, not tens."""
    rules = "".join(
        f"  - match: {{name: 'l{i}.*'}}\n    weight: {{bits: 4}}\n" for i in range(15000)
    )
    (tmp_path / "big.yaml").write_text("version: 1\nstrict: false\nrules:\n" + rules)
    with pytest.raises(ConfigError, match="the config holds more than 100000 values"):
        bounded(8, lambda: qswap.load_config(tmp_path / "big.yaml"))


def test_histogram_bins_are_bounded() -> None:
    """bins: 1e9 (8 GB per observer) is refused when the config is read."""
    cfg = {"activation": {"observer": {"name": "histogram", "bins": 10**9}}}
    with pytest.raises(ConfigError, match="option 'bins': must be at most 65536"):
        qswap.load_config(cfg)


def test_a_dict_config_nested_300_deep_is_a_config_error() -> None:
    """The dict path has the YAML path's depth limit, not Python's recursion limit."""
    deep: dict[str, Any] = {}
    cur = deep
    for _ in range(300):
        cur["a"] = {}
        cur = cur["a"]
    with pytest.raises(ConfigError, match="nested more than 64 levels deep"):
        qswap.load_config(deep)


# --------------------------------------------------------------------------- 2. silently wrong


def test_layers_int8_kernels_cannot_run_are_fallbacks_the_plan_shows() -> None:
    """per_group or axis-1 weights on x86: the plan says fake, and the layer really is fake."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    cfg = {
        "extends": ["x86_int8"],
        "activation": {"observer": "minmax"},
        "weight": {"granularity": "per_group", "group_size": 4},
    }
    x = torch.randn(16, 8)
    p = qswap.plan(model, cfg, example_inputs=(x,))
    assert p["0"].backend == "fake" and "per-group weights" in p["0"].reason
    with pytest.warns(qswap.FallbackWarning, match=r"2 of 2 layers cannot run on backend 'x86'"):
        q = qswap.quantize(model, cfg, calib_data=[x], example_inputs=(x,), progress=False)
    assert not torch.equal(q(x), model(x))  # fake-quantized, not silently float
    rows = {r.name: r for r in qswap.report(model, q, [x]).rows}
    assert rows["0"].backend == "fake"


def test_an_axis_out_of_range_is_an_error_naming_the_layer() -> None:
    """weight.axis: -100 fails in the plan, naming the layer and its weight's shape."""
    with pytest.raises(
        PlanError, match=r"layer '0': its weight of shape \[4, 8\] has no axis -100"
    ):
        qswap.plan(
            nn.Sequential(nn.Linear(8, 4)), {"extends": ["w8a8_minmax"], "weight": {"axis": -100}}
        )


# --------------------------------------------------------------------------- 5. a new user


def test_weight_only_needs_no_calibration_data() -> None:
    """quantize() in weight-only mode runs without calib_data; static says what it needs."""
    model = nn.Sequential(nn.Linear(8, 4))
    assert "weight" in qswap.quantize(model, "w4_per_group")._qswap.layers["0"].qparams  # type: ignore[union-attr]
    with pytest.raises(CalibrationError, match="got no calib_data, but mode 'static'"):
        qswap.quantize(model, "w8a8_minmax")


def test_concurrent_x86_and_qnnpack_converts_are_right_and_leave_the_engine_alone() -> None:
    """Two threads converting for x86 and qnnpack get the single-thread results; the engine stays."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(32, 16)
    configs = {
        "x86": {"extends": ["x86_int8"], "activation": {"observer": "minmax"}},
        "qnnpack": {"extends": ["qnnpack_int8"], "activation": {"observer": "minmax"}},
    }
    if "qnnpack" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch build has no qnnpack engine")
    engine = torch.backends.quantized.engine
    expected = {
        k: qswap.quantize(model, c, calib_data=[x], example_inputs=(x,), progress=False)(x)
        for k, c in configs.items()
    }
    wrong: list[str] = []

    def convert_many(kind: str) -> None:
        for _ in range(10):
            q = qswap.quantize(
                model, configs[kind], calib_data=[x], example_inputs=(x,), progress=False
            )
            with torch.no_grad():
                if not torch.equal(q(x), expected[kind]):
                    wrong.append(kind)

    threads = [threading.Thread(target=convert_many, args=(k,)) for k in configs]
    bounded(120, lambda: [t.start() for t in threads] and [t.join() for t in threads])
    assert wrong == []
    assert torch.backends.quantized.engine == engine


def test_convert_after_a_calibration_that_raised_is_refused() -> None:
    """Partial statistics are not converted silently; a full calibrate() clears the refusal."""
    model = nn.Sequential(nn.Linear(4, 4))
    prepared = qswap.prepare(model, "w8a8_minmax")

    def batches() -> Any:
        yield torch.randn(8, 4)
        raise ValueError("record 2 is corrupt")

    with pytest.raises(ValueError, match="record 2 is corrupt"):
        qswap.calibrate(prepared, batches(), progress=False)
    with pytest.raises(
        CalibrationError,
        match=r"the last calibrate\(\) on this model stopped early \(batch 2 raised ValueError: "
        r"record 2 is corrupt\)",
    ):
        qswap.convert(prepared)
    qswap.calibrate(prepared, [torch.randn(8, 4)], progress=False)
    assert "weight" in qswap.convert(prepared)._qswap.layers["0"].qparams  # type: ignore[union-attr]


# --------------------------------------------------------------------------- 4. smaller defects


def test_hook_based_weight_norm_and_spectral_norm_quantize_with_fusion() -> None:
    """Legacy weight_norm/spectral_norm layers followed by ReLU fuse and quantize on fake and x86."""
    import warnings

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the hook-based forms
        model = nn.Sequential(
            torch.nn.utils.weight_norm(nn.Linear(4, 8)),
            nn.ReLU(),
            torch.nn.utils.spectral_norm(nn.Linear(8, 2)),
        ).eval()
    x = torch.randn(16, 4)
    ref = model(x)
    for cfg in ("w8a8_minmax", "x86_int8"):
        q = qswap.quantize(model, cfg, calib_data=[x], example_inputs=(x,), progress=False)
        with torch.no_grad():
            assert (q(x) - ref).abs().max() < 0.05 * ref.abs().max()
    assert hasattr(model[0], "weight_g")  # the user's model keeps its reparametrization


def test_a_model_pytorch_already_quantized_is_refused_by_name() -> None:
    """A torch.ao quantized layer inside the model is named, not met with NotImplementedError."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch.ao.nn.quantized as nnq

        model = nn.Sequential(nn.Linear(4, 4), nnq.Linear(4, 4))
    with pytest.raises(PlanError, match=r"module '1' is torch\.ao\.nn\.quantized\.Linear, a layer"):
        qswap.plan(model, "x86_int8")


def test_torch_save_of_an_int8_model_round_trips() -> None:
    """torch.save(qmodel) pickles an int8 model (no lock in the way) and it loads equal."""
    import io

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    x = torch.randn(8, 4)
    q = qswap.quantize(model, "x86_int8", calib_data=[x], example_inputs=(x,), progress=False)
    buffer = io.BytesIO()
    torch.save(q, buffer)
    buffer.seek(0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's TypedStorage notice on load
        loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(x), q(x))
    assert loaded._qswap.registry is qswap.default_registry()


class _Nest(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@pytest.mark.parametrize("config", ["w8a8_minmax", "x86_int8"])
def test_a_model_nested_200_deep_quantizes_and_runs(config: str) -> None:
    """Where the float model runs, tracing, calibration and the quantized model run too."""
    import sys

    model: nn.Module = nn.Linear(2, 2)
    for _ in range(200):
        model = _Nest(model)
    x = torch.randn(4, 2)
    limit = sys.getrecursionlimit()
    q = bounded(
        60,
        lambda: qswap.quantize(model, config, calib_data=[x], example_inputs=(x,), progress=False),
    )
    assert q(x).shape == (4, 2)
    assert sys.getrecursionlimit() == limit  # raised only while qswap's forwards run


def test_a_fallback_is_said_once_in_one_line() -> None:
    """4-bit activations on x86 fall back: one FallbackWarning, pointing at the plan."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(8, 4)
    cfg = {"backend": "x86", "activation": {"bits": 4}}
    with pytest.warns(qswap.FallbackWarning) as said:
        qswap.quantize(model, cfg, calib_data=[x], example_inputs=(x,), progress=False)
    assert len(said) == 1 and "\n" not in str(said[0].message)
    assert "print(qswap.plan(model, config)) shows each with its reason" in str(said[0].message)
