"""The config: models, presets, extends, safe YAML, errors with line:col, round trips."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, ValidationError

from qswap.config import (
    MAX_CONFIG_BYTES,
    ComponentRef,
    Match,
    QConfig,
    QuantSpec,
    QuantSpecPatch,
    Rule,
    config_json_schema,
    dump_config,
    list_presets,
    load_config,
    slot_base,
)
from qswap.exceptions import ConfigError
from qswap.registry import Registry

REPO = Path(__file__).resolve().parent.parent
BAD = REPO / "tests" / "bad_configs"
CASES: list[dict[str, Any]] = json.loads((BAD / "cases.json").read_text(encoding="utf-8"))["cases"]
EXAMPLE_CONFIGS = sorted((REPO / "examples" / "configs").glob("*.yaml"))
PRESET_FILES = sorted((REPO / "qswap" / "presets").glob("*.yaml"))
SCHEMA_LINE = "# yaml-language-server: $schema=../../schemas/qswap-config.schema.json"


def raises_config_error(source: Any, **kwargs: Any) -> ConfigError:
    """Load ``source`` and return the ConfigError it must raise."""
    with pytest.raises(ConfigError) as info:
        load_config(source, **kwargs)
    return info.value


# --------------------------------------------------------------------------- a registry of our own


class _NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _MseOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    steps: int = 100


def _observer(options: type[BaseModel]) -> type[torch.nn.Module]:
    class StubObserver(torch.nn.Module):
        options_model = options

        def __init__(self, spec: Any, options: Any = None) -> None:
            super().__init__()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def calculate_qparams(self) -> Any:
            raise NotImplementedError

        def merge(self, other: Any) -> None:
            raise NotImplementedError

    return StubObserver


class _StubQuantizer(torch.nn.Module):
    options_model = _NoOptions

    def __init__(self, spec: Any, options: Any = None) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def set_qparams(self, qparams: Any) -> None:
        raise NotImplementedError


@pytest.fixture(scope="module")
def own_registry() -> Registry:
    """A registry with known names only: observers minmax and mse, quantizer log2, backend sim."""
    reg = Registry("config-tests")
    reg.register_observer("minmax", _observer(_NoOptions))
    reg.register_observer("mse", _observer(_MseOptions))
    reg.register_quantizer("affine", _StubQuantizer)
    reg.register_quantizer("log2", _StubQuantizer)
    reg.register_backend("fake")
    reg.register_backend("sim")
    return reg


# --------------------------------------------------------------------------- presets and loading


def test_presets_are_the_builtins_and_match_pytorch_defaults() -> None:
    """The presets load and carry the backend, observers and layouts the contract names."""
    assert list_presets() == [
        "ort_int8",
        "qnnpack_int8",
        "w4_packed",
        "w4_per_group",
        "w8_packed",
        "w8a8_minmax",
        "x86_dynamic_int8",
        "x86_int8",
    ]
    w4, w8 = load_config("w4_packed"), load_config("w8_packed")
    assert (w4.backend, w4.mode, w4.weight.group_size, w4.weight.quant_range()) == (
        "packed",
        "weight_only",
        128,
        (-8, 7),
    )
    assert (w8.weight.granularity, w8.weight.scheme, w8.weight.method) == (
        "per_channel",
        "symmetric",
        None,
    )
    ort = load_config("ort_int8")
    assert (ort.backend, ort.mode, ort.fallback, ort.vnni) == (
        "onnxruntime",
        "static",
        "float",
        "auto",
    )
    assert ort.activation.quant_range() == (0, 255) and ort.weight.quant_range() == (-128, 127)
    dynamic = load_config("x86_dynamic_int8")
    assert (dynamic.backend, dynamic.mode, dynamic.fallback) == ("x86", "dynamic", "float")
    assert dynamic.activation.quant_range() == (0, 255)
    x86 = load_config("x86_int8")
    assert (x86.backend, x86.mode) == ("x86", "static")
    assert (x86.activation.signed, x86.activation.scheme, x86.activation.granularity) == (
        False,
        "affine",
        "per_tensor",
    )
    assert x86.activation.observer.name == "histogram" and x86.activation.reduce_range
    assert x86.activation.quant_range() == (0, 127)
    assert (x86.weight.signed, x86.weight.scheme, x86.weight.granularity, x86.weight.axis) == (
        True,
        "symmetric",
        "per_channel",
        0,
    )
    assert x86.weight.observer.name == "minmax" and x86.weight.quant_range() == (-128, 127)
    qnnpack = load_config("qnnpack_int8")
    assert qnnpack.backend == "qnnpack" and not qnnpack.activation.reduce_range
    assert qnnpack.activation.observer.name == "histogram"
    assert qnnpack.weight.granularity == "per_tensor" and qnnpack.weight.axis is None
    w8a8 = load_config("w8a8_minmax")
    assert w8a8.backend == "fake"
    assert {w8a8.activation.observer.name, w8a8.weight.observer.name} == {"minmax"}
    w4 = load_config("w4_per_group")
    assert (w4.backend, w4.mode) == ("fake", "weight_only")
    assert (w4.weight.bits, w4.weight.granularity, w4.weight.group_size) == (4, "per_group", 128)
    assert w4.weight.quant_range() == (-8, 7)


@pytest.mark.parametrize("path", PRESET_FILES + EXAMPLE_CONFIGS, ids=lambda p: p.name)
def test_shipped_yaml_has_schema_line_validates_and_round_trips(path: Path) -> None:
    """Presets and example configs start with the $schema line, load, and dump back equal."""
    assert path.read_text(encoding="utf-8").splitlines()[0] == SCHEMA_LINE
    cfg = load_config(path)
    assert cfg.extends == []
    assert load_config(cfg.to_yaml()) == cfg


def test_every_source_kind_loads_the_same_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A path, a str path, YAML text, a dict, a preset name and a QConfig give equal configs."""
    text = (REPO / "qswap" / "presets" / "x86_int8.yaml").read_text(encoding="utf-8")
    path = tmp_path / "copy.yml"
    path.write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    expected = load_config("x86_int8")
    assert load_config(path) == expected
    assert load_config("copy.yml") == expected
    assert load_config(text) == expected
    assert load_config(yaml.safe_load(text)) == expected
    assert load_config(expected) is expected
    assert load_config({"extends": ["x86_int8"]}) == expected
    assert load_config("{extends: [x86_int8]}") == expected


