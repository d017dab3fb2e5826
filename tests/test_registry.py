"""The scoped registry: contracts, scoping, freezing, duplicates, lookup, packs, plugins."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from qswap.exceptions import (
    ConfigError,
    FrozenRegistryError,
    NotRegisteredError,
    PlanError,
    PluginError,
    RegistrationError,
)
from qswap.pack import display_path, pack_json_schema, read_pack
from qswap.registry import (
    Backend,
    ComponentEntry,
    FusionPattern,
    MappingEntry,
    Registry,
    default_registry,
    qualified_name,
    registration_template,
    registry_data_dir,
)

HERE = Path(__file__).name
PLUGIN_DIST = Path(__file__).resolve().parent / "plugin_dist"


# --------------------------------------------------------------------------- fixtures


class MyConv(nn.Conv2d):
    """A subclass that keeps Conv2d's forward."""


class MyConvWithForward(nn.Conv2d):
    """A subclass that changes what forward computes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class GrandChildConv(MyConvWithForward):
    """Inherits the overridden forward."""


class QConv(nn.Module):
    """A counterpart honouring the contract."""

    @classmethod
    def from_float(cls, module: nn.Module, spec: Any) -> QConv:
        return cls()


class QConvOther(nn.Module):
    """A second counterpart."""

    @staticmethod
    def from_float(module: nn.Module, spec: Any) -> nn.Module:
        return nn.Identity()


class NoFromFloat(nn.Module):
    """Lacks from_float."""


class InstanceFromFloat(nn.Module):
    """from_float is an instance method."""

    def from_float(self, module: nn.Module, spec: Any) -> nn.Module:
        return self


class OneArgFromFloat(nn.Module):
    """from_float takes only the module."""

    @classmethod
    def from_float(cls, module: nn.Module) -> nn.Module:
        return cls()


class Options(BaseModel):
    """Options of the test quantizer."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    levels: int = 4


class DuckQuantizer(nn.Module):
    """Implements the quantizer protocol without subclassing it."""

    options_model: ClassVar[type[BaseModel]] = Options

    def __init__(self, spec: Any, options: BaseModel | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.options = options

    def set_qparams(self, qparams: Any) -> None:
        self.qparams = qparams

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)


class DuckObserver(nn.Module):
    """Implements the observer protocol without subclassing it."""

    options_model: ClassVar[type[BaseModel]] = Options

    def __init__(self, spec: Any, options: BaseModel | None = None) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def calculate_qparams(self) -> Any:
        return None

    def merge(self, other: Any) -> None:
        return None


def fuse_pair(a: nn.Module, b: nn.Module) -> nn.Module:
    """A fuser returning a module."""
    return nn.Sequential(a, b)


def fuse_to_int(a: nn.Module, b: nn.Module) -> Any:
    """A broken fuser returning a number."""
    return 3


def _line_of(text: str, path: Path = Path(__file__)) -> int:
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if text in line:
            return i
    raise AssertionError(text)


# --------------------------------------------------------------------------- mappings


def test_decorator_and_call_register_and_return_the_counterpart_unchanged() -> None:
    """Both forms register the mapping, return the class itself and record file:line."""
    reg = Registry("t")

    @reg.register_mapping(nn.Conv2d, backend="fake")  # decorator-site
    class QDecorated(nn.Module):
        @classmethod
        def from_float(cls, module: nn.Module, spec: Any) -> nn.Module:
            return cls()

    returned = reg.register_mapping(nn.Linear, QConv, backend="fake", slots={"weight": 0})
    assert returned is QConv
    assert QDecorated.__name__ == "QDecorated" and isinstance(QDecorated, type)
    entry = reg.find_mapping(nn.Conv2d, "fake")
    assert entry is not None and entry.counterpart is QDecorated
    assert entry.origin.endswith(f"{HERE}:{_line_of('# decorator-site')}")
    assert entry.slots == {"weight": 0} and entry.subclasses is False
    linear = reg.find_mapping(nn.Linear, "fake")
    assert linear == MappingEntry(
        nn.Linear,
        QConv,
        "fake",
        False,
        {"weight": 0},
        f"{display_path(__file__)}:{_line_of('returned = ')}",
    )
    assert reg.find_mapping(nn.Linear, "x86") is None


def test_counterpart_without_from_float_is_refused_with_the_fix() -> None:
    """A class lacking from_float(module, spec) is refused at registration, naming the fix."""
    reg = Registry("t")
    with pytest.raises(RegistrationError) as info:
        reg.register_mapping(nn.Conv2d, NoFromFloat)
    msg = str(info.value)
    assert (
        "test_registry.NoFromFloat cannot be registered as the counterpart of torch.nn.Conv2d"
        in msg
    )
    assert "it has no from_float(module, spec)" in msg
    assert "@classmethod\n    def from_float(cls, module, spec) -> torch.nn.Module: ..." in msg
    assert reg.find_mapping(nn.Conv2d, "fake") is None


