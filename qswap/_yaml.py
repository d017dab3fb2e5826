"""Safe YAML with positions: the one loader behind configs and registry packs.

It builds plain data only (the safe tags; never a Python object), keeps each value's
file:line:col, refuses duplicate keys, recursive aliases, alias bombs, runaway nesting and
big or binary files, and words YAML's syntax errors with a hint. libyaml parses when it is
installed; its errors are re-worded by the pure-Python parser, whose messages are tested.
What a format makes of the data (its models, its wording, its exception) stays with it::

    >>> reader = YamlReader("config", error=lambda reason, at: ValueError(f"{at}: {reason}"))
    >>> root = reader.parse("bits: [4, 8]\\n", "<string>")
    >>> root.value["bits"].value[1].mark
    Mark(source='<string>', line=1, col=11)
    >>> plain(root)
    {'bits': [4, 8]}
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_NODES",
    "Mark",
    "Node",
    "NotRegularFileError",
    "YamlReader",
    "descend",
    "mark_at",
    "plain",
]

#: Files and texts larger than this are refused before parsing.
MAX_BYTES = 1 << 20
#: Values a document may expand to, each use of an alias counted.
MAX_NODES = 100_000
#: Nesting levels a document (or a dict wrapped by ``YamlReader.wrap``) may have.
MAX_DEPTH = 64


@dataclass(frozen=True)
class Mark:
    """Where a value came from: source name and 1-based line/column (None off a text)."""

    source: str
    line: int | None = None
    col: int | None = None

    def __str__(self) -> str:
        if self.line is None:
            return self.source
        return f"{self.source}:{self.line}:{self.col}"


@dataclass
class Node:
    """A plain value with its position; mappings and lists hold further nodes.

    ``key_mark`` is where the key of a mapping value was written (None at the root).
    """

    value: Any
    mark: Mark
    key_mark: Mark | None = None


class NotRegularFileError(OSError):
    """A path names a pipe, socket or device: reading it could block or never end."""


#: Builds the exception a format raises for a problem ``reason`` found at a position.
ErrorFactory = Callable[[str, Mark], Exception]

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_SCALAR_TAGS = frozenset(
    tag
    for tag in yaml.SafeLoader.yaml_constructors
    if isinstance(tag, str)
    and tag not in (_MAP_TAG, _SEQ_TAG)
    and not tag.endswith((":omap", ":pairs", ":set"))
)


def _short_tag(tag: str) -> str:
    return "!!" + tag[len("tag:yaml.org,2002:") :] if tag.startswith("tag:yaml.org,2002:") else tag


def _line_col(text: str, index: int) -> tuple[int, int]:
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


@dataclass(frozen=True)
class YamlReader:
    """Reads one format's YAML: ``what`` names it in messages, ``error`` builds its exception.

    Every problem in a file's content is raised as ``error(reason, mark)``; a path that cannot
    be opened raises ``OSError`` (``FileNotFoundError``, ``IsADirectoryError``,
    ``NotRegularFileError``, ...), which the format words itself.
    """

    what: str
    error: ErrorFactory
    max_bytes: int = MAX_BYTES

    def read(self, path: Path, shown: str) -> str:
        """Return the file's text, refusing big, binary or non-regular files before parsing."""
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), shown)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFileError(f"{shown!r} is not a regular file (a pipe, socket or device)")
        if info.st_size > self.max_bytes:
            raise self.too_big(info.st_size, shown)
        with path.open("rb") as handle:
            data = handle.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise self.too_big(len(data), shown)
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
            raise self.error(
                f"the file is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                f"{exc.start}); is it a binary file? Save the {self.what} as UTF-8 YAML",
                Mark(shown, line, col),
            ) from None

    def too_big(self, size: int, source: str) -> Exception:
        """The error for a text of ``size`` bytes, over the limit."""
        return self.error(
            f"the {self.what} is {size / (1 << 20):.1f} MiB; qswap reads {self.what}s of at most "
            f"{self.max_bytes // (1 << 20)} MiB. Check that this is the right file",
            Mark(source, 1, 1),
        )

    def parse(self, text: str, source: str) -> Node | None:
        """Parse one YAML document into located nodes; ``None`` for an empty document."""
        if len(text) > self.max_bytes // 4:  # only long text can exceed the limit in UTF-8
            size = len(text.encode("utf-8", "replace"))
            if size > self.max_bytes:
                raise self.too_big(size, source)
        try:
            return self._compose(text, source, _LOADERS[0])
        except yaml.YAMLError as exc:
            if len(_LOADERS) == 1:
                raise self._syntax_error(exc, text, source) from None
            try:  # libyaml words its errors otherwise: report the pure-Python parser's
                self._compose(text, source, _PureLoader)
            except yaml.YAMLError as pure:
                raise self._syntax_error(pure, text, source) from None
            raise self._syntax_error(exc, text, source) from None

    def wrap(self, value: Any, mark: Mark, depth: int = 0) -> Node:
        """Wrap dict/list data (no positions) into nodes at ``mark``; as deep as YAML may be."""
        if depth > MAX_DEPTH:
            raise self.error(
                f"the {self.what} is nested more than {MAX_DEPTH} levels deep. A {self.what} "
                "needs only a few levels; check the dict you passed",
                Mark(mark.source),
            )
        if isinstance(value, Mapping):
            return Node({k: self.wrap(v, mark, depth + 1) for k, v in value.items()}, mark, mark)
        if isinstance(value, (list, tuple)):
            return Node([self.wrap(v, mark, depth + 1) for v in value], mark, mark)
        return Node(value, mark, mark)

    def _compose(self, text: str, source: str, loader_cls: type[_Marking]) -> Node | None:
        loader: Any = loader_cls(text, source, self)  # type: ignore[call-arg]
        try:
            found: Node | None = loader.locate()
            return found
        except RecursionError:
            raise self.error(
                f"the YAML is nested too deeply. A {self.what} needs only a few levels; check "
                "for runaway brackets",
                Mark(source, 1, 1),
            ) from None
        finally:
            loader.dispose()

    def _syntax_error(self, exc: yaml.YAMLError, text: str, source: str) -> Exception:
        """Turn a PyYAML error into the format's error with line, column and a hint."""
        if isinstance(exc, yaml.reader.ReaderError):
            line, col = _line_col(text, exc.position)
            char = exc.character if isinstance(exc.character, str) else chr(exc.character)
            return self.error(
                f"the text holds the control character U+{ord(char):04X}, which YAML does not "
                f"allow; is this a binary file? Remove the character or save the {self.what} as "
                "plain UTF-8 text",
                Mark(source, line, col),
            )
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        col = mark.column + 1 if mark is not None else 1
        at = Mark(source, line, col)
        problem = str(getattr(exc, "problem", None) or exc).strip()
        line_text = text.splitlines()[line - 1] if 0 < line <= len(text.splitlines()) else ""
        if "\t" in line_text[: max(col, 1)] or "'\\t'" in problem:
            return self.error(
                f"YAML syntax error: {problem}. This line is indented with a tab, which YAML "
                "does not allow; indent with spaces (2 per level)",
                at,
            )
        context = getattr(exc, "context", None)
        both = f"{problem} {context or ''}"
        hint = next(
            (h for key, h in _hints(self.what) if key in both),
            "check the indentation, quotes and brackets here",
        )
        context_mark = getattr(exc, "context_mark", None)
        started = ""
        if context and context_mark is not None and context_mark.line + 1 != line:
            started = f" ({context} at line {context_mark.line + 1})"
        return self.error(f"YAML syntax error: {problem}{started}. {hint[0].upper()}{hint[1:]}", at)


