"""`analytics-engine verify` against real PostgreSQL and S3: events and results are built
directly in a fresh database (schema from the database service's migrations), expected results
come from the pure streaming engine, the lake is written with the archival service's writer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from aiohttp import web

from analytics_engine.archival.compactor import Compactor
from analytics_engine.archival.layout import KPI_RESULTS_PREFIX, kpi_object_key
from analytics_engine.archival.ledger import Ledger
from analytics_engine.archival.s3 import ObjectStore
from analytics_engine.archival.tables import kpi_table, parse_kpi_result, to_parquet
from analytics_engine.core.redis import connect
from analytics_engine.database.migrate import migrate
from analytics_engine.kpi.definitions import VersionedKPIDefinition
from analytics_engine.kpi.engine import EntityEventView, KPIEngine, KPIResult
from analytics_engine.verify.cli import Options, VerifySettings, verify

BASE = datetime(2024, 5, 1, 23, 40, tzinfo=UTC)

DEFINITIONS: list[dict[str, Any]] = [
    {
        "code": "orders_completed",
        "display_name": "Completed orders",
        "entity_type": "order",
        "aggregation": "count",
        "filter": "status == 'completed'",
        "group_by": ["region"],
        "window": {"type": "tumbling", "size": "60s", "allowed_lateness": "10s"},
    },
    {
        "code": "revenue",
        "display_name": "Revenue",
        "entity_type": "order",
        "aggregation": "sum",
        "field": "amount",
        "filter": "amount > 0 && event == 'created'",
        "window": {"type": "sliding", "size": "120s", "slide": "60s", "allowed_lateness": "5s"},
    },
    {
        "code": "avg_amount",
        "display_name": "Average",
        "entity_type": "order",
        "aggregation": "avg",
        "field": "amount",
        "group_by": ["region", "channel"],
        "window": {"type": "tumbling", "size": "300s", "allowed_lateness": "30s"},
    },
    {
        "code": "max_amount",
        "display_name": "Max",
        "entity_type": "order",
        "aggregation": "max",
        "field": "amount",
        "window": {"type": "tumbling", "size": "60s"},
    },
    {
        "code": "customers",
        "display_name": "Customers",
        "entity_type": "order",
        "aggregation": "count_distinct",
        "field": "customer",
        "group_by": ["region"],
        "window": {"type": "tumbling", "size": "120s", "allowed_lateness": "20s"},
    },
]


@dataclass(frozen=True)
class Event:
    event_id: str
    event_kind: str
    entity_type: str
    entity_id: str
    version: int
    occurred_at: datetime
    published_at: datetime
    attributes: dict[str, Any]


def make_events(n: int = 900) -> list[Event]:
    rnd = random.Random(7)
    events: list[Event] = []
    for i in range(n):
        occurred = BASE + timedelta(seconds=i * 1.5 + rnd.random())
        delay = rnd.choice([0.05, 0.2, 1.0, 2.5]) if rnd.random() > 0.08 else rnd.uniform(8, 60)
        attrs: dict[str, Any] = {
            "status": rnd.choice(["completed", "completed", "pending"]),
            "customer": f"c{rnd.randint(1, 40)}",
        }
        if rnd.random() > 0.1:
            attrs["region"] = rnd.choice(["eu", "us", "apac"])
        if rnd.random() > 0.3:
            attrs["channel"] = rnd.choice(["web", "app"])
        if rnd.random() < 0.04:  # no dimension value: the engine and the SQL leave them out
            attrs[rnd.choice(["region", "channel"])] = rnd.choice([["eu"], {"r": "eu"}, []])
        roll = rnd.random()
        if roll > 0.05:
            attrs["amount"] = round(rnd.uniform(-5, 200), 2) if roll > 0.2 else rnd.randint(1, 9)
        kind = rnd.choice(["created", "created", "updated", "deactivated"])
        entity_type = "order" if rnd.random() > 0.1 else "customer"
        events.append(
            Event(
                str(uuid.UUID(int=rnd.getrandbits(128))),
                kind,
                entity_type,
                f"o{i % 97}",
                i,
                occurred,
                occurred + timedelta(seconds=delay),
                attrs,
            )
        )
    return events


def engine_results(events: list[Event]) -> list[KPIResult]:
    engine = KPIEngine(clock=lambda: BASE + timedelta(hours=2))
    engine.set_definitions(
        VersionedKPIDefinition.model_validate({**d, "version": 3}) for d in DEFINITIONS
    )
    for e in sorted(events, key=lambda e: e.published_at):
        engine.process(
            EntityEventView(
                e.event_id,
                e.event_kind,
                e.entity_type,
                e.entity_id,
                e.version,
                e.occurred_at,
                e.published_at,
                e.attributes,
            )
        )
    return engine.drain_results()


@dataclass
class World:
    database_url: str
    definitions_dir: Path
    results: list[KPIResult]
    s3: Any
    bucket: str
    redis_url: str

    def settings(self, **extra: Any) -> VerifySettings:
        values: dict[str, Any] = {
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "KPI_DEFINITIONS_DIR": str(self.definitions_dir),
            "S3_ENDPOINT_URL": self.s3.endpoint_url,
            "S3_BUCKET": self.bucket,
            "AWS_ACCESS_KEY_ID": self.s3.access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3.secret_key,
            "AWS_REGION": self.s3.region,
        }
        values.update(extra)
        return VerifySettings(**values)

    def env(self) -> dict[str, str]:
        return {
            k: str(v)
            for k, v in {
                "DATABASE_URL": self.database_url,
                "REDIS_URL": self.redis_url,
                "KPI_DEFINITIONS_DIR": self.definitions_dir,
                "S3_ENDPOINT_URL": self.s3.endpoint_url,
                "S3_BUCKET": self.bucket,
                "AWS_ACCESS_KEY_ID": self.s3.access_key,
                "AWS_SECRET_ACCESS_KEY": self.s3.secret_key,
                "AWS_REGION": self.s3.region,
            }.items()
        }

    def put_lake(self, results: list[KPIResult], *, batch: str) -> None:
        rows = [parse_kpi_result(r.to_dict()) for r in results]
        parts: dict[tuple[str, str], list[Any]] = {}
        for row in rows:
            parts.setdefault((row.kpi_code, row.day), []).append(row)
        client = self.s3.client()
        for (code, day), part in parts.items():
            client.put_object(
                Bucket=self.bucket,
                Key=kpi_object_key(code, day, batch),
                Body=to_parquet(kpi_table(part)),
            )


@pytest.fixture
async def world(
    database_url: str, tmp_path: Path, s3_server: Any, s3_bucket: str, redis_url: str
) -> AsyncIterator[World]:
    definitions_dir = tmp_path / "kpis"
    definitions_dir.mkdir()
    (definitions_dir / "kpis.yaml").write_text(yaml.safe_dump(DEFINITIONS))
    events = make_events()
    results = engine_results(events)
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn, timescale="off")
        await conn.copy_records_to_table(
            "entity_events",
            records=[
                (
                    uuid.UUID(e.event_id),
                    e.event_kind,
                    e.entity_type,
                    e.entity_id,
                    e.version,
                    e.occurred_at,
                    e.published_at,
                    orjson.dumps(e.attributes).decode(),
                    None,
                    "data_simulator",
                )
                for e in events
            ],
            columns=[
                "event_id",
                "event_kind",
                "entity_type",
                "entity_id",
                "version",
                "occurred_at",
                "published_at",
                "attributes",
                "reason",
                "source",
            ],
        )
        await conn.executemany(
            "INSERT INTO kpi_results (kpi_code, window_start, window_end, dimensions, dims_key,"
            " value, sample_count, definition_version, computed_at, stored_at, forwarded)"
            " VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9, now() - interval '1 hour',"
            " true)",
            [
                (
                    r.kpi_code,
                    r.window_start,
                    r.window_end,
                    orjson.dumps(r.dimensions).decode(),
                    orjson.dumps(r.dimensions, option=orjson.OPT_SORT_KEYS).decode(),
                    r.value,
                    r.sample_count,
                    r.definition_version,
                    r.computed_at,
                )
                for r in results
            ],
        )
    finally:
        await conn.close()
    w = World(database_url, definitions_dir, results, s3_server, s3_bucket, redis_url)
    w.put_lake(results, batch="b1")
    yield w


# The stored results come from an engine that never closed windows by the clock, so the clock
# must not close them here either.
NO_IDLE_CLOSE = timedelta(days=365 * 100)
OPTIONS = Options(
    start=None, end=None, kpis=None, skip_lake=False, json=False, idle_close=NO_IDLE_CLOSE
)


async def test_clean_data_verifies(world: World) -> None:
    assert len(world.results) > 150
    assert {r.kpi_code for r in world.results} == {d["code"] for d in DEFINITIONS}
    report = await verify(world.settings(), OPTIONS)
    assert report.mismatches == []
    assert report.ok
    compared = sum(k.compared for k in report.kpis)
    assert compared == len(world.results)
    assert sum(k.matched for k in report.kpis) == compared
    assert sum(k.open_windows_skipped for k in report.kpis) == 0
    assert report.lake["results_checked"] == len(world.results)


async def test_the_lake_still_verifies_after_compaction(world: World) -> None:
    """The results archived as many small files (one flush every few results), then merged by
    the archival service's compaction: verify reads every result once, as before."""
    client = world.s3.client()
    prefix = f"{KPI_RESULTS_PREFIX}/"

    def keys() -> list[str]:
        found: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=world.bucket, Prefix=prefix
        ):
            found.extend(item["Key"] for item in page.get("Contents", []))
        return found

    for key in keys():
        client.delete_object(Bucket=world.bucket, Key=key)
    for first in range(0, len(world.results), 5):
        world.put_lake(world.results[first : first + 5], batch=f"b{first:05d}")
    small = keys()
    partitions = {k.rsplit("/", 1)[0] for k in small}
    assert len(small) > 2 * len(partitions)

    store = ObjectStore(
        endpoint_url=world.s3.endpoint_url,
        bucket=world.bucket,
        access_key=world.s3.access_key,
        secret_key=world.s3.secret_key,
        region=world.s3.region,
    )
    redis = connect(world.redis_url)
    try:
        outcome = await Compactor(
            store=store,
            redis=redis,
            ledger=Ledger(redis, ttl_s=3600),
            owner="verify-test",
            interval_s=3600,
            min_age_s=86_400,
            min_files=2,
            max_bytes=64 * 1024 * 1024,
            clock=lambda: datetime(2100, 1, 1, tzinfo=UTC),
        ).run_pass()
    finally:
        store.close()
        await redis.aclose()
    files = {p: [k for k in small if k.rsplit("/", 1)[0] == p] for p in partitions}
    single = {p for p, found in files.items() if len(found) == 1}  # nothing to merge there
    assert outcome is not None
    assert outcome.files == len(small) - len(single)
    merged = keys()
    assert len(merged) == len(partitions)
    assert {k.rsplit("/", 1)[0] for k in merged} == partitions
    assert all("/compacted-" in k for k in merged if k.rsplit("/", 1)[0] not in single)

    report = await verify(world.settings(), OPTIONS)
    assert report.mismatches == []
    assert report.ok
    assert report.lake["results_checked"] == len(world.results)