@pytest.mark.parametrize(
    ("counterpart", "expected"),
    [
        (InstanceFromFloat, "from_float must be a classmethod (or staticmethod)"),
        (OneArgFromFloat, "from_float must accept two arguments (module, spec)"),
        (QConv(), "a counterpart must be a class"),
    ],
)
def test_counterpart_contract_violations_are_named(counterpart: Any, expected: str) -> None:
    """An instance-method from_float, a one-argument from_float and a non-class are all refused."""
    with pytest.raises(RegistrationError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        Registry("t").register_mapping(nn.Conv2d, counterpart)


def test_staticmethod_counterpart_is_accepted() -> None:
    """A staticmethod from_float(module, spec) satisfies the contract."""
    reg = Registry("t")
    reg.register_mapping(nn.Conv2d, QConvOther)
    assert reg.find_mapping(nn.Conv2d, "fake").counterpart is QConvOther  # type: ignore[union-attr]


@pytest.mark.parametrize("key", ["torch.nn.Conv2d", nn.Conv2d(1, 1, 1), int])
def test_mapping_key_must_be_a_module_class(key: Any) -> None:
    """Strings, instances and non-module classes are refused as keys."""
    with pytest.raises(RegistrationError, match="the key must be a torch.nn.Module subclass"):
        Registry("t").register_mapping(key, QConv)


@pytest.mark.parametrize(
    ("slots", "expected"),
    [
        ({"weight": "0"}, "needs an integer channel axis"),
        ({"bad name": 0}, "is not a parameter-like"),
    ],
)
def test_bad_slots_are_refused(slots: Any, expected: str) -> None:
    """Slot axes must be ints and slot names parameter-like."""
    with pytest.raises(RegistrationError, match=expected):
        Registry("t").register_mapping(nn.Conv2d, QConv, slots=slots)


def test_duplicate_mapping_names_both_sites_and_replace_overrides() -> None:
    """A second mapping for the same class and backend raises naming both definitions."""
    reg = Registry("t")
    reg.register_mapping(nn.Conv2d, QConv)  # first-site
    with pytest.raises(RegistrationError) as info:
        reg.register_mapping(nn.Conv2d, QConvOther)  # second-site
    msg = str(info.value)
    assert "torch.nn.Conv2d already has a 'fake' mapping in registry 't'" in msg
    assert f"{HERE}:{_line_of('# first-site')}" in msg
    assert f"{HERE}:{_line_of('# second-site')}" in msg
    assert "Pass replace=True" in msg
    reg.register_mapping(nn.Conv2d, QConvOther, replace=True)
    assert reg.find_mapping(nn.Conv2d, "fake").counterpart is QConvOther  # type: ignore[union-attr]
    reg.register_mapping(nn.Conv2d, QConv, backend="x86")  # other backend: no clash
    assert reg.find_mapping(nn.Conv2d, "x86").counterpart is QConv  # type: ignore[union-attr]


# --------------------------------------------------------------------------- lookup


def test_subclasses_match_only_when_registered_with_subclasses_true() -> None:
    """Exact type first; a subclass matches its base only with subclasses=True."""
    reg = Registry("t")
    reg.register_mapping(nn.Conv2d, QConv)
    assert reg.find_mapping(MyConv, "fake") is None
    reg.register_mapping(nn.Conv2d, QConv, subclasses=True, replace=True)
    entry = reg.find_mapping(MyConv, "fake")
    assert entry is not None and entry.float_cls is nn.Conv2d
    reg.register_mapping(MyConv, QConvOther)
    assert reg.find_mapping(MyConv, "fake").counterpart is QConvOther  # type: ignore[union-attr]


def test_subclass_overriding_forward_never_matches_its_parent() -> None:
    """A subclass (or grandchild) that overrides forward is refused even with subclasses=True."""
    reg = Registry("t")
    reg.register_mapping(nn.Conv2d, QConv, subclasses=True)
    assert reg.find_mapping(MyConvWithForward, "fake") is None
    assert reg.find_mapping(GrandChildConv, "fake") is None
    text = reg.explain(GrandChildConv, "fake")
    assert "GrandChildConv overrides forward (in MyConvWithForward, " in text
    assert f"{HERE}:{_line_of('class MyConvWithForward(nn.Conv2d):')}" in text
    assert "register a mapping for GrandChildConv itself" in text


def test_explain_says_what_matched_and_what_almost_did() -> None:
    """explain reports exact and subclass matches, near misses and a paste-ready template."""
    reg = Registry("t")
    reg.register_mapping(nn.Conv2d, QConv)  # explain-site
    exact = reg.explain(nn.Conv2d, "fake").splitlines()
    assert exact == [
        "torch.nn.Conv2d in registry 't':",
        (
            "  backend 'fake': matched exactly -> test_registry.QConv (registry 't', "
            f"{display_path(__file__)}:{_line_of('# explain-site')})"
        ),
        "    slots: weight (axis 0)",
    ]
    near = reg.explain(MyConv, "fake")
    assert "backend 'fake': no mapping" in near
    assert "almost: base torch.nn.Conv2d has an entry" in near
    assert "registered without subclasses=True" in near
    assert "from test_registry import MyConv\n" in near
    assert '@reg.register_mapping(MyConv, backend="fake")' in near
    reg.register_mapping(nn.Conv2d, QConv, subclasses=True, replace=True)
    via = reg.explain(MyConv, "fake")
    assert "matched via base torch.nn.Conv2d (registered with subclasses=True" in via


def test_explain_notes_a_same_named_class_and_fusions() -> None:
    """explain warns when a different class with the same name is registered, and lists fusions."""
    reg = Registry("t")
    reg.register_mapping(nn.Conv2d, QConv)
    reg.register_fusion((nn.Conv2d, nn.ReLU), fuse_pair)
    lookalike = type("Conv2d", (nn.Module,), {"forward": lambda self, x: x})
    text = reg.explain(lookalike)
    assert "a different class with the same name is registered: torch.nn.Conv2d" in text
    fusions = reg.explain(nn.Conv2d)
    assert "fusion patterns containing it:" in fusions
    assert "(Conv2d, ReLU) -> test_registry.fuse_pair" in fusions


def test_lookup_of_a_non_class_is_a_type_error() -> None:
    """find_mapping and explain want classes and say to pass type(module)."""
    reg = Registry("t")
    with pytest.raises(TypeError, match=r"pass type\(module\)"):
        reg.find_mapping(nn.Conv2d(1, 1, 1), "fake")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"pass type\(module\)"):
        reg.explain("Conv2d")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- scoping


def test_child_reads_fall_through_and_writes_stay_local() -> None:
    """A child sees its parent's entries; the parent and a sibling never see the child's."""
    parent = Registry("parent")
    parent.register_mapping(nn.Conv2d, QConv)
    parent.register_backend("sim")
    child = Registry("child", parent=parent)
    sibling = Registry("sibling", parent=parent)
    assert child.find_mapping(nn.Conv2d, "fake").counterpart is QConv  # type: ignore[union-attr]
    assert child.backend("sim").name == "sim"
    child.register_mapping(nn.Linear, QConv)
    child.register_quantizer("round", DuckQuantizer)
    assert parent.find_mapping(nn.Linear, "fake") is None
    assert sibling.find_mapping(nn.Linear, "fake") is None
    with pytest.raises(NotRegisteredError):
        sibling.quantizer("round")
    assert child.quantizer("round").cls is DuckQuantizer
    # A child may shadow its parent's entry without replace=True; the parent keeps its own.
    child.register_mapping(nn.Conv2d, QConvOther)
    assert child.find_mapping(nn.Conv2d, "fake").counterpart is QConvOther  # type: ignore[union-attr]
    assert parent.find_mapping(nn.Conv2d, "fake").counterpart is QConv  # type: ignore[union-attr]
    assert child.list("mapping:*") == [
        "mapping:fake:torch.nn.Conv2d",
        "mapping:fake:torch.nn.Linear",
    ]
    assert parent.list("mapping:*") == ["mapping:fake:torch.nn.Conv2d"]


