"""PostgreSQL plumbing: connection pools and the mapping of outages to `TransientError`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any, Final

import asyncpg
import orjson

from analytics_engine.core.errors import TransientError

# Errors meaning "PostgreSQL is unavailable or busy right now", not "this data is bad": the
# batch is retried as is, nothing is dead-lettered.
TRANSIENT_ERRORS: Final[tuple[type[BaseException], ...]] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,  # class 08, incl. CannotConnectNowError
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,  # connection closed / pool closing under us
    asyncpg.exceptions.InternalClientError,  # a connection broken mid-protocol by an outage
    asyncpg.exceptions.InsufficientResourcesError,  # class 53: too many connections, disk full
    asyncpg.exceptions.OperatorInterventionError,  # class 57: admin shutdown, crash recovery
    asyncpg.exceptions.TransactionRollbackError,  # deadlock, serialization failure
    asyncpg.exceptions.LockNotAvailableError,
)


@contextlib.contextmanager
def transient_errors(what: str) -> Iterator[None]:
    """Re-raise an outage as `TransientError` so the bus retries instead of dead-lettering."""
    try:
        yield
    except (asyncpg.exceptions.QueryCanceledError, asyncpg.exceptions.DataError):
        raise  # a statement timeout or a value asyncpg cannot encode is the caller's fault
    except TRANSIENT_ERRORS as exc:
        raise TransientError(f"{what}: database unavailable ({type(exc).__name__}: {exc})") from exc


def _encode_json(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _encode_jsonb(value: Any) -> bytes:
    """jsonb's binary format: a version byte (1) then the JSON text."""
    return b"\x01" + (value.encode() if isinstance(value, str) else orjson.dumps(value))


def _decode_jsonb(data: bytes) -> Any:
    if data[:1] != b"\x01":
        raise ValueError(f"unknown jsonb binary format version {data[:1]!r}")
    return orjson.loads(memoryview(data)[1:])


async def _init_connection(conn: Any) -> None:
    """json/jsonb decode to Python objects (and encode from them; a `str` is taken as JSON
    text). jsonb goes in binary format so that binary COPY can write jsonb columns."""
    await conn.set_type_codec(
        "json", schema="pg_catalog", encoder=_encode_json, decoder=orjson.loads
    )
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=_encode_jsonb,
        decoder=_decode_jsonb,
        format="binary",
    )


async def create_pool(
    dsn: str,
    *,
    max_size: int,
    setup_sql: str | None = None,
    min_size: int = 0,
    application_name: str = "database_service",
    command_timeout: float | None = 60.0,
) -> Any:
    """An asyncpg pool that connects lazily (the service starts while PostgreSQL is down and
    reconnects by itself when it returns); `setup_sql` runs on every new connection."""

    async def init(conn: Any) -> None:
        await _init_connection(conn)
        if setup_sql:
            await conn.execute(setup_sql)

    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=init,
        command_timeout=command_timeout,
        max_inactive_connection_lifetime=300.0,
        server_settings={"application_name": application_name},
    )


async def connect(dsn: str) -> Any:
    return await asyncpg.connect(dsn, server_settings={"application_name": "database_service"})
