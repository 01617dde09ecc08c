"""Archival Service: KPI results and expired entity events to Parquet on S3.

`analytics-engine run archival`. Reads `archive.kpi_results` (batched, exactly once in the lake,
see `kpi_results.py`) and `archival.events` (one object per batch, confirmed on
`archival.confirmed`, see `entity_events.py`). In the background, merges the small
`kpi_results/` files of old partitions (`compaction.py`, `compactor.py`).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field, field_validator

from analytics_engine.archival.compactor import CompactionHooks, Compactor
from analytics_engine.archival.entity_events import EntityEventArchiver
from analytics_engine.archival.kpi_results import ArchivalHooks, KpiResultArchiver
from analytics_engine.archival.ledger import Ledger
from analytics_engine.archival.metrics import CompactionMetrics
from analytics_engine.archival.s3 import ObjectStore
from analytics_engine.core.channels import ARCHIVAL_EVENTS, ARCHIVE_KPI_RESULTS
from analytics_engine.core.durations import parse_duration
from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.core.settings import BaseServiceSettings, S3Settings

SERVICE = "archival_service"


class Settings(BaseServiceSettings, S3Settings):
    port: int = Field(
        default=8085,
        ge=0,
        le=65535,
        validation_alias="ARCHIVAL_PORT",
        description="Port of the archival service's HTTP server (`/healthz`, `/readyz`, "
        "`/metrics`).",
    )
    batch_rows: int = Field(
        default=20_000,
        ge=1,
        le=1_000_000,
        validation_alias="ARCHIVAL_BATCH_ROWS",
        description="KPI results per flush (at most; a flush writes one file per partition). "
        "Flushes run one at a time, in the background while the next results are read, each a "
        "few round trips to Redis and S3. Draining a backlog (bench/pipeline_bench.py --parts "
        "d), 20k rows per flush archived ~5% more rows/s than 40k, 10k about as many, 80k "
        "fewer; compaction merges the files of past days (ARCHIVAL_COMPACTION_*).",
    )
    flush_interval_s: float = Field(
        default=5.0,
        gt=0,
        validation_alias="ARCHIVAL_FLUSH_INTERVAL",
        description="Longest a KPI result waits in the buffer (seconds, or '5s', '500ms'). "
        "A quarter of `ARCHIVAL_BATCH_ROWS` or more is written sooner, once no result came for "
        "0.25 s (the end of a backlog).",
    )
    dedup_ttl_s: int = Field(
        default=7 * 86_400,
        ge=60,
        validation_alias="ARCHIVAL_DEDUP_TTL",
        description="How long (seconds) the fingerprints of a partition are kept in Redis after "
        "its last write: duplicates arriving later than that are not detected.",
    )
    s3_concurrency: int = Field(
        default=8,
        ge=1,
        le=64,
        validation_alias="ARCHIVAL_S3_CONCURRENCY",
        description="S3 requests in flight at once (threads and connections): the files of one "
        "flush, or of several entity-event batches, are uploaded in parallel up to this.",
    )
    read_batch: int = Field(
        default=2000,
        ge=1,
        le=10_000,
        validation_alias="ARCHIVAL_READ_BATCH",
        description="KPI results read from the stream per handler call.",
    )
    events_read_batch: int = Field(
        default=2,
        ge=1,
        le=1000,
        validation_alias="ARCHIVAL_EVENTS_READ_BATCH",
        description="archival.events messages (each a batch of rows) per handler call. Each "
        "costs ~20 MB of memory while in hand, and more of them in one call did not make "
        "archiving faster (measured with 5000-row batches).",
    )
    zstd_level: int | None = Field(
        default=None,
        ge=1,
        le=22,
        validation_alias="ARCHIVAL_ZSTD_LEVEL",
        description="zstd level (1-22) of the Parquet files; higher levels cost more CPU per "
        "file for usually smaller files. Unset: pyarrow's default (1).",
    )

    compaction_interval_s: float = Field(
        default=3600.0,
        ge=0,
        validation_alias="ARCHIVAL_COMPACTION_INTERVAL",
        description="How often the small `kpi_results/` files of old partitions are merged into "
        "`compacted-<uuid>.parquet` objects (seconds, or '1h', '30m'); one replica at a time "
        "(a Redis lock). 0 turns compaction off (what a crashed pass left is still settled at "
        "start).",
    )
    compaction_min_age_s: float = Field(
        default=86_400.0,
        ge=0,
        validation_alias="ARCHIVAL_COMPACTION_MIN_AGE",
        description="A partition is compacted once its day (UTC) ended at least this long ago "
        "(seconds, or '1d', '6h'). Results arriving later (a backfill) land as new small files "
        "that a later pass merges again.",
    )
    compaction_min_files: int = Field(
        default=16,
        ge=2,
        validation_alias="ARCHIVAL_COMPACTION_MIN_FILES",
        description="A partition is compacted once it holds at least this many small files.",
    )
    compaction_max_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=1024,
        validation_alias="ARCHIVAL_COMPACTION_MAX_BYTES",
        description="Parquet bytes merged into one object at most (a bigger partition is merged "
        "in several objects; files of half this size or more are left as they are). Bounds the "
        "memory of a merge: well-compressed files (large flushes) take ~7x their size as Arrow "
        "and ~17x while merged and sorted (measured: 33 MiB of files, +600 MiB resident); "
        "tiny files (~3.5 KB each, mostly footer) take far less. A day of 5 s flushes of one KPI "
        "is ~60 MB of tiny files: two objects.",
    )

    @field_validator(
        "flush_interval_s", "compaction_interval_s", "compaction_min_age_s", mode="before"
    )
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip() and not value.strip()[-1].isdigit():
            return parse_duration(value).total_seconds()
        return value


def create(
    settings: Settings,
    *,
    hooks: ArchivalHooks | None = None,
    compaction_hooks: CompactionHooks | None = None,
) -> ServiceRuntime:
    """Compose the service. `hooks` and `compaction_hooks` are test seams into the KPI-results
    flush and the lake compaction."""
    runtime = ServiceRuntime(service=SERVICE, settings=settings, port=settings.port)
    store = ObjectStore(
        endpoint_url=settings.s3_endpoint_url,
        bucket=settings.s3_bucket,
        access_key=settings.aws_access_key_id,
        secret_key=settings.aws_secret_access_key,
        region=settings.aws_region,
        concurrency=settings.s3_concurrency,
    )
    ledger = Ledger(runtime.redis, ttl_s=settings.dedup_ttl_s)
    kpis = KpiResultArchiver(
        store=store,
        ledger=ledger,
        dead_letters=runtime.dead_letters,
        channel=ARCHIVE_KPI_RESULTS,
        group=SERVICE,
        owner=settings.instance_id,
        batch_rows=settings.batch_rows,
        flush_interval_s=settings.flush_interval_s,
        claim_idle_s=settings.claim_idle_ms / 1000,
        compression_level=settings.zstd_level,
        hooks=hooks,
    )
    events = EntityEventArchiver(
        store=store,
        publisher=runtime.publisher,
        dead_letters=runtime.dead_letters,
        compression_level=settings.zstd_level,
    )
    kpis.attach(
        runtime.consume(
            [ARCHIVE_KPI_RESULTS],
            kpis.handle,
            auto_ack=False,
            batch_size=settings.read_batch,
            lazy_events=True,  # the archiver reads payloads only
            # Redis assembles the next batch while this one is parsed: with a backlog the two
            # waited for each other (measured: the main thread idle ~45% of a drain)
            read_ahead=True,
        )
    )
    events.attach(
        runtime.consume(
            [ARCHIVAL_EVENTS], events.handle, auto_ack=False, batch_size=settings.events_read_batch
        )
    )
    runtime.add_task("archive-flush", kpis.run_timer)
    compactor = Compactor(
        store=store,
        redis=runtime.redis,
        ledger=ledger,
        owner=settings.instance_id,
        interval_s=settings.compaction_interval_s,
        min_age_s=settings.compaction_min_age_s,
        min_files=settings.compaction_min_files,
        max_bytes=settings.compaction_max_bytes,
        compression_level=settings.zstd_level,
        metrics=CompactionMetrics(runtime.metrics.registry),
        hooks=compaction_hooks,
    )
    runtime.add_task("lake-compaction", compactor.run)

    async def startup() -> None:
        # Arrow's default allocator (mimalloc) keeps freed pages: ~12 MB more resident memory
        # under load than the system allocator, for no CPU difference measured here.
        pa.set_memory_pool(pa.system_memory_pool())
        await kpis.recover()

    async def shutdown() -> None:
        await kpis.close()
        store.close()

    runtime.on_startup(startup)
    runtime.on_shutdown(shutdown)
    runtime.add_readiness_check("s3", store.reachable)
    return runtime
