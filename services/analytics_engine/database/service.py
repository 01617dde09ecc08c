"""The Database Service (`analytics-engine run database`): composition only.

Consumes `simulation.entity.*` (SimulationDataConsumer), `kpi.calculated` (KPIResultConsumer),
`archival.confirmed` (Archiver) and `stream.*` (StreamSubscriptions); answers `database.query`
and `database.command` (QueryRequestHandler); runs retention and partition maintenance.
"""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import Field, PostgresDsn, field_validator
from pydantic_settings import NoDecode

from analytics_engine.core import channels
from analytics_engine.core.durations import Duration
from analytics_engine.core.retry import until_reachable
from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.core.settings import BaseServiceSettings, DatabaseSettings
from analytics_engine.database.archival import Archiver
from analytics_engine.database.db import TRANSIENT_ERRORS, connect, create_pool
from analytics_engine.database.kpi_result_consumer import KPIResultConsumer
from analytics_engine.database.metrics import DatabaseMetrics
from analytics_engine.database.migrate import migrate
from analytics_engine.database.partitions import PartitionManager
from analytics_engine.database.query_handler import QueryRequestHandler
from analytics_engine.database.simulation_data_consumer import SimulationDataConsumer
from analytics_engine.database.subscriptions import StreamSubscriptions
from analytics_engine.database.writer import STAGING_SETUP, EntityEventWriter

log = logging.getLogger(__name__)

SERVICE = "database_service"
_CALLER = re.compile(r"[a-z0-9_-]+|\*")