def test_json_file_loads(tmp_path: Path) -> None:
    """A .json config is read like YAML, with positions in errors."""
    good = tmp_path / "q.json"
    good.write_text('{"version": 1, "backend": "fake", "weight": {"bits": 4}}', encoding="utf-8")
    assert load_config(good).weight.bits == 4
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "version": 1,\n  "weight": {"bitz": 4}\n}\n', encoding="utf-8")
    err = raises_config_error(bad)
    assert (err.line, err.col, err.path) == (3, 14, "weight.bitz")


def test_defaults_are_uint8_activations_and_int8_per_channel_weights() -> None:
    """A minimal config means fake backend, uint8 affine activations, int8 per-channel weights."""
    cfg = load_config("version: 1")
    assert cfg == QConfig()
    assert (cfg.backend, cfg.mode, cfg.fusion, cfg.strict) == ("fake", "static", "auto", True)
    assert cfg.activation.quant_range() == (0, 255)
    assert (cfg.weight.granularity, cfg.weight.axis, cfg.weight.quant_range()) == (
        "per_channel",
        0,
        (-128, 127),
    )


def test_unquoted_off_is_read_as_fusion_off() -> None:
    """YAML 1.1 reads `fusion: off` as false; it still means fusion off and dumps quoted."""
    cfg = load_config("fusion: off")
    assert cfg.fusion == "off"
    assert "fusion: 'off'" in cfg.to_yaml()
    assert load_config(cfg.to_yaml()) == cfg


def test_anchors_aliases_and_merge_keys_are_plain_yaml() -> None:
    """Anchors, aliases and `<<` merge keys work, as safe_load would read them."""
    text = (
        "version: 1\n"
        "activation: &eight {bits: 8, signed: false, scheme: affine}\n"
        "rules:\n"
        "  - match: {name: 'head.*'}\n"
        "    activation:\n"
        "      <<: *eight\n"
        "      bits: 6\n"
    )
    cfg = load_config(text)
    assert cfg.activation.bits == 8
    patch = cfg.rules[0].activation
    assert patch is not None and (patch.bits, patch.signed, patch.scheme) == (6, False, "affine")


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    """A file saved with a UTF-8 byte-order mark (Windows editors) loads."""
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbfversion: 1\nbackend: x86\n")
    assert load_config(path).backend == "x86"


# --------------------------------------------------------------------------- the bad-config corpus