def test_exact_parent_entry_beats_child_subclass_entry() -> None:
    """Exact type wins over a subclass match even when the subclass entry is in the child."""
    parent = Registry("parent")
    parent.register_mapping(MyConv, QConvOther)
    child = Registry("child", parent=parent)
    child.register_mapping(nn.Conv2d, QConv, subclasses=True)
    assert child.find_mapping(MyConv, "fake").counterpart is QConvOther  # type: ignore[union-attr]


def test_two_independent_registries_never_see_each_other() -> None:
    """Writes to one root registry are invisible in another."""
    a, b = Registry("a"), Registry("b")
    a.register_mapping(nn.Conv2d, QConv)
    a.register_backend("only_a")
    assert b.find_mapping(nn.Conv2d, "fake") is None
    assert b.names("backend") == []
    assert b.list() == []


def test_registry_constructor_checks_its_arguments() -> None:
    """A registry needs a name and a Registry (or None) as parent."""
    with pytest.raises(RegistrationError, match="non-empty name"):
        Registry("")
    with pytest.raises(RegistrationError, match="must be a Registry or None"):
        Registry("x", parent="default")  # type: ignore[arg-type]
    assert repr(Registry("x", parent=Registry("p"))) == "Registry('x', parent='p')"


# --------------------------------------------------------------------------- freezing


def test_every_write_to_a_frozen_registry_raises_with_the_fix(tmp_path: Path) -> None:
    """All write methods refuse and say how to make a child; the child stays writable."""
    reg = Registry("base")
    reg.register_mapping(nn.Conv2d, QConv)
    reg.freeze()
    assert reg.frozen
    pack = tmp_path / "p.yaml"
    pack.write_text("version: 1\n")
    writes = [
        lambda: reg.register_mapping(nn.Linear, QConv),
        lambda: reg.register_mapping(nn.Linear)(QConv),
        lambda: reg.register_fusion((nn.Conv2d, nn.ReLU), fuse_pair),
        lambda: reg.register_quantizer("q", DuckQuantizer),
        lambda: reg.register_observer("o", DuckObserver),
        lambda: reg.register_backend("b"),
        lambda: reg.load_pack(pack),
        lambda: reg.load_plugins(),
    ]
    for write in writes:
        with pytest.raises(FrozenRegistryError) as info:
            write()
        assert "registry 'base' is frozen" in str(info.value)
        assert 'qswap.Registry("mine", parent=' in str(info.value)
    child = Registry("mine", parent=reg)
    child.register_mapping(nn.Linear, QConv)
    assert child.find_mapping(nn.Conv2d, "fake") is not None
    assert reg.find_mapping(nn.Linear, "fake") is None


# --------------------------------------------------------------------------- fusion


def test_fusion_patterns_register_by_call_and_decorator_longest_first() -> None:
    """Fusion patterns come back child-over-parent, longest first; decorators return the fuser."""
    parent = Registry("parent")
    parent.register_fusion((nn.Conv2d, nn.ReLU), fuse_pair)
    child = Registry("child", parent=parent)

    @child.register_fusion((nn.Conv2d, nn.BatchNorm2d, nn.ReLU))
    def fuse_three(a: nn.Module, b: nn.Module, c: nn.Module) -> nn.Module:
        return nn.Sequential(a, b, c)

    child.register_fusion((nn.Conv2d, nn.ReLU), fuse_to_int)
    patterns = child.fusion_patterns()
    assert [p.types for p in patterns] == [
        (nn.Conv2d, nn.BatchNorm2d, nn.ReLU),
        (nn.Conv2d, nn.ReLU),
    ]
    assert patterns[0].fuser is fuse_three and patterns[1].fuser is fuse_to_int
    assert parent.fusion_patterns()[0].fuser is fuse_pair
    fused = patterns[0].fuse(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1), nn.ReLU())
    assert isinstance(fused, nn.Sequential) and len(fused) == 3


def test_a_fuser_returning_a_non_module_fails_on_first_use_naming_the_entry() -> None:
    """FusionPattern.fuse raises RegistrationError naming the pattern, fuser and origin."""
    reg = Registry("t")
    reg.register_fusion((nn.Conv2d, nn.ReLU), fuse_to_int)  # bad-fuser-site
    pattern = reg.fusion_patterns()[0]
    with pytest.raises(RegistrationError) as info:
        pattern.fuse(nn.Conv2d(1, 1, 1), nn.ReLU())
    assert str(info.value) == (
        f"fusion pattern (Conv2d, ReLU) registered at {pattern.origin}: its fuser "
        "test_registry.fuse_to_int returned int, not a torch.nn.Module; make the fuser return "
        "the fused module"
    )
    assert pattern.origin.endswith(f"{HERE}:{_line_of('# bad-fuser-site')}")
    with pytest.raises(PlanError, match="takes 2 modules, got 1"):
        pattern.fuse(nn.ReLU())


@pytest.mark.parametrize(
    ("types", "fuser", "expected"),
    [
        ((nn.Conv2d,), fuse_pair, "tuple of two or more torch.nn.Module classes"),
        (("Conv2d", "ReLU"), fuse_pair, "tuple of two or more torch.nn.Module classes"),
        ((nn.Conv2d, nn.ReLU), "fuse_pair", "must be callable"),
        ((nn.Conv2d, nn.BatchNorm2d, nn.ReLU), fuse_pair, "must accept 3 modules"),
    ],
)
def test_bad_fusion_registrations_are_refused(types: Any, fuser: Any, expected: str) -> None:
    """Short or non-class type tuples, non-callables and wrong-arity fusers are refused."""
    with pytest.raises(RegistrationError, match=expected):
        Registry("t").register_fusion(types, fuser)


def test_duplicate_fusion_raises_unless_replace() -> None:
    """Registering the same type tuple twice names both sites."""
    reg = Registry("t")
    reg.register_fusion((nn.Conv2d, nn.ReLU), fuse_pair)
    with pytest.raises(RegistrationError, match=r"fusion pattern \(Conv2d, ReLU\) is already"):
        reg.register_fusion((nn.Conv2d, nn.ReLU), fuse_to_int)
    reg.register_fusion((nn.Conv2d, nn.ReLU), fuse_to_int, replace=True)
    assert reg.fusion_patterns()[0].fuser is fuse_to_int


# --------------------------------------------------------------------------- components