def _hints(what: str) -> tuple[tuple[str, str], ...]:
    """(words in PyYAML's error, what the user should do) for the common syntax errors."""
    return (
        (
            "mapping values are not allowed",
            (
                "a ':' appears where no key can start. Fix the indentation or quote a value that "
                "contains ': '"
            ),
        ),
        (
            "could not find expected ':'",
            "a key is missing its ':' or a quote is not closed. Check this line",
        ),
        (
            "expected <block end>",
            (
                "the indentation does not line up with the lines above. Indent each level by the "
                "same number of spaces"
            ),
        ),
        (
            "found undefined alias",
            (
                "an *alias names no &anchor defined above it. Define the anchor first or write "
                "the value out"
            ),
        ),
        (
            "expected a single document",
            f"the text holds several YAML documents (---). Keep one {what} per file",
        ),
        ("scanning a quoted scalar", "a quoted value is not closed. Add the closing quote"),
        (
            "parsing a flow sequence",
            "a '[' list is not closed. Add the closing ']' or check the commas",
        ),
        (
            "parsing a flow mapping",
            "a '{' mapping is not closed. Add the closing '}' or check the commas",
        ),
    )


class _Marking:
    """Loader methods that keep each node's position and build only plain YAML data."""

    source: str
    reader: YamlReader
    count: int
    depth: int

    if TYPE_CHECKING:  # from the YAML loader classes below

        def peek_event(self) -> Any: ...
        def construct_object(self, node: Any, deep: bool = False) -> Any: ...
        def flatten_mapping(self, node: Any) -> None: ...
        def get_single_node(self) -> Any: ...

    def _setup(self, source: str, reader: YamlReader) -> None:
        self.source = source
        self.reader = reader
        self.count = 0
        self.depth = 0

    def mark(self, mark: Any) -> Mark:
        return Mark(self.source, mark.line + 1, mark.column + 1)

    def error(self, node: Any, message: str) -> Exception:
        return self.reader.error(message, self.mark(node.start_mark))

    def compose_node(self, parent: Any, index: Any) -> Any:
        # Refuse runaway nesting at the node where it happens, long before Python's stack ends.
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                what = self.reader.what
                raise self.reader.error(
                    f"the YAML is nested more than {MAX_DEPTH} levels deep. A {what} needs only "
                    "a few levels; check for runaway brackets or indentation",
                    self.mark(self.peek_event().start_mark),
                )
            return super().compose_node(parent, index)  # type: ignore[misc]
        finally:
            self.depth -= 1

    def locate(self) -> Node | None:
        node = self.get_single_node()
        if node is None:
            return None
        sizes: dict[int, int] = {}
        if self.expanded_size(node, sizes, set()) > MAX_NODES:
            # Report the node that fans out: the biggest child no longer exceeds the limit.
            while True:
                children = self.children(node)
                biggest = max(children, key=lambda c: sizes[id(c)], default=None)
                if biggest is None or sizes[id(biggest)] <= MAX_NODES:
                    break
                node = biggest
            what = self.reader.what
            raise self.error(
                node,
                f"the {what} holds more than {MAX_NODES} values (each use of an alias "
                f"counted). A {what} needs a few hundred: check that this is the right file, and "
                "do not nest repeated aliases",
            )
        return self.build(node, None, frozenset())

    @staticmethod
    def children(node: Any) -> list[Any]:
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        if isinstance(node, yaml.MappingNode):
            return [part for pair in node.value for part in pair]
        return []

    def expanded_size(self, node: Any, sizes: dict[int, int], active: set[int]) -> int:
        """How many values ``node`` becomes once every alias is expanded (each node counted once)."""
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise self.error(
                node, "an alias refers to a node that contains it. Remove the recursive alias"
            )
        active.add(key)
        size = 1 + sum(self.expanded_size(child, sizes, active) for child in self.children(node))
        active.discard(key)
        sizes[key] = size
        return size

    def build(self, node: Any, key_mark: Mark | None, active: frozenset[int]) -> Node:
        self.count += 1
        if self.count > MAX_NODES:
            what = self.reader.what
            raise self.error(
                node,
                f"the {what} expands to more than {MAX_NODES} values (nested aliases?). "
                f"Write the {what} without repeated anchors",
            )
        mark = self.mark(node.start_mark)
        if isinstance(node, yaml.ScalarNode):
            if node.tag not in _SCALAR_TAGS:
                raise self._unsafe(node)
            return Node(self.construct_object(node, deep=True), mark, key_mark)
        if id(node) in active:
            raise self.error(
                node, "an alias refers to a node that contains it. Remove the recursive alias"
            )
        active = active | {id(node)}
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _SEQ_TAG:
                raise self._unsafe(node)
            return Node([self.build(child, None, active) for child in node.value], mark, key_mark)
        if node.tag != _MAP_TAG:
            raise self._unsafe(node)
        first: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.key(key_node)
            if key in first:
                raise self.error(
                    key_node,
                    f"duplicate key {key!r} (first written at line {first[key].line + 1}). YAML "
                    "would silently keep only the last one; remove or merge the duplicates",
                )
            first[key] = key_node.start_mark
        self.flatten_mapping(node)
        out: dict[Any, Node] = {}
        for key_node, value_node in node.value:
            out[self.key(key_node)] = self.build(value_node, self.mark(key_node.start_mark), active)
        return Node(out, mark, key_mark)

    def key(self, node: Any) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, "a mapping key must be a plain name, not a list or mapping")
        if node.tag not in _SCALAR_TAGS:
            raise self._unsafe(node)
        return self.construct_object(node, deep=True)

    def _unsafe(self, node: Any) -> Exception:
        return self.error(
            node,
            f"the YAML tag {_short_tag(node.tag)} is not allowed: qswap reads {self.reader.what}s "
            "with safe loading and never builds Python objects from a file. Remove the tag and "
            "write plain values",
        )


