"""The declarative config: pydantic models, safe YAML loading, presets, errors with line numbers.

A config says *what* to quantize and *how*; it never imports code. Observers,
quantizers and backends are names resolved through a registry, module classes
are matched by name as strings, and YAML is read with safe loading only::

    >>> from qswap.config import load_config
    >>> cfg = load_config("x86_int8")
    >>> cfg.backend, cfg.weight.granularity
    ('x86', 'per_channel')

Every problem is a ``qswap.ConfigError`` whose message reads
``file:line:col: field.path: what is wrong. how to fix`` (with a "did you
mean" for mistyped names).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Union, get_args, get_origin

import regex as _regex
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

from qswap._yaml import (
    MAX_BYTES,
    Mark,
    Node,
    NotRegularFileError,
    YamlReader,
    descend,
    mark_at,
    plain,
)
from qswap.exceptions import ConfigError

if TYPE_CHECKING:
    import torch

    from qswap.registry import Registry

__all__ = [
    "MAX_CONFIG_BYTES",
    "ComponentRef",
    "Match",
    "QConfig",
    "QuantSpec",
    "QuantSpecPatch",
    "Rule",
    "config_json_schema",
    "dump_config",
    "list_presets",
    "load_config",
    "slot_base",
]

#: Config files and YAML strings larger than this are refused before parsing.
MAX_CONFIG_BYTES = MAX_BYTES

_PRESET_DIR = Path(__file__).resolve().with_name("presets")
_CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
# Validation-context key: components inside were already checked against a registry.
_TRUSTED = "qswap.components_checked"
# The pydantic error type for every error raised by this module's validators.
_ERR = "qswap_config"
_MODEL_CONFIG = ConfigDict(extra="forbid", frozen=True)
#: the longest a rule's regex may take on one module path: the `regex` engine (which also
#: avoids most catastrophic backtracking) stops a pathological pattern after that long
_REGEX_SECONDS = 0.25
_NAME_RE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_ACTIVATION_SLOTS = ("input", "output")
# Editors see the range in the JSON Schema; validation gives its own fix-it message.
_BITS_RANGE: dict[str, Any] = {"minimum": 2, "maximum": 16}


def _fail(message: str, *loc: str | int) -> PydanticCustomError:
    """Build the validation error this module raises; ``loc`` points below the current model."""
    return PydanticCustomError(_ERR, "{message}", {"message": message, "loc": tuple(loc)})


def _suggest(word: object, choices: Iterable[str]) -> str:
    """Return "; did you mean 'x'?" for the closest choice, or "." when nothing is close."""
    if not isinstance(word, str):
        return "."
    by_lower: dict[str, str] = {}
    for choice in choices:
        by_lower.setdefault(choice.lower(), choice)
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f"; did you mean '{by_lower[close[0]]}'?" if close else "."


def _show(value: object) -> str:
    """Describe a user value in a message ("the string '8'", "a list", "nothing (null)")."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        short = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {short!r}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


def _registry(info: ValidationInfo) -> Registry:
    """The registry names are checked against: context key "registry", else the default one."""
    context = info.context if isinstance(info.context, Mapping) else {}
    reg = context.get("registry")
    if reg is None:
        from qswap.registry import default_registry

        reg = default_registry()
    return reg


def _trusted(info: ValidationInfo) -> bool:
    context = info.context if isinstance(info.context, Mapping) else {}
    return bool(context.get(_TRUSTED))