def test_bad_config_corpus_is_complete() -> None:
    """At least 40 bad configs, and every file in tests/bad_configs has an expectation."""
    listed = {case["file"] for case in CASES}
    assert len(listed) == len(CASES) >= 40
    committed = {case["file"] for case in CASES if "generate_bytes" not in case}
    on_disk = {p.name for p in BAD.iterdir() if p.is_file() and p.name != "cases.json"}
    assert on_disk == committed


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["file"])
def test_bad_config_gives_config_error_with_location_and_fix(
    case: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each bad config raises ConfigError at its expected file:line:col with what-and-fix text."""
    monkeypatch.chdir(REPO)
    path = Path("tests") / "bad_configs" / case["file"]
    if "generate_bytes" in case:
        path = tmp_path / case["file"]
        filler = b"# padding padding padding padding padding padding padding padding\n"
        body = b"version: 1\n" + filler * (case["generate_bytes"] // len(filler))
        path.write_bytes(body.ljust(case["generate_bytes"], b"#"))
    started = time.perf_counter()
    err = raises_config_error(path)
    assert time.perf_counter() - started < 2.0
    source = case.get("source", case["file"])
    assert Path(err.source or "").name == source
    assert (err.line, err.col) == (case["line"], case["col"])
    assert str(err).startswith(f"{err.source}:{case['line']}:{case['col']}: ")
    assert case["message"] in str(err)
    assert err.path == case.get("path")
    # Every message says how to fix it: a second sentence or a suggestion after the problem.
    reason = err.reason
    assert ". " in reason or "; " in reason or "? " in reason


def test_unsafe_tag_never_runs_code(tmp_path: Path) -> None:
    """A !!python/object/apply tag is refused with line:col and the command never runs."""
    marker = tmp_path / "pwned"
    text = f"version: 1\nbackend: !!python/object/apply:os.system ['touch {marker}']\n"
    err = raises_config_error(text)
    assert (err.line, err.col) == (2, 10)
    assert "!!python/object/apply:os.system is not allowed" in str(err)
    assert not marker.exists()


def test_big_yaml_text_fails_fast_without_parsing() -> None:
    """A YAML string over 1 MiB is refused at once with the size and the limit."""
    text = "version: 1\n" + "# x\n" * (MAX_CONFIG_BYTES // 4 + 1)
    started = time.perf_counter()
    err = raises_config_error(text)
    assert time.perf_counter() - started < 0.5
    assert "qswap reads configs of at most 1 MiB" in str(err)


def test_alias_bomb_is_refused() -> None:
    """Nested aliases that would expand to millions of values are refused with a message."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    started = time.perf_counter()
    err = raises_config_error("\n".join(lines) + "\n")
    assert time.perf_counter() - started < 1.0
    assert "holds more than 100000 values (each use of an alias counted)" in str(err)
    assert (err.line, err.col) == (5, 5)


def test_deep_nesting_is_a_config_error() -> None:
    """Runaway brackets give a ConfigError at the level that is too deep, not a RecursionError."""
    err = raises_config_error("version: " + "[" * 200 + "]" * 200 + "\n")
    assert "nested more than 64 levels deep" in str(err)
    assert (err.line, err.col) == (1, 73)  # the 64th bracket below the root mapping


def test_missing_file_and_directory_are_config_errors(tmp_path: Path) -> None:
    """A missing path or a directory is a ConfigError naming the path."""
    err = raises_config_error(tmp_path / "nope.yaml")
    assert "not found" in str(err) and "nope.yaml" in str(err)
    err = raises_config_error(tmp_path)
    assert "is a directory" in str(err)


def test_unknown_preset_name_suggests_the_nearest() -> None:
    """A bare word that is no preset, file or YAML gets a did-you-mean over preset names."""
    err = raises_config_error("x86_in8")
    assert str(err) == (
        "<string>: 'x86_in8' is not a preset, a config file or YAML text; did you mean "
        "'x86_int8'? Presets: ort_int8, qnnpack_int8, w4_packed, w4_per_group, w8_packed, w8a8_minmax, "
        "x86_dynamic_int8, "
        "x86_int8; or pass a path ending in .yaml"
    )


def test_wrong_source_type_is_a_config_error() -> None:
    """Passing something that is not a config source says what is accepted."""
    with pytest.raises(ConfigError, match="cannot load a config from int"):
        load_config(42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- pinned whole messages


def test_pinned_message_unknown_key() -> None:
    """An unknown key names the key, the suggestion and the valid keys, at the key's position."""
    err = raises_config_error("version: 1\nweight:\n  bitz: 4\n")
    assert str(err) == (
        "<string>:3:3: weight.bitz: unknown key 'bitz'; did you mean 'bits'? Remove or rename it "
        "(valid keys here: axis, bits, granularity, group_size, method, observer, quantizer, "
        "reduce_range, scheme, signed)"
    )


def test_pinned_message_unknown_observer(own_registry: Registry) -> None:
    """An unknown observer lists the registry's observers and how to register one."""
    err = raises_config_error("weight:\n  observer: mes\n", registry=own_registry)
    assert str(err) == (
        "<string>:2:13: weight.observer: unknown observer 'mes'; did you mean 'mse'? Registered "
        "observers: minmax, mse. Register your own with registry.register_observer('mes', ...) "
        "and pass registry="
    )


def test_pinned_message_rule_merged_onto_root() -> None:
    """A rule's per_group without group_size anywhere is reported at that rule, with the fix."""
    text = "version: 1\nrules:\n  - match: {type: Linear}\n    weight: {granularity: per_group}\n"
    err = raises_config_error(text)
    assert str(err) == (
        "<string>:4:27: rules[0].weight.granularity: per_group needs group_size > 0. Add e.g. "
        "'group_size: 128' next to granularity: per_group (this rule's weight is merged onto "
        "the root weight spec)"
    )


def test_pinned_message_duplicate_key() -> None:
    """A duplicate key points at the second one and says where the first was."""
    err = raises_config_error("version: 1\nbackend: fake\nbackend: x86\n")
    assert str(err) == (
        "<string>:3:1: duplicate key 'backend' (first written at line 2). YAML would silently "
        "keep only the last one; remove or merge the duplicates"
    )


def test_pinned_message_tab() -> None:
    """A tab used for indentation gets a hint to indent with spaces."""
    err = raises_config_error("version: 1\nweight:\n\tbits: 4\n")
    assert str(err) == (
        "<string>:3:1: YAML syntax error: found character '\\t' that cannot start any token. "
        "This line is indented with a tab, which YAML does not allow; indent with spaces "
        "(2 per level)"
    )


def test_several_problems_are_listed_after_the_first() -> None:
    """Independent problems are all reported, each with its own line and column."""
    err = raises_config_error("version: 1\nbackend: fake\nmode: statc\nweight: {bits: 1}\n")
    lines = str(err).splitlines()
    assert lines[0].startswith("<string>:3:7: mode: ")
    assert lines[1].startswith("  also <string>:4:16: weight.bits: bits must be between 2 and 16")
    assert (err.line, err.col, err.path) == (3, 7, "mode")


def test_dict_errors_have_a_path_but_no_line() -> None:
    """Errors in a dict config name the field path; line and column are None."""
    err = raises_config_error({"rules": [{"match": {"name": "fc"}, "weight": {"bits": 40}}]})
    assert (err.source, err.line, err.col, err.path) == (
        "<dict>",
        None,
        None,
        "rules[0].weight.bits",
    )
    assert str(err).startswith(
        "<dict>: rules[0].weight.bits: bits must be between 2 and 16, got 40"
    )


# --------------------------------------------------------------------------- cross-field checks


@pytest.mark.parametrize(
    ("fields", "path", "fragment"),
    [
        ({"granularity": "per_group"}, "granularity", "per_group needs group_size > 0"),
        (
            {"granularity": "per_group", "group_size": -4},
            "group_size",
            "group_size must be > 0, got -4",
        ),
        ({"granularity": "per_tensor", "group_size": 64}, "group_size", "group_size only applies"),
        ({"granularity": "per_channel"}, "granularity", "per_channel needs an axis"),
        (
            {"granularity": "per_tensor", "axis": 1},
            "axis",
            "axis only applies to per_channel or per_group",
        ),
        ({"bits": 17}, "bits", "bits must be between 2 and 16, got 17"),
        ({"bits": True}, "bits", "expected a whole number, got the boolean true"),
    ],
)
def test_spec_cross_field_checks(fields: dict[str, Any], path: str, fragment: str) -> None:
    """Inconsistent spec fields are errors at the field to fix, with fix-it text."""
    err = raises_config_error({"activation": fields})
    assert err.path == f"activation.{path}"
    assert fragment in str(err)


def test_per_group_may_carry_an_axis_and_reduce_range_shrinks_the_grid() -> None:
    """per_group accepts an axis; quant_range follows bits, sign and reduce_range."""
    spec = QuantSpec(granularity="per_group", group_size=32, axis=1, bits=4)
    assert spec.quant_range() == (-8, 7)
    assert QuantSpec(bits=8, signed=False, reduce_range=True).quant_range() == (0, 127)
    assert QuantSpec(bits=16).quant_range() == (-32768, 32767)
    assert QuantSpec(bits=2, signed=False).quant_range() == (0, 3)


def test_rule_patch_onto_per_channel_root_can_switch_to_per_tensor() -> None:
    """A rule switching weights to per_tensor drops the inherited axis instead of failing."""
    cfg = load_config(
        {"rules": [{"match": {"name": "fc"}, "weight": {"granularity": "per_tensor"}}]}
    )
    patch = cfg.rules[0].weight
    assert patch is not None
    merged = patch.apply_to(cfg.weight)
    assert (merged.granularity, merged.axis) == ("per_tensor", None)
    grouped = QuantSpecPatch(granularity="per_group", group_size=64).apply_to(cfg.weight)
    assert (grouped.axis, grouped.group_size) == (0, 64)


def test_rule_patch_merge_errors_point_at_the_rule() -> None:
    """A rule whose patch breaks the merged spec is reported at the rule's field."""
    err = raises_config_error(
        "weight: {granularity: per_tensor}\nrules:\n  - match: {name: fc}\n    weight: {axis: 1}\n"
    )
    assert (err.line, err.col, err.path) == (4, 20, "rules[0].weight.axis")
    assert "merged onto the root weight spec" in str(err)
    err = raises_config_error(
        "rules:\n  - match: {name: fc}\n    slots:\n      kernel: {group_size: 8}\n"
    )
    assert err.path == "rules[0].slots.kernel.group_size"


def test_apply_to_raises_config_error_with_the_field() -> None:
    """apply_to on an inconsistent result raises ConfigError naming the field."""
    with pytest.raises(ConfigError, match="per_channel needs an axis") as info:
        QuantSpecPatch(granularity="per_channel").apply_to(QuantSpec())
    assert info.value.path == "granularity"


def test_slots_merge_onto_the_matching_root_spec() -> None:
    """Parameter slots start from the weight spec, input/output slots from the activation spec."""
    assert [slot_base(s) for s in ("kernel", "bias", "k_proj.input", "out.output")] == [
        "weight",
        "weight",
        "activation",
        "activation",
    ]
    cfg = QConfig()
    assert cfg.base_spec("kernel") is cfg.weight and cfg.base_spec("input") is cfg.activation
    rule = Rule(
        match=Match(name="*"),
        activation=QuantSpecPatch(bits=4),
        output=QuantSpecPatch(signed=True),
        slots={"kernel": QuantSpecPatch(axis=1)},
    )
    assert [p.bits for p in rule.patches_for("output")] == [4, None]
    assert rule.patches_for("weight") == []
    assert [p.axis for p in rule.patches_for("kernel")] == [1]
    both = Rule(
        match=Match(name="*"),
        weight=QuantSpecPatch(bits=4),
        slots={"kernel": QuantSpecPatch(axis=1)},
    )
    assert [(p.bits, p.axis) for p in both.patches_for("kernel")] == [(4, None), (None, 1)]


def test_parameter_slots_are_checked_on_top_of_the_rules_weight() -> None:
    """A slot patch is validated after the same rule's weight patch, as the walker applies it."""
    grouped = {
        "match": {"name": "fc"},
        "weight": {"granularity": "per_group", "group_size": 64},
        "slots": {"kernel": {"group_size": 32}},
    }
    assert load_config({"rules": [grouped]}).rules[0].slots["kernel"].group_size == 32
    flat = {
        "match": {"name": "fc"},
        "weight": {"granularity": "per_tensor"},
        "slots": {"kernel": {"axis": 1}},
    }
    err = raises_config_error({"rules": [flat]})
    assert err.path == "rules[0].slots.kernel.axis"
    assert "axis only applies to per_channel or per_group" in str(err)


def test_explicit_skip_false_is_a_rule_and_survives_a_dump() -> None:
    """`skip: false` un-skips modules an earlier rule skipped; it is kept in the dump."""
    text = (
        "rules:\n  - match: {name: 'features.*'}\n    skip: true\n"
        "  - match: {name: features.3}\n    skip: false\n"
    )
    cfg = load_config(text)
    assert "skip" in cfg.rules[1].model_fields_set and not cfg.rules[1].skip
    dumped = yaml.safe_load(cfg.to_yaml())["rules"]
    assert dumped == [
        {"match": {"name": "features.*"}, "skip": True},
        {"match": {"name": "features.3"}, "skip": False},
    ]
    assert "skip" in load_config(cfg.to_yaml()).rules[1].model_fields_set


def test_models_are_frozen_and_forbid_extra_fields() -> None:
    """Configs cannot be mutated after validation and reject unknown fields in Python too."""
    cfg = QConfig()
    with pytest.raises(ValidationError):
        cfg.backend = "x86"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        QuantSpec(bitz=4)  # type: ignore[call-arg]
    assert hash(QuantSpec()) == hash(QuantSpec())
    assert hash(ComponentRef.model_validate({"name": "histogram", "bins": 512})) == hash(
        ComponentRef(name="histogram", options={"bins": 512})
    )


# --------------------------------------------------------------------------- components


def test_component_short_forms_and_dump() -> None:
    """Observers accept a name or {name, options...}, validate options, dump to the short form."""
    cfg = load_config(
        "activation:\n  observer: {name: histogram, bins: 512, method: percentile}\n"
        "weight:\n  observer: minmax\n"
    )
    assert cfg.activation.observer == ComponentRef(
        name="histogram", options={"bins": 512, "method": "percentile"}
    )
    dumped = yaml.safe_load(cfg.to_yaml())
    assert dumped["activation"]["observer"] == {
        "name": "histogram",
        "bins": 512,
        "method": "percentile",
    }
    assert dumped["weight"]["observer"] == "minmax"
    spec = QuantSpec(observer="histogram")  # type: ignore[arg-type]
    assert spec.observer == ComponentRef(name="histogram")


def test_component_options_use_the_components_own_model() -> None:
    """A histogram option out of its own range is an error from its options model, at the option."""
    err = raises_config_error("activation:\n  observer:\n    name: histogram\n    bins: 4\n")
    assert (err.line, err.col, err.path) == (4, 11, "activation.observer.bins")
    assert "observer 'histogram' option 'bins': must be at least 16, got the number 4" in str(err)


def test_custom_registry_names_are_checked(own_registry: Registry) -> None:
    """With registry=, components and backends resolve there and the default one is not used."""
    text = "backend: sim\nweight:\n  observer: {name: mse, steps: 20}\n  quantizer: log2\n"
    cfg = load_config(text, registry=own_registry)
    assert cfg.backend == "sim" and cfg.weight.observer.options == {"steps": 20}
    err = raises_config_error(text)
    assert "unknown backend 'sim'" in str(err)
    err = raises_config_error("activation: {observer: histogram}", registry=own_registry)
    assert "unknown observer 'histogram'" in str(err)
    err = raises_config_error("weight:\n  observer: {name: mse, step: 3}\n", registry=own_registry)
    assert "observer 'mse' has no option 'step'; did you mean 'steps'? Its options: steps" in str(
        err
    )
    assert load_config(cfg, registry=own_registry) == cfg


def test_validation_context_carries_the_registry(own_registry: Registry) -> None:
    """QConfig.model_validate reads the registry from the validation context key "registry"."""
    cfg = QConfig.model_validate({"backend": "sim"}, context={"registry": own_registry})
    assert cfg.backend == "sim"
    with pytest.raises(ValidationError, match="unknown backend 'sim'"):
        QConfig.model_validate({"backend": "sim"})


# --------------------------------------------------------------------------- match


class _Block(torch.nn.Module):
    class Inner(torch.nn.Module):
        pass


class _MyConv(torch.nn.Conv2d):
    pass


@pytest.mark.parametrize(
    ("match", "name", "module", "expected"),
    [
        ({"name": "features.*"}, "features.0", torch.nn.ReLU(), True),
        ({"name": "features.*"}, "classifier.0", torch.nn.ReLU(), False),
        ({"name": "features.?"}, "features.10", torch.nn.ReLU(), False),
        ({"name": "Features.*"}, "features.0", torch.nn.ReLU(), False),
        ({"regex": r"layer\d\.\d\.conv[12]"}, "layer1.0.conv2", torch.nn.ReLU(), True),
        ({"regex": r"layer\d"}, "layer1.0.conv2", torch.nn.ReLU(), False),
        ({"type": "Conv2d"}, "x", torch.nn.Conv2d(1, 1, 1), True),
        ({"type": "torch.nn.Conv2d"}, "x", torch.nn.Conv2d(1, 1, 1), True),
        ({"type": "torch.nn.modules.conv.Conv2d"}, "x", torch.nn.Conv2d(1, 1, 1), True),
        ({"type": "torch.nn.Conv1d"}, "x", torch.nn.Conv2d(1, 1, 1), False),
        ({"type": "torch.ao.nn.Conv2d"}, "x", torch.nn.Conv2d(1, 1, 1), False),
        ({"type": "Conv2d"}, "x", _MyConv(1, 1, 1), False),
        ({"type": "_MyConv"}, "x", _MyConv(1, 1, 1), True),
        ({"type": "_Block.Inner"}, "x", _Block.Inner(), True),
        ({"type": f"{__name__}._Block.Inner"}, "x", _Block.Inner(), True),
        ({"type": "Inner"}, "x", _Block.Inner(), True),
        ({"name": "fc", "type": "Linear"}, "fc", torch.nn.Linear(1, 1), True),
        ({"name": "fc", "type": "Linear"}, "fc", torch.nn.ReLU(), False),
        ({"name": "fc", "regex": "f.*", "type": "Linear"}, "fc2", torch.nn.Linear(1, 1), False),
    ],
)
def test_match_compares_names_and_class_names_as_strings(
    match: dict[str, str], name: str, module: torch.nn.Module, expected: bool
) -> None:
    """Match needs every given key: glob and regex on the dotted path, type on class names."""
    assert Match.model_validate(match).matches(name, module) is expected


# --------------------------------------------------------------------------- extends


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_extends_merges_depth_first_and_concatenates_rules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Child keys override parents recursively, rules run parent first, paths are file-relative."""
    _write(
        tmp_path / "base" / "grand.yaml",
        "version: 1\nextends: [x86_int8]\nweight: {bits: 6}\n"
        "rules:\n  - match: {name: stem}\n    skip: true\n",
    )
    _write(
        tmp_path / "base" / "parent.yaml",
        "version: 1\nextends: [grand.yaml]\nactivation: {bits: 7}\n"
        "rules:\n  - match: {name: head}\n    weight: {bits: 4}\n",
    )
    child = _write(
        tmp_path / "child.yaml",
        "version: 1\nextends: [base/parent.yaml]\nactivation: {observer: minmax}\n"
        "rules:\n  - match: {name: fc}\n    skip: true\n",
    )
    monkeypatch.chdir(REPO)  # relative paths start at the extending file, not the cwd
    cfg = load_config(child)
    assert cfg.extends == []
    assert cfg.backend == "x86"
    assert (cfg.weight.bits, cfg.weight.granularity) == (6, "per_channel")
    assert (cfg.activation.bits, cfg.activation.observer.name, cfg.activation.reduce_range) == (
        7,
        "minmax",
        True,
    )
    assert [r.match.name for r in cfg.rules] == ["stem", "head", "fc"]
    assert load_config(cfg.to_yaml()) == cfg


def test_later_parents_override_earlier_ones_and_diamonds_are_no_cycle(tmp_path: Path) -> None:
    """With several parents the later wins; two parents sharing a grandparent is fine."""
    _write(tmp_path / "a.yaml", "extends: [w8a8_minmax]\nweight: {bits: 4}\n")
    _write(tmp_path / "b.yaml", "extends: [w8a8_minmax]\nweight: {bits: 6}\nbackend: x86\n")
    cfg = load_config(_write(tmp_path / "c.yaml", "extends: [a.yaml, b.yaml]\n"))
    assert (cfg.weight.bits, cfg.backend) == (6, "x86")
    # a.yaml arrives fully resolved, so its own parent's backend (fake) overrides b's x86.
    cfg = load_config(_write(tmp_path / "d.yaml", "extends: [b.yaml, a.yaml]\n"))
    assert (cfg.weight.bits, cfg.backend) == (4, "fake")


def test_extends_switching_granularity_drops_inherited_axis() -> None:
    """A child that sets per_tensor weights on top of x86_int8 does not inherit axis 0."""
    cfg = load_config({"extends": ["x86_int8"], "weight": {"granularity": "per_tensor"}})
    assert (cfg.weight.granularity, cfg.weight.axis) == ("per_tensor", None)
    cfg = load_config({"extends": ["w4_per_group"], "weight": {"granularity": "per_channel"}})
    assert (cfg.weight.granularity, cfg.weight.axis, cfg.weight.group_size) == (
        "per_channel",
        0,
        None,
    )


def test_extends_merges_component_options_only_for_the_same_component(tmp_path: Path) -> None:
    """Same observer name merges options; another name replaces the parent's observer whole."""
    _write(tmp_path / "parent.yaml", "activation:\n  observer: {name: histogram, bins: 512}\n")
    same = load_config(
        _write(
            tmp_path / "same.yaml",
            "extends: [parent.yaml]\n"
            "activation:\n  observer: {name: histogram, method: percentile}\n",
        )
    )
    assert same.activation.observer.options == {"bins": 512, "method": "percentile"}
    other = load_config(
        _write(
            tmp_path / "other.yaml",
            "extends: [parent.yaml]\nactivation:\n  observer: {name: moving_average_minmax}\n",
        )
    )
    assert other.activation.observer == ComponentRef(name="moving_average_minmax")


def test_extends_chain_error_in_parent_points_into_the_parent(tmp_path: Path) -> None:
    """A bad value inherited from a parent file is reported at the parent's line."""
    _write(tmp_path / "parent.yaml", "version: 1\nactivation:\n  bits: 99\n")
    err = raises_config_error(_write(tmp_path / "child.yaml", "extends: [parent.yaml]\n"))
    assert Path(err.source or "").name == "parent.yaml" and (err.line, err.col) == (3, 9)


def test_extends_in_a_dict_is_relative_to_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dict or string config resolves relative extends paths from the current directory."""
    _write(tmp_path / "base.yaml", "backend: qnnpack\n")
    monkeypatch.chdir(tmp_path)
    assert load_config({"extends": ["base.yaml"]}).backend == "qnnpack"
    err = raises_config_error({"extends": ["nope.yaml"]})
    assert err.path == "extends[0]" and "not found" in str(err)


def test_qconfig_with_extends_is_resolved_on_load() -> None:
    """A QConfig built in Python with extends resolves them in load_config."""
    cfg = QConfig(extends=["qnnpack_int8"], mode="dynamic")
    loaded = load_config(cfg)
    assert (loaded.backend, loaded.mode, loaded.extends) == ("qnnpack", "dynamic", [])


# --------------------------------------------------------------------------- schema


def test_json_schema_describes_the_config_as_users_write_it() -> None:
    """The schema accepts every example and preset, and rejects unknown keys and bad short forms."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = config_json_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["additionalProperties"] is False
    validator = jsonschema.Draft202012Validator(schema)
    for path in PRESET_FILES + EXAMPLE_CONFIGS:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if data.get("fusion") is False:
            data["fusion"] = "off"
        assert not list(validator.iter_errors(data)), path
    assert list(validator.iter_errors({"weight": {"bitz": 4}}))
    assert list(validator.iter_errors({"weight": {"observer": {"bins": 4}}}))
    assert json.loads(json.dumps(schema)) == schema


def test_dump_config_is_to_yaml_and_loaded_configs_drop_extends() -> None:
    """dump_config writes the resolved config: no extends, every root field spelled out."""
    cfg = load_config(REPO / "examples" / "configs" / "vgg_x86.yaml")
    text = dump_config(cfg)
    assert text == cfg.to_yaml()
    data = yaml.safe_load(text)
    assert "extends" not in data
    assert list(data) == [
        "version",
        "backend",
        "mode",
        "fusion",
        "bias_correction",
        "activation",
        "weight",
        "rules",
        "strict",
    ]
    assert data["bias_correction"] is True  # from the x86_int8 preset it extends
    assert data["rules"] == [
        {"match": {"name": "features.0", "type": "Conv2d"}, "skip": True},
        {"match": {"name": "classifier.1", "type": "torch.nn.Linear"}, "skip": True},
    ]


# ------------------------------------------------------------------------ round trips (hypothesis)

_IDENT = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,7}", fullmatch=True)
_DOTTED = st.lists(_IDENT, min_size=1, max_size=3).map(".".join)
_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs")),
    min_size=1,
    max_size=12,
)
_OBSERVERS = st.one_of(
    st.sampled_from(["minmax", "per_channel_minmax", "histogram", "moving_average_minmax"]),
    st.fixed_dictionaries(
        {"name": st.just("histogram")},
        optional={
            "bins": st.sampled_from([16, 256, 2048]),
            "method": st.sampled_from(["mse", "percentile"]),
            "percentile": st.sampled_from([99.0, 99.9, 99.99]),
        },
    ),
    st.fixed_dictionaries(
        {"name": st.just("moving_average_minmax")},
        optional={"averaging_constant": st.floats(0.001, 1.0)},
    ),
)