def test_duck_typed_components_register_and_create_with_validated_options() -> None:
    """Protocol-conforming classes register; create() validates options with their own model."""
    reg = Registry("t")
    assert reg.register_quantizer("round", DuckQuantizer) is DuckQuantizer

    @reg.register_observer("duck")
    class Obs(DuckObserver):
        pass

    assert Obs.__name__ == "Obs"
    entry = reg.quantizer("round")
    assert isinstance(entry, ComponentEntry) and entry.options_model is Options
    q = entry.create("spec", {"levels": 8})  # type: ignore[arg-type]
    assert isinstance(q, DuckQuantizer) and q.options == Options(levels=8)
    assert torch.equal(q(torch.tensor([0.4, 1.6])), torch.tensor([0.0, 2.0]))
    with pytest.raises(ConfigError) as info:
        entry.create("spec", {"level": 8})  # type: ignore[arg-type]
    assert "invalid options for quantizer 'round': level: Extra inputs are not permitted" in str(
        info.value
    )
    assert "(its options are: levels)" in str(info.value)
    assert reg.observer("duck").cls is Obs
    assert reg.names("quantizer") == ["round"] and reg.names("observer") == ["duck"]


class _NoSetQparams(nn.Module):
    options_model = Options

    def __init__(self, spec: Any, options: Any = None) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _NoForward(DuckQuantizer):
    forward = nn.Module.forward  # type: ignore[assignment]


class _BadOptions(DuckQuantizer):
    options_model = dict  # type: ignore[assignment]


class _BadInit(DuckQuantizer):
    def __init__(self) -> None:
        super().__init__(None)


class _NotAModule:
    options_model = Options

    def forward(self, x: Any) -> Any:
        return x

    def set_qparams(self, q: Any) -> None:
        pass


@pytest.mark.parametrize(
    ("kind", "cls", "expected"),
    [
        ("quantizer", _NoSetQparams, "it lacks set_qparams; subclass qswap.quantizers.Quantizer"),
        ("quantizer", _NoForward, "it lacks forward;"),
        ("quantizer", _BadOptions, "options_model must be a pydantic BaseModel subclass"),
        ("quantizer", _BadInit, "must be constructible as _BadInit(spec, options)"),
        ("quantizer", _NotAModule, "must be a torch.nn.Module subclass"),
        (
            "observer",
            DuckQuantizer,
            "it lacks calculate_qparams, merge; subclass qswap.observers.Observer",
        ),
        ("observer", lambda x: x, "a plain function fn(x) -> x can be registered as a quantizer"),
    ],
)
def test_component_protocol_violations_are_refused(kind: str, cls: Any, expected: str) -> None:
    """Components missing protocol methods, a model or a (spec, options) constructor are refused."""
    reg = Registry("t")
    with pytest.raises(RegistrationError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        getattr(reg, f"register_{kind}")("x", cls)


def test_component_lookup_suggests_the_nearest_name() -> None:
    """An unknown quantizer, observer or backend gets NotRegisteredError with did-you-mean."""
    reg = Registry("t")
    reg.register_quantizer("affine", DuckQuantizer)
    reg.register_backend("fake")
    with pytest.raises(NotRegisteredError) as info:
        reg.quantizer("afine")
    assert str(info.value) == (
        "no quantizer named 'afine' in registry 't'; did you mean 'affine'? Registered: affine. "
        "Add one with @reg.register_quantizer('afine')"
    )
    with pytest.raises(NotRegisteredError, match="did you mean 'fake'"):
        reg.backend("fakee")
    with pytest.raises(NotRegisteredError, match="Registered: none"):
        reg.observer("minmax")
    with pytest.raises(ValueError, match="unknown kind 'mapping'"):
        reg.names("mapping")


def test_duplicate_component_names_both_sites() -> None:
    """A second quantizer with the same name raises naming the first definition."""
    reg = Registry("t")
    reg.register_quantizer("q", DuckQuantizer)  # q-first
    with pytest.raises(RegistrationError) as info:
        reg.register_quantizer("q", DuckQuantizer)
    assert f"{HERE}:{_line_of('# q-first')}" in str(info.value)
    assert "Pass replace=True to override it, or pick another name" in str(info.value)
    with pytest.raises(RegistrationError, match="the name must start with a letter"):
        reg.register_quantizer("bad name", DuckQuantizer)


def test_subclass_of_the_base_classes_must_implement_the_hooks() -> None:
    """A Quantizer/Observer subclass that leaves forward/observe unimplemented is refused."""
    from qswap.observers import Observer
    from qswap.quantizers import Quantizer

    class Lazy(Quantizer):
        pass

    class HalfObserver(Observer):
        def observe(self, x: torch.Tensor) -> None:
            pass

    reg = Registry("t")
    with pytest.raises(RegistrationError, match="it does not implement forward"):
        reg.register_quantizer("lazy", Lazy)
    with pytest.raises(
        RegistrationError, match="it does not implement calculate_qparams, _merge_state"
    ):
        reg.register_observer("half", HalfObserver)


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x)