def _freeze(value: Any) -> Any:
    """A hashable stand-in for nested option values."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


# --------------------------------------------------------------------------- models


class ComponentRef(BaseModel):
    """A registered observer or quantizer by name, with options its own model validates.

    YAML short forms: ``minmax`` or ``{name: histogram, bins: 2048}``; it dumps back to them.

        >>> ComponentRef.model_validate({"name": "histogram", "bins": 512}).options
        {'bins': 512}
    """

    model_config = _MODEL_CONFIG

    name: str = Field(description="Registered component name.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Options validated by the component's options model."
    )

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: Any) -> Any:
        if isinstance(data, ComponentRef):
            return data
        if isinstance(data, str):
            if not data.strip():
                raise _fail("the component name is empty. Write a registered name such as minmax")
            return {"name": data, "options": {}}
        if isinstance(data, Mapping):
            rest = dict(data)
            if "name" not in rest:
                raise _fail(
                    "a component written as a mapping needs a 'name' key. "
                    "Write e.g. {name: histogram, bins: 2048}"
                )
            name = rest.pop("name")
            if not isinstance(name, str) or not name.strip():
                raise _fail(
                    f"the component name must be a non-empty string, got {_show(name)}. "
                    "Write a registered name such as minmax",
                    "name",
                )
            options = rest
            if set(rest) == {"options"} and isinstance(rest["options"], Mapping):
                options = dict(rest["options"])
            return {"name": name, "options": options}
        raise _fail(
            f"expected a component name or a mapping with 'name', got {_show(data)}. "
            "Write e.g. minmax or {name: histogram, bins: 2048}"
        )

    @model_serializer(mode="plain")
    def _dump_short(self) -> str | dict[str, Any]:
        return self.name if not self.options else {"name": self.name, **self.options}

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {
            "title": "ComponentRef",
            "description": (
                "A registered observer or quantizer: its name, or a mapping with 'name' "
                "and that component's own options."
            ),
            "anyOf": [
                {"type": "string", "minLength": 1},
                {
                    "type": "object",
                    "properties": {"name": {"type": "string", "minLength": 1}},
                    "required": ["name"],
                    "additionalProperties": True,
                },
            ],
        }

    def __hash__(self) -> int:
        return hash((self.name, _freeze(self.options)))


def _check_component(
    ref: ComponentRef, kind: Literal["observer", "quantizer", "method"], info: ValidationInfo
) -> ComponentRef:
    """Resolve a component name in the registry and validate its options with its own model."""
    if _trusted(info):
        return ref
    reg = _registry(info)
    names = sorted(reg.names(kind))
    if ref.name not in names:
        raise _fail(
            f"unknown {kind} {ref.name!r}{_suggest(ref.name, names)} Registered {kind}s: "
            f"{', '.join(names)}. Register your own with registry.register_{kind}"
            f"({ref.name!r}, ...) and pass registry=",
            "name",
        )
    options_model: type[BaseModel] = getattr(reg, kind)(ref.name).options_model
    try:
        options = options_model.model_validate(ref.options)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = _clean_loc(err)
        valid = sorted(options_model.model_fields)
        if err["type"] == "extra_forbidden" and loc:
            listed = ", ".join(valid) if valid else "none"
            message = (
                f"{kind} {ref.name!r} has no option {loc[-1]!r}{_suggest(loc[-1], valid)} "
                f"Its options: {listed}"
            )
        else:
            where = f" option {loc[0]!r}" if loc else ""
            message = f"{kind} {ref.name!r}{where}: {_describe(err, valid)}"
        raise _fail(message, *loc) from None
    normalized = options.model_dump(mode="json", exclude_unset=True)
    if normalized == ref.options:
        return ref
    return ComponentRef(name=ref.name, options=normalized)


def _spec_problem(
    granularity: str, axis: int | None, group_size: int | None
) -> tuple[str, str] | None:
    """Return (field, message) for an inconsistent granularity/axis/group_size, else None."""
    if granularity == "per_channel" and axis is None:
        return "granularity", (
            "per_channel needs an axis. Add 'axis: 0' (the output channels of Linear and Conv "
            "weights) or use granularity: per_tensor"
        )
    if granularity == "per_group" and group_size is None:
        return "granularity", (
            "per_group needs group_size > 0. Add e.g. 'group_size: 128' next to "
            "granularity: per_group"
        )
    if group_size is not None and granularity != "per_group":
        return "group_size", (
            f"group_size only applies to granularity: per_group, but this spec is {granularity}. "
            "Remove group_size or set granularity: per_group"
        )
    if axis is not None and granularity == "per_tensor":
        return "axis", (
            "axis only applies to per_channel or per_group granularity, but this spec is "
            "per_tensor. Remove axis or set granularity: per_channel"
        )
    return None


class _SpecChecks(BaseModel):
    """Field checks shared by QuantSpec and QuantSpecPatch (None means "not set" in a patch)."""

    model_config = _MODEL_CONFIG

    @field_validator("bits", check_fields=False)
    @classmethod
    def _bits_in_range(cls, value: int | None) -> int | None:
        if value is not None and not 2 <= value <= 16:
            raise _fail(
                f"bits must be between 2 and 16, got {value}. Use 8 for int8 or 4 for int4 weights"
            )
        return value

    @field_validator("group_size", check_fields=False)
    @classmethod
    def _group_size_positive(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise _fail(
                f"group_size must be > 0, got {value}. Use a positive size such as 128 "
                "that divides the grouped dimension"
            )
        return value

    @field_validator("observer", check_fields=False)
    @classmethod
    def _observer_registered(
        cls, value: ComponentRef | None, info: ValidationInfo
    ) -> ComponentRef | None:
        return None if value is None else _check_component(value, "observer", info)

    @field_validator("quantizer", check_fields=False)
    @classmethod
    def _quantizer_registered(
        cls, value: ComponentRef | None, info: ValidationInfo
    ) -> ComponentRef | None:
        return None if value is None else _check_component(value, "quantizer", info)

    @field_validator("method", check_fields=False)
    @classmethod
    def _method_registered(
        cls, value: ComponentRef | None, info: ValidationInfo
    ) -> ComponentRef | None:
        return None if value is None else _check_component(value, "method", info)


class QuantSpec(_SpecChecks):
    """How one tensor slot is quantized: bits, sign, scheme, granularity, observer, quantizer.

    >>> QuantSpec(bits=8, signed=False).quant_range()
    (0, 255)
    """

    bits: StrictInt = Field(
        default=8, description="Bit width, 2..16.", json_schema_extra=_BITS_RANGE
    )
    signed: StrictBool = Field(
        default=True, description="Signed integer grid (int8) or unsigned (uint8)."
    )
    scheme: Literal["symmetric", "affine"] = Field(
        default="symmetric",
        description="symmetric: zero point 0 (signed) or mid-range; affine: free zero point.",
    )
    granularity: Literal["per_tensor", "per_channel", "per_group"] = Field(
        default="per_tensor",
        description="One scale per tensor, per channel (needs axis), or per group.",
    )
    axis: StrictInt | None = Field(
        default=None, description="Channel axis; required for per_channel."
    )
    group_size: StrictInt | None = Field(
        default=None, description="Elements per group; required for per_group."
    )
    reduce_range: StrictBool = Field(
        default=False, description="Drop one bit of range (x86/fbgemm kernels without VNNI)."
    )
    observer: ComponentRef = Field(
        default_factory=lambda: ComponentRef(name="minmax"),
        description="Registered observer: a name or {name: ..., options...}.",
    )
    quantizer: ComponentRef = Field(
        default_factory=lambda: ComponentRef(name="affine"),
        description="Registered quantizer: a name or {name: ..., options...}.",
    )
    method: ComponentRef | None = Field(
        default=None,
        description=(
            "Weights only: a registered weight method that rounds the weight from the layer's "
            "calibration inputs (gptq, awq, smoothquant, or {name: gptq, act_order: true}); none: "
            "round to nearest."
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> QuantSpec:
        problem = _spec_problem(self.granularity, self.axis, self.group_size)
        if problem is not None:
            field, message = problem
            raise _fail(message, field)
        return self

    def quant_range(self) -> tuple[int, int]:
        """The integer grid ``(quant_min, quant_max)``; ``reduce_range`` drops one bit.

        >>> QuantSpec(bits=8, reduce_range=True).quant_range()
        (-64, 63)
        """
        bits = self.bits - 1 if self.reduce_range else self.bits
        if self.signed:
            return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        return 0, (1 << bits) - 1

    def storage_range(self) -> tuple[int, int]:
        """The integers a quantized tensor can hold: ``quant_range`` without ``reduce_range``.

        ``reduce_range`` narrows the grid qparams are computed for (so an int8 kernel's
        intermediate sums cannot overflow), not what the tensor stores: values beyond the
        calibrated range still fit up to the full ``bits``, as in torch's int8 kernels and
        its ``FakeQuantize(quant_max=255, reduce_range=True)``.

        >>> QuantSpec(bits=8, signed=False, reduce_range=True).storage_range()
        (0, 255)
        """
        if self.signed:
            return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        return 0, (1 << self.bits) - 1


class QuantSpecPatch(_SpecChecks):
    """A partial QuantSpec used by rules; ``None`` means "keep the value underneath".

    >>> QuantSpecPatch(bits=4).apply_to(QuantSpec()).bits
    4
    """

    bits: StrictInt | None = Field(
        default=None, description="Bit width, 2..16.", json_schema_extra=_BITS_RANGE
    )
    signed: StrictBool | None = None
    scheme: Literal["symmetric", "affine"] | None = None
    granularity: Literal["per_tensor", "per_channel", "per_group"] | None = None
    axis: StrictInt | None = None
    group_size: StrictInt | None = None
    reduce_range: StrictBool | None = None
    observer: ComponentRef | None = None
    quantizer: ComponentRef | None = None
    method: ComponentRef | None = None

    def apply_to(self, base: QuantSpec) -> QuantSpec:
        """Override ``base`` field by field with the fields this patch sets, and re-validate.

        Switching granularity drops an inherited ``axis``/``group_size`` the new
        granularity does not use. Raises ConfigError when the result is inconsistent.

            >>> per_channel = QuantSpec(granularity="per_channel", axis=0)
            >>> QuantSpecPatch(granularity="per_tensor").apply_to(per_channel).axis is None
            True
        """
        try:
            return _patched(base, self)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            loc = _clean_loc(err)
            raise ConfigError(_describe(err, None), path=_format_path(loc) or None) from None


def _patched(base: QuantSpec, patch: QuantSpecPatch) -> QuantSpec:
    """``patch`` applied to ``base``; raises ValidationError when the result is inconsistent."""
    data: dict[str, Any] = {name: getattr(base, name) for name in QuantSpec.model_fields}
    for name in QuantSpecPatch.model_fields:
        value = getattr(patch, name)
        if value is not None:
            data[name] = value
    if patch.granularity is not None:
        if patch.axis is None and patch.granularity == "per_tensor":
            data["axis"] = None
        if patch.group_size is None and patch.granularity != "per_group":
            data["group_size"] = None
    return QuantSpec.model_validate(data, context={_TRUSTED: True})


class Match(BaseModel):
    """Which modules a rule applies to; every key given must match.

    >>> import torch
    >>> m = Match(name="features.*", type="torch.nn.Conv2d")
    >>> m.matches("features.0", torch.nn.Conv2d(1, 1, 1))
    True
    """

    model_config = _MODEL_CONFIG

    name: str | None = Field(
        default=None, description="fnmatch glob on the module's dotted path, e.g. 'features.*'."
    )
    regex: str | None = Field(
        default=None, description="Regular expression that must match the whole dotted path."
    )
    type: str | None = Field(
        default=None,
        description="Class name ('Conv2d') or dotted path ('torch.nn.Conv2d'), as a string.",
    )

    @field_validator("name")
    @classmethod
    def _name_not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value:
            raise _fail("name is empty. Write a glob on module paths such as 'features.*'")
        return value

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            re.compile(value)
        except re.error as exc:
            where = f" at position {exc.pos}" if exc.pos is not None else ""
            raise _fail(
                f"invalid regex {value!r}: {exc.msg}{where}. Fix the pattern (it must match the "
                "whole dotted module path) or use name: with a glob such as 'features.*'"
            ) from None
        return value

    @field_validator("type")
    @classmethod
    def _type_is_a_name(cls, value: str | None) -> str | None:
        if value is not None and _NAME_RE.fullmatch(value) is None:
            raise _fail(
                f"type {value!r} is not a class name. Write the class name (Conv2d) or its "
                "dotted path (torch.nn.Conv2d), without parentheses, spaces or wildcards"
            )
        return value

    @model_validator(mode="after")
    def _has_a_key(self) -> Match:
        if self.name is None and self.regex is None and self.type is None:
            raise _fail(
                "match needs at least one of name, regex, type. Add e.g. name: 'features.*' "
                "or type: Conv2d"
            )
        return self

    def matches(self, name: str, module: torch.nn.Module) -> bool:
        """True when the module at dotted path ``name`` satisfies every key given."""
        if self.name is not None and not fnmatch.fnmatchcase(name, self.name):
            return False
        if (
            self.regex is not None
            and _regex.fullmatch(self.regex, name, timeout=_REGEX_SECONDS) is None
        ):
            return False
        if self.type is None:
            return True
        # a parametrized module's class is a generated subclass: match the user's class
        from torch.nn.utils.parametrize import type_before_parametrizations

        return _type_matches(type_before_parametrizations(module), self.type)

    def __hash__(self) -> int:
        return hash((self.name, self.regex, self.type))


def _type_matches(cls: type, pattern: str) -> bool:
    """Compare a class with a name as strings: bare name, qualified path, or a public alias."""
    if pattern in (cls.__name__, cls.__qualname__, f"{cls.__module__}.{cls.__qualname__}"):
        return True
    prefix, _, last = pattern.rpartition(".")
    if not prefix or cls.__name__ != last:
        return False
    return cls.__module__ == prefix or cls.__module__.startswith(prefix + ".")


def slot_base(slot: str) -> Literal["weight", "activation"]:
    """Which root spec a slot's patch is merged onto: activations for inputs/outputs, else weight.

    >>> slot_base("k_proj.input"), slot_base("kernel")
    ('activation', 'weight')
    """
    last = slot.rpartition(".")[2]
    return "activation" if last in _ACTIVATION_SLOTS else "weight"


class Rule(BaseModel):
    """Overrides for the modules ``match`` selects; later rules override earlier ones per field."""

    model_config = _MODEL_CONFIG

    match: Match = Field(description="Which modules this rule applies to.")
    skip: StrictBool = Field(
        default=False,
        description="true keeps the matched modules float; an explicit false un-skips them.",
    )
    weight: QuantSpecPatch | None = Field(
        default=None, description="Overrides for the weight slot."
    )
    activation: QuantSpecPatch | None = Field(
        default=None, description="Overrides for input and output."
    )
    input: QuantSpecPatch | None = Field(default=None, description="Overrides for the input slot.")
    output: QuantSpecPatch | None = Field(
        default=None, description="Overrides for the output slot."
    )
    slots: dict[str, QuantSpecPatch] = Field(
        default_factory=dict,
        description="Overrides for named slots: parameters ('kernel', 'bias') or 'sub.input'.",
    )

    _SPEC_KEYS: ClassVar[tuple[str, ...]] = ("weight", "activation", "input", "output")

    @field_validator("slots")
    @classmethod
    def _slot_names(cls, value: dict[str, QuantSpecPatch]) -> dict[str, QuantSpecPatch]:
        for slot in value:
            if slot in ("weight", "activation", "input", "output"):
                raise _fail(
                    f"slot {slot!r} has its own key. Move it out of slots: to the rule's "
                    f"'{slot}:' key",
                    slot,
                )
            if _NAME_RE.fullmatch(slot) is None:
                raise _fail(
                    f"slot name {slot!r} is not a parameter or slot name. Write e.g. kernel, "
                    "bias or k_proj.input",
                    slot,
                )
        return value

    @model_validator(mode="after")
    def _not_contradictory(self) -> Rule:
        overrides = [key for key in self._SPEC_KEYS if getattr(self, key) is not None]
        if self.slots:
            overrides.append("slots")
        if self.skip and overrides:
            raise _fail(
                f"skip: true contradicts the {', '.join(overrides)} settings of the same rule: a "
                "skipped module stays float and ignores them. Remove skip: true or move those "
                "settings to another rule",
                "skip",
            )
        if not self.skip and not overrides and "skip" not in self.model_fields_set:
            raise _fail(
                "this rule changes nothing: it has a match but no skip and no "
                "weight/activation/input/output/slots override. Add one or delete the rule"
            )
        return self

    def patches_for(self, slot: str) -> list[QuantSpecPatch]:
        """The patches this rule applies to ``slot``, in merge order (general before specific).

        ``activation`` comes before ``input``/``output``; ``weight`` before a parameter slot.

        >>> four, signed = QuantSpecPatch(bits=4), QuantSpecPatch(signed=True)
        >>> r = Rule(match=Match(name="*"), activation=four, input=signed)
        >>> [p.model_dump(exclude_none=True) for p in r.patches_for("input")]
        [{'bits': 4}, {'signed': True}]
        """
        found: list[QuantSpecPatch | None]
        if slot == "weight":
            found = [self.weight]
        elif slot in _ACTIVATION_SLOTS:
            found = [self.activation, getattr(self, slot)]
        elif slot_base(slot) == "weight":
            found = [self.weight, self.slots.get(slot)]
        else:
            found = [self.slots.get(slot)]
        return [patch for patch in found if patch is not None]


def _default_activation() -> QuantSpec:
    return QuantSpec(signed=False, scheme="affine")


def _default_weight() -> QuantSpec:
    return QuantSpec(signed=True, scheme="symmetric", granularity="per_channel", axis=0)


class QConfig(BaseModel):
    """A whole quantization config (``version: 1``): backend, mode, fusion, default specs, rules.

    >>> QConfig(backend="fake").weight.granularity
    'per_channel'
    """

    model_config = _MODEL_CONFIG

    version: Literal[1] = Field(default=1, description="Config format version; always 1.")
    extends: list[str] = Field(
        default_factory=list,
        description="Presets or paths (relative to this file) merged underneath, in order.",
    )
    backend: str = Field(
        default="fake", description="A registered backend: fake, x86, qnnpack, ..."
    )
    mode: Literal["static", "dynamic", "weight_only", "qat"] = Field(
        default="static", description="static, dynamic, weight_only or qat."
    )
    fusion: Literal["auto", "off"] | list[list[str]] = Field(
        default="auto",
        description="auto (from the trace), off, or explicit groups of module names.",
    )
    activation: QuantSpec = Field(
        default_factory=_default_activation, description="Default spec for inputs and outputs."
    )
    weight: QuantSpec = Field(
        default_factory=_default_weight, description="Default spec for weights."
    )
    rules: list[Rule] = Field(default_factory=list, description="Ordered overrides; later wins.")
    strict: StrictBool = Field(
        default=True, description="A rule that matches no module is an error."
    )
    fallback: Literal["fake", "float"] = Field(
        default="fake",
        description=(
            "What a layer the backend cannot run becomes: fake (simulated in float with the "
            "same specs) or float (left as it is). The plan shows each such layer and why."
        ),
    )
    vnni: Literal["auto"] | StrictBool = Field(
        default="auto",
        description=(
            "Integer backends: whether the CPU that runs the int8 kernels has VNNI. Without it, "
            "x86 (fbgemm) and ONNX Runtime add pairs of u8 x s8 products in 16 bits, which "
            "saturate when 8-bit activations meet 8-bit weights; the plan then keeps those "
            "weights to 7 bits (reduce_range) and says so. auto: measured on this machine; "
            "true/false: the CPU the model will run on."
        ),
    )
    bias_correction: StrictBool = Field(
        default=False,
        description=(
            "Static and weight-only modes: subtract from each conv/linear bias the mean shift "
            "that weight quantization causes on the calibration inputs (E[(Wq - W) x])."
        ),
    )

    @field_validator("version", mode="before")
    @classmethod
    def _version_one(cls, value: Any) -> Any:
        if value != 1 or isinstance(value, bool):
            raise _fail(f"unsupported config version {value!r}. This qswap reads version: 1")
        return value

    @field_validator("vnni", mode="before")
    @classmethod
    def _vnni_choice(cls, value: Any) -> Any:
        if value == "auto" or isinstance(value, bool):
            return value
        raise _fail(
            f"vnni must be auto, true or false, got {_show(value)}"
            f"{_suggest(value, ['auto', 'true', 'false'])} auto measures this CPU; true or false "
            "names the CPU the int8 model will run on"
        )

    @field_validator("backend")
    @classmethod
    def _backend_registered(cls, value: str, info: ValidationInfo) -> str:
        names = sorted(_registry(info).names("backend"))
        if value not in names:
            raise _fail(
                f"unknown backend {value!r}{_suggest(value, names)} Registered backends: "
                f"{', '.join(names)}. Register one with registry.register_backend(...) and pass "
                "registry="
            )
        return value

    @field_validator("fusion", mode="before")
    @classmethod
    def _fusion_groups(cls, value: Any) -> Any:
        if value is False:  # YAML 1.1 reads an unquoted `off` as false
            return "off"
        if isinstance(value, str):
            if value not in ("auto", "off"):
                raise _fail(
                    f"fusion must be auto, off or a list of module-name groups, got {value!r}"
                    f"{_suggest(value, ['auto', 'off'])} Write fusion: auto"
                )
            return value
        if not isinstance(value, list):
            raise _fail(
                f"fusion must be auto, off or a list of module-name groups, got {_show(value)}. "
                "Write fusion: auto or fusion: [[conv1, bn1, relu]]"
            )
        seen: dict[str, int] = {}
        for i, group in enumerate(value):
            if not isinstance(group, list) or len(group) < 2:
                got = f"{len(group)} name" if isinstance(group, list) else _show(group)
                raise _fail(
                    f"a fusion group is a list of two or more module names, got {got}. "
                    "Write e.g. [conv1, bn1, relu]",
                    i,
                )
            for j, name in enumerate(group):
                if not isinstance(name, str) or not name:
                    raise _fail(
                        f"a fusion group holds module names, got {_show(name)}. Write the dotted "
                        "module path, e.g. layer1.0.conv1",
                        i,
                        j,
                    )
                if name in seen:
                    raise _fail(
                        f"module {name!r} is in fusion groups {seen[name]} and {i}. A module can "
                        "be fused only once; remove it from one group",
                        i,
                        j,
                    )
                seen[name] = i
        return value

    @field_validator("rules", mode="before")
    @classmethod
    def _rules_list(cls, value: Any) -> Any:
        return [] if value is None else value

    @model_validator(mode="after")
    def _rules_merge_cleanly(self) -> QConfig:
        # Each patch is checked merged the way the walker cascades it: activation before
        # input/output, the rule's weight before its parameter slots.
        for i, rule in enumerate(self.rules):
            merged = {"weight": self.weight, "activation": self.activation}
            targets: list[tuple[tuple[str, ...], QuantSpecPatch | None, str, QuantSpec]] = [
                (("weight",), rule.weight, "weight", self.weight),
                (("activation",), rule.activation, "activation", self.activation),
            ]
            for key, patch, base_name, base in targets:
                if patch is not None:
                    merged[base_name] = self._merge_rule_patch(i, key, patch, base_name, base)
            later: list[tuple[tuple[str, ...], QuantSpecPatch | None, str, QuantSpec]] = [
                (("input",), rule.input, "activation", merged["activation"]),
                (("output",), rule.output, "activation", merged["activation"]),
            ]
            for slot, patch in rule.slots.items():
                # A dotted slot ("k_proj.input") belongs to a submodule: only the root applies.
                kind = slot_base(slot)
                base = self.activation if kind == "activation" else merged["weight"]
                later.append((("slots", slot), patch, kind, base))
            for key, patch, base_name, base in later:
                if patch is not None:
                    self._merge_rule_patch(i, key, patch, base_name, base)
        return self

    @staticmethod
    def _merge_rule_patch(
        index: int, key: tuple[str, ...], patch: QuantSpecPatch, base_name: str, base: QuantSpec
    ) -> QuantSpec:
        try:
            return _patched(base, patch)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            field = _clean_loc(err)
            if field and field[0] not in patch.model_fields_set:
                field = ()
            raise _fail(
                f"{_describe(err, None)} (this rule's {key[-1]} is merged onto the root "
                f"{base_name} spec)",
                "rules",
                index,
                *key,
                *field,
            ) from None

    def base_spec(self, slot: str) -> QuantSpec:
        """The root spec a slot starts from before rules apply (see ``slot_base``).

        >>> QConfig().base_spec("input").signed
        False
        """
        return self.activation if slot_base(slot) == "activation" else self.weight

    def to_yaml(self) -> str:
        """Dump as YAML that ``load_config`` reads back to an equal config.

        >>> cfg = QConfig(backend="fake")
        >>> load_config(cfg.to_yaml()) == cfg
        True
        """
        text: str = yaml.dump(
            _plain_config(self), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100
        )
        return text


def _plain_config(cfg: QConfig) -> dict[str, Any]:
    """The config as plain data in file order; rules keep only what they set."""
    out: dict[str, Any] = {"version": cfg.version}
    if cfg.extends:
        out["extends"] = list(cfg.extends)
    out["backend"] = cfg.backend
    out["mode"] = cfg.mode
    out["fusion"] = cfg.fusion if isinstance(cfg.fusion, str) else [list(g) for g in cfg.fusion]
    out["bias_correction"] = cfg.bias_correction
    if cfg.fallback != "fake":
        out["fallback"] = cfg.fallback
    if cfg.vnni != "auto":
        out["vnni"] = cfg.vnni
    out["activation"] = cfg.activation.model_dump(mode="json", exclude_none=True)
    out["weight"] = cfg.weight.model_dump(mode="json", exclude_none=True)
    out["rules"] = [_plain_rule(rule) for rule in cfg.rules]
    out["strict"] = cfg.strict
    return out


def _plain_rule(rule: Rule) -> dict[str, Any]:
    """A rule as plain data; an explicit ``skip: false`` (it un-skips earlier rules) is kept."""
    out: dict[str, Any] = rule.model_dump(mode="json", exclude_defaults=True)
    if "skip" in rule.model_fields_set and "skip" not in out:
        out = {"match": out.pop("match"), "skip": rule.skip, **out}
    return out


def _is_scalar(value: object) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


class _Dumper(yaml.SafeDumper):  # type: ignore[misc]
    """Safe YAML dumper: indented lists, short lists and small mappings of scalars inline."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> Any:
        return super().increase_indent(flow, False)

    def represent_list(self, data: list[Any]) -> Any:
        inline = bool(data) and all(_is_scalar(x) for x in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=inline)

    def represent_dict(self, data: dict[Any, Any]) -> Any:
        inline = 0 < len(data) <= 3 and all(_is_scalar(v) for v in data.values())
        return self.represent_mapping("tag:yaml.org,2002:map", data, flow_style=inline)