class _PureLoader(_Marking, yaml.SafeLoader):  # type: ignore[misc]
    """The pure-Python loader: its error messages are the ones the tests pin."""

    def __init__(self, text: str, source: str, reader: YamlReader) -> None:
        yaml.SafeLoader.__init__(self, text)
        self._setup(source, reader)


if yaml.__with_libyaml__:

    class _FastLoader(
        _Marking,
        yaml.composer.Composer,  # type: ignore[misc]
        yaml.cyaml.CParser,  # type: ignore[misc]
        yaml.constructor.SafeConstructor,  # type: ignore[misc]
        yaml.resolver.Resolver,  # type: ignore[misc]
    ):
        """libyaml's scanner and parser under the same composer and checks: 4x faster."""

        def __init__(self, text: str, source: str, reader: YamlReader) -> None:
            yaml.cyaml.CParser.__init__(self, text)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)
            yaml.composer.Composer.__init__(self)
            self._setup(source, reader)

    _LOADERS: tuple[type[_Marking], ...] = (_FastLoader, _PureLoader)
else:
    _LOADERS = (_PureLoader,)


def descend(root: Node, loc: Sequence[str | int]) -> tuple[Node, int]:
    """Follow ``loc`` (keys and list indexes, e.g. a pydantic error's) from ``root``.

    Returns the deepest node reached and how many parts of ``loc`` led there: a part that
    names nothing (a pydantic tag, ``"[key]"``, a missing key) stops the walk.

    >>> root = Node({"rules": Node([Node(1, Mark("f", 2, 5))], Mark("f", 2, 1))}, Mark("f", 1, 1))
    >>> node, depth = descend(root, ("rules", 0, "match"))
    >>> str(node.mark), depth
    ('f:2:5', 2)
    """
    node = root
    depth = 0
    for part in loc:
        value = node.value
        in_dict = isinstance(value, dict) and part in value
        in_list = isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value)
        if not (in_dict or in_list):
            break
        node = value[part]
        depth += 1
    return node, depth


def mark_at(root: Node, loc: Sequence[str | int], *, key: bool = False) -> Mark:
    """Where the value at ``loc`` was written (its key's position with ``key=True``).

    A ``loc`` that leads nowhere gives the deepest node on its way: for an error about a value
    that is missing or cannot be placed, the mapping or list that should hold it.
    """
    node, depth = descend(root, loc)
    if key and depth == len(loc) and node.key_mark is not None:
        return node.key_mark
    return node.mark


def plain(node: Node) -> Any:
    """The data a node holds, without positions (what ``yaml.safe_load`` would return)."""
    if isinstance(node.value, dict):
        return {k: plain(v) for k, v in node.value.items()}
    if isinstance(node.value, list):
        return [plain(v) for v in node.value]
    return node.value