def test_plain_function_quantizer_is_wrapped_in_an_adapter() -> None:
    """register_quantizer(name, fn) builds a quantizer applying fn after set_qparams, with STE."""
    from qswap.config import QuantSpec
    from qswap.quantizers import Quantizer, qparams_from_range

    reg = Registry("t")
    assert reg.register_quantizer("sign", _sign) is _sign
    entry = reg.quantizer("sign")
    assert entry.wraps is _sign and issubclass(entry.cls, Quantizer)
    q = entry.create(QuantSpec())
    x = torch.tensor([-0.3, 0.0, 2.5], requires_grad=True)
    assert torch.equal(q(x), x)  # identity until convert sets qparams
    q.set_qparams(qparams_from_range(-1.0, 1.0, QuantSpec()))  # type: ignore[operator]
    y = q(x)
    assert torch.equal(y, torch.tensor([-1.0, 0.0, 1.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))  # type: ignore[arg-type]
    with pytest.raises(RegistrationError, match="a quantizer function is called as fn"):
        reg.register_quantizer("two", lambda x, y: x)


# --------------------------------------------------------------------------- backends


def test_backends_register_by_name_or_object_with_origin() -> None:
    """register_backend accepts a name or a Backend, fills the origin and refuses duplicates."""
    reg = Registry("t")
    sim = reg.register_backend("sim")  # backend-site
    assert sim == Backend(
        "sim", origin=f"{sim.origin.rsplit(':', 1)[0]}:{_line_of('# backend-site')}"
    )
    int4 = reg.register_backend(Backend("int4", integer=True, weight_bits=(4, 4)))
    assert reg.backend("int4") is int4 and int4.integer
    assert reg.names("backend") == ["int4", "sim"]
    with pytest.raises(RegistrationError, match="backend 'sim' is already registered"):
        reg.register_backend("sim")
    with pytest.raises(RegistrationError, match=r"weight_bits must be a \(low, high\) tuple"):
        reg.register_backend(Backend("w", weight_bits=(8, 4)))
    with pytest.raises(RegistrationError, match="lower must be callable"):
        reg.register_backend(Backend("l", lower="x"))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- discovery


def test_list_is_sorted_and_globs_case_insensitively() -> None:
    """list(pattern) returns sorted display names of every kind, glob-matched ignoring case."""
    reg = Registry("t")
    reg.register_mapping(nn.Conv2d, QConv)
    reg.register_mapping(nn.ConvTranspose2d, QConv, slots={"weight": 1})
    reg.register_mapping(nn.Linear, QConv)
    reg.register_fusion((nn.Conv2d, nn.ReLU), fuse_pair)
    reg.register_quantizer("round", DuckQuantizer)
    reg.register_backend("fake")
    assert reg.list("*conv*") == [
        "fusion:torch.nn.Conv2d+torch.nn.ReLU",
        "mapping:fake:torch.nn.Conv2d",
        "mapping:fake:torch.nn.ConvTranspose2d",
    ]
    assert reg.list() == sorted(reg.list())
    assert len(reg.list()) == 6
    assert reg.list("quantizer:*") == ["quantizer:round"]
    assert reg.list("nothing*") == []


def test_qualified_name_prefers_the_public_path() -> None:
    """Class names print as their shortest public import path."""
    import torch.ao.nn.intrinsic as nni

    assert qualified_name(nn.Conv2d) == "torch.nn.Conv2d"
    assert qualified_name(nni.ConvReLU2d) == "torch.ao.nn.intrinsic.ConvReLU2d"
    assert qualified_name(QConv) == "test_registry.QConv"


def test_registration_template_is_valid_python() -> None:
    """The template for an unmapped class compiles and names the class and backend."""
    text = registration_template(nn.Bilinear, "x86")
    compile(text, "<template>", "exec")
    assert text.splitlines()[:3] == [
        "from torch.nn import Bilinear",
        "",
        '@reg.register_mapping(Bilinear, backend="x86")',
    ]
    assert (
        "#     - {module: torch.nn.Bilinear, counterpart: my_pkg.QuantizedBilinear, backend: x86"
        in text
    )


# --------------------------------------------------------------------------- packs

GOOD_PACK = """\
# yaml-language-server: $schema=../schemas/qswap-registry-pack.schema.json
version: 1
name: test
backend: sim
backends:
  - {name: sim, description: simulated}
mappings:
  - {module: torch.nn.Conv2d, counterpart: test_registry.QConv}
  - module: torch.nn.ConvTranspose2d
    counterpart: test_registry.QConvOther
    backend: other
    subclasses: true
    slots: {weight: 1, bias: 0}
fusions:
  - {types: [torch.nn.Conv2d, torch.nn.ReLU], fuser: test_registry.fuse_pair}
quantizers:
  round: test_registry.DuckQuantizer
  sign: test_registry._sign
observers:
  duck: test_registry.DuckObserver
"""


def test_pack_registers_everything_with_pack_origins(tmp_path: Path) -> None:
    """A YAML pack registers mappings, fusions, components and backends with file:line origins."""
    path = tmp_path / "good.yaml"
    path.write_text(GOOD_PACK)
    reg = Registry("t")
    needs_quantizers = importlib.util.find_spec("qswap.quantizers") is not None
    if not needs_quantizers:
        path.write_text(GOOD_PACK.replace("  sign: test_registry._sign\n", ""))
    reg.load_pack(path)
    conv = reg.find_mapping(nn.Conv2d, "sim")
    assert conv is not None and conv.counterpart is QConv and conv.slots == {"weight": 0}
    assert conv.origin.endswith("good.yaml:8")
    tconv = reg.find_mapping(nn.ConvTranspose2d, "other")
    assert tconv is not None and tconv.subclasses and tconv.slots == {"weight": 1, "bias": 0}
    assert tconv.origin.endswith("good.yaml:9")
    assert reg.fusion_patterns()[0].origin.endswith("good.yaml:15")
    assert reg.quantizer("round").origin.endswith("good.yaml:17")
    assert reg.observer("duck").cls is DuckObserver
    assert reg.backend("sim").description == "simulated"
    assert reg.backend("sim").origin.endswith("good.yaml:6")
    with pytest.raises(
        RegistrationError, match=r"backend 'sim' is already registered .*good.yaml:6"
    ):
        reg.load_pack(path)  # everything is a duplicate now
    assert reg.quantizer("round").origin.endswith("good.yaml:17")
    reg.load_pack(path, replace=True)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "mappings:\n  - {module: torch.nn.Conv2dd, counterpart: test_registry.QConv}\n",
            (
                "bad.yaml:2:14: cannot import 'torch.nn.Conv2dd': 'torch.nn' has no attribute "
                "'Conv2dd' (did you mean torch.nn.Conv2d?)"
            ),
        ),
        (
            "fusions:\n  - {types: [torch.nn.Conv2d, torch.nn.ReLU], fuser: nomodule_xyz.fuse}\n",
            "bad.yaml:2:54: cannot import 'nomodule_xyz.fuse': no module named 'nomodule_xyz'",
        ),
        (
            "mappings:\n  - {module: torch.nn.Conv2d, counterpart: test_registry.Missing.X}\n",
            (
                "bad.yaml:2:44: cannot import 'test_registry.Missing.X': 'test_registry' has no "
                "submodule or attribute 'Missing'"
            ),
        ),
        (
            "mappings:\n  - {module: qswap.no_such_mod.X, counterpart: test_registry.QConv}\n",
            (
                "cannot import 'qswap.no_such_mod.X': 'qswap' has no submodule or attribute "
                "'no_such_mod'; fix the dotted path or install the package"
            ),
        ),
        (
            "mappings:\n  - {module: torch.nn.Conv2d, counterpart: test_registry.NoFromFloat}\n",
            "cannot be registered as the counterpart of torch.nn.Conv2d (at ",
        ),
        (
            "mappings:\n  - {modul: torch.nn.Conv2d, counterpart: test_registry.QConv}\n",
            (
                "bad.yaml:2:6: mappings[0].modul: Extra inputs are not permitted; "
                "did you mean 'module'?"
            ),
        ),
        ("version: 2\n", "bad.yaml:1:10: version: Input should be 1"),
        (
            "mappings:\n  - {module: torch.nn.Conv2d, counterpart: x, slots: {weight: '0'}}\n",
            "mappings[0].slots.weight: Input should be a valid integer",
        ),
        ("fusions:\n  - {types: [torch.nn.Conv2d], fuser: x.y}\n", "fusions[0].types: List should"),
        ("mappings:\n  - {module: torch nn, counterpart: x}\n", "use a dotted path"),
        (
            "version: 1\nversion: 1\n",
            (
                "bad.yaml:2:1: not a valid YAML registry pack: duplicate key 'version' (first "
                "written at line 1). YAML would silently keep only the last one"
            ),
        ),
        (
            "x: !!python/object/apply:os.system [echo]\n",
            (
                "bad.yaml:1:4: not a valid YAML registry pack: the YAML tag "
                "!!python/object/apply:os.system is not allowed: qswap reads registry packs with "
                "safe loading"
            ),
        ),
        ("x: !!set {a}\n", "bad.yaml:1:4: not a valid YAML registry pack: the YAML tag !!set"),
        ("a: &x [*x]\n", "bad.yaml:1:4: not a valid YAML registry pack: an alias refers to a node"),
        (
            "a: 1\n---\nb: 2\n",
            "bad.yaml:2:1: not a valid YAML registry pack: YAML syntax error: but found another "
            "document",
        ),
        (
            "quantizers:\n  'bad key': x.Y\n",
            "bad.yaml:2:3: quantizers.bad key: String should match pattern",
        ),
        ("- a\n- b\n", "bad.yaml:1:1: a registry pack is a mapping"),
        ("# only a comment\n", "bad.yaml:1:1: registry pack is empty"),
        ("a: [\n", "bad.yaml:2:1: not a valid YAML registry pack"),
        ("mappings:\n  - {module: .Rel, counterpart: x.Y}\n", "is relative; pass package=..."),
    ],
)
def test_bad_packs_give_file_line_col_and_a_fix(tmp_path: Path, body: str, expected: str) -> None:
    """Import failures, schema errors, unsafe tags and bad YAML name the pack position."""
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    reg = Registry("t")
    with pytest.raises(RegistrationError) as info:
        reg.load_pack(path)
    assert expected in str(info.value)
    assert reg.list() == []