async def test_wrong_value_and_missing_window_are_reported(world: World) -> None:
    wrong = next(r for r in world.results if r.kpi_code == "revenue" and r.value > 100)
    gone = next(r for r in world.results if r.kpi_code == "orders_completed")
    conn = await asyncpg.connect(world.database_url)
    try:
        await conn.execute(
            "UPDATE kpi_results SET value = value * (1 + 1e-6) WHERE kpi_code = $1 AND "
            "window_start = $2",
            wrong.kpi_code,
            wrong.window_start,
        )
        await conn.execute(
            "DELETE FROM kpi_results WHERE kpi_code = $1 AND window_start = $2 AND "
            "dimensions = $3::jsonb",
            gone.kpi_code,
            gone.window_start,
            orjson.dumps(gone.dimensions).decode(),
        )
    finally:
        await conn.close()
    report = await verify(world.settings(), OPTIONS)
    problems = {(m.problem, m.kpi_code, m.window_start) for m in report.mismatches}
    assert ("wrong_value", "revenue", wrong.window_start) in problems
    assert ("missing_window", "orders_completed", gone.window_start) in problems
    # the lake still holds the original value of the changed result
    assert ("lake_value_mismatch", "revenue", wrong.window_start) in problems
    assert len(report.mismatches) == 3


