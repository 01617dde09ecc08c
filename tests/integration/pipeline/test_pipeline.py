"""The data path end to end, against real Redis, PostgreSQL and S3: simulator -> database ->
calculation engine -> database -> archival. Every event is persisted once, every KPI equals its
SQL recomputation, every result is archived exactly once (`analytics-engine verify` is the
judge), also when services crash mid-stream and restart."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from analytics_engine.archival import service as archival
from analytics_engine.calculation import service as calculation
from analytics_engine.core import channels
from analytics_engine.core.acl import SERVICE_ACCESS, acl_file
from analytics_engine.core.redis import connect
from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.database import service as database
from analytics_engine.localstack import RedisServer
from analytics_engine.observability import service as observability
from analytics_engine.simulator import service as simulator
from analytics_engine.verify.cli import Options, VerifySettings, verify

pytestmark = pytest.mark.asyncio

KPIS = {
    "orders_count.yaml": """
code: orders_count
display_name: Orders
entity_type: order
aggregation: count
window: {type: tumbling, size: 2s, allowed_lateness: 1s}
""",
    "revenue_by_region.yaml": """
code: revenue_by_region
display_name: Revenue by region
entity_type: order
aggregation: sum
field: amount
filter: "status != 'cancelled' && event == 'created'"
group_by: [region]
window: {type: tumbling, size: 2s, allowed_lateness: 1s}
unit: EUR
""",
    "avg_temperature.yaml": """
code: avg_temperature
display_name: Average temperature
entity_type: sensor
aggregation: avg
field: temperature
group_by: [site]
window: {type: sliding, size: 4s, slide: 2s, allowed_lateness: 1s}
""",
    "distinct_customers.yaml": """
code: distinct_customers
display_name: Distinct customers
entity_type: order
aggregation: count_distinct
field: customer_id
window: {type: tumbling, size: 4s, allowed_lateness: 0s}
""",
}


QUERY_KPI = """
code: stored_orders
display_name: Stored orders
entity_type: order
query: {sql: "SELECT count(*) FROM entity_events WHERE entity_type = $1", params: [order],
        schedule: 1s}
