"""Calculation Engine service: composes the StreamProcessor, definition sync, backfills, query
KPIs and the HTTP API on a `ServiceRuntime`.

Deployment: ONE active replica per KPI set. The consumer name is fixed
(`CALCULATION_CONSUMER_NAME`) so a restarted pod re-reads its own pending entries; the state
lives in that one process and its checkpoint (`ae:calc:checkpoint`), the query KPIs' last slots
in `ae:calc:checkpoint.query_slots`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import Field, field_validator

from analytics_engine.calculation.api import KPIApi
from analytics_engine.calculation.backfill import BackfillManager
from analytics_engine.calculation.cache import LatestResults
from analytics_engine.calculation.metrics import CalculationMetrics
from analytics_engine.calculation.processor import StreamProcessor
from analytics_engine.calculation.queries import QueryRunner
from analytics_engine.calculation.registry import DefinitionRegistry, recorded_directory
from analytics_engine.calculation.sync import DefinitionSync
from analytics_engine.core import channels
from analytics_engine.core.bus import REDIS_ERRORS
from analytics_engine.core.retry import until_reachable
from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.core.settings import BaseServiceSettings
from analytics_engine.kpi import KPIDefinition, KPIResult, parse_duration
from analytics_engine.kpi.engine import iso_utc
from analytics_engine.kpi.loader import load_valid_definitions

log = logging.getLogger(__name__)

SERVICE = "calculation_engine"


class Settings(BaseServiceSettings):
    calculation_port: int = Field(
        default=8082,
        ge=0,
        le=65535,
        validation_alias="CALCULATION_PORT",
        description="Port of the engine's HTTP API (`/api/v1/kpis...`, `/healthz`, `/readyz`, "
        "`/metrics`).",
    )
    kpi_definitions_dir: str | None = Field(
        default=None,
        validation_alias="KPI_DEFINITIONS_DIR",
        description="YAML KPI definitions, read at every start; the metadata service's definitions "
        "win for a code both define. An edited file is a new version of its KPI at the next start "
        "(windows reset, backfilled); a deleted one stops its KPI unless the metadata service "
        "holds it (it seeds itself from the same directory under `analytics-engine up`: delete "
        "the KPI through the API). An invalid file is logged and skipped.",
    )
    consumer_name: str = Field(
        default="calculation-engine-0",
        pattern=r"^[A-Za-z0-9_.\-]+$",
        validation_alias="CALCULATION_CONSUMER_NAME",
        description="Fixed stream consumer name (one active replica per KPI set).",
    )
    checkpoint_key: str = Field(
        default="ae:calc:checkpoint",
        pattern=r"^ae:calc:[A-Za-z0-9_.:\-]+$",
        validation_alias="CALCULATION_CHECKPOINT_KEY",
        description="Redis key of the engine's checkpoint (its parts and recent-id log live "
        "under `{key}:`, the last slot each query KPI ran in the hash `{key}.query_slots`). It "
        "must lie under `ae:calc:`, the only keys the engine's Redis ACL user may write.",
    )
    checkpoint_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        validation_alias="CALCULATION_CHECKPOINT_INTERVAL",
        description="Seconds between checkpoints of the engine's state to Redis. After a crash "
        "the events since the last checkpoint are read again: longer means more to replay, "
        "shorter more Redis writes.",
    )
    checkpoint_part_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=64 * 1024,
        le=256 * 1024 * 1024,
        validation_alias="CALCULATION_CHECKPOINT_PART_BYTES",
        description="A checkpoint larger than this is stored as parts of this size (one MULTI). "
        "Keep it below Redis's proto-max-bulk-len (8mb in the chart): Redis refuses a larger "
        "value by dropping the connection.",
    )
    advance_interval_s: float = Field(
        default=0.05,
        gt=0,
        le=5,
        validation_alias="CALCULATION_ADVANCE_INTERVAL",
        description="Seconds between checks that close windows by the wall clock once the "
        "streams are caught up, so a window's result comes even when no later event arrives "
        "(a window due to close triggers one sooner).",
    )
    idle_close_grace: timedelta = Field(
        default=timedelta(seconds=1),
        validation_alias="CALCULATION_IDLE_CLOSE_GRACE",
        description="Closing by the wall clock moves the watermark to now minus this (covering "
        "clock skew with Redis): such a window closes this long after its end + allowed "
        "lateness, and an event published before that but read after it counts as late.",
    )
    dedupe_capacity: int = Field(
        default=50_000,
        ge=0,
        le=10_000_000,
        validation_alias="CALCULATION_DEDUPE_CAPACITY",
        description="Event ids remembered (the most recent ones) to drop duplicate events; 0 "
        "turns deduplication off. More catches older duplicates, for memory and checkpoint "
        "size.",
    )
    backfill_horizon: timedelta = Field(
        default=timedelta(hours=1),
        validation_alias="CALCULATION_BACKFILL_HORIZON",
        description="How far back before a new or changed KPI's cut its closed windows are "
        "recomputed under the new definition (from its stored events). The backfill always "
        "reaches back further when needed to cover every window still open at the cut "
        "(about size + allowed_lateness back), however long the window: those are published "
        "by the backfill alone (so long windows replay more events). Windows starting "
        "earlier keep their old version's results.",
    )
    backfill_delay: timedelta = Field(
        default=timedelta(seconds=10),
        validation_alias="CALCULATION_BACKFILL_DELAY",
        description="How long after the last window it covers has closed a backfill waits "
        "before it replays, so the database has stored the events (also the clock skew "
        "tolerated between the engine and Redis, and between producers' `occurred_at` and "
        "their envelopes' timestamps when a backfill orders the replay).",
    )
    backfill_max_events: int = Field(
        default=250_000,
        ge=1,
        validation_alias="CALCULATION_BACKFILL_MAX_EVENTS",
        description="Most replayed events one backfill holds in memory at once (~0.8 KB each). "
        "A backfill is computed as the replay arrives and holds only the events waiting for "
        "their turn in publication order: those published later than events that occurred "
        "after them, usually a few seconds' worth; a producer that publishes old history all "
        "at once makes it hold that history. One that needs more is abandoned at once (a "
        "retry would replay the same history): the windows open at the cut get no result.",
    )
    backfill_enabled: bool = Field(
        default=True,
        validation_alias="CALCULATION_BACKFILL",
        description="Backfill new and changed KPIs (see `CALCULATION_BACKFILL_HORIZON`). "
        "false: their results begin at the cut, the windows open then computed from the later "
        "events alone.",
    )
    backfill_idle_timeout_s: float = Field(
        default=30.0,
        gt=0,
        validation_alias="CALCULATION_BACKFILL_IDLE_TIMEOUT",
        description="Seconds a backfill waits for the database's replay to send anything (an "
        "event or its end) before the attempt fails and is retried.",
    )
    metadata_timeout_s: float = Field(
        default=5.0,
        gt=0,
        validation_alias="CALCULATION_METADATA_TIMEOUT",
        description="Timeout (seconds) of each request for KPI definitions to the metadata "
        "service; without an answer the definitions in force stay.",
    )
    resync_interval_s: float = Field(
        default=60.0,
        gt=0,
        validation_alias="CALCULATION_RESYNC_INTERVAL",
        description="Seconds between full re-reads of the metadata service's KPI definitions, "
        "which heal a missed `metadata.changed` (changes are otherwise applied as announced). "
        "While the metadata service does not answer (at start, before it is up), every 2 s.",
    )
    query_timeout_s: float = Field(
        default=10.0,
        gt=0,
        validation_alias="CALCULATION_QUERY_TIMEOUT",
        description="Timeout (seconds) of requests to the database service: query KPI runs "
        "(one that times out publishes nothing for its slot) and the API's latest and history "
        "reads (504).",
    )

    query_catchup_slots: int = Field(
        default=1440,
        ge=1,
        le=100_000,
        validation_alias="CALCULATION_QUERY_CATCHUP_SLOTS",
        description="Most slots a `bind_window` query KPI runs at once to catch up on those "
        "missed while the engine was down or the database service did not answer: the newest "
        "ones (the older are skipped and logged). 1440 is a day of 1-minute slots; 1 runs "
        "only the newest slot.",
    )

    @field_validator("idle_close_grace", "backfill_horizon", "backfill_delay", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> timedelta:
        return parse_duration(value)


@dataclass(frozen=True)
class CalculationService:
    runtime: ServiceRuntime
    processor: StreamProcessor
    registry: DefinitionRegistry
    sync: DefinitionSync
    backfills: BackfillManager
    queries: QueryRunner
    cache: LatestResults


def directory_definitions(directory: str) -> list[KPIDefinition]:
    """The definitions of `KPI_DEFINITIONS_DIR`. An invalid file is logged and left out, as
    the metadata service does with the same directory: it never stops the engine."""
    definitions, problems = load_valid_definitions(directory)
    if problems is not None:
        log.error("KPI definitions not loaded", extra={"error": str(problems)[:2000]})
    return definitions


def query_slots_key(checkpoint_key: str) -> str:
    """The query KPIs' slot marks: beside the checkpoint (one engine's KPI set each), not under
    `{checkpoint_key}:`, whose keys the checkpoint does not list are deleted at start."""
    return f"{checkpoint_key}.query_slots"


def create(settings: Settings) -> ServiceRuntime:
    return build(settings).runtime


def build(settings: Settings) -> CalculationService:
    """The composed service, with handles on its parts (tests and benchmarks use them)."""
    runtime = ServiceRuntime(service=SERVICE, settings=settings, port=settings.calculation_port)
    metrics = CalculationMetrics(runtime.metrics.registry)
    cache = LatestResults()
    seed = (
        directory_definitions(settings.kpi_definitions_dir) if settings.kpi_definitions_dir else []
    )
    registry = DefinitionRegistry(seed)
    processor = StreamProcessor(
        runtime,
        consumer_name=settings.consumer_name,
        checkpoint_key=settings.checkpoint_key,
        checkpoint_interval_s=settings.checkpoint_interval_s,
        checkpoint_part_bytes=settings.checkpoint_part_bytes,
        advance_interval_s=settings.advance_interval_s,
        idle_close_grace=settings.idle_close_grace,
        dedupe_capacity=settings.dedupe_capacity,
        metrics=metrics,
        cache=cache,
    )

    async def publish_now(
        results: list[KPIResult],
        origin: str,
        version_since: Callable[[KPIResult], datetime | None] | None = None,
    ) -> None:
        processor.queue_results(results, origin=origin, version_since=version_since)
        await processor.flush_results()

    async def publish_backfill(results: list[KPIResult]) -> None:
        # where the version begins: the database then hides older versions' results from
        # there on, also in windows this version found empty (none of its results says so)
        await publish_now(results, "backfill", backfills.version_since)

    async def publish_query(results: list[KPIResult]) -> None:
        await publish_now(results, "query")

    async def record_version(code: str, version: int, since: datetime) -> None:
        await runtime.requests.request(
            channels.DATABASE_COMMAND,
            "record_kpi_version",
            {"kpi_code": code, "definition_version": version, "since": iso_utc(since)},
            timeout=settings.query_timeout_s,
        )

    backfills = BackfillManager(
        runtime.redis,
        runtime.publisher,
        horizon=settings.backfill_horizon,
        delay=settings.backfill_delay,
        max_events=settings.backfill_max_events,
        idle_timeout_s=settings.backfill_idle_timeout_s,
        on_results=publish_backfill,
        watermark=lambda: processor.engine.watermark,
        on_outcome=lambda outcome: metrics.backfills.labels(outcome).inc(),
        record_version=record_version,
        owner=settings.consumer_name,
    )
    processor.suppress = backfills.suppressed

    def checkpoint_section() -> dict[str, Any]:
        directory = [d.model_dump(mode="json") for d in registry.directory_record()]
        return {**backfills.checkpoint_section(), "directory_definitions": directory}

    processor.extra_checkpoint = checkpoint_section
    queries = QueryRunner(
        lambda: runtime.requests,
        on_results=publish_query,
        redis=runtime.redis,
        key=query_slots_key(settings.checkpoint_key),
        catchup_slots=settings.query_catchup_slots,
        timeout_s=settings.query_timeout_s,
    )

    def apply() -> None:
        definitions = registry.effective()
        changed, removed = processor.set_definitions(definitions.values(), registry.origins())
        queries.set_definitions(definitions.values())
        for code in removed:
            backfills.cancel(code)
        watermark = processor.engine.watermark
        active = processor.engine.definitions
        for code in changed:
            if settings.backfill_enabled and watermark is not None:
                backfills.schedule(active[code], watermark)  # replaces the code's job
            else:
                backfills.cancel(code)

    sync = DefinitionSync(
        registry,
        lambda: runtime.requests,
        apply=apply,
        timeout_s=settings.metadata_timeout_s,
        resync_interval_s=settings.resync_interval_s,
    )

    async def startup() -> None:
        # 1. the checkpointed state, under the definitions it was computed with; those from
        #    the metadata service stand in until it answers, those from the directory give way
        #    to the directory as it is now (an edit is a new version, a deletion stops the KPI)
        extra = await until_reachable(processor.load_checkpoint, errors=REDIS_ERRORS, what="redis")
        backfills.restore(extra)
        recorded = recorded_directory(extra)
        registry.restore(processor.engine.definitions.values(), processor.origins, recorded)
        if registry.directory_record() != recorded:
            processor.mark_dirty()  # checkpoint the directory's versions, even if no KPI changed
        # 2. today's definitions (the metadata service, else the checkpoint's and the
        #    directory's): changes since the checkpoint are hot reloads, with backfills
        if not await sync.full_sync():
            apply()
        processor.collect_results()  # undrained results of the snapshot

    def kpi_list() -> list[dict[str, Any]]:
        running = processor.engine.definitions
        query_running = queries.definitions
        stats = processor.engine.stats().kpis
        items = []
        for code, definition in sorted(registry.effective().items()):
            if not definition.enabled:
                status = "disabled"
            elif code in running or code in query_running:
                status = backfills.status(code) or "running"
            else:
                status = "inactive"
            counters = stats.get(code)
            items.append(
                {
                    **definition.model_dump(mode="json"),
                    "kind": "query" if definition.query is not None else "streaming",
                    "status": status,
                    "source": registry.source_of(code),
                    "late_events": counters.late_events if counters else 0,
                    "last_window_end": cache.last_window_end(code),
                    "backfill": backfills.pending(code),
                    "coverage": backfills.coverage_of(code),
                }
            )
        return items

    api = KPIApi(
        kpis=kpi_list,
        latest=cache.latest,
        known=lambda code: code in registry.effective(),
        requests=lambda: runtime.requests,
        timeout_s=settings.query_timeout_s,
    )
    api.add_routes(runtime.http)
    runtime.on_startup(startup)
    runtime.on_shutdown(processor.shutdown)
    runtime.consume([channels.METADATA_CHANGED], sync.on_changed)
    runtime.add_task("advance", processor.advance_loop)
    runtime.add_task("checkpoint", processor.checkpoint_loop)
    runtime.add_task("definition-sync", sync.run)
    runtime.add_task("backfills", backfills.run)
    runtime.add_task("query-kpis", queries.run)
    return CalculationService(runtime, processor, registry, sync, backfills, queries, cache)