def test_pack_load_is_all_or_nothing(tmp_path: Path) -> None:
    """A pack whose last entry clashes leaves the registry exactly as it was."""
    reg = Registry("t")
    reg.register_fusion((nn.Conv2d, nn.ReLU), fuse_pair)
    before = reg.list()
    path = tmp_path / "clash.yaml"
    path.write_text(
        "mappings:\n  - {module: torch.nn.Linear, counterpart: test_registry.QConv}\n"
        "fusions:\n  - {types: [torch.nn.Conv2d, torch.nn.ReLU], fuser: test_registry.fuse_pair}\n"
    )
    with pytest.raises(RegistrationError, match="clash.yaml:4"):
        reg.load_pack(path)
    assert reg.list() == before
    assert reg.find_mapping(nn.Linear, "fake") is None


def test_missing_pack_file_is_a_clear_error(tmp_path: Path) -> None:
    """A pack path that does not exist says so."""
    with pytest.raises(RegistrationError, match="registry pack not found"):
        Registry("t").load_pack(tmp_path / "nope.yaml")


def test_pack_yaml_has_the_limits_of_a_config(tmp_path: Path) -> None:
    """A pack is refused when too big, not UTF-8, nested too deep or an alias bomb, at its line."""
    path = tmp_path / "bad.yaml"
    bomb = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcd", "bcde", strict=True)
    )
    cases = [
        (
            "version: 1\n" + "#" * (2 << 20),
            "bad.yaml:1:1: not a valid YAML registry pack: the registry pack is 2.0 MiB; qswap "
            "reads registry packs of at most 1 MiB",
        ),
        (
            bomb + "f: [*e, *e]\n",
            "bad.yaml:5:4: not a valid YAML registry pack: the registry pack holds more than "
            "100000 values (each use of an alias counted)",
        ),
        (
            "a: " + "[" * 100 + "]" * 100 + "\n",
            "bad.yaml:1:67: not a valid YAML registry pack: the YAML is nested more than 64 "
            "levels deep",
        ),
    ]
    for body, expected in cases:
        path.write_text(body)
        with pytest.raises(RegistrationError) as info:
            read_pack(path)
        assert expected in str(info.value)
    path.write_bytes(b"version: 1\n\xff\n")
    with pytest.raises(RegistrationError, match=r"bad\.yaml:2:1: .*not UTF-8 text \(byte 0xff"):
        read_pack(path)


def test_a_pack_path_that_is_a_folder_or_a_pipe_is_refused(tmp_path: Path) -> None:
    """A folder or a FIFO named as a pack is refused without blocking."""
    with pytest.raises(RegistrationError, match="cannot read registry pack: .*Is a directory"):
        read_pack(tmp_path)
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "q.yaml"
        os.mkfifo(fifo)
        with pytest.raises(RegistrationError, match="not a regular file"):
            read_pack(fifo)


def test_relative_dotted_paths_resolve_against_package(tmp_path: Path) -> None:
    """A leading '.' in a pack is relative to the package passed to load_pack."""
    path = tmp_path / "rel.yaml"
    path.write_text("mappings:\n  - {module: torch.nn.Conv2d, counterpart: .QConv}\n")
    reg = Registry("t")
    reg.load_pack(path, package=__name__)
    assert reg.find_mapping(nn.Conv2d, "fake").counterpart is QConv  # type: ignore[union-attr]


def test_pack_schema_is_a_json_schema_that_accepts_the_builtin_pack() -> None:
    """pack_json_schema() describes the format and validates registry/torch_nn.yaml."""
    import yaml

    schema = pack_json_schema()
    assert schema["title"] == "qswap registry pack"
    assert schema["additionalProperties"] is False
    assert {"version", "mappings", "fusions", "quantizers", "observers", "backends"} <= set(
        schema["properties"]
    )
    jsonschema = pytest.importorskip("jsonschema")
    data = yaml.safe_load((registry_data_dir() / "torch_nn.yaml").read_text())
    jsonschema.validate(data, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"mappings": [{"modul": "x"}]}, schema)