async def test_cli_exit_codes_table_and_json(world: World) -> None:
    async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "analytics_engine.cli",
            "verify",
            "--idle-close",
            str(NO_IDLE_CLOSE.total_seconds()),
            *args,
            env={**os.environ, **(env or world.env())},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, out, _ = await cli()
    assert code == 0, out
    assert out.rstrip().endswith("OK")

    # a duplicate in the lake: the same results archived a second time
    world.put_lake([r for r in world.results if r.kpi_code == "max_amount"][:2], batch="b2")
    code, out, _ = await cli()
    assert code == 1
    assert "duplicate_in_lake" in out and "max_amount" in out
    code, out, _ = await cli("--json", "--kpi", "max_amount")
    assert code == 1
    data = orjson.loads(out)
    assert data["ok"] is False
    assert [m["problem"] for m in data["mismatches"]] == ["duplicate_in_lake"] * 2
    assert data["summary"]["kpis"][0]["kpi_code"] == "max_amount"
    code, out, _ = await cli("--skip-lake")
    assert code == 0

    code, out, err = await cli(
        env={**world.env(), "DATABASE_URL": "postgresql://x:y@127.0.0.1:9/nothing"}
    )
    assert code == 2
    assert err.strip().count("\n") == 0 and "cannot connect to PostgreSQL" in err
    code, _, err = await cli("--kpi", "nope")
    assert code == 2 and "unknown KPI code" in err


