"""An in-process controller of the local stack, for chaos runs and stress tests.

It starts the stack exactly like `analytics-engine up` does (`localstack.up.start_infra` and
`start_services`: Redis with per-service ACL users and AOF `appendfsync everysec`, PostgreSQL
with the read-only role, the S3 store, every service as a supervised child process) and adds
the handles a chaos run needs:

- faults: SIGKILL a service (the supervisor restarts it), restart or SIGKILL Redis, stop and
  start PostgreSQL or the S3 store (same ports, same data);
- observation: per consumer group lag in entries and in seconds (age of the oldest entry not yet
  acknowledged), the simulator's status, lost and duplicated entity events in PostgreSQL by the
  simulator's deterministic event ids, `verify` in-process;
- control: pause / resume the simulator, wait until the pipeline is caught up or fully settled.

    async with StackController(StackConfig(data_dir, rate=1000)) as stack:
        await stack.kill_service("database")
        await stack.wait_caught_up()
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from analytics_engine.core import channels
from analytics_engine.core.bus import REDIS_ERRORS
from analytics_engine.core.redis import connect
from analytics_engine.localstack.ports import free_port
from analytics_engine.localstack.up import (
    LOCAL_SERVICES,
    InfraStack,
    LocalServices,
    start_infra,
    start_services,
    wait_ready,
)
from analytics_engine.verify.cli import Options, VerifySettings, verify
from analytics_engine.verify.report import Report

# Short windows so that a pipeline paused for a check settles in seconds (the samples in
# k8s/samples use 1 min to 1 h windows). The same four aggregations as the pipeline tests.
CHAOS_KPIS: Mapping[str, str] = {
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
# The streams of the data path: entity events -> database + calculation -> KPI results ->
# database -> archive. Recovery is judged on these; control streams are reported separately.
DATA_PATH = frozenset(
    {
        *channels.ENTITY_CHANNELS,
        channels.KPI_CALCULATED,
        channels.ARCHIVE_KPI_RESULTS,
        channels.ARCHIVAL_EVENTS,
        channels.ARCHIVAL_CONFIRMED,
    }
)
WIDEST_WINDOW_S = 4.0
MAX_LATENESS_S = 1.0

# The event's sequence number is the last UUID group of the simulator's event ids.
SEQ_SQL = "('x' || lpad(split_part(event_id::text, '-', 5), 16, '0'))::bit(64)::bigint"


class StackError(RuntimeError):
    """The stack did not start, or a wait timed out."""


@dataclass(frozen=True)
class StackConfig:
    data_dir: Path
    rate: float = 1000.0
    seed: int = 42
    services: tuple[str, ...] = LOCAL_SERVICES
    kpi_dir: Path | None = None
    """KPI YAML directory; default: `CHAOS_KPIS` written under `data_dir/kpis`."""
    extra_env: Mapping[str, str] = field(default_factory=dict)
    archival_flush_s: float = 5.0
    """`ARCHIVAL_FLUSH_INTERVAL` (the default of the service)."""


@dataclass(frozen=True, slots=True)
class GroupLag:
    stream: str
    group: str
    lag: int
    """Entries not yet delivered to the group."""
    pending: int
    """Entries delivered but not acknowledged."""
    age_s: float
    """Age of the oldest entry not yet acknowledged (0 when none): the group's lag in time."""


@dataclass(frozen=True, slots=True)
class Accounting:
    """Entity events in PostgreSQL against the simulator's first `expected` sequence numbers."""

    expected: int
    stored_rows: int
    distinct_ids: int
    missing: int
    duplicates: int
    unexpected: int
    """Stored ids outside the expected sequence range or with another id prefix."""
    missing_sample: list[int]