_Dumper.add_representer(list, _Dumper.represent_list)
_Dumper.add_representer(dict, _Dumper.represent_dict)


def dump_config(cfg: QConfig) -> str:
    """Return ``cfg`` as YAML text (same as ``cfg.to_yaml()``).

    >>> print(dump_config(load_config("w8a8_minmax")).splitlines()[1])
    backend: fake
    """
    return cfg.to_yaml()


def config_json_schema() -> dict[str, Any]:
    """The JSON Schema of a config file as users write it (for editors and ``qswap schema``).

    >>> config_json_schema()["title"]
    'qswap config'
    """
    schema = QConfig.model_json_schema(mode="validation")
    for definition in schema.get("$defs", {}).values():
        # Editors show descriptions on hover: keep a docstring's first paragraph, not its example.
        if isinstance(definition.get("description"), str):
            definition["description"] = definition["description"].split("\n\n")[0]
    schema["title"] = "qswap config"
    schema["description"] = (
        "A qswap quantization config (version 1). Observers, quantizers and backends are "
        "names from the qswap registry; see `qswap registry list` and `qswap presets`."
    )
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def list_presets() -> list[str]:
    """Names of the built-in presets usable as a config or in ``extends``.

    >>> "x86_int8" in list_presets()
    True
    """
    return sorted(p.stem for p in _PRESET_DIR.glob("*.yaml"))


