"""PostgreSQL storage of KPI definitions and entity types (asyncpg).

Every change runs in one transaction that updates the current row, appends a history row and
writes an outbox row (the `metadata.changed` event), so the three can never disagree. Rows are
soft-deleted: the version keeps counting across delete and re-create, so `definition_version` in
KPI results never goes backwards for a code.

PostgreSQL being down (or the schema not migrated yet) surfaces as `StoreUnavailable`, a
`TransientError`: HTTP answers 503, request/reply answers `unavailable`, nothing crashes.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

import asyncpg
import orjson
from pydantic import BaseModel, ValidationError

from analytics_engine.kpi.definitions import EntityTypeDefinition, KPIDefinition
from analytics_engine.metadata.errors import (
    BadInput,
    Conflict,
    Invalid,
    NotFound,
    PreconditionFailed,
    StoreUnavailable,
)
from analytics_engine.metadata.migrate import migrate, packaged_migrations
from analytics_engine.metadata.preconditions import NONE, Precondition
from analytics_engine.metadata.validation import (
    INVALID_KPI,
    NUL_REFUSED,
    broken_kpis,
    canonical,
    check_kpi_entity,
)

log = logging.getLogger(__name__)

KindName = Literal["kpi_definition", "entity_type"]
Action = Literal["created", "updated", "deleted"]

OUTBOX_LOCK_KEY: Final = 0x6D65_7461_6F75_7462  # "metaoutb": one outbox drainer at a time
OUTBOX_LOCK_WAIT: Final = "2s"

UNSTORABLE_TEXT: Final = (
    asyncpg.exceptions.CharacterNotInRepertoireError,  # NUL in a text parameter
    asyncpg.exceptions.UntranslatableCharacterError,  # \u0000 in a jsonb parameter
)
UNAVAILABLE_ERRORS: Final = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections
    asyncpg.InterfaceError,  # connection closed under us
)


@dataclass(frozen=True, slots=True)
class Kind:
    """Where one kind of definition lives (identifiers are constants, never user input)."""

    name: KindName
    table: str
    history: str
    key: str
    label: str
    model: type[BaseModel]

    def same(self, stored: dict[str, Any], spec: dict[str, Any]) -> bool:
        """Whether a stored spec means `spec`. A spec stored by an earlier release lacks the
        fields added since (their defaults): re-read through today's model it is compared as
        written today, so re-asserting an unchanged definition makes no new version."""
        if stored == spec:
            return True
        try:
            return canonical(self.model.model_validate(stored)) == spec
        except ValidationError:
            return False


KPI: Final = Kind(
    "kpi_definition",
    "kpi_definitions",
    "kpi_definition_history",
    "code",
    "KPI definition",
    KPIDefinition,
)
ENTITY_TYPE: Final = Kind(
    "entity_type",
    "entity_types",
    "entity_type_history",
    "entity_type",
    "entity type",
    EntityTypeDefinition,
)


@dataclass(frozen=True, slots=True)
class Stored:
    key: str
    version: int
    spec: dict[str, Any]
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class PutResult:
    stored: Stored
    created: bool
    changed: bool


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    version: int
    action: Action
    spec: dict[str, Any]
    changed_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "action": self.action,
            "changed_at": self.changed_at.isoformat(),
            "spec": self.spec,
        }


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    id: int
    event_id: str
    payload: dict[str, Any]


def change_payload(kind: Kind, key: str, action: Action, version: int) -> dict[str, Any]:
    """The `metadata.changed` event payload."""
    return {
        "kind": kind.name,
        "code": key,
        "action": "deleted" if action == "deleted" else "upserted",
        "version": version,
    }


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda value: orjson.dumps(value).decode(),
        decoder=orjson.loads,
        schema="pg_catalog",
    )


async def _keep_session(_: asyncpg.Connection) -> None:
    """Pool reset hook: skip asyncpg's default reset query on every release. This service never
    changes session state (only transaction-scoped locks, no LISTEN/SET), and an open transaction
    is still rolled back by asyncpg; this halves the round trips of a read."""


class MetadataStore:
    def __init__(
        self,
        dsn: str,
        *,
        max_connections: int = 10,
        connect_timeout: float = 5.0,
        command_timeout: float = 10.0,
    ) -> None:
        self._dsn = dsn
        self._max = max_connections
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None
        self.schema_ready = False
        self.changed = asyncio.Event()
        """Set after every committed change: wakes the outbox relay."""

    # -- lifecycle -------------------------------------------------------------------------
    async def open(self) -> None:
        """Create the pool without connecting (min size 0): a database that is down at start
        only makes requests fail with 503 until it is back."""
        if self._pool is None:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=0,
                max_size=self._max,
                timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
                init=_init_connection,
                reset=_keep_session,
                max_inactive_connection_lifetime=60.0,
            )

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 10)
            except TimeoutError:
                pool.terminate()

    async def migrate(self) -> list[int]:
        async with self._connection(need_schema=False) as conn:
            applied = await migrate(conn, packaged_migrations())
        self.schema_ready = True
        if applied:
            log.info("applied metadata migrations", extra={"versions": applied})
        return applied

    async def ping(self) -> bool:
        async with self._connection(need_schema=False) as conn:
            return bool(await conn.fetchval("SELECT 1"))

    @asynccontextmanager
    async def _connection(self, *, need_schema: bool = True) -> AsyncIterator[asyncpg.Connection]:
        if self._pool is None:
            raise StoreUnavailable("the metadata store is not open")
        if need_schema and not self.schema_ready:
            raise StoreUnavailable("the metadata schema is not ready yet (database unreachable)")
        try:
            async with self._pool.acquire(timeout=self._connect_timeout) as conn:
                yield conn
        except UNAVAILABLE_ERRORS as exc:
            raise StoreUnavailable(f"database unavailable: {_describe(exc)}") from exc
        except UNSTORABLE_TEXT as exc:
            # The HTTP API refuses NUL up front; this catches any path that does not.
            raise BadInput(NUL_REFUSED) from exc

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._connection() as conn, conn.transaction():
            yield conn

    # -- reads -----------------------------------------------------------------------------
    async def get(self, kind: Kind, key: str) -> Stored | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {kind.key} AS key, version, spec, updated_at FROM {kind.table} "
                f"WHERE {kind.key} = $1 AND deleted_at IS NULL",
                key,
            )
        return _stored(row) if row is not None else None

    async def list_all(self, kind: Kind, *, entity_type: str | None = None) -> list[Stored]:
        """Live definitions ordered by key; KPIs optionally of one entity type."""
        query = (
            f"SELECT {kind.key} AS key, version, spec, updated_at FROM {kind.table} "
            f"WHERE deleted_at IS NULL"
        )
        args: list[Any] = []
        if entity_type is not None:
            query += " AND spec ->> 'entity_type' = $1"
            args.append(entity_type)
        async with self._connection() as conn:
            rows = await conn.fetch(f"{query} ORDER BY {kind.key}", *args)
        return [_stored(row) for row in rows]

    async def history(self, kind: Kind, key: str) -> list[HistoryEntry]:
        """Every version ever written for `key`, oldest first (empty: never existed)."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT version, action, spec, changed_at FROM {kind.history} "
                f"WHERE {kind.key} = $1 ORDER BY version",
                key,
            )
        return [HistoryEntry(r["version"], r["action"], r["spec"], r["changed_at"]) for r in rows]

    async def seeded_kpis(self) -> dict[str, dict[str, Any]]:
        """code -> the spec `KPI_DEFINITIONS_DIR` gave it when last applied (`seeding`)."""
        async with self._connection() as conn:
            rows = await conn.fetch("SELECT code, spec FROM seeded_kpis")
        return {row["code"]: row["spec"] for row in rows}

    # -- writes ----------------------------------------------------------------------------
    async def record_seeded_kpi(self, code: str, spec: dict[str, Any]) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO seeded_kpis (code, spec) VALUES ($1, $2) ON CONFLICT (code)"
                " DO UPDATE SET spec = EXCLUDED.spec, seeded_at = now()",
                code,
                spec,
            )

    async def put_kpi(self, kpi: KPIDefinition, condition: Precondition = NONE) -> PutResult:
        """Create or replace a KPI after checking it against its (locked) entity type."""
        spec = canonical(kpi)
        unchanged = await self._unchanged(KPI, kpi.code, spec, condition)
        if unchanged is not None:
            return unchanged
        async with self._transaction() as conn:
            row = await conn.fetchrow(
                "SELECT spec FROM entity_types WHERE entity_type = $1 AND deleted_at IS NULL "
                "FOR SHARE",
                kpi.entity_type,
            )
            entity = EntityTypeDefinition.model_validate(row["spec"]) if row else None
            known: list[str] = []
            if entity is None:
                known = [
                    r["entity_type"]
                    for r in await conn.fetch(
                        "SELECT entity_type FROM entity_types WHERE deleted_at IS NULL"
                    )
                ]
            errors = check_kpi_entity(kpi, entity, known)
            if errors:
                raise Invalid(INVALID_KPI, errors)
            result = await self._upsert(conn, KPI, kpi.code, spec, condition)
        self._committed(result.changed)
        return result

    async def put_entity_type(
        self, entity: EntityTypeDefinition, condition: Precondition = NONE
    ) -> PutResult:
        """Create or replace an entity type; refused (Conflict) if it would break a KPI."""
        spec = canonical(entity)
        unchanged = await self._unchanged(ENTITY_TYPE, entity.entity_type, spec, condition)
        if unchanged is not None:
            return unchanged
        async with self._transaction() as conn:
            result = await self._upsert(conn, ENTITY_TYPE, entity.entity_type, spec, condition)
            if result.changed:
                errors = broken_kpis(entity, await self._kpis_of(conn, entity.entity_type))
                if errors:
                    raise Conflict(
                        f"entity type {entity.entity_type!r} would break KPI definitions that "
                        f"use it; change or delete those first",
                        errors,
                    )
        self._committed(result.changed)
        return result

    async def delete(self, kind: Kind, key: str, condition: Precondition = NONE) -> int:
        """Soft-delete; returns the version of the deletion."""
        async with self._transaction() as conn:
            row = await conn.fetchrow(
                f"SELECT version, spec FROM {kind.table} "
                f"WHERE {kind.key} = $1 AND deleted_at IS NULL FOR UPDATE",
                key,
            )
            if row is None:
                raise NotFound(kind.label, key)
            failure = condition.failure(row["version"])
            if failure is not None:
                raise PreconditionFailed(f"{kind.label} {key!r} {failure}", row["version"])
            if kind is ENTITY_TYPE:
                users = [k.code for k in await self._kpis_of(conn, key)]
                if users:
                    raise Conflict(
                        f"entity type {key!r} is used by KPI definitions: {', '.join(users)}",
                    )
            version = int(row["version"]) + 1
            await conn.execute(
                f"UPDATE {kind.table} SET version = $2, deleted_at = now(), updated_at = now() "
                f"WHERE {kind.key} = $1",
                key,
                version,
            )
            await self._record(conn, kind, key, version=version, spec=row["spec"], action="deleted")
        self._committed(True)
        return version

    async def ensure_entity_type(self, entity: EntityTypeDefinition) -> bool:
        """Create the entity type unless one with this name exists; True if created."""
        try:
            await self.put_entity_type(entity, Precondition(absent=True))
        except PreconditionFailed:
            return False
        return True

    async def _kpis_of(self, conn: asyncpg.Connection, entity_type: str) -> list[KPIDefinition]:
        rows = await conn.fetch(
            "SELECT code, spec FROM kpi_definitions "
            "WHERE deleted_at IS NULL AND spec ->> 'entity_type' = $1 ORDER BY code",
            entity_type,
        )
        kpis: list[KPIDefinition] = []
        for row in rows:
            try:
                kpis.append(KPIDefinition.model_validate(row["spec"]))
            except ValidationError:
                log.warning("stored KPI no longer validates", extra={"code": row["code"]})
        return kpis

    async def _unchanged(
        self, kind: Kind, key: str, spec: dict[str, Any], condition: Precondition
    ) -> PutResult | None:
        """Fast path of an idempotent PUT (operators re-assert specs all the time): when the
        live spec already equals `spec`, answer from one read, with no row lock and no write.
        The stored spec was valid against its entity type, and entity-type changes that would
        break it are refused, so skipping the checks is safe. None: take the write path."""
        current = await self.get(kind, key)
        if (
            current is None
            or not kind.same(current.spec, spec)
            or condition.failure(current.version)
        ):
            return None
        return PutResult(current, created=False, changed=False)

    async def _upsert(
        self,
        conn: asyncpg.Connection,
        kind: Kind,
        key: str,
        spec: dict[str, Any],
        condition: Precondition,
    ) -> PutResult:
        # A placeholder row (deleted, version 0) makes "absent" lockable like "present": two
        # concurrent creates of one key serialize on it instead of one failing on the PK.
        await conn.execute(
            f"INSERT INTO {kind.table} ({kind.key}, version, spec, deleted_at) "
            f"VALUES ($1, 0, '{{}}'::jsonb, now()) ON CONFLICT DO NOTHING",
            key,
        )
        row = await conn.fetchrow(
            f"SELECT version, spec, deleted_at, updated_at FROM {kind.table} "
            f"WHERE {kind.key} = $1 FOR UPDATE",
            key,
        )
        assert row is not None
        exists = row["deleted_at"] is None
        current: int | None = row["version"] if exists else None
        failure = condition.failure(current)
        if failure is not None:
            raise PreconditionFailed(f"{kind.label} {key!r} {failure}", current)
        if exists and kind.same(row["spec"], spec):
            stored = Stored(key, row["version"], row["spec"], row["updated_at"])
            return PutResult(stored, False, False)
        # Versions never go backwards while history survives, even if the current row was lost
        # (a partial restore): continue after the highest recorded version.
        recorded = await conn.fetchval(
            f"SELECT coalesce(max(version), 0) FROM {kind.history} WHERE {kind.key} = $1", key
        )
        version = max(int(row["version"]), int(recorded)) + 1
        updated_at = await conn.fetchval(
            f"UPDATE {kind.table} SET version = $2, spec = $3, updated_at = now(), "
            f"created_at = CASE WHEN deleted_at IS NULL THEN created_at ELSE now() END, "
            f"deleted_at = NULL WHERE {kind.key} = $1 RETURNING updated_at",
            key,
            version,
            spec,
        )
        await self._record(
            conn, kind, key, version=version, spec=spec, action="updated" if exists else "created"
        )
        return PutResult(Stored(key, version, spec, updated_at), not exists, True)

    async def _record(
        self,
        conn: asyncpg.Connection,
        kind: Kind,
        key: str,
        *,
        version: int,
        spec: dict[str, Any],
        action: Action,
    ) -> None:
        await conn.execute(
            f"INSERT INTO {kind.history} ({kind.key}, version, spec, action) "
            f"VALUES ($1, $2, $3, $4)",
            key,
            version,
            spec,
            action,
        )
        await conn.execute(
            "INSERT INTO metadata_outbox (event_id, payload) VALUES ($1, $2)",
            uuid.uuid4(),
            change_payload(kind, key, action, version),
        )

    def _committed(self, changed: bool) -> None:
        if changed:
            self.changed.set()

    # -- outbox ----------------------------------------------------------------------------
    async def drain_outbox(
        self,
        publish: Callable[[Sequence[OutboxEntry]], Awaitable[None]],
        *,
        limit: int = 100,
    ) -> int:
        """Publish the oldest pending change events and delete them, in one transaction.

        One replica drains at a time (a transaction-level advisory lock, waited for up to
        `OUTBOX_LOCK_WAIT`, then 0 is returned and the rows are left to the holder or to the
        next poll): replicas taking rows side by side (SKIP LOCKED) published a code's later
        change before its earlier one whenever the earlier one's batch was still in flight. A
        code's changes get outbox ids in commit order (its row is locked before the outbox
        insert), so publishing by id keeps their order. If `publish` fails the rows stay for the
        next attempt. A crash after publishing but before commit republishes with the same
        `event_id` (at-least-once).
        """
        try:
            async with self._transaction() as conn:
                await conn.execute(f"SET LOCAL lock_timeout = '{OUTBOX_LOCK_WAIT}'")
                await conn.execute("SELECT pg_advisory_xact_lock($1)", OUTBOX_LOCK_KEY)
                return await self._drain_locked(conn, publish, limit)
        except asyncpg.exceptions.LockNotAvailableError:
            return 0  # another replica is draining (held up by a Redis outage or backpressure)

    async def _drain_locked(
        self,
        conn: asyncpg.Connection,
        publish: Callable[[Sequence[OutboxEntry]], Awaitable[None]],
        limit: int,
    ) -> int:
        rows = await conn.fetch(
            "SELECT id, event_id, payload FROM metadata_outbox ORDER BY id LIMIT $1", limit
        )
        if not rows:
            return 0
        entries = [OutboxEntry(r["id"], str(r["event_id"]), r["payload"]) for r in rows]
        await publish(entries)
        await conn.execute(
            "DELETE FROM metadata_outbox WHERE id = ANY($1::bigint[])", [e.id for e in entries]
        )
        return len(entries)


def _stored(row: asyncpg.Record) -> Stored:
    return Stored(row["key"], row["version"], row["spec"], row["updated_at"])


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text[:300]
