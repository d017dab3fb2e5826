"""qswap._yaml: the one safe, position-keeping YAML loader behind configs and registry packs."""

from __future__ import annotations

from pathlib import Path

import pytest

from qswap._yaml import MAX_DEPTH, Mark, NotRegularFileError, YamlReader, descend, mark_at, plain


class Problem(ValueError):
    """The exception a test format raises: the reason and where."""

    def __init__(self, reason: str, at: Mark) -> None:
        super().__init__(f"{at}: {reason}")
        self.reason = reason
        self.at = at


READER = YamlReader("widget", error=Problem)


def problem(text: str) -> Problem:
    """Parse ``text`` and return the Problem it must raise."""
    with pytest.raises(Problem) as info:
        READER.parse(text, "w.yaml")
    return info.value


def test_values_keep_their_positions_and_keys_theirs() -> None:
    """Each value knows its line and column, and a mapping value where its key was written."""
    root = READER.parse("a:\n  - 1\n  - {b: x}\n", "w.yaml")
    assert root is not None
    assert plain(root) == {"a": [1, {"b": "x"}]}
    item = root.value["a"].value[1].value["b"]
    assert (str(item.mark), str(item.key_mark)) == ("w.yaml:3:9", "w.yaml:3:6")


def test_an_empty_document_is_none() -> None:
    """A text of comments only parses to None, for the format to word."""
    assert READER.parse("# nothing\n", "w.yaml") is None


def test_mark_at_follows_a_pydantic_loc_as_far_as_it_goes() -> None:
    """A loc leads to its node (or its key), and stops at the deepest node that exists."""
    root = READER.parse("rules:\n  - name: a\n", "w.yaml")
    assert root is not None
    assert str(mark_at(root, ("rules", 0, "name"))) == "w.yaml:2:11"
    assert str(mark_at(root, ("rules", 0, "name"), key=True)) == "w.yaml:2:5"
    assert str(mark_at(root, ("rules", 0, "missing"), key=True)) == "w.yaml:2:5"
    assert descend(root, ("rules", 3))[1] == 1


def test_problems_use_the_format_noun_and_its_exception() -> None:
    """Unsafe tags, duplicate keys and syntax errors come as the format's error, at the line."""
    tag = problem("a: !!python/name:os.system x\n")
    assert str(tag.at) == "w.yaml:1:4"
    assert "qswap reads widgets with safe loading" in tag.reason
    dup = problem("a: 1\na: 2\n")
    assert str(dup) == (
        "w.yaml:2:1: duplicate key 'a' (first written at line 1). YAML would silently keep only "
        "the last one; remove or merge the duplicates"
    )
    several = problem("a: 1\n---\nb: 2\n")
    assert "Keep one widget per file" in several.reason


def test_limits_refuse_deep_nesting_and_alias_bombs() -> None:
    """Nesting past MAX_DEPTH and aliases expanding past the value limit are refused."""
    deep = problem("a: " + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5) + "\n")
    assert f"nested more than {MAX_DEPTH} levels deep. A widget needs" in deep.reason
    bomb = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcd", "bcde", strict=True)
    )
    assert "the widget holds more than 100000 values" in problem(bomb).reason
    with pytest.raises(Problem, match="nested more than 64 levels deep"):
        nested: object = 1
        for _ in range(MAX_DEPTH + 2):
            nested = [nested]
        READER.wrap(nested, Mark("<dict>"))


def test_read_refuses_big_binary_and_odd_files(tmp_path: Path) -> None:
    """A file over the limit or not UTF-8 is the format's error; a folder is an OSError."""
    small = YamlReader("widget", error=Problem, max_bytes=1 << 20)
    path = tmp_path / "w.yaml"
    path.write_bytes(b"a: 1\n" + b"#" * (1 << 20))
    with pytest.raises(Problem, match="the widget is 1.0 MiB; qswap reads widgets of at most 1"):
        small.read(path, "w.yaml")
    path.write_bytes(b"a: 1\nb: \xff\n")
    with pytest.raises(Problem, match=r"w\.yaml:2:4: the file is not UTF-8 text"):
        small.read(path, "w.yaml")
    with pytest.raises(IsADirectoryError):
        small.read(tmp_path, "dir")
    assert issubclass(NotRegularFileError, OSError)