"""


@dataclass
class Stack:
    env: dict[str, Any]
    database_url: str
    runtimes: dict[str, tuple[ServiceRuntime, asyncio.Task[None]]] = field(default_factory=dict)
    redis_urls: dict[str, str] = field(default_factory=dict)  # a service's own, if not REDIS_URL

    async def start(self, name: str, **overrides: Any) -> ServiceRuntime:
        module = {
            "database": database,
            "calculation": calculation,
            "archival": archival,
            "simulator": simulator,
            "observability": observability,
        }[name]
        own = {"REDIS_URL": self.redis_urls[name]} if name in self.redis_urls else {}
        settings = module.Settings.model_validate(  # type: ignore[attr-defined]
            {**self.env, "SERVICE_INSTANCE_ID": f"{name}-0", **own, **overrides}
        )
        runtime: ServiceRuntime = module.create(settings)  # type: ignore[attr-defined]
        task = asyncio.create_task(runtime.run())
        self.runtimes[name] = (runtime, task)
        ready = asyncio.create_task(runtime.ready.wait())
        done, _ = await asyncio.wait([ready, task], timeout=30, return_when="FIRST_COMPLETED")
        if task in done:
            task.result()
        assert ready in done, f"{name} did not become ready"
        return runtime

    async def crash(self, name: str) -> None:
        """Kill without a graceful stop: in-flight work is neither finished nor acknowledged."""
        runtime, task = self.runtimes.pop(name)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        with contextlib.suppress(Exception):
            await runtime.redis.aclose()

    async def stop_all(self) -> None:
        for runtime, _ in self.runtimes.values():
            runtime.stop()
        for _, task in self.runtimes.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)
        self.runtimes.clear()


@pytest.fixture
async def stack(
    tmp_path: Path,
    redis_url: str,
    database_url: str,
    s3_server: Any,
    s3_bucket: str,
) -> AsyncIterator[Stack]:
    kpi_dir = tmp_path / "kpis"
    kpi_dir.mkdir()
    for name, text in KPIS.items():
        (kpi_dir / name).write_text(text)
    env = {
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "S3_ENDPOINT_URL": s3_server.endpoint_url,
        "S3_BUCKET": s3_bucket,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_REGION": s3_server.region,
        "KPI_DEFINITIONS_DIR": str(kpi_dir),
        "SIMULATOR_PORT": 0,
        "CALCULATION_PORT": 0,
        "DATABASE_SERVICE_PORT": 0,
        "ARCHIVAL_PORT": 0,
        "OBSERVABILITY_PORT": 0,
        "ARCHIVAL_FLUSH_INTERVAL": "500ms",
        "DATABASE_ARCHIVAL_INTERVAL": "0s",
        "CALCULATION_BACKFILL": "false",
        "BUS_CLAIM_IDLE_MS": 2000,
        "HEARTBEAT_INTERVAL": 1.0,
    }
    s = Stack(env=env, database_url=database_url)
    yield s
    await s.stop_all()


# The Redis ACL user each service connects as when deployed (`analytics_engine.core.acl`).
ACL_USERS = {
    "database": "database_service",
    "calculation": "calculation_engine",
    "archival": "archival_service",
    "simulator": "data_simulator",
    "observability": "observability_service",
}


@pytest.fixture
def acl_stack(stack: Stack, tmp_path: Path) -> Iterator[Stack]:
    """`stack` on a Redis of its own loaded with the platform's ACL file: every service runs as
    its own least-privilege user, as deployed; the test's own reads run as `admin`."""
    users = tmp_path / "users.acl"
    users.write_text(acl_file({s: f"pw-{s}" for s in SERVICE_ACCESS}, admin_password="admin-pw"))
    with RedisServer(tmp_path / "acl-redis", acl_file=users, admin_password="admin-pw") as server:
        base = f"127.0.0.1:{server.port}/0"
        stack.env["REDIS_URL"] = f"redis://admin:admin-pw@{base}"
        stack.redis_urls = {n: f"redis://{u}:pw-{u}@{base}" for n, u in ACL_USERS.items()}
        yield stack


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def settle(stack: Stack, *, events: int) -> None:
    """Wait until every event is stored, every window closed and stored, the archive drained."""
    conn = await asyncpg.connect(stack.database_url)
    redis = connect(stack.env["REDIS_URL"])
    try:

        async def stored() -> bool:
            return int(await conn.fetchval("SELECT count(*) FROM entity_events")) >= events

        await eventually(stored, timeout=90, what=f"{events} stored events")
        newest = await conn.fetchval("SELECT max(published_at) FROM entity_events")
        # the widest window ends at most 4 s after the newest event, lateness 1 s, idle close 1 s
        close_by = newest + timedelta(seconds=8)

        async def closed() -> bool:
            now = await conn.fetchval("SELECT now()")
            return bool(now > close_by)

        await eventually(closed, timeout=30, what="the last windows to close")
        previous = -1

        async def results_stable() -> bool:
            nonlocal previous
            count = int(await conn.fetchval("SELECT count(*) FROM kpi_results"))
            unforwarded = int(
                await conn.fetchval("SELECT count(*) FROM kpi_results WHERE NOT forwarded")
            )
            stable = count == previous and unforwarded == 0
            previous = count
            return stable

        await eventually(results_stable, timeout=60, what="KPI results to be stored")

        async def archived() -> bool:
            key = channels.stream_key(channels.ARCHIVE_KPI_RESULTS)
            for group in await redis.xinfo_groups(key):
                if int(group.get("lag") or 0) or int(group.get("pending") or 0):
                    return False
            return True

        await eventually(archived, timeout=60, what="the archive to catch up")
    finally:
        await conn.close()
        await redis.aclose()


async def check_everything(stack: Stack, *, events: int) -> None:
    conn = await asyncpg.connect(stack.database_url)
    try:
        stored = await conn.fetchval("SELECT count(*) FROM entity_events")
        distinct = await conn.fetchval("SELECT count(DISTINCT event_id) FROM entity_events")
        results = await conn.fetchval("SELECT count(*) FROM kpi_results")
    finally:
        await conn.close()
    assert stored == distinct == events, "every event persisted exactly once"
    assert results > 0
    settings = VerifySettings.model_validate(stack.env)
    report = await verify(
        settings,
        Options(
            start=None,
            end=None,
            kpis=None,
            skip_lake=False,
            json=False,
            archive_grace=timedelta(0),
            idle_close=timedelta(seconds=3),
        ),
    )
    assert not report.mismatches, report.mismatches[:20]
    for summary in report.kpis:
        assert summary.matched == summary.compared > 0, summary
        assert summary.open_windows_skipped == 0, summary
    assert {k.kpi_code for k in report.kpis} == {
        "orders_count",
        "revenue_by_region",
        "avg_temperature",
        "distinct_customers",
    }
    # every result stored before verify ran was checked in the lake (a query KPI may have
    # stored more since)
    assert report.lake and report.lake["results_checked"] >= results


