"""The named SQL of the SQLite broker: ``queries.sql`` and ``schema.sql``, parsed once at import.

``queries.sql`` holds blocks that each start with a ``-- name: NAME`` line; the block's text up to
the next such line is the query. Python refers to queries only by name (``QUERIES["reserve"]``)
and never builds SQL strings; a variable-length ``IN`` list is a JSON array bound to
``json_each(?)``.
"""

from __future__ import annotations

import re
import sqlite3
from importlib.resources import files
from typing import Final

_NAME_LINE: Final = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def _read(resource: str) -> str:
    return files(__package__ or __name__).joinpath(resource).read_text(encoding="utf-8")


def parse_queries(text: str) -> dict[str, str]:
    """Split ``-- name: X`` blocks into ``{X: sql}``; a duplicate or empty one is a ValueError."""
    parts = _NAME_LINE.split(text)
    queries: dict[str, str] = {}
    # parts = [preamble, name1, body1, name2, body2, ...]
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        sql = body.strip()
        if name in queries or not sql:
            raise ValueError(f"queries.sql: query {name!r} is duplicated or empty")
        queries[name] = sql
    return queries


def split_statements(script: str) -> list[str]:
    """Split a DDL script into complete statements (trigger bodies may contain ``;``)."""
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if pending.strip() and not all(
        part.strip().startswith("--") or not part.strip() for part in pending.splitlines()
    ):
        raise ValueError("schema.sql ends with an incomplete statement")
    return statements


QUERIES: Final = parse_queries(_read("queries.sql"))
SCHEMA: Final = split_statements(_read("schema.sql"))