# --------------------------------------------------------------------------- YAML with positions


def _yaml_problem(reason: str, at: Mark) -> ConfigError:
    return ConfigError(reason, source=at.source, line=at.line, col=at.col)


_YAML = YamlReader("config", error=_yaml_problem, max_bytes=MAX_CONFIG_BYTES)


@dataclass(frozen=True)
class _Doc:
    """One config document before ``extends`` is resolved."""

    root: Node
    shown: str
    ident: str
    base_dir: Path
    files: bool = True  # whether its extends may name files (a stored config: presets only)


def _parse(text: str, source: str, *, quote: bool = True) -> Node:
    """Parse YAML text into a located mapping; every problem is a ConfigError.

    ``quote=False`` (a file another config names) never repeats the file's text in a message.
    """
    root = _YAML.parse(text, source)
    if root is None:
        raise ConfigError(
            "the config is empty. Write at least 'version: 1', or 'extends: [x86_int8]' to start "
            "from a preset",
            source=source,
            line=1,
            col=1,
        )
    if not isinstance(root.value, dict):
        hint = "Write 'key: value' lines without a leading '-'"
        if isinstance(root.value, str) and root.value in list_presets():
            hint = f"To start from the preset, write extends: [{root.value}]"
        got = _show(root.value) if quote or not isinstance(root.value, str) else "text"
        raise ConfigError(
            f"the top level of a config must be a mapping of keys (backend:, weight:, rules:, "
            f"...), got {got}. {hint if quote else 'It is not a qswap config'}",
            source=source,
            line=root.mark.line,
            col=root.mark.col,
        )
    return root