class StackController:
    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.data_dir = config.data_dir.absolute()
        self.infra: InfraStack | None = None
        self.local: LocalServices | None = None
        self._admin: Redis | None = None
        self._http: aiohttp.ClientSession | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self, *, ready_timeout: float = 120.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        kpi_dir = self.config.kpi_dir
        if kpi_dir is None:
            kpi_dir = self.data_dir / "kpis"
            kpi_dir.mkdir(exist_ok=True)
            for name, text in CHAOS_KPIS.items():
                (kpi_dir / name).write_text(text)
        self.infra = await asyncio.to_thread(start_infra, self.data_dir)
        env = {
            "SIMULATOR_SEED": str(self.config.seed),
            "ARCHIVAL_FLUSH_INTERVAL": str(self.config.archival_flush_s),
            **self.config.extra_env,
        }
        self.local = start_services(
            self.config.services,
            self.infra.connections,
            self.data_dir,
            kpi_dir=kpi_dir,
            rate=self.config.rate,
            gateway_port=free_port(),
            redis_urls=self.infra.redis_urls,
            extra_env=env,
        )
        self._admin = connect(self.infra.admin_redis_url, max_connections=8)
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        ready = await wait_ready(self.local.ports, timeout=ready_timeout)
        if not all(ready.values()):
            late = [n for n, ok in ready.items() if not ok]
            raise StackError(
                f"not ready after {ready_timeout:.0f}s: {', '.join(late)} "
                f"(logs in {self.data_dir / 'logs'})"
            )

    async def stop(self) -> None:
        if self.local is not None:
            await self.local.supervisor.stop_all()
            self.local = None
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._admin is not None:
            with contextlib.suppress(Exception):
                await self._admin.aclose()
            self._admin = None
        if self.infra is not None:
            await asyncio.to_thread(self.infra.infra.stop)
            self.infra = None

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- accessors -------------------------------------------------------------------------
    @property
    def stack(self) -> InfraStack:
        if self.infra is None:
            raise StackError("the stack is not running")
        return self.infra

    @property
    def services(self) -> LocalServices:
        if self.local is None:
            raise StackError("the stack is not running")
        return self.local

    @property
    def admin(self) -> Redis:
        if self._admin is None:
            raise StackError("the stack is not running")
        return self._admin

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise StackError("the stack is not running")
        return self._http

    @property
    def database_url(self) -> str:
        return self.stack.connections["DATABASE_URL"]

    def url(self, service: str, path: str = "") -> str:
        return f"http://127.0.0.1:{self.services.ports[service]}{path}"

    def log_path(self, service: str) -> Path:
        return self.data_dir / "logs" / f"{service}.log"

    def restarts(self) -> dict[str, int]:
        return {n: self.services.supervisor.restarts(n) for n in self.services.services}

    # -- faults ----------------------------------------------------------------------------
    async def kill_service(self, name: str, *, timeout: float = 60.0) -> float:
        """SIGKILL the service's process; return once the supervisor's new process is ready
        (seconds from the kill)."""
        supervisor = self.services.supervisor
        pid = supervisor.pid(name)
        if pid is None:
            raise StackError(f"{name} is not running")
        started = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        deadline = started + timeout
        while True:
            new = supervisor.pid(name)
            if new is not None and new != pid and await self.ready(name):
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise StackError(f"{name} not back {timeout:.0f}s after SIGKILL")
            await asyncio.sleep(0.1)

    async def freeze_service(self, name: str, seconds: float) -> float:
        """SIGSTOP the service's process for `seconds`, then SIGCONT: a stalled pod, whose
        connections stay open and whose pending entries stay its own. Returns the seconds."""
        pid = self.services.supervisor.pid(name)
        if pid is None:
            raise StackError(f"{name} is not running")
        started = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)
        finally:
            os.kill(pid, signal.SIGCONT)
        return time.monotonic() - started

    async def publish_wait_s(self, name: str) -> float:
        """Seconds the service has waited for room in full streams so far (backpressure: its
        `analytics_bus_publish_wait_seconds_total`, summed over channels)."""
        async with self.http.get(self.url(name, "/metrics")) as resp:
            text = await resp.text()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "analytics_bus_publish_wait_seconds"
            for sample in family.samples
            if sample.name.endswith("_total")
        )

    async def ready(self, name: str) -> bool:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with self.http.get(self.url(name, "/readyz")) as resp:
                return resp.status == 200
        return False

    async def restart_redis(self) -> None:
        """Graceful restart (SIGTERM: Redis fsyncs the AOF on shutdown), same port and data."""
        await asyncio.to_thread(self.stack.infra.redis.restart)

    async def crash_redis(self) -> None:
        """SIGKILL Redis and start it again: with `appendfsync everysec` up to ~1 s of
        acknowledged writes may be lost."""
        redis = self.stack.infra.redis
        await asyncio.to_thread(redis.kill)
        await asyncio.to_thread(redis.start)

    async def stop_postgres(self) -> None:
        await asyncio.to_thread(self.stack.infra.postgres.stop)

    async def start_postgres(self) -> None:
        await asyncio.to_thread(self.stack.infra.postgres.start)

    async def stop_s3(self) -> None:
        await asyncio.to_thread(self.stack.infra.s3.stop)

    async def start_s3(self) -> None:
        await asyncio.to_thread(self.stack.infra.s3.start)

    async def grant_default_user_for_aof(self) -> None:
        """Work around Redis dropping every MULTI/EXEC (and script effect) of the AOF on load
        when the `default` user lacks permissions (redis/redis#14541, fixed by #14545; valkey
        #3983): EXEC re-checks ACLs as `default` while loading. The user stays `off` (nobody
        can authenticate as it); it only gets permissions. Rewrites the ACL file and reloads it.
        """
        path = self.data_dir / "redis-users.acl"
        lines = path.read_text().splitlines()
        lines = [
            "user default off ~* &* +@all" if line.startswith("user default ") else line
            for line in lines
        ]
        path.write_text("\n".join(lines) + "\n")
        await self.admin.execute_command("ACL", "LOAD")  # type: ignore[no-untyped-call]

    # -- the simulator ---------------------------------------------------------------------
    async def simulator(self, action: str | None = None) -> dict[str, Any]:
        """The simulator's status; `action` `start` or `stop` first."""
        path = "/api/v1/simulator" + (f"/{action}" if action else "")
        method = self.http.post if action else self.http.get
        async with method(self.url("simulator", path)) as resp:
            resp.raise_for_status()
            body: dict[str, Any] = await resp.json()
            return body

    async def pause_simulator(self) -> int:
        """Stop the simulator; return its final `events_emitted` (stable once stopped)."""
        await self.simulator("stop")
        previous = -1
        while True:  # a batch in flight when `stop` arrived is still published
            emitted = int((await self.simulator())["events_emitted"])
            if emitted == previous:
                return emitted
            previous = emitted
            await asyncio.sleep(0.3)

    # -- observation -----------------------------------------------------------------------
    async def group_lags(self, *, since: float | None = None) -> list[GroupLag]:
        """Every consumer group of every durable stream. With `since` (Unix seconds), pending
        entries added before it are ignored when ageing (entries left pending by an earlier
        fault must not be blamed on the next one; `stuck_elsewhere` and the final settle still
        see them)."""
        admin = self.admin
        streams: Any = admin
        now_ms = time.time() * 1000
        out: list[GroupLag] = []
        keys = sorted(
            [k async for k in admin.scan_iter(match=channels.stream_key("*"), _type="stream")]
        )
        for key in keys:
            stream = key.decode().removeprefix(channels.stream_key(""))
            try:
                groups = await admin.xinfo_groups(key)
            except ResponseError as exc:
                if "no such key" in str(exc):
                    continue  # deleted since the SCAN (a finished replay stream)
                raise
            for info in groups:
                group = _text(info["name"])
                lag = int(info.get("lag") or 0)
                pending = int(info.get("pending") or 0)
                oldest: float | None = None
                if pending and since is None:
                    summary = await streams.xpending(key, group)
                    if summary and summary.get("min"):
                        oldest = _id_ms(summary["min"])
                elif pending and since is not None:
                    first_pending = await streams.xpending_range(
                        key, group, min=f"{int(since * 1000)}-0", max="+", count=1
                    )
                    if first_pending:
                        oldest = _id_ms(first_pending[0]["message_id"])
                if lag or info.get("lag") is None:
                    last = _text(info["last-delivered-id"])
                    nxt = await streams.xrange(key, min=f"({last}", max="+", count=1)
                    if nxt:
                        lag = max(lag, 1)
                        first = _id_ms(nxt[0][0])
                        oldest = first if oldest is None else min(oldest, first)
                    else:  # Redis's own `lag` can be off (after a partial AOF replay)
                        lag = 0
                age = max(0.0, (now_ms - oldest) / 1000) if oldest is not None else 0.0
                out.append(GroupLag(stream, group, lag, pending, age))
        return out

    def lag_allowance(self, lag: GroupLag) -> float:
        """How far behind (seconds) a group may be in steady state: the calculation engine
        acknowledges at its 1 s checkpoints, the archival service after its flush."""
        if lag.group == "archival_service":
            return 3.0 + self.config.archival_flush_s
        return 3.0

    async def behind(self, *, since: float | None = None) -> list[GroupLag]:
        """Data-path groups lagging more than their allowance (empty: caught up)."""
        return [
            g
            for g in await self.group_lags(since=since)
            if g.stream in DATA_PATH and g.age_s > self.lag_allowance(g)
        ]

    async def stuck_elsewhere(self, older_than: float = 30.0) -> list[GroupLag]:
        """Groups off the data path (control streams: stream.*, metadata.changed, ticks) with an
        entry unacknowledged for longer than `older_than` seconds."""
        return [
            g for g in await self.group_lags() if g.stream not in DATA_PATH and g.age_s > older_than
        ]

    async def stale_pending(self, older_than: float = 30.0) -> list[GroupLag]:
        """Data-path groups holding an entry unacknowledged for longer than `older_than` s."""
        return [
            g for g in await self.group_lags() if g.stream in DATA_PATH and g.age_s > older_than
        ]

    async def wait_caught_up(
        self, *, timeout: float = 300.0, stable: int = 3, since: float | None = None
    ) -> float:
        """Seconds until every group stays within its allowance for `stable` polls (0.5 s);
        Redis being unreachable counts as behind. `since`: see `group_lags`."""
        started = time.monotonic()
        streak = 0
        last: list[GroupLag] = []
        while True:
            try:
                last = await self.behind(since=since)
                ok = not last
            except (*REDIS_ERRORS, TimeoutError):
                ok = False
            streak = streak + 1 if ok else 0
            if streak >= stable:
                return time.monotonic() - started - (stable - 1) * 0.5
            if time.monotonic() - started > timeout:
                detail = ", ".join(f"{g.group}<-{g.stream} {g.age_s:.1f}s/{g.lag}" for g in last)
                raise StackError(f"not caught up after {timeout:.0f}s: {detail}")
            await asyncio.sleep(0.5)

    async def accounting(self, expected: int) -> Accounting:
        """Lost and duplicated entity events: the simulator numbers its events 0.. in the last
        group of their ids, under one id prefix (seed and run id)."""
        conn = await asyncpg.connect(self.database_url, timeout=10)
        try:
            row = await conn.fetchrow(
                f"""
                WITH ids AS (
                    SELECT event_id, {SEQ_SQL} AS seq,
                           left(event_id::text, 23) AS prefix
                    FROM entity_events
                ), main AS (
                    SELECT prefix FROM ids GROUP BY prefix ORDER BY count(*) DESC LIMIT 1
                )
                SELECT count(*) AS rows,
                       count(DISTINCT event_id) AS distinct_ids,
                       count(DISTINCT seq) FILTER (
                           WHERE seq < $1 AND prefix = (SELECT prefix FROM main)
                       ) AS in_range,
                       count(DISTINCT event_id) FILTER (
                           WHERE seq >= $1 OR prefix <> (SELECT prefix FROM main)
                       ) AS unexpected
                FROM ids
                """,
                expected,
            )
            assert row is not None
            missing = expected - int(row["in_range"])
            sample: list[int] = []
            if missing:
                sample = [
                    int(r["s"])
                    for r in await conn.fetch(
                        f"""
                        SELECT s FROM generate_series(0, $1 - 1) AS s
                        EXCEPT SELECT {SEQ_SQL} FROM entity_events
                        ORDER BY 1 LIMIT 20
                        """,
                        expected,
                    )
                ]
        finally:
            await conn.close()
        return Accounting(
            expected=expected,
            stored_rows=int(row["rows"]),
            distinct_ids=int(row["distinct_ids"]),
            missing=missing,
            duplicates=int(row["rows"]) - int(row["distinct_ids"]),
            unexpected=int(row["unexpected"]),
            missing_sample=sample,
        )

    async def settle(self, *, timeout: float = 180.0) -> int:
        """Pause the simulator and wait until every emitted event is stored, every window has
        closed and its result is stored, forwarded and archived. Returns `events_emitted`."""
        emitted = await self.pause_simulator()
        # Entries left pending by an earlier fault long ago do not hold the settle up (the
        # caller reports them: `stale_pending`).
        since = time.time() - 30
        deadline = time.monotonic() + timeout
        conn = await asyncpg.connect(self.database_url, timeout=10)
        try:

            async def until(what: str, check: Any) -> None:
                while not await check():
                    if time.monotonic() > deadline:
                        raise StackError(f"not settled after {timeout:.0f}s: {what}")
                    await asyncio.sleep(0.3)

            async def stored() -> bool:
                n = await conn.fetchval("SELECT count(DISTINCT event_id) FROM entity_events")
                return int(n) >= emitted or not await self.behind_any(since=since)

            await until("events stored", stored)
            newest = await conn.fetchval("SELECT max(published_at) FROM entity_events")
            close_by = newest + timedelta(seconds=WIDEST_WINDOW_S + MAX_LATENESS_S + 3)

            async def closed() -> bool:
                return bool(await conn.fetchval("SELECT now() > $1", close_by))

            await until("last windows closed", closed)
            previous = -1

            async def results_stable() -> bool:
                nonlocal previous
                count = int(await conn.fetchval("SELECT count(*) FROM kpi_results"))
                unforwarded = int(
                    await conn.fetchval("SELECT count(*) FROM kpi_results WHERE NOT forwarded")
                )
                ok = count == previous and unforwarded == 0
                previous = count
                return ok

            await until("results stored and forwarded", results_stable)

            async def drained() -> bool:
                return not await self.behind_any(since=since)

            await until("every consumer group drained", drained)
        finally:
            await conn.close()
        return emitted

    async def behind_any(self, *, since: float | None = None) -> bool:
        """Any data-path group with an entry not yet acknowledged (strict: for a paused
        pipeline). `since`: only pending entries added after it count (see `group_lags`)."""
        lags = [g for g in await self.group_lags(since=since) if g.stream in DATA_PATH]
        if since is None:
            return any(g.lag or g.pending for g in lags)
        return any(g.lag or g.age_s > 0 for g in lags)

    async def verify(
        self,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        archive_grace: float = 60.0,
        idle_close: float = 30.0,
    ) -> Report:
        """`analytics-engine verify`, in-process, with the stack's settings (`stack.env`)."""
        # The admin Redis user: verify's request/reply client listens on `reply.verify.*`,
        # which the stack's `cli` ACL user may not subscribe to (see the chaos report).
        settings = VerifySettings.model_validate(
            {
                **self.stack.connections,
                "REDIS_URL": self.stack.admin_redis_url,
                "KPI_DEFINITIONS_DIR": str(self._kpi_dir()),
            }
        )
        options = Options(
            start=start,
            end=end,
            kpis=None,
            skip_lake=False,
            json=False,
            archive_grace=timedelta(seconds=archive_grace),
            idle_close=timedelta(seconds=idle_close),
        )
        return await verify(settings, options)

    def _kpi_dir(self) -> Path:
        return self.config.kpi_dir or self.data_dir / "kpis"

    async def db_now(self) -> datetime:
        conn = await asyncpg.connect(self.database_url, timeout=10)
        try:
            value: datetime = await conn.fetchval("SELECT now()")
        finally:
            await conn.close()
        return value.astimezone(UTC)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _id_ms(entry_id: bytes | str) -> float:
    return float(_text(entry_id).split("-", 1)[0])