@contextlib.asynccontextmanager
async def stand_in_engine(items: list[dict[str, Any]]) -> AsyncIterator[str]:
    """The calculation engine's `GET /api/v1/kpis` answering `items`; yields its base URL."""
    engine = web.Application()

    async def kpis(_: web.Request) -> web.Response:
        return web.json_response({"items": items})

    engine.router.add_get("/api/v1/kpis", kpis)
    runner = web.AppRunner(engine)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_windows_awaiting_the_engine_s_backfill_are_pending(world: World) -> None:
    """A KPI whose backfill has not run yet has no stored results for the windows before its
    cut: with the engine's word for it (`CALCULATION_URL`), verify counts them as pending."""
    mine = sorted({r.window_start for r in world.results if r.kpi_code == "orders_completed"})
    since, cut = mine[2], mine[5]  # windows 2, 3 and 4 await the backfill
    conn = await asyncpg.connect(world.database_url)
    try:
        await conn.execute(
            "DELETE FROM kpi_results WHERE kpi_code = 'orders_completed'"
            " AND window_start >= $1 AND window_start < $2",
            mine[1],
            cut,
        )
    finally:
        await conn.close()
    # window 1 is gone too, but it starts before the backfill's `since`: missing
    backfill = {
        "definition_version": 1,
        "since": since.isoformat(),
        "cut": cut.isoformat(),
        "due": (cut + timedelta(minutes=5)).isoformat(),
    }
    items = [{"code": "orders_completed", "backfill": backfill}, {"code": "revenue"}]
    async with stand_in_engine(items) as url:
        report = await verify(world.settings(CALCULATION_URL=url), OPTIONS)
    summary = next(k for k in report.kpis if k.kpi_code == "orders_completed")
    pending = [
        r
        for r in world.results
        if r.kpi_code == "orders_completed" and since <= r.window_start < cut
    ]
    assert summary.pending_backfill == len(pending) > 0
    assert {(m.problem, m.window_start) for m in report.mismatches} == {("missing_window", mine[1])}
    assert any("await the calculation engine's backfill" in n for n in report.notes)

    # without the engine's word, the same windows are missing
    report = await verify(world.settings(CALCULATION_URL=url), OPTIONS)
    assert any("calculation engine not reachable" in n for n in report.notes)
    missing = {m.window_start for m in report.mismatches if m.problem == "missing_window"}
    assert missing == {mine[1], *(r.window_start for r in pending)}