def _read(path: Path, shown: str, at: Mark | None = None) -> str:
    """Read a config file as text, refusing big or binary files before parsing."""
    # A missing or unreadable file named by `extends` is reported at that entry.
    source, line, col = (at.source, at.line, at.col) if at is not None else (shown, None, None)
    try:
        return _YAML.read(path, shown)
    except FileNotFoundError:
        start = "the current directory" if at is None else "the file that names it"
        raise ConfigError(
            f"config file {shown!r} not found. Check the path (relative paths start at {start})",
            source=source,
            line=line,
            col=col,
        ) from None
    except IsADirectoryError:
        raise ConfigError(
            f"{shown!r} is a directory. Name a .yaml config file", source=source, line=line, col=col
        ) from None
    except NotRegularFileError:  # a FIFO or a device would block or never end
        raise ConfigError(
            f"{shown!r} is not a regular file (a pipe, socket or device). Name a .yaml config file",
            source=source,
            line=line,
            col=col,
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read {shown!r}: {exc.strerror or exc}", source=source, line=line, col=col
        ) from None


# --------------------------------------------------------------------------- extends


def _preset_doc(name: str) -> _Doc:
    path = _PRESET_DIR / f"{name}.yaml"
    return _Doc(_parse(_read(path, str(path)), str(path)), name, f"preset:{name}", path.parent)


