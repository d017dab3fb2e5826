"""The JSON Schemas in schemas/ match the models they are generated from."""

from __future__ import annotations

from pathlib import Path

from qswap.cli import _schemas, render_schema

REPO = Path(__file__).resolve().parent.parent


def test_committed_schemas_are_up_to_date() -> None:
    """schemas/*.json equal a fresh generation; run `qswap schema --write` when this fails."""
    for name, schema in _schemas().items():
        path = REPO / "schemas" / name
        assert path.is_file(), f"{path} is missing: run `qswap schema --write`"
        assert path.read_text(encoding="utf-8") == render_schema(schema), (
            f"{path} is stale: run `qswap schema --write`"
        )