@st.composite
def _layout(draw: st.DrawFn) -> dict[str, Any]:
    granularity = draw(st.sampled_from(["per_tensor", "per_channel", "per_group"]))
    out: dict[str, Any] = {"granularity": granularity}
    if granularity == "per_channel":
        out["axis"] = draw(st.integers(-4, 3))
    if granularity == "per_group":
        out["group_size"] = draw(st.integers(1, 512))
        if draw(st.booleans()):
            out["axis"] = draw(st.integers(-4, 3))
    return out


_PLAIN_FIELDS = {
    "bits": st.integers(2, 16),
    "signed": st.booleans(),
    "scheme": st.sampled_from(["symmetric", "affine"]),
    "reduce_range": st.booleans(),
    "observer": _OBSERVERS,
    "quantizer": st.just("affine"),
}


@st.composite
def _spec(draw: st.DrawFn, partial: bool) -> dict[str, Any]:
    fields = draw(st.fixed_dictionaries({}, optional=_PLAIN_FIELDS))
    if not partial or draw(st.booleans()):
        fields.update(draw(_layout()))
    return fields


@st.composite
def _rule(draw: st.DrawFn) -> dict[str, Any]:
    match = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "name": _TEXT,
                "regex": st.one_of(
                    st.sampled_from([r"layer\d+\..*", "fc|head", ".*"]), _TEXT.map(re.escape)
                ),
                "type": _DOTTED,
            },
        ).filter(bool)
    )
    if draw(st.booleans()):
        return {"match": match, "skip": True}
    explicit = {"skip": False} if draw(st.booleans()) else {}
    patch = _spec(partial=True).filter(bool)
    overrides = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "weight": patch,
                "activation": patch,
                "input": patch,
                "output": patch,
                "slots": st.dictionaries(
                    _DOTTED.filter(lambda s: s not in ("weight", "activation", "input", "output")),
                    patch,
                    min_size=1,
                    max_size=2,
                ),
            },
        ).filter(lambda overrides: bool(overrides or explicit))
    )
    return {"match": match, **explicit, **overrides}