async def test_windows_before_the_version_took_effect_are_not_expected(world: World) -> None:
    """A KPI created (or changed) while events flowed: the engine computes that version's
    windows from its backfill's `since` on, and its KPI list keeps saying so (`coverage`)
    after the backfill is done. The default range starts at the oldest stored event: older
    windows are no missing ones; later ones are still checked."""
    mine = sorted({r.window_start for r in world.results if r.kpi_code == "orders_completed"})
    since, lost = mine[4], mine[6]
    conn = await asyncpg.connect(world.database_url)
    try:
        await conn.execute(
            "DELETE FROM kpi_results WHERE kpi_code = 'orders_completed'"
            " AND (window_start < $1 OR window_start = $2)",
            since,
            lost,
        )
    finally:
        await conn.close()
    coverage = {"definition_version": 3, "since": since.isoformat()}
    items = [{"code": "orders_completed", "backfill": None, "coverage": coverage}]
    async with stand_in_engine(items) as url:
        report = await verify(world.settings(CALCULATION_URL=url), OPTIONS)
    summary = next(k for k in report.kpis if k.kpi_code == "orders_completed")
    before = [
        r for r in world.results if r.kpi_code == "orders_completed" and r.window_start < since
    ]
    assert summary.before_version_skipped == len(before) > 0
    # a window the engine is responsible for and did not store is still a mismatch
    assert {(m.problem, m.kpi_code, m.window_start) for m in report.mismatches} == {
        ("missing_window", "orders_completed", lost)
    }
    assert not report.ok
    assert any("have no result of definition version 3" in n for n in report.notes)

    # the engine's word for another KPI changes nothing for this one
    items = [{"code": "revenue", "coverage": coverage}]
    async with stand_in_engine(items) as url:
        report = await verify(world.settings(CALCULATION_URL=url), OPTIONS)
    summary = next(k for k in report.kpis if k.kpi_code == "orders_completed")
    assert summary.before_version_skipped == 0
    missing = {m.window_start for m in report.mismatches if m.kpi_code == "orders_completed"}
    assert missing == {*mine[:4], lost}


async def test_a_filter_postgresql_cannot_evaluate_is_unverifiable(world: World) -> None:
    """A float overflow in the recompute SQL (where the engine's filter just yields inf)
    makes that KPI unverifiable, with the reason; verify carries on with the others."""
    overflowing = {
        **DEFINITIONS[3],
        "code": "huge_amount",
        "filter": "amount * 1e300 * 1e300 > 1",
    }
    (world.definitions_dir / "kpis.yaml").write_text(yaml.safe_dump([*DEFINITIONS, overflowing]))
    report = await verify(world.settings(), OPTIONS)
    assert [(m.problem, m.kpi_code) for m in report.mismatches] == [("unverifiable", "huge_amount")]
    assert "NumericValueOutOfRangeError" in report.mismatches[0].detail
    assert {k.kpi_code for k in report.kpis} == {d["code"] for d in DEFINITIONS}
    assert sum(k.matched for k in report.kpis) == len(world.results)