def _file_doc(path: Path, shown: str, at: Mark | None = None) -> _Doc:
    # a file another config names is never quoted back: it may not be a config at all
    root = _parse(_read(path, shown, at), shown, quote=at is None)
    return _Doc(root, shown, str(path.resolve()), path.resolve().parent)


def _parent_doc(item: Node, doc: _Doc, index: int) -> _Doc:
    """Open one ``extends`` entry: a preset name, or a path relative to the extending file."""
    entry = item.value
    at = item.mark
    if not isinstance(entry, str) or not entry.strip():
        raise ConfigError(
            f"an extends entry must be a preset name or a file path, got {_show(entry)}. "
            f"Presets: {', '.join(list_presets())}",
            source=at.source,
            line=at.line,
            col=at.col,
            path=f"extends[{index}]",
        )
    presets = list_presets()
    if entry in presets:
        return _preset_doc(entry)
    where: dict[str, Any] = {
        "source": at.source,
        "line": at.line,
        "col": at.col,
        "path": f"extends[{index}]",
    }
    pathlike = any(c in entry for c in "/.~") or os.sep in entry
    if pathlike and not entry.lower().endswith(_CONFIG_SUFFIXES):
        raise ConfigError(
            f"extends names built-in presets or config files ending in "
            f"{', '.join(_CONFIG_SUFFIXES)}, got {entry!r}. Presets: {', '.join(presets)}",
            **where,
        )
    if not doc.files:
        raise ConfigError(
            f"this config may extend built-in presets only (it came from a model or artifact "
            f"file, whose stored config is complete), not {entry!r}. Presets: "
            f"{', '.join(presets)}",
            **where,
        )
    path = Path(entry).expanduser()
    absolute = path.is_absolute()
    if not absolute:
        path = doc.base_dir / path
    if doc.ident.startswith(("<", "preset:")) or absolute:
        shown = os.path.normpath(path)
    else:
        shown = os.path.normpath(os.path.join(os.path.dirname(doc.shown), entry))
    if path.is_file() or (path.exists() and not path.is_dir()):
        return _file_doc(path, shown, at)
    if entry.endswith(_CONFIG_SUFFIXES) or "/" in entry or os.sep in entry:
        raise ConfigError(
            f"file {entry!r} not found (looked for {os.path.normpath(path)}). Paths in "
            f"extends are relative to the file that names them; built-in presets are: "
            f"{', '.join(presets)}",
            source=at.source,
            line=at.line,
            col=at.col,
            path=f"extends[{index}]",
        )
    raise ConfigError(
        f"unknown preset {entry!r}{_suggest(entry, presets)} Presets: "
        f"{', '.join(presets)}; or give a path ending in .yaml",
        source=at.source,
        line=at.line,
        col=at.col,
        path=f"extends[{index}]",
    )