class Settings(BaseServiceSettings, DatabaseSettings):
    port: int = Field(
        default=8084,
        ge=0,
        le=65535,
        validation_alias="DATABASE_SERVICE_PORT",
        description="Port of the database service's HTTP server (`/healthz`, `/readyz`, "
        "`/metrics`).",
    )
    database_readonly_url: PostgresDsn | None = Field(
        default=None,
        validation_alias="DATABASE_READONLY_URL",
        repr=False,  # holds the password
        description="Role for execute_query (see database/roles.py); falls back to DATABASE_URL.",
    )
    query_timeout: Duration = Field(
        default=timedelta(seconds=5),
        validation_alias="DATABASE_QUERY_TIMEOUT",
        description="Longest a `database.query` read may take (statement timeout and deadline, "
        "waiting for a connection included); a read past it is cancelled with "
        "`query_timeout` (a connection not had in time is `unavailable`).",
    )
    execute_query_callers: Annotated[tuple[str, ...], NoDecode] = Field(
        default=("calculation_engine", "cli"),
        validation_alias="DATABASE_EXECUTE_QUERY_CALLERS",
        description="Services that may run `execute_query` (arbitrary read SQL), "
        "comma-separated; `*` lets every caller. A caller is known by its request's "
        "`reply_to`, `reply.{service}.{instance}`: Redis's ACL lets only that service's user "
        "listen there, so another credential cannot read the answer. Other callers get a "
        "`forbidden` error reply: the API gateway's credential, say, has no use for SQL.",
    )

    @field_validator("execute_query_callers", mode="before")
    @classmethod
    def _callers(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        for name in value:
            if not _CALLER.fullmatch(name):
                raise ValueError(f"{name!r}: a service name ([a-z0-9_-]) or *")
        return value

    query_max_rows: int = Field(
        default=10_000,
        ge=1,
        validation_alias="DATABASE_QUERY_MAX_ROWS",
        description="Most rows an `execute_query` reply carries (a request may ask for fewer); "
        "longer results are cut (`truncated`).",
    )
    query_max_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        le=6 * 1024 * 1024,
        validation_alias="DATABASE_QUERY_MAX_BYTES",
        description="Cap on the JSON size of a `database.query` reply (`execute_query`, "
        "`kpi_history`, `latest_kpi_values`, `list_entities`); bigger results are truncated "
        "(`truncated`, or `next_after` for a page). At most 6 MB: a reply must fit Redis's 8 MB "
        "message limit.",
    )
    retention: Duration = Field(
        default=timedelta(days=7),
        validation_alias="DATABASE_RETENTION",
        description="Entity events older than this (by `occurred_at`) are sent to the archival "
        "service and deleted once it confirms; also `request_archival`'s default.",
    )
    archival_interval: Duration = Field(
        default=timedelta(seconds=60),
        validation_alias="DATABASE_ARCHIVAL_INTERVAL",
        description="Time between retention passes, which also re-send batches whose "
        "confirmation is overdue. 0 turns the periodic passes off: old events stay until a "
        "`request_archival` command runs a pass.",
    )
    archival_batch_rows: int = Field(
        default=5000,
        ge=1,
        le=100_000,
        validation_alias="DATABASE_ARCHIVAL_BATCH_ROWS",
        description="Most rows of one archival batch (one entity type and UTC day, sent as one "
        "`archival.events` message, ~2 MB at the default with small attributes).",
    )
    archival_batch_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=64 * 1024,
        le=256 * 1024 * 1024,
        validation_alias="DATABASE_ARCHIVAL_BATCH_BYTES",
        description="About the most bytes of one archival batch's message (estimated from the "
        "rows' sizes; a batch holds at least one row). Keep it well under Redis's "
        "proto-max-bulk-len (8mb in the chart): a larger message is refused by Redis, and the "
        "batch would be retried forever. Large attributes make batches of fewer rows.",
    )
    archival_confirm_timeout: Duration = Field(
        default=timedelta(minutes=5),
        validation_alias="DATABASE_ARCHIVAL_CONFIRM_TIMEOUT",
        description="An unconfirmed archival batch is re-sent after this long.",
    )
    archival_max_inflight: int = Field(
        default=8,
        ge=1,
        validation_alias="DATABASE_ARCHIVAL_MAX_INFLIGHT",
        description="Archival batches sent and not yet confirmed at most; a pass creates new "
        "ones only below this (it bounds the rows awaiting deletion and the messages in "
        "flight).",
    )
    subscription_timeout: Duration = Field(
        default=timedelta(seconds=30),
        validation_alias="DATABASE_SUBSCRIPTION_TIMEOUT",
        description="A replay subscription (`stream.subscribe`) without a heartbeat for this "
        "long is ended; keep it well above its subscribers' heartbeat interval (5 s for the "
        "calculation engine's backfills).",
    )
    replay_page_rows: int = Field(
        default=1000,
        ge=1,
        le=50_000,
        validation_alias="DATABASE_REPLAY_PAGE_ROWS",
        description="Stored events a replay reads and publishes per page (one MULTI with the "
        "subscription's cursor).",
    )
    replay_max_lag: int = Field(
        default=50_000,
        ge=1,
        validation_alias="DATABASE_REPLAY_MAX_LAG",
        description="Replay pauses while the target stream has this many unread entries.",
    )
    write_batch: int = Field(
        default=2000,
        ge=1,
        le=10_000,
        validation_alias="DATABASE_WRITE_BATCH",
        description="Entity events read per stream per batch (one transaction per batch).",
    )
    write_linger: Duration = Field(
        default=timedelta(milliseconds=50),
        validation_alias="DATABASE_WRITE_LINGER",
        description="A read of fewer than DATABASE_WRITE_BATCH events waits this long once for "
        "more before writing: fewer, bigger transactions (KPIs do not wait on this path).",
    )
    writers: int = Field(
        default=3,
        ge=1,
        le=8,
        validation_alias="DATABASE_WRITERS",
        description="Concurrent entity-event consumers (batches in flight) per instance. Each "
        "overlaps its PostgreSQL work (and commit) with the others' parsing; measured on 2 "
        "cores, a backlog drained ~10% faster with 3 than with 2, and no faster with 4.",
    )
    pool_size: int = Field(
        default=8,
        ge=2,
        validation_alias="DATABASE_POOL_SIZE",
        description="Most PostgreSQL connections of each of the instance's two pools (writer, "
        "and reader for queries): up to twice this per instance.",
    )
    timescale: Literal["auto", "on", "off"] = Field(
        default="auto",
        validation_alias="DATABASE_TIMESCALE",
        description="Schema flavour, chosen when the schema is first created (later changes "
        "have no effect): `auto` TimescaleDB when its extension can be created, `on` requires "
        "it, `off` plain PostgreSQL with daily partitions.",
    )
    partition_days_ahead: int = Field(
        default=3,
        ge=0,
        validation_alias="DATABASE_PARTITION_DAYS_AHEAD",
        description="On plain PostgreSQL, days of `entity_events` partitions created ahead of "
        "today (at start, then hourly); a day an event needs is otherwise created on demand.",
    )


class _Pools:
    """Pools created at startup; handlers get them through these accessors."""

    def __init__(self) -> None:
        self.writer: Any = None
        self.reader: Any = None

    def get_writer(self) -> Any:
        if self.writer is None:
            raise RuntimeError("database pools are not open yet")
        return self.writer

    def get_reader(self) -> Any:
        if self.reader is None:
            raise RuntimeError("database pools are not open yet")
        return self.reader


class _LazyPool:
    """Stands in for a pool that is created at startup (components are built before that)."""

    def __init__(self, get: Any) -> None:
        self._get = get

    def acquire(self, *args: Any, **kwargs: Any) -> Any:
        return self._get().acquire(*args, **kwargs)


async def _migrate_until_done(settings: Settings) -> str:
    """Apply migrations, waiting for PostgreSQL if it is not up yet."""

    async def attempt() -> str:
        conn = await connect(str(settings.database_url))
        try:
            return await migrate(conn, timescale=settings.timescale)
        finally:
            await conn.close()

    return await until_reachable(attempt, errors=TRANSIENT_ERRORS, what="database")


