"""Registry packs: the YAML format that declares mappings, fusion patterns, components and backends.

A pack names Python objects by dotted path, so loading one imports code: a pack is
trusted code, like a plugin. The YAML itself is read as configs are (``qswap._yaml``): safe
loading only, positions kept for messages, limits on size, nesting and aliases.
``Registry.load_pack`` resolves and registers what :func:`read_pack` validated here.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    model_validator,
)

from qswap._yaml import Mark, Node, NotRegularFileError, YamlReader, mark_at, plain
from qswap.exceptions import RegistrationError

__all__ = [
    "BackendSpec",
    "FusionSpec",
    "MappingSpec",
    "PackDocument",
    "RegistryPack",
    "display_path",
    "pack_json_schema",
    "read_pack",
]

_DOTTED = r"^\.*[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
_NAME = r"^[A-Za-z_][A-Za-z0-9_.\-]*$"

DottedPath = Annotated[
    str,
    Field(
        pattern=_DOTTED,
        description=(
            "Dotted path of a Python object, e.g. torch.nn.Conv2d. A leading '.' is relative "
            "to the `package` passed to Registry.load_pack."
        ),
    ),
]
ComponentName = Annotated[str, Field(pattern=_NAME)]
SlotName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.]*$")]


class _PackModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MappingSpec(_PackModel):
    """One float class -> quantized counterpart entry."""

    module: DottedPath = Field(description="The float module class, e.g. torch.nn.Conv2d.")
    counterpart: DottedPath = Field(
        description="A class with classmethod from_float(module, spec) -> nn.Module."
    )
    backend: Annotated[str, Field(pattern=_NAME)] | None = Field(
        default=None, description="Backend of this entry; defaults to the pack's `backend`."
    )
    subclasses: StrictBool = Field(
        default=False,
        description="Also match subclasses that do not override forward.",
    )
    slots: dict[SlotName, StrictInt] = Field(
        default_factory=lambda: {"weight": 0},
        description="Quantized parameter slots and their default channel axis.",
    )


class FusionSpec(_PackModel):
    """One fusion pattern: consecutive module types and the function that fuses them."""

    types: list[DottedPath] = Field(
        min_length=2,
        description="Module classes in forward order, e.g. [torch.nn.Conv2d, torch.nn.ReLU].",
    )
    fuser: DottedPath = Field(description="Callable fuser(*modules) -> nn.Module.")


class DecompositionSpec(_PackModel):
    """One ``decompositions:`` entry: a module class seen as the modules it is made of."""

    module: DottedPath = Field(description="The module class, e.g. timm.layers.BatchNormAct2d.")
    decompose: DottedPath = Field(
        description="Callable module -> nn.Module returning the equivalent module tree."
    )


class BackendSpec(_PackModel):
    """A backend: a name the config's `backend:` can use, and its capabilities."""

    name: ComponentName
    description: str = ""
    integer: StrictBool = Field(default=False, description="Lowers to integer kernels.")
    weight_bits: tuple[StrictInt, StrictInt] = (2, 16)
    activation_bits: tuple[StrictInt, StrictInt] = (2, 16)
    lower: DottedPath | None = Field(
        default=None,
        description="lower(model, layers, example_args, example_kwargs) -> nn.Module: its layers "
        "turned into what it runs (qswap.registry.Lowering).",
    )
    keeps_observers: StrictBool = Field(
        default=False,
        description="lower receives its layers with their observers still attached (it replaces "
        "them in place); else convert strips them first.",
    )
    saturates: DottedPath | None = Field(
        default=None,
        description="() -> bool: whether its u8 x s8 kernels add pairs in 16 bits on this CPU.",
    )
    check: DottedPath | None = Field(
        default=None,
        description="(layer) -> str | None: what it cannot run of a planned layer, or None.",
    )
    float_outputs: StrictBool = Field(
        default=False,
        description="A layer whose output is only the model's output keeps it float (the "
        "kernels dequantize inside); the plan drops that output quantizer and says so.",
    )
    shares_ties: StrictBool = Field(
        default=False,
        description="Its lowering stores a parameter several layers share (a tied embedding and "
        "lm_head) once, so the plan keeps tied layers on it instead of falling back.",
    )

    @model_validator(mode="after")
    def _ranges(self) -> BackendSpec:
        for field in ("weight_bits", "activation_bits"):
            lo, hi = getattr(self, field)
            if not 1 <= lo <= hi <= 32:
                raise ValueError(
                    f"{field} must be [low, high] with 1 <= low <= high <= 32, got [{lo}, {hi}]"
                )
        return self