def test_builtin_pack_parses_and_starts_with_the_schema_line() -> None:
    """registry/torch_nn.yaml validates without imports and carries the $schema comment."""
    path = registry_data_dir() / "torch_nn.yaml"
    assert path.read_text().splitlines()[0] == (
        "# yaml-language-server: $schema=../schemas/qswap-registry-pack.schema.json"
    )
    pack = read_pack(path).pack
    modules = {m.module: m.slots for m in pack.mappings}
    assert modules["torch.nn.ConvTranspose2d"] == {"weight": 1}
    assert modules["torch.ao.nn.intrinsic.LinearReLU"] == {"weight": 0}
    assert modules["torch.nn.LayerNorm"] == {}  # norms: activations only, 1-d scale stays float
    assert len(pack.mappings) == 16 and len(pack.fusions) == 13
    assert {m.counterpart for m in pack.mappings} == {"qswap.backends.fake.FakeQuantized"}


def test_builtin_pack_loads_into_a_fresh_registry() -> None:
    """Every dotted path in registry/torch_nn.yaml imports and passes the contracts."""
    import torch.ao.nn.intrinsic as nni

    reg = Registry("t")
    reg.load_pack(registry_data_dir() / "torch_nn.yaml")
    for cls, axis in [
        (nn.Linear, 0),
        (nn.Conv1d, 0),
        (nn.Conv2d, 0),
        (nn.Conv3d, 0),
        (nn.ConvTranspose1d, 1),
        (nn.ConvTranspose2d, 1),
        (nn.ConvTranspose3d, 1),
        (nn.Embedding, 0),
        (nn.EmbeddingBag, 0),
        (nni.ConvReLU1d, 0),
        (nni.ConvReLU2d, 0),
        (nni.ConvReLU3d, 0),
        (nni.LinearReLU, 0),
    ]:
        entry = reg.find_mapping(cls, "fake")
        assert entry is not None, cls
        assert entry.slots == {"weight": axis}
        assert entry.counterpart.__name__ == "FakeQuantized"
    patterns = {p.types: p.fuser.__name__ for p in reg.fusion_patterns()}
    assert patterns[(nn.Conv2d, nn.BatchNorm2d, nn.ReLU)] == "fuse_conv_bn_relu"
    assert patterns[(nn.Linear, nn.BatchNorm1d)] == "fuse_linear_bn"
    assert patterns[(nn.BatchNorm2d, nn.ReLU)] == "fuse_bn_relu"
    assert len(reg.fusion_patterns()[0].types) == 3


# --------------------------------------------------------------------------- default


def test_registry_data_dir_is_the_repo_registry_folder_in_a_checkout() -> None:
    """In a checkout the built-in packs live in <repo>/registry."""
    assert registry_data_dir() == Path(__file__).resolve().parent.parent / "registry"


def test_default_registry_is_cached_frozen_and_complete() -> None:
    """default_registry() is one frozen object holding components, the fake backend and the pack."""
    reg = default_registry()
    assert reg is default_registry() and reg.frozen and reg.name == "default"
    assert reg.backend("fake").integer is False
    assert {"affine"} <= set(reg.names("quantizer"))
    assert {"minmax", "histogram"} <= set(reg.names("observer"))
    conv = reg.find_mapping(nn.Conv2d, "fake")
    assert conv is not None and conv.counterpart.__name__ == "FakeQuantized"
    assert "torch_nn.yaml:" in conv.origin
    assert len(reg.fusion_patterns()) >= 13
    with pytest.raises(FrozenRegistryError, match=r"parent=qswap.default_registry\(\)\)"):
        reg.register_mapping(nn.Bilinear, QConv)


def test_default_registry_build_has_no_import_side_effects() -> None:
    """Importing qswap.registry in a fresh process builds nothing and loads no plugin."""
    code = "import qswap, qswap.registry as r; assert r._DEFAULT is None; print('ok')"
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# --------------------------------------------------------------------------- plugins


def _install_dist_info(
    site: Path, name: str, version: str, entry_points: str, module: Path | None
) -> None:
    """Lay out what pip would install: the module and a *.dist-info with entry_points.txt."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(entry_points)
    if module is not None:
        shutil.copy(module, site / module.name)


def _dist_from_source(site: Path, src: Path) -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((src / "pyproject.toml").read_text())["project"]
    eps = project["entry-points"]["qswap.registry"]
    text = "[qswap.registry]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items())
    (module,) = src.glob("*.py")
    _install_dist_info(site, project["name"], project["version"], text, module)


@pytest.fixture
def plugin_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty site directory on sys.path; plugin modules imported from it are forgotten after."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    before = set(sys.modules)
    yield site  # type: ignore[misc]
    for name in set(sys.modules) - before:
        if name.startswith("qswap_") and "plugin" in name:
            del sys.modules[name]


def test_plugins_load_only_when_asked(plugin_site: Path) -> None:
    """An installed plugin registers into the registry it is given, only via load_plugins()."""
    _dist_from_source(plugin_site, PLUGIN_DIST / "demo")
    importlib.invalidate_caches()
    reg = Registry("host")
    assert reg.names("backend") == []
    assert "qswap_demo_plugin" not in sys.modules
    assert reg.load_plugins() == ["qswap-demo-plugin:demo"]
    from qswap_demo_plugin import DemoLayer  # type: ignore[import-not-found]

    entry = reg.find_mapping(DemoLayer, "fake")
    assert entry is not None and "qswap_demo_plugin.py:" in entry.origin
    assert reg.names("backend") == ["demo_backend"]
    assert reg.load_plugins() == []  # already loaded: skipped, no duplicate error
    assert Registry("other").find_mapping(DemoLayer, "fake") is None


def test_failing_plugin_names_its_distribution_and_rolls_back(plugin_site: Path) -> None:
    """A plugin whose register(reg) raises raises PluginError naming its distribution; undone."""
    _dist_from_source(plugin_site, PLUGIN_DIST / "broken")
    importlib.invalidate_caches()
    reg = Registry("host")
    with pytest.raises(PluginError) as info:
        reg.load_plugins()
    assert str(info.value) == (
        "plugin 'broken' from distribution 'qswap-broken-plugin' 0.2.0 (entry point "
        "qswap.registry: qswap_broken_plugin:register) failed in register(reg): RuntimeError: "
        "the plugin's own bug"
    )
    assert isinstance(info.value.__cause__, RuntimeError)
    assert reg.names("backend") == []


def test_plugin_that_cannot_import_names_its_distribution(plugin_site: Path) -> None:
    """An entry point whose module is missing gives PluginError naming distribution and target."""
    _install_dist_info(
        plugin_site,
        "qswap-ghost-plugin",
        "1.0",
        "[qswap.registry]\nghost = qswap_ghost_plugin_xyz:register\n",
        None,
    )
    importlib.invalidate_caches()
    with pytest.raises(PluginError) as info:
        Registry("host").load_plugins()
    msg = str(info.value)
    assert "plugin 'ghost' from distribution 'qswap-ghost-plugin' 1.0" in msg
    assert "failed to import: ModuleNotFoundError" in msg
    assert "Fix or uninstall that distribution" in msg


def test_plugin_dist_installs_with_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The test distribution is a real installable package whose entry point qswap finds."""
    pytest.importorskip("hatchling")
    target = tmp_path / "target"
    src = tmp_path / "src"
    shutil.copytree(PLUGIN_DIST / "demo", src)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "--target",
            str(target),
            str(src),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        pytest.skip(f"pip could not build the test distribution offline: {proc.stderr[-300:]}")
    monkeypatch.syspath_prepend(str(target))
    importlib.invalidate_caches()
    reg = Registry("host")
    try:
        assert reg.load_plugins() == ["qswap-demo-plugin:demo"]
        assert reg.names("backend") == ["demo_backend"]
    finally:
        sys.modules.pop("qswap_demo_plugin", None)