def create(settings: Settings) -> ServiceRuntime:
    runtime = ServiceRuntime(service=SERVICE, settings=settings, port=settings.port)
    metrics = DatabaseMetrics(runtime.metrics.registry)
    pools = _Pools()
    writer_pool = _LazyPool(pools.get_writer)
    partitions = PartitionManager(enabled=True, days_ahead=settings.partition_days_ahead)

    async def open_pools() -> None:
        flavour = await _migrate_until_done(settings)
        partitions.enabled = flavour == "postgres"
        log.info("schema ready", extra={"flavour": flavour})
        pools.writer = await create_pool(
            str(settings.database_url), max_size=settings.pool_size, setup_sql=STAGING_SETUP
        )
        pools.reader = await create_pool(
            str(settings.database_readonly_url or settings.database_url),
            max_size=settings.pool_size,
            application_name="database_service_reader",
        )
        async with pools.writer.acquire() as conn:
            await partitions.ensure_ahead(conn)

    async def close_pools() -> None:
        for pool in (pools.reader, pools.writer):
            if pool is not None:
                await pool.close()

    runtime.on_startup(open_pools)
    runtime.on_shutdown(close_pools)

    async def database_reachable() -> bool:
        async with pools.get_writer().acquire(timeout=2.0) as conn:
            return bool(await conn.fetchval("SELECT 1", timeout=2.0) == 1)

    runtime.add_readiness_check("database", database_reachable)

    # entity events
    writer = EntityEventWriter(writer_pool, partitions, metrics)
    # Several consumers in the service's group overlap Python work with PostgreSQL work; each
    # has its own handler (a handler acknowledges through the consumer it is bound to).
    for i in range(settings.writers):
        entities = SimulationDataConsumer(writer, runtime.dead_letters, metrics)
        entities.bind(
            runtime.consume(
                channels.ENTITY_CHANNELS,
                entities,
                consumer=runtime.instance if i == 0 else f"{runtime.instance}-w{i}",
                auto_ack=False,
                batch_size=settings.write_batch,
                linger_ms=int(settings.write_linger.total_seconds() * 1000),
                lazy_events=True,  # the handler reads envelope fields, never whole Events
                read_ahead=True,  # Redis assembles the next batch while this one is parsed
            )
        )
    # KPI results
    kpis = KPIResultConsumer(writer_pool, runtime.publisher, runtime.dead_letters, metrics)
    kpis.bind(runtime.consume([channels.KPI_CALCULATED], kpis, auto_ack=False))

    # retention
    archiver = Archiver(
        pool=writer_pool,
        publisher=runtime.publisher,
        dead_letters=runtime.dead_letters,
        metrics=metrics,
        partitions=partitions,
        retention=settings.retention,
        interval=settings.archival_interval,
        batch_rows=settings.archival_batch_rows,
        batch_bytes=settings.archival_batch_bytes,
        confirm_timeout=settings.archival_confirm_timeout,
        max_inflight=settings.archival_max_inflight,
    )
    archiver.bind(
        runtime.consume([channels.ARCHIVAL_CONFIRMED], archiver.on_confirmed, auto_ack=False)
    )
    if settings.archival_interval.total_seconds() > 0:
        runtime.add_task("archival", archiver.run)

    async def partition_maintenance() -> None:
        while True:
            await asyncio.sleep(3600)
            try:
                async with pools.get_writer().acquire() as conn:
                    await partitions.ensure_ahead(conn)
            except TRANSIENT_ERRORS as exc:
                log.warning("partition maintenance postponed", extra={"error": str(exc)})

    runtime.add_task("partition_maintenance", partition_maintenance)

    # stream subscriptions
    subscriptions = StreamSubscriptions(
        redis=runtime.redis,
        pool=writer_pool,
        publisher=runtime.publisher,
        dead_letters=runtime.dead_letters,
        metrics=metrics,
        instance=runtime.instance,
        timeout=settings.subscription_timeout,
        page_rows=settings.replay_page_rows,
        max_lag=settings.replay_max_lag,
    )
    subscriptions.bind(
        runtime.consume(
            [channels.STREAM_SUBSCRIBE, channels.STREAM_HEARTBEAT, channels.STREAM_UNSUBSCRIBE],
            subscriptions.on_control,
            auto_ack=False,
        )
    )
    runtime.add_task("stream_replay", subscriptions.run)

    # request/reply
    queries = QueryRequestHandler(
        reader_pool=pools.get_reader,
        writer_pool=pools.get_writer,
        query_timeout=settings.query_timeout,
        max_rows=settings.query_max_rows,
        max_bytes=settings.query_max_bytes,
        execute_query_callers=settings.execute_query_callers,
        metrics=metrics,
        request_archival=archiver.request,
    )
    runtime.respond(channels.DATABASE_QUERY, queries.query_handlers())
    runtime.respond(channels.DATABASE_COMMAND, queries.command_handlers())
    return runtime