class RegistryPack(_PackModel):
    """A registry pack file: ``registry/*.yaml`` and users' own packs share this format."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        title="qswap registry pack",
        json_schema_extra={
            "$schema": "https://json-schema.org/draft/2020-12/schema",
        },
    )

    version: Literal[1] = 1
    name: str = Field(default="", description="A label for messages.")
    description: str = ""
    backend: Annotated[str, Field(pattern=_NAME)] = Field(
        default="fake", description="Default backend of the mappings below."
    )
    requires: list[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]] = Field(
        default_factory=list,
        description=(
            "Top-level packages the pack's classes come from (e.g. transformers). Such a pack "
            "is registered once the program has imported all of them (a model built with them "
            "has), so it never imports a library itself; mappings, fusions and decompositions "
            "only."
        ),
    )
    backends: list[BackendSpec] = Field(default_factory=list)
    mappings: list[MappingSpec] = Field(default_factory=list)
    fusions: list[FusionSpec] = Field(default_factory=list)
    decompositions: list[DecompositionSpec] = Field(default_factory=list)
    quantizers: dict[ComponentName, DottedPath] = Field(
        default_factory=dict, description="Quantizer name -> class (or plain function fn(x) -> x)."
    )
    observers: dict[ComponentName, DottedPath] = Field(
        default_factory=dict, description="Observer name -> class."
    )
    methods: dict[ComponentName, DottedPath] = Field(
        default_factory=dict,
        description="Weight method name -> class (how weights are rounded: gptq, awq...).",
    )

    @model_validator(mode="after")
    def _deferred_holds_tables_only(self) -> RegistryPack:
        if self.requires and (self.backends or self.quantizers or self.observers or self.methods):
            raise ValueError(
                "a pack with requires: declares mappings, fusions and decompositions only (they "
                "are registered "
                "when the library is imported); put backends, quantizers, observers and methods in a "
                "pack without requires"
            )
        return self


def pack_json_schema() -> dict[str, Any]:
    """Return the JSON Schema of a registry pack, as ``schemas/`` stores it.

    >>> pack_json_schema()["title"]
    'qswap registry pack'
    """
    return RegistryPack.model_json_schema()


def display_path(filename: str | os.PathLike[str]) -> str:
    """Return ``filename`` relative to the working directory when it lies below it.

    >>> display_path("/nonexistent/x.py")
    '/nonexistent/x.py'
    """
    text = os.fspath(filename)
    try:
        return str(Path(text).resolve().relative_to(Path.cwd()))
    except (ValueError, OSError):
        return text


def _pack_problem(reason: str, at: Mark) -> RegistrationError:
    return RegistrationError(f"{at}: not a valid YAML registry pack: {reason}")


_YAML = YamlReader("registry pack", error=_pack_problem)


@dataclass(frozen=True)
class PackDocument:
    """A validated pack with the YAML positions of its nodes, for messages."""

    pack: RegistryPack
    source: str
    root: Node

    def where(self, loc: Sequence[str | int]) -> str:
        """Return ``"file:line:col"`` of the node at ``loc`` (e.g. ``("mappings", 2)``)."""
        return str(mark_at(self.root, loc))

    def origin(self, loc: Sequence[str | int]) -> str:
        """Return ``"file:line"`` of the node at ``loc``, the origin recorded on entries."""
        return f"{self.source}:{mark_at(self.root, loc).line}"


def _field_names() -> list[str]:
    names: set[str] = set()
    for model in (RegistryPack, MappingSpec, FusionSpec, BackendSpec):
        names.update(model.model_fields)
    return sorted(names)


def _path_text(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _validation_message(exc: ValidationError, root: Node, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = [p for p in err["loc"] if isinstance(p, (str, int))]
        if loc[-1:] == ["[key]"]:  # a bad mapping key: point at the key
            where = mark_at(root, loc[:-1], key=True)
        else:
            where = mark_at(root, loc, key=err["type"] == "extra_forbidden")
        msg = err["msg"]
        hint = ""
        if err["type"] == "extra_forbidden" and loc:
            close = difflib.get_close_matches(str(loc[-1]), _field_names(), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; remove it"
        elif err["type"] == "string_pattern_mismatch":
            hint = "; use a dotted path such as torch.nn.Conv2d or a plain name"
        lines.append(f"{where}: {_path_text(loc) or '<root>'}: {msg}{hint}")
    head = f"{source}: invalid registry pack ({len(lines)} error{'s' if len(lines) > 1 else ''})"
    return head + "\n" + "\n".join(f"  {line}" for line in lines)


def read_pack(path: str | os.PathLike[str]) -> PackDocument:
    """Read and validate a pack file (YAML, safe loading) without importing anything it names.

    The YAML is read as configs are: safe tags only, no duplicate keys, and limits on size,
    nesting and aliases.

    >>> from qswap.registry import registry_data_dir
    >>> read_pack(registry_data_dir() / "torch_nn.yaml").pack.version
    1
    """
    source = display_path(path)
    try:
        text = _YAML.read(Path(path), source)
    except FileNotFoundError:
        raise RegistrationError(
            f"{source}: registry pack not found; check the path (cwd is {Path.cwd()})"
        ) from None
    except NotRegularFileError:
        raise RegistrationError(
            f"{source}: cannot read registry pack: it is not a regular file (a pipe, socket or "
            "device); name a .yaml pack file"
        ) from None
    except OSError as exc:
        raise RegistrationError(f"{source}: cannot read registry pack: {exc}") from None
    root = _YAML.parse(text, source)
    if root is None:
        raise RegistrationError(
            f"{source}:1:1: registry pack is empty; expected a mapping with keys such as "
            "version, mappings, fusions"
        )
    if not isinstance(root.value, dict):
        raise RegistrationError(
            f"{root.mark}: a registry pack is a mapping with keys such as version, mappings, "
            f"fusions; got a {type(root.value).__name__}"
        )
    try:
        pack = RegistryPack.model_validate(plain(root))
    except ValidationError as exc:
        raise RegistrationError(_validation_message(exc, root, source)) from None
    return PackDocument(pack=pack, source=source, root=root)