@st.composite
def _fusion(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["auto", "off", "groups"]))
    if kind != "groups":
        return kind
    names = draw(st.lists(_DOTTED, min_size=2, max_size=6, unique=True))
    cut = draw(st.integers(0, len(names) - 2)) if len(names) >= 4 else 0
    groups = [names[:2], names[2:]] if cut and len(names[2:]) >= 2 else [names]
    return groups


@st.composite
def _config(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "version": 1,
        "backend": draw(st.sampled_from(["fake", "x86", "qnnpack"])),
        "mode": draw(st.sampled_from(["static", "dynamic", "weight_only", "qat"])),
        "fusion": draw(_fusion()),
        "activation": draw(_spec(partial=False)),
        "weight": draw(_spec(partial=False)),
        "rules": draw(st.lists(_rule(), max_size=4)),
        "strict": draw(st.booleans()),
    }


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_config())
def test_dump_load_round_trip_is_exact(data: dict[str, Any]) -> None:
    """Any valid config dumps to YAML that loads back equal, and dumping again is stable."""
    cfg = load_config(data)
    text = cfg.to_yaml()
    again = load_config(text)
    assert again == cfg
    assert again.to_yaml() == text
    assert load_config(yaml.safe_load(text)) == cfg
    assert [_explicit(r) for r in again.rules] == [_explicit(r) for r in cfg.rules]


def _explicit(rule: Rule) -> list[Any]:
    """What a rule sets explicitly (the walker's cascade reads it): skip, and non-None patch fields."""
    patches = [rule.weight, rule.activation, rule.input, rule.output, *rule.slots.values()]
    return ["skip" in rule.model_fields_set] + [
        None if p is None else sorted(k for k in p.model_fields_set if getattr(p, k) is not None)
        for p in patches
    ]


def test_type_match_sees_through_parametrize() -> None:
    """`type: Linear` matches a Linear that carries a parametrization (e.g. weight_norm)."""
    import torch
    from torch.nn.utils import parametrizations

    layer = parametrizations.weight_norm(torch.nn.Linear(2, 2))
    assert type(layer).__name__ != "Linear"
    assert Match(type="Linear").matches("fc", layer)
    assert Match(type="torch.nn.Linear").matches("fc", layer)
    assert not Match(type="Conv2d").matches("fc", layer)