# --------------------------------------------------------------------------- threads


def test_concurrent_registration_from_eight_threads() -> None:
    """Eight threads registering at once lose nothing, and exactly one wins each contested name."""
    reg = Registry("t")
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []
    wins: list[int] = []
    classes = [type(f"Layer{i}_{j}", (nn.Module,), {}) for i in range(8) for j in range(25)]

    def work(i: int) -> None:
        try:
            barrier.wait()
            for j in range(25):
                reg.register_mapping(classes[i * 25 + j], QConv)
                reg.register_backend(f"b{i}_{j}")
            try:
                reg.register_quantizer("contested", DuckQuantizer)
                wins.append(i)
            except RegistrationError:
                pass
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(reg.mappings()) == 200 and len(reg.names("backend")) == 200
    assert len(wins) == 1
    assert all(reg.find_mapping(c, "fake") is not None for c in classes)


def test_entries_are_frozen_dataclasses() -> None:
    """Entries cannot be mutated after registration and stay hashable."""
    reg = Registry("t")
    reg.register_mapping(nn.Conv2d, QConv)
    entry = reg.find_mapping(nn.Conv2d, "fake")
    with pytest.raises(AttributeError):
        entry.backend = "x86"  # type: ignore[misc, union-attr]
    assert hash(entry) == hash(entry)
    assert isinstance(FusionPattern((nn.Conv2d, nn.ReLU), fuse_pair, "x:1"), FusionPattern)


LIB = """
import torch
from torch import nn


class Dense(nn.Linear):
    def forward(self, x):
        return super().forward(x) + 0.0


class NormAct(nn.BatchNorm2d):
    def __init__(self, n):
        super().__init__(n)
        self.act = nn.SiLU()
        self.drop = nn.Identity()

    def forward(self, x):
        return self.act(super().forward(x))
"""

LIB_PACK = """version: 1
name: fakelib
requires: [fakelib_{n}]
mappings:
  - {{module: fakelib_{n}.layers.Dense, counterpart: qswap.backends.fake.FakeQuantized, slots: {{weight: 0}}}}
  - {{module: fakelib_{n}.missing.Gone, counterpart: qswap.backends.fake.FakeQuantized, slots: {{weight: 0}}}}
decompositions:
  - {{module: fakelib_{n}.layers.NormAct, decompose: qswap.decompose.batchnorm_act}}
"""


def _fake_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int) -> str:
    pkg = tmp_path / f"fakelib_{n}"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "layers.py").write_text(LIB)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "fakelib.yaml").write_text(LIB_PACK.format(n=n))
    return f"fakelib_{n}"


def test_a_pack_with_requires_waits_for_the_program_to_import_the_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """requires: entries register once their class's module is imported; qswap imports nothing."""
    name = _fake_library(tmp_path, monkeypatch, 1)
    reg = Registry("lazy", parent=default_registry())
    reg.load_pack(tmp_path / "fakelib.yaml")
    reg.freeze()
    assert f"{name}.layers" not in sys.modules  # loading the pack imported nothing
    layers = importlib.import_module(f"{name}.layers")
    entry = reg.find_mapping(layers.Dense, "fake")  # the entry whose module is now imported
    assert entry is not None and entry.slots == {"weight": 0}
    assert reg.decomposition(layers.NormAct) is not None
    assert f"{name}.missing" not in sys.modules  # still waiting: never imported by qswap


def test_a_decomposed_module_is_planned_as_its_parts_on_a_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A BatchNorm+act class folds into the conv before it; the user's model keeps its class."""
    import qswap

    name = _fake_library(tmp_path, monkeypatch, 2)
    reg = Registry("lazy", parent=default_registry())
    reg.load_pack(tmp_path / "fakelib.yaml")
    layers = importlib.import_module(f"{name}.layers")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), layers.NormAct(4), nn.Flatten(), nn.LazyLinear(2))
    x = torch.rand(2, 3, 6, 6)
    model(x)
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    p = qswap.plan(model, "x86_int8", example_inputs=(x,), registry=reg)
    assert p["1.bn"].kind == "fuse" and p["1.act"].module_type is nn.SiLU
    q = qswap.quantize(
        model, "x86_int8", calib_data=[x], example_inputs=(x,), registry=reg, progress=False
    )
    assert type(model[1]) is layers.NormAct  # the user's model is not decomposed
    assert isinstance(q[1], nn.Sequential) and type(q[1].act) is nn.SiLU
    ref = model(x)
    with torch.no_grad():
        assert (q(x) - ref).abs().max() < 0.1 * ref.abs().max()
    rep = qswap.report(model, q, [x])
    assert [r.name for r in rep.rows][:1] == ["0"]


def test_a_pack_entry_the_installed_library_lacks_is_dropped_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry whose class moved in the installed library warns once; the others register."""
    name = _fake_library(tmp_path, monkeypatch, 3)
    (tmp_path / "moved.yaml").write_text(
        f"version: 1\nrequires: [{name}]\nmappings:\n"
        f"  - {{module: {name}.layers.Moved, counterpart: qswap.backends.fake.FakeQuantized}}\n"
    )
    reg = Registry("lazy", parent=default_registry())
    reg.load_pack(tmp_path / "moved.yaml")
    importlib.import_module(f"{name}.layers")
    with pytest.warns(
        UserWarning, match=r"moved\.yaml \(requires fakelib_3\): entries that do not"
    ):
        assert reg.find_mapping(nn.Linear, "fake") is not None