async def test_every_event_persisted_every_kpi_right_every_result_archived_once(
    stack: Stack,
) -> None:
    events = 6000
    for name in ("database", "calculation", "archival"):
        await stack.start(name)
    await stack.start(
        "simulator", SIMULATOR_SEED=7, SIMULATOR_RATE=2000, SIMULATOR_MAX_EVENTS=events
    )
    await settle(stack, events=events)
    await check_everything(stack, events=events)


async def test_crashing_consumers_mid_stream_loses_and_duplicates_nothing(stack: Stack) -> None:
    events = 9000
    for name in ("database", "calculation", "archival"):
        await stack.start(name)
    await stack.start(
        "simulator", SIMULATOR_SEED=11, SIMULATOR_RATE=1500, SIMULATOR_MAX_EVENTS=events
    )
    for name in ("database", "calculation", "archival"):
        await asyncio.sleep(1.0)
        await stack.crash(name)
        await asyncio.sleep(0.5)
        await stack.start(name)
    await settle(stack, events=events)
    await check_everything(stack, events=events)


async def test_a_reader_down_longer_than_its_stream_holds_loses_nothing(stack: Stack) -> None:
    """The database service is down while the simulator publishes 4x what a stream holds: the
    simulator waits on the full streams (backpressure) instead of anything being trimmed unread,
    and resumes as the database service catches up and retention trims."""
    events, cap = 6000, 1000
    stack.env |= {"BUS_STREAM_MAXLEN": cap, "OBSERVABILITY_TRIM_INTERVAL": "300ms"}
    for name in ("observability", "calculation", "archival"):
        await stack.start(name)
    sim = await stack.start(
        "simulator", SIMULATOR_SEED=5, SIMULATOR_RATE=3000, SIMULATOR_MAX_EVENTS=events
    )
    await asyncio.sleep(4.0)  # at 3000/s, all 6000 would be out by now
    redis = connect(stack.env["REDIS_URL"])
    try:
        lengths = [await redis.xlen(channels.stream_key(c)) for c in channels.ENTITY_CHANNELS]
    finally:
        await redis.aclose()
    # each stream filled to its cap with at most the batch that filled it, then the simulator
    # waited: no more, and nothing trimmed from what the database service has not read
    assert max(lengths) >= cap and all(n <= cap + 1000 for n in lengths), lengths
    assert sum(lengths) < events
    waited = sim.metrics.registry.get_sample_value(
        "analytics_bus_publish_wait_seconds_total", {"channel": channels.ENTITY_CREATED}
    )
    assert waited is not None and waited > 1.0
    await stack.start("database")
    await settle(stack, events=events)
    await check_everything(stack, events=events)


async def test_the_services_do_their_jobs_as_their_own_redis_acl_users(acl_stack: Stack) -> None:
    """Least privilege leaves every service what it needs: publishing, consuming, dead letters,
    the engine's checkpoints, its restart (restore, sweep of stray keys, rewind, retention
    hold), the archiver's ledger, the observability service's trimming."""
    events = 6000
    acl_stack.env |= {"OBSERVABILITY_TRIM_INTERVAL": "300ms"}
    # a query KPI: `execute_query` through the database service, which answers the engine's
    # user (DATABASE_EXECUTE_QUERY_CALLERS)
    (Path(acl_stack.env["KPI_DEFINITIONS_DIR"]) / "stored_orders.yaml").write_text(QUERY_KPI)
    for name in ("observability", "database", "calculation", "archival"):
        await acl_stack.start(name)
    await acl_stack.start(
        "simulator", SIMULATOR_SEED=13, SIMULATOR_RATE=2000, SIMULATOR_MAX_EVENTS=events
    )
    await asyncio.sleep(1.5)
    await acl_stack.crash("calculation")
    calc = await acl_stack.start("calculation")
    await settle(acl_stack, events=events)
    await check_everything(acl_stack, events=events)
    registry = calc.metrics.registry
    assert registry.get_sample_value("analytics_calc_checkpoint_duration_seconds_count")
    conn = await asyncpg.connect(acl_stack.database_url)
    try:
        stored = await conn.fetchval(
            "SELECT max(value) FROM kpi_results WHERE kpi_code = 'stored_orders'"
        )
        orders = await conn.fetchval(
            "SELECT count(*) FROM entity_events WHERE entity_type = 'order'"
        )
    finally:
        await conn.close()
    assert stored is not None and 0 < stored <= orders
    observability_runtime, _ = acl_stack.runtimes["observability"]
    trimmed = observability_runtime.metrics.registry.get_sample_value(
        "analytics_stream_entries_trimmed_total", {"channel": channels.ENTITY_CREATED}
    )
    assert trimmed is not None and trimmed > 0