def _resolve(doc: _Doc, chain: list[tuple[str, str]], done: dict[str, Node]) -> Node:
    """Merge ``extends`` parents depth-first underneath ``doc``; returns a node without extends.

    ``done`` holds every parent resolved so far in this load, by identity: a file that many
    configs extend is read and merged once (fan-out stays linear, not exponential).
    """
    root = doc.root
    own = {k: v for k, v in root.value.items() if k != "extends"}
    ext = root.value.get("extends")
    merged: Node | None = None
    if ext is not None and ext.value is not None:
        if not isinstance(ext.value, list):
            raise ConfigError(
                f"expected a list of preset names or paths, got {_show(ext.value)}. "
                "Write e.g. extends: [x86_int8]",
                source=ext.mark.source,
                line=ext.mark.line,
                col=ext.mark.col,
                path="extends",
            )
        for i, item in enumerate(ext.value):
            parent = _parent_doc(item, doc, i)
            idents = [ident for ident, _ in chain]
            if parent.ident in idents:
                loop = [shown for _, shown in chain[idents.index(parent.ident) :]] + [parent.shown]
                raise ConfigError(
                    f"extends cycle: {' -> '.join(loop)}. Remove the extends entry that closes "
                    "the loop",
                    source=item.mark.source,
                    line=item.mark.line,
                    col=item.mark.col,
                    path=f"extends[{i}]",
                )
            resolved = done.get(parent.ident)
            if resolved is None:
                parent = dataclasses.replace(parent, files=doc.files and parent.files)
                resolved = _resolve(parent, [*chain, (parent.ident, parent.shown)], done)
                done[parent.ident] = resolved
            merged = resolved if merged is None else _merge(merged, resolved)
    own_node = Node(own, root.mark, root.key_mark)
    return own_node if merged is None else _merge(merged, own_node)


def _name_of(component: Node) -> Any:
    name = component.value.get("name")
    return None if name is None else name.value


def _merge(base: Node, over: Node, key: Any = None) -> Node:
    """Child over parent: mappings merge recursively, ``rules`` concatenate, the rest replaces."""
    if not (isinstance(base.value, dict) and isinstance(over.value, dict)):
        if key == "rules" and isinstance(base.value, list) and isinstance(over.value, list):
            return Node(base.value + over.value, over.mark, over.key_mark)
        return over
    if key in ("observer", "quantizer", "method") and _name_of(base) != _name_of(over):
        return over  # another component: its options do not mix with the parent's
    out = dict(base.value)
    for k, v in over.value.items():
        out[k] = _merge(out[k], v, k) if k in out else v
    if "granularity" in over.value:
        # Switching granularity drops the parent's axis/group_size that no longer apply.
        granularity = over.value["granularity"].value
        if granularity == "per_tensor" and "axis" not in over.value:
            out.pop("axis", None)
        if granularity != "per_group" and "group_size" not in over.value:
            out.pop("group_size", None)
    return Node(out, over.mark, over.key_mark)


# --------------------------------------------------------------------------- error mapping


def _is_tag(part: object) -> bool:
    """Pydantic inserts union/function tags into ``loc``; they are not config keys."""
    return isinstance(part, str) and ("[" in part or part.startswith("function-"))


def _clean_loc(err: Mapping[str, Any]) -> tuple[str | int, ...]:
    loc = list(err.get("loc", ()))
    ctx = err.get("ctx") or {}
    if err.get("type") == _ERR:
        loc.extend(ctx.get("loc", ()))
    return tuple(part for part in loc if not _is_tag(part))


