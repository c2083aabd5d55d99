"""The named SQL: parsed once, every query valid against the schema, hot paths on their indexes."""

from __future__ import annotations

import ast
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

import conveyor.brokers.sqlite as package
from conveyor.brokers.sqlite.queries import QUERIES, SCHEMA, parse_queries, split_statements

PACKAGE_DIR = Path(package.__file__).parent


@pytest.fixture
def schema_db() -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    for statement in SCHEMA:
        conn.execute(statement)
    try:
        yield conn
    finally:
        conn.close()


def _params(sql: str) -> dict[str, object] | tuple[object, ...]:
    names = re.findall(r":([a-z_]+)", sql)
    if names:
        return dict.fromkeys(names, None)
    return (None,) * sql.count("?")


def test_every_query_compiles_against_the_schema(schema_db: sqlite3.Connection) -> None:
    skip = {"begin_immediate", "begin_deferred", "commit", "rollback"}
    for name, sql in QUERIES.items():
        if name in skip or sql.startswith("PRAGMA"):
            continue
        try:
            schema_db.execute(f"EXPLAIN {sql}", _params(sql))
        except sqlite3.Error as exc:  # pragma: no cover - the message names the broken query
            pytest.fail(f"query {name!r} does not compile: {exc}")


@pytest.mark.parametrize(
    ("query", "index"),
    [
        ("reserve", "jobs_reserve"),
        ("promote_scheduled", "jobs_scheduled"),
        ("requeue_expired", "jobs_expiry"),
        ("live_dedup_ids", "jobs_dedup"),
        ("counts_of_queue", "jobs_queue_state"),
        ("cleanup", "jobs_finished"),
    ],
)
def test_hot_queries_use_their_partial_index(
    schema_db: sqlite3.Connection, query: str, index: str
) -> None:
    sql = QUERIES[query]
    plan = " | ".join(
        row[3] for row in schema_db.execute(f"EXPLAIN QUERY PLAN {sql}", _params(sql))
    )
    assert index in plan, plan


def test_python_never_builds_sql_it_only_names_queries() -> None:
    """Every execute/executemany in the package takes Q[...], QUERIES[...] or a schema statement."""
    for source in PACKAGE_DIR.glob("*.py"):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("execute", "executemany", "executescript")
            ):
                sql = node.args[0]
                named = (
                    isinstance(sql, ast.Subscript)
                    and isinstance(sql.value, ast.Name)
                    and sql.value.id in ("Q", "QUERIES")
                )
                from_schema = isinstance(sql, ast.Name) and sql.id == "statement"
                assert named or from_schema, f"{source.name}:{node.lineno} builds SQL"


def test_loader_rejects_duplicate_and_empty_queries() -> None:
    assert parse_queries("-- preamble\n-- name: a\nSELECT 1\n-- name: b\nSELECT 2;\n") == {
        "a": "SELECT 1",
        "b": "SELECT 2;",
    }
    with pytest.raises(ValueError, match="duplicated or empty"):
        parse_queries("-- name: a\nSELECT 1\n-- name: a\nSELECT 2\n")
    with pytest.raises(ValueError, match="duplicated or empty"):
        parse_queries("-- name: a\n\n-- name: b\nSELECT 2\n")


def test_schema_splits_into_complete_statements() -> None:
    assert split_statements("CREATE TABLE a (x);\n-- c\nCREATE TABLE b (y);\n-- end\n") == [
        "CREATE TABLE a (x);",
        "-- c\nCREATE TABLE b (y);",
    ]
    with pytest.raises(ValueError, match="incomplete"):
        split_statements("CREATE TABLE a (x")
    assert any("CREATE TABLE jobs" in s for s in SCHEMA)
