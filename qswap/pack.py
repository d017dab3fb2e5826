"""Registry packs: the YAML format that declares mappings, fusion patterns, components and backends.

A pack names Python objects by dotted path, so loading one imports code: a pack is
trusted code, like a plugin. The YAML itself is read with safe loading only.
``Registry.load_pack`` resolves and registers what :func:`read_pack` validated here.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    model_validator,
)

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

    @model_validator(mode="after")
    def _deferred_holds_tables_only(self) -> RegistryPack:
        if self.requires and (self.backends or self.quantizers or self.observers):
            raise ValueError(
                "a pack with requires: declares mappings, fusions and decompositions only (they "
                "are registered "
                "when the library is imported); put backends, quantizers and observers in a "
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


@dataclass(frozen=True)
class PackDocument:
    """A validated pack with the YAML positions of its nodes, for messages."""

    pack: RegistryPack
    source: str
    root: yaml.Node

    def where(self, loc: Sequence[str | int]) -> str:
        """Return ``"file:line:col"`` of the node at ``loc`` (e.g. ``("mappings", 2)``)."""
        node = _node_at(self.root, loc)
        mark = node.start_mark
        return f"{self.source}:{mark.line + 1}:{mark.column + 1}"

    def origin(self, loc: Sequence[str | int]) -> str:
        """Return ``"file:line"`` of the node at ``loc``, the origin recorded on entries."""
        node = _node_at(self.root, loc)
        return f"{self.source}:{node.start_mark.line + 1}"


def _node_at(root: yaml.Node, loc: Sequence[str | int]) -> yaml.Node:
    cur = root
    for part in loc:
        if isinstance(cur, yaml.MappingNode):
            if part == "[key]":
                break
            for key, value in cur.value:
                if key.value == str(part):
                    cur = value
                    break
            else:
                break
        elif isinstance(cur, yaml.SequenceNode) and isinstance(part, int):
            if 0 <= part < len(cur.value):
                cur = cur.value[part]
            else:
                break
        else:
            break
    return cur


def _key_node(root: yaml.Node, loc: Sequence[str | int]) -> yaml.Node:
    """The key node of the last element of ``loc`` when it is a mapping key, else the value."""
    parent = _node_at(root, loc[:-1])
    if isinstance(parent, yaml.MappingNode):
        for key, _ in parent.value:
            if key.value == str(loc[-1]):
                return key
    return _node_at(root, loc)


def _check_duplicate_keys(node: yaml.Node, source: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    mark = key.start_mark
                    raise RegistrationError(
                        f"{source}:{mark.line + 1}:{mark.column + 1}: duplicate key "
                        f"{key.value!r} (first at line {seen[key.value]}); remove one of them"
                    )
                seen[key.value] = key.start_mark.line + 1
            _check_duplicate_keys(value, source)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicate_keys(item, source)


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


def _validation_message(exc: ValidationError, root: yaml.Node, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = [p for p in err["loc"] if isinstance(p, (str, int))]
        node = (
            _key_node(root, loc)
            if err["type"] == "extra_forbidden" and loc
            else _node_at(root, loc)
        )
        mark = node.start_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}"
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

    >>> from qswap.registry import registry_data_dir
    >>> read_pack(registry_data_dir() / "torch_nn.yaml").pack.version
    1
    """
    source = display_path(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RegistrationError(
            f"{source}: registry pack not found; check the path (cwd is {Path.cwd()})"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistrationError(f"{source}: cannot read registry pack: {exc}") from None
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            raise RegistrationError(
                f"{source}:1:1: registry pack is empty; expected a mapping with keys such as "
                "version, mappings, fusions"
            )
        _check_duplicate_keys(root, source)
        data = loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise RegistrationError(
            f"{source}{pos}: not a valid YAML registry pack: {exc.problem or exc.context}"
            " (packs are read with safe loading: no Python tags)"
        ) from None
    except yaml.YAMLError as exc:
        raise RegistrationError(f"{source}: not a valid YAML registry pack: {exc}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        mark = root.start_mark
        raise RegistrationError(
            f"{source}:{mark.line + 1}:{mark.column + 1}: a registry pack is a mapping with keys "
            f"such as version, mappings, fusions; got a {type(data).__name__}"
        )
    try:
        pack = RegistryPack.model_validate(data)
    except ValidationError as exc:
        raise RegistrationError(_validation_message(exc, root, source)) from None
    return PackDocument(pack=pack, source=source, root=root)