def _format_path(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _NAME_RE.fullmatch(str(part)) and "." not in str(part):
            out += f".{part}" if out else str(part)
        else:
            out += f"[{str(part)!r}]"
    return out


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model class whose fields live at ``loc`` inside a QConfig, if any."""
    current: Any = QConfig
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            if (
                current is ComponentRef
                or not isinstance(part, str)
                or part not in current.model_fields
            ):
                return None
            current = current.model_fields[part].annotation
        elif get_origin(current) is list and isinstance(part, int):
            current = get_args(current)[0]
        elif get_origin(current) is dict:
            current = get_args(current)[1]
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> ``X``; other unions become the first non-literal member."""
    if get_origin(annotation) in (Union, UnionType):
        members = [
            a for a in get_args(annotation) if a is not type(None) and get_origin(a) is not Literal
        ]
        return members[0] if members else annotation
    return annotation


_EXAMPLES = {"match": "match: {name: 'features.*'}", "name": "name: minmax"}


def _describe(err: Mapping[str, Any], valid_keys: list[str] | None) -> str:
    """What is wrong and how to fix it, for one pydantic error."""
    kind = err.get("type")
    ctx = err.get("ctx") or {}
    value = err.get("input")
    loc = [p for p in err.get("loc", ()) if not _is_tag(p)]
    last = loc[-1] if loc else None
    if kind == _ERR:
        return str(ctx["message"])
    if kind == "extra_forbidden":
        keys = sorted(valid_keys or [])
        listed = f" (valid keys here: {', '.join(keys)})" if keys else ""
        return f"unknown key {last!r}{_suggest(last, keys)} Remove or rename it{listed}"
    if kind == "missing":
        example = _EXAMPLES.get(str(last), f"{last}: ...")
        return f"required key {last!r} is missing. Add e.g. {example}"
    if kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return (
            f"{_show(value)} is not allowed here{_suggest(value, allowed)} Use one of: "
            f"{', '.join(allowed)}"
        )
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return (
            f"expected a whole number, got {_show(value)}. Write an integer such as 8, "
            "without quotes"
        )
    if kind in ("bool_type", "bool_parsing"):
        return f"expected true or false, got {_show(value)}. Write true or false, without quotes"
    if kind in ("string_type", "string_too_short"):
        return (
            f"expected a non-empty string, got {_show(value)}. Write a name, quoted if it "
            "looks like a number"
        )
    if kind in ("list_type", "tuple_type"):
        return f"expected a list, got {_show(value)}. Write a YAML list such as [a, b]"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return (
            f"expected a mapping of keys, got {_show(value)}. Write 'key: value' lines "
            "indented under this key"
        )
    bounds = {
        "greater_than": ("greater than", "gt"),
        "greater_than_equal": ("at least", "ge"),
        "less_than": ("less than", "lt"),
        "less_than_equal": ("at most", "le"),
    }
    if kind in bounds:
        words, key = bounds[str(kind)]
        limit = ctx.get(key)
        return f"must be {words} {limit}, got {_show(value)}. Use a value {words} {limit}"
    if kind in ("float_type", "float_parsing"):
        return f"expected a number, got {_show(value)}. Write a number such as 0.01, without quotes"
    return f"{err.get('msg', 'invalid value')} (got {_show(value)}). Fix the value"


@dataclass(frozen=True)
class _Issue:
    message: str
    path: str
    mark: Mark


def _issue(err: Mapping[str, Any], root: Node) -> _Issue:
    loc = _clean_loc(err)
    kind = err.get("type")
    _, depth = descend(root, loc)
    found = depth == len(loc)
    mark = mark_at(root, loc, key=kind == "extra_forbidden")
    shown = loc if kind in ("missing", "extra_forbidden") or found else loc[:depth]
    valid = None
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        valid = list(model.model_fields) if model is not None else None
    return _Issue(_describe({**err, "loc": loc}, valid), _format_path(shown), mark)


def _config_error(exc: ValidationError, root: Node) -> ConfigError:
    errors = exc.errors(include_url=False)
    # A mistyped key ("matc") also reports the required key as missing; the typo says more.
    typo_parents = {_clean_loc(e)[:-1] for e in errors if e["type"] == "extra_forbidden"}
    issues: list[_Issue] = []
    for err in errors:
        if err["type"] == "missing" and _clean_loc(err)[:-1] in typo_parents:
            continue
        issue = _issue(err, root)
        if all(issue.path != seen.path for seen in issues):
            issues.append(issue)
    first = issues[0]
    message = first.message
    for more in issues[1:6]:
        message += f"\n  also {more.mark}: {more.path + ': ' if more.path else ''}{more.message}"
    if len(issues) > 6:
        message += f"\n  ... and {len(issues) - 6} more problems"
    return ConfigError(
        message,
        source=first.mark.source,
        line=first.mark.line,
        col=first.mark.col,
        path=first.path or None,
    )


# --------------------------------------------------------------------------- loading


def _looks_like_path(text: str) -> bool:
    if text.endswith(_CONFIG_SUFFIXES):
        return True
    try:
        return os.path.isfile(text)
    except (OSError, ValueError):
        return False


def _source_doc(source: object) -> _Doc:
    """Turn any accepted source into one document (extends not yet resolved)."""
    cwd = Path.cwd()
    if isinstance(source, QConfig):
        # Only the fields set explicitly override what `extends` brings in.
        explicit = {k: v for k, v in _plain_config(source).items() if k in source.model_fields_set}
        mark = Mark("<QConfig>")
        return _Doc(_YAML.wrap(explicit, mark), "<QConfig>", "<QConfig>", cwd)
    if isinstance(source, Mapping):
        mark = Mark("<dict>")
        return _Doc(_YAML.wrap(dict(source), mark), "<dict>", "<dict>", cwd)
    if isinstance(source, os.PathLike):
        path = Path(os.fspath(source))
        return _file_doc(path, str(path))
    if isinstance(source, str):
        if "\n" in source or "\r" in source:
            return _Doc(_parse(source, "<string>"), "<string>", "<string>", cwd)
        if _looks_like_path(source):
            return _file_doc(Path(source), source)
        presets = list_presets()
        if source in presets:
            return _preset_doc(source)
        if ":" in source or source.lstrip().startswith("{") or not source.strip():
            return _Doc(_parse(source, "<string>"), "<string>", "<string>", cwd)
        raise ConfigError(
            f"{source!r} is not a preset, a config file or YAML text{_suggest(source, presets)} "
            f"Presets: {', '.join(presets)}; or pass a path ending in .yaml",
            source="<string>",
        )
    raise ConfigError(
        f"cannot load a config from {type(source).__name__}. Pass a path, YAML text, a dict, a "
        "preset name or a QConfig"
    )


def load_config(
    source: QConfig | Mapping[str, Any] | str | os.PathLike[str],
    *,
    registry: Registry | None = None,
    files: bool = True,
) -> QConfig:
    """Load and validate a config from a path, YAML text, a dict, a preset name or a QConfig.

    ``extends`` is resolved (presets and ``.yaml`` paths merged depth-first, each parent read
    once), so the result has ``extends == []``. ``files=False`` lets ``extends`` name built-in
    presets only: for configs stored in model and artifact files, which are complete.
    Names are checked against ``registry`` (default: the default registry). Raises
    ConfigError with file:line:col on any problem.

        >>> load_config({"extends": ["x86_int8"], "weight": {"bits": 4}}).weight.bits
        4
    """
    if isinstance(source, QConfig) and registry is None and not source.extends:
        return source
    doc = _source_doc(source)
    if not files:
        doc = dataclasses.replace(doc, files=False)
    merged = _resolve(doc, [(doc.ident, doc.shown)], {})
    try:
        return QConfig.model_validate(plain(merged), context={"registry": registry})
    except ValidationError as exc:
        raise _config_error(exc, merged) from None
