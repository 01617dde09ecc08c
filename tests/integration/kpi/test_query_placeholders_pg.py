"""The query KPI rule on params agrees with what the engine meets at run time: PostgreSQL
prepares the statement (its parameter count) and the database service requires one param per
parameter. A definition the metadata service accepts must prepare with exactly its params."""

from __future__ import annotations

import asyncpg
import pytest

from analytics_engine.kpi.definitions import placeholder_errors, sql_placeholders

pytestmark = pytest.mark.asyncio

CASES = [
    ("SELECT 1", 0),
    ("SELECT 1", 1),
    ("SELECT $1::int", 1),
    ("SELECT $1::int", 2),
    ("SELECT $1::int + $2::int", 1),
    ("SELECT $2::int - $1::int, $1::int", 2),
    ("SELECT $1::int + $3::int", 3),
    ("SELECT $1::int + $3::int", 2),
    ("SELECT '$2', $1::text -- $3\n", 1),
    ("SELECT $0::int", 0),
]


WINDOW_CASES = [
    ("SELECT $1::timestamptz, $2::timestamptz", 0),
    ("SELECT $1::text, $2::timestamptz, $3::timestamptz", 1),
    ("SELECT $1::text, $2::timestamptz", 1),
    ("SELECT $1::text", 1),
    ("SELECT $1::text, $3::timestamptz", 1),
    ("SELECT $1::text, $2::text, $3::text, $4::text", 1),
]
"""With `bind_window` the engine sends `params` + 2 values (the slot's start and end)."""


async def test_accepted_params_are_what_postgres_prepares(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        cases = [(sql, params, False) for sql, params in CASES]
        cases += [(sql, params, True) for sql, params in WINDOW_CASES]
        for sql, params, window in cases:
            accepted = placeholder_errors(sql_placeholders(sql), params, bind_window=window) is None
            sent = params + (2 if window else 0)
            try:
                stmt = await conn.prepare(sql)
                runs = len(stmt.get_parameters()) == sent
            except asyncpg.PostgresError:
                runs = False
            assert accepted == runs, (sql, params, window)
    finally:
        await conn.close()