async def test_an_explicit_range_stops_where_the_events_were_archived_and_deleted(
    world: World,
) -> None:
    """The database archived and deleted the events of 2024-05-01 (retention): the windows of
    that day cannot be recomputed from PostgreSQL, whatever range is asked for. An explicit
    `--start` before it must not turn their (correct) stored results into mismatches."""
    day_end = datetime(2024, 5, 2, tzinfo=UTC)
    conn = await asyncpg.connect(world.database_url)
    try:
        await conn.execute(
            "DELETE FROM entity_events WHERE entity_type = 'order' AND occurred_at < $1", day_end
        )
        await conn.execute(
            "INSERT INTO archival_batches (batch_id, entity_type, day, status, row_count)"
            " VALUES ($1, 'order', '2024-05-01', 'deleted', 1)",
            uuid.uuid4(),
        )
    finally:
        await conn.close()
    before = [r for r in world.results if r.window_start < day_end]
    assert before and len(before) < len(world.results)

    report = await verify(world.settings(), OPTIONS)  # the default range already stops there
    assert report.mismatches == []

    explicit = Options(
        start=BASE - timedelta(hours=1),
        end=BASE + timedelta(hours=2),
        kpis=None,
        skip_lake=False,
        json=False,
        idle_close=NO_IDLE_CLOSE,
    )
    report = await verify(world.settings(), explicit)
    assert report.mismatches == []
    assert report.ok
    compared = sum(k.compared for k in report.kpis)
    assert compared == len(world.results) - len(before)
    assert any("archived and deleted" in n for n in report.notes)


async def test_the_lake_check_covers_the_results_of_disabled_and_removed_kpis(
    world: World,
) -> None:
    """Every stored result is archived, whatever became of its KPI since: one disabled and one
    removed from the definitions still have their stored results checked against the lake."""
    disabled = {**DEFINITIONS[3], "enabled": False}  # max_amount
    kept = [d for d in DEFINITIONS if d["code"] not in ("max_amount", "customers")]
    (world.definitions_dir / "kpis.yaml").write_text(yaml.safe_dump([*kept, disabled]))
    client = world.s3.client()
    for code in ("max_amount", "customers"):
        listing = client.list_objects_v2(
            Bucket=world.bucket, Prefix=f"{KPI_RESULTS_PREFIX}/kpi_code={code}/"
        )
        for item in listing.get("Contents", []):
            client.delete_object(Bucket=world.bucket, Key=item["Key"])
    report = await verify(world.settings(), OPTIONS)
    lost = {
        (m.problem, m.kpi_code)
        for m in report.mismatches
        if m.kpi_code in ("max_amount", "customers")
    }
    assert lost == {("missing_in_lake", "max_amount"), ("missing_in_lake", "customers")}
    gone = [r for r in world.results if r.kpi_code in ("max_amount", "customers")]
    assert len(report.mismatches) == len(gone)
    assert report.lake["results_checked"] == len(world.results)
    assert not report.ok


async def test_an_unreadable_lake_object_is_reported_and_the_rest_still_checked(
    world: World,
) -> None:
    """A foreign or damaged object in the lake (not Parquet, or not the archive's columns):
    verify names it as unverifiable and still checks everything else (it raised a traceback)."""
    client = world.s3.client()
    partition = f"{KPI_RESULTS_PREFIX}/kpi_code=max_amount/date=2024-05-01"
    client.put_object(Bucket=world.bucket, Key=f"{partition}/junk.parquet", Body=b"not parquet")
    other = pa.table({"something": [1, 2]})
    sink = pa.BufferOutputStream()
    pq.write_table(other, sink)
    client.put_object(
        Bucket=world.bucket,
        Key=f"{partition}/foreign.parquet",
        Body=sink.getvalue().to_pybytes(),
    )
    client.put_object(
        Bucket=world.bucket,
        Key="entity_events/entity_type=order/date=2024-05-01/batch-x.parquet",
        Body=b"",
    )
    report = await verify(world.settings(), OPTIONS)
    unreadable = sorted(m.detail.split()[2] for m in report.mismatches)
    assert [m.problem for m in report.mismatches] == ["unverifiable"] * 3
    assert unreadable == [
        "entity_events/entity_type=order/date=2024-05-01/batch-x.parquet",
        f"{partition}/foreign.parquet",
        f"{partition}/junk.parquet",
    ]
    assert report.lake["results_checked"] == len(world.results)
    assert not report.ok
