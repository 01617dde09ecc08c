"""The full local pipeline on this machine, every service a real process on loopback (as
`analytics-engine up` runs them), each figure next to a raw baseline measured in the same run.

Run: `.venv/bin/python bench/pipeline_bench.py [--parts abcd] [--hold 30] [--profile]`

(a) sustained entity events/s with zero loss: the simulator's rate is ramped through its HTTP
    API (`PUT /api/v1/simulator/rate`); a step passes when the simulator reaches >= 95 % of the
    rate, the lag of both entity consumers (database, calculation) stays bounded over `--hold`
    seconds, and after stopping the simulator every emitted event is in PostgreSQL.
    Baseline: raw Redis Streams hop (XADD / XREADGROUP / XACK of the same bytes).
(b) KPI freshness: window close (end + allowed lateness) -> result received on
    `kpi.calculated.{code}`, for two 1 s tumbling KPIs, per ramp step; also the engine's own
    `analytics_kpi_freshness_seconds`. Baseline: raw stream hop latency (XADD -> XREADGROUP).
(c) database drain: N events published into the entity streams while the database service is
    stopped (the calculation engine keeps up meanwhile, as in an outage), then it is started;
    time until its lag and pending are 0. Baseline: asyncpg COPY of the same rows into a plain
    table.
(d) archival: N KPI results on `archive.kpi_results` (and 5000-row batches on `archival.events`)
    backlogged with the archival service stopped, then drained. Baseline: pyarrow Parquet zstd
    of the same rows in memory + one boto3 PUT.
(c) and (d) start once no backfill is pending or being replayed (printed). The calculation
    engine runs with CALCULATION_BACKFILL=false unless `--backfill`: no part measures backfills,
    and one replays up to an hour of stored events when the KPI's first window closes (for an
    hourly KPI: at the next full hour, in the middle of whatever part runs then).
Targets: >= 20k events/s sustained, >= 100k events/s drain, freshness p99 <= 100 ms,
archival >= 100k rows/s. The machine is shared: `uptime` is printed with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import signal
import statistics
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg  # type: ignore[import-untyped]
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from redis.asyncio import Redis

from _profile import record, summarise
from _stack import (
    GroupState,
    Stack,
    cpu_seconds,
    exit_on_sigterm,
    group_state,
    kpi_files,
    percentile,
    slope,
    uptime_line,
)
from analytics_engine.archival.layout import dims_key
from analytics_engine.archival.tables import KPI_RESULTS_SCHEMA, TS
from analytics_engine.core import channels
from analytics_engine.core.bus import EventPublisher, encode_event
from analytics_engine.core.envelopes import parse_event, utcnow
from analytics_engine.core.storable import parse_entity_event
from analytics_engine.database.writer import _EVENT_COLUMNS
from analytics_engine.simulator import service as simulator_service
from analytics_engine.simulator.generator import EventGenerator

FRESH_KPIS = {
    "fresh-orders-count.yaml": """
code: fresh_orders_count
display_name: Orders per second
entity_type: order
aggregation: count
window: {type: tumbling, size: 1s, allowed_lateness: 0s}
""",
    "fresh-revenue-by-region.yaml": """
code: fresh_revenue_by_region
display_name: Revenue per second by region
entity_type: order
aggregation: sum
field: amount
group_by: [region]
window: {type: tumbling, size: 1s, allowed_lateness: 0s}
""",
}
FRESH_LATENESS_S = 0.0
DB_GROUP = "database_service"
CALC_GROUP = "calculation_engine"
ARCHIVAL_GROUP = "archival_service"
CALC_CHANNELS = (channels.ENTITY_CREATED, channels.ENTITY_UPDATED)
SOURCE = "data_simulator"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- event material ---------------------------------------------------------------------------
def envelope(event_id: str, channel: str, source: str, when: datetime, payload: Any) -> bytes:
    """An event's wire bytes, as the core's publisher writes them."""
    publisher = EventPublisher.__new__(EventPublisher)
    publisher._source = source  # make_event only reads the source
    return encode_event(publisher.make_event(channel, payload, event_id=event_id, timestamp=when))


def generate(n: int, *, seed: int, run_id: str) -> list[tuple[str, bytes]]:
    """`n` simulator events (channel, wire bytes) from the simulator's own generator."""
    settings = simulator_service.Settings.model_validate(
        {"SIMULATOR_SEED": seed, "SIMULATOR_RUN_ID": run_id}
    )
    generator = EventGenerator(settings.generator_config())
    out: list[tuple[str, bytes]] = []
    while len(out) < n:
        first = generator.sequence
        wall = utcnow()
        batch = generator.next_batch(min(1000, n - len(out)), wall)
        out.extend(
            (ch, envelope(generator.event_id(first + i), ch, SOURCE, wall, payload))
            for i, (ch, payload) in enumerate(batch)
        )
    return out


# Same wire effect as the core's publish script: per event XADD to the channel's stream and
# PUBLISH, one atomic script call per batch (built from prepared bytes, so backlogs of 200k
# are built quickly by this client).
_PUBLISH = """
for i = 1, #ARGV, 2 do
  redis.call('XADD', KEYS[tonumber(ARGV[i])], 'MAXLEN', '~', 1000000, '*', 'm', ARGV[i + 1])
  redis.call('PUBLISH', string.sub(KEYS[tonumber(ARGV[i])], 11), ARGV[i + 1])
end
return #ARGV / 2
"""


async def publish(redis: Redis, items: Sequence[tuple[str, bytes]], batch: int = 1000) -> float:
    script = redis.register_script(_PUBLISH)
    started = time.perf_counter()
    for i in range(0, len(items), batch):
        keys: dict[str, int] = {}
        args: list[Any] = []
        for channel, data in items[i : i + batch]:
            args += [keys.setdefault(channels.stream_key(channel), len(keys) + 1), data]
        await script(keys=list(keys), args=args)
    return time.perf_counter() - started


# -- raw baselines ----------------------------------------------------------------------------
async def raw_stream_hop(redis: Redis, payloads: Sequence[bytes], batch: int = 500) -> float:
    """events/s of XADD (pipelined) -> XREADGROUP -> XACK of the same bytes, one group."""
    key = f"bench:raw:{uuid.uuid4().hex}"
    await redis.xgroup_create(key, "g", id="0", mkstream=True)
    n = len(payloads)
    consumed = 0

    async def consume() -> None:
        nonlocal consumed
        while consumed < n:
            reply = await redis.xreadgroup("g", "c", {key: ">"}, count=batch, block=1000)
            for _, entries in reply or []:
                ids = [entry_id for entry_id, _ in entries]
                for _, fields in entries:
                    orjson.loads(fields[b"m"])
                await redis.xack(key, "g", *ids)
                consumed += len(ids)

    started = time.perf_counter()
    task = asyncio.create_task(consume())
    for i in range(0, n, batch):
        pipe = redis.pipeline(transaction=False)
        for data in payloads[i : i + batch]:
            pipe.xadd(key, {b"m": data}, maxlen=1_000_000, approximate=True)
        await pipe.execute()
    await task
    elapsed = time.perf_counter() - started
    await redis.delete(key)
    return n / elapsed


async def raw_hop_latency(writer: Redis, reader: Redis, n: int = 1000) -> tuple[float, float]:
    """p50/p99 ms of one XADD until a blocked XREADGROUP (another connection) returns it."""
    key = f"bench:lat:{uuid.uuid4().hex}"
    await writer.xgroup_create(key, "g", id="$", mkstream=True)
    samples: list[float] = []
    for _ in range(n):
        read = asyncio.create_task(reader.xreadgroup("g", "c", {key: ">"}, count=10, block=2000))
        await asyncio.sleep(0.001)  # the reader is blocked by now
        t0 = time.perf_counter()
        await writer.xadd(key, {b"m": b"x"})
        reply = await read
        samples.append(time.perf_counter() - t0)
        ids = [entry_id for _, entries in reply for entry_id, _ in entries]
        await writer.xack(key, "g", *ids)
    await writer.delete(key)
    return percentile(samples, 0.5) * 1000, percentile(samples, 0.99) * 1000


# -- freshness --------------------------------------------------------------------------------
@dataclass
class Freshness:
    """Results of the fresh_* KPIs as received: close -> receive, and close -> envelope time."""

    samples: list[tuple[float, float, float]] = field(default_factory=list)
    """(close time, received - close, envelope timestamp - close), wall-clock seconds."""

    def on_message(self, data: bytes) -> None:
        now = time.time()
        envelope = orjson.loads(data)
        payload = envelope["payload"]
        close = datetime.fromisoformat(payload["window_end"]).timestamp() + FRESH_LATENESS_S
        stamp = datetime.fromisoformat(envelope["timestamp"].replace("Z", "+00:00")).timestamp()
        self.samples.append((close, now - close, stamp - close))

    def between(self, start: float, end: float) -> list[float]:
        """Latencies of windows that closed in [start, end] (while events were flowing: the
        last window of a step closes by the idle path after the simulator stops)."""
        return [latency for close, latency, _ in self.samples if start <= close <= end]

    def slowest_windows(self, start: float, end: float, n: int) -> list[tuple[float, float]]:
        """The `n` windows closed in [start, end] whose last result came latest."""
        latest: dict[float, float] = {}
        for close, latency, _ in self.samples:
            if start <= close <= end:
                latest[close] = max(latency, latest.get(close, 0.0))
        return sorted(latest.items(), key=lambda item: -item[1])[:n]


async def listen(redis: Redis, freshness: Freshness, ready: asyncio.Event) -> None:
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.psubscribe(f"{channels.KPI_CALCULATED_PREFIX}fresh_*")
    ready.set()
    try:
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None and message["type"] == "pmessage":
                freshness.on_message(message["data"])
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def scrape_histogram(
    http: aiohttp.ClientSession, url: str, name: str, having: str = ""
) -> dict[float, float]:
    """Cumulative bucket counts of the histogram `name` (series containing `having`, summed),
    plus its `_sum` under the key -1."""
    async with http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if having not in line:
            continue
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            bound = math.inf if le == "+Inf" else float(le)
            buckets[bound] = buckets.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_sum"):
            buckets[-1.0] = buckets.get(-1.0, 0.0) + float(line.rsplit(" ", 1)[1])
    return buckets


async def engine_freshness(http: aiohttp.ClientSession, url: str) -> dict[float, float]:
    """`analytics_kpi_freshness_seconds` over the fresh_* KPIs."""
    return await scrape_histogram(http, url, "analytics_kpi_freshness_seconds", "fresh_")


async def aof_rewrites(redis: Redis) -> int:
    """Redis's background AOF rewrites so far (each a forked child writing the whole dataset:
    CPU the per-process figures count once the child has ended)."""
    info = await redis.info("persistence")
    return int(info.get("aof_rewrites", 0))


async def checkpoint_times(http: aiohttp.ClientSession, url: str) -> dict[float, float]:
    """`analytics_calc_checkpoint_duration_seconds`: how long the engine's checkpoints take."""
    return await scrape_histogram(http, url, "analytics_calc_checkpoint_duration_seconds")


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """Upper bucket bound holding the q-quantile of the observations between two scrapes."""
    bounds = sorted(b for b in after if b >= 0)
    total = after.get(math.inf, 0.0) - before.get(math.inf, 0.0)
    if total <= 0:
        return float("nan")
    for bound in bounds:
        if after[bound] - before.get(bound, 0.0) >= q * total:
            return bound
    return math.inf


# -- (a) + (b): the ramp ----------------------------------------------------------------------
@dataclass
class Step:
    rate: float
    achieved: float = 0.0
    db_lag_end: int | None = None
    calc_lag_end: int | None = None
    db_lag_max: int = 0
    calc_lag_max: int = 0
    db_slope: float = 0.0
    calc_slope: float = 0.0
    drain_s: float | None = None
    emitted: int = 0
    stored: int = 0
    bounded: bool = False
    passed: bool = False
    cpu: dict[str, float] = field(default_factory=dict)
    fresh_p50: float = float("nan")
    fresh_p99: float = float("nan")
    fresh_n: int = 0
    engine_p50: float = float("nan")
    engine_p99: float = float("nan")
    aof_rewrites: int = 0
    checkpoints: int = 0
    checkpoint_mean_ms: float = float("nan")
    checkpoint_p99_ms: float = float("nan")
    slowest: list[tuple[float, float]] = field(default_factory=list)
    """The slowest windows while measuring: (close time, latency of its last result)."""


class Pipeline:
    def __init__(self, stack: Stack, args: argparse.Namespace) -> None:
        self.stack = stack
        self.args = args
        self.redis = stack.admin()
        self.reader = stack.admin()
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self.sim = stack.url("simulator")
        self.freshness = Freshness()
        self.pg: Any = None
        self.stored_before_ramp = 0

    async def close(self) -> None:
        await self.http.close()
        await self.redis.aclose()
        await self.reader.aclose()
        if self.pg is not None:
            await self.pg.close()

    async def sim_call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        async with self.http.request(method, f"{self.sim}/api/v1/simulator{path}", json=body) as r:
            r.raise_for_status()
            result: dict[str, Any] = await r.json()
            return result

    async def stored(self) -> int:
        return int(await self.pg.fetchval("SELECT count(*) FROM entity_events"))

    async def states(self) -> tuple[GroupState, GroupState]:
        db = await group_state(self.redis, channels.ENTITY_CHANNELS, DB_GROUP)
        calc = await group_state(self.redis, CALC_CHANNELS, CALC_GROUP)
        return db, calc

    async def wait_drained(self, timeout: float) -> float | None:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            db, calc = await self.states()
            if db.drained and calc.lag == 0:
                return time.monotonic() - started
            await asyncio.sleep(0.1)
        return None

    async def step(self, rate: float) -> Step:
        hold = self.args.hold
        step = Step(rate)
        calc_url = self.stack.url("calculation")
        await self.sim_call("PUT", "/rate", {"rate": rate})
        await self.sim_call("POST", "/start")
        await asyncio.sleep(2.0)  # settle at the new rate before measuring
        profiles: list[Any] = []
        if self.args.profile:
            for name in ("simulator", "database", "calculation"):
                out = self.stack.base_dir / f"profile-{name}-{int(rate)}.txt"
                proc = record(self.stack.pid(name), hold, out)
                if proc is not None:
                    profiles.append((name, out, proc))
        engine_before = await engine_freshness(self.http, calc_url)
        checkpoints_before = await checkpoint_times(self.http, calc_url)
        if self.args.profile:
            await self.redis.config_resetstat()
        cpu0 = cpu_seconds(self.stack.all_pids())
        rewrites0 = await aof_rewrites(self.redis)
        wall0 = time.time()
        t0 = time.monotonic()
        emitted0 = (await self.sim_call("GET", ""))["events_emitted"]
        db_points: list[tuple[float, float]] = []
        calc_points: list[tuple[float, float]] = []
        while (now := time.monotonic()) - t0 < hold:
            await asyncio.sleep(1.0)
            db, calc = await self.states()
            t = time.monotonic() - t0
            if db.lag is not None:
                db_points.append((t, db.lag))
            if calc.lag is not None:
                calc_points.append((t, calc.lag))
        emitted1 = (await self.sim_call("GET", ""))["events_emitted"]
        elapsed = time.monotonic() - t0
        cpu1 = cpu_seconds(self.stack.all_pids())
        step.aof_rewrites = await aof_rewrites(self.redis) - rewrites0
        if self.args.profile:
            await print_redis_commands(self.redis, emitted1 - emitted0, rate)
        step.cpu = {k: 100 * (cpu1[k] - cpu0.get(k, 0.0)) / elapsed for k in cpu1}
        step.achieved = (emitted1 - emitted0) / elapsed
        wall1 = time.time()
        engine_after = await engine_freshness(self.http, calc_url)
        checkpoints_after = await checkpoint_times(self.http, calc_url)
        await self.sim_call("POST", "/stop")
        del now
        half = [p for p in db_points if p[0] >= hold / 2]
        chalf = [p for p in calc_points if p[0] >= hold / 2]
        step.db_slope, step.calc_slope = slope(half), slope(chalf)
        step.db_lag_end = int(db_points[-1][1]) if db_points else None
        step.calc_lag_end = int(calc_points[-1][1]) if calc_points else None
        step.db_lag_max = int(max((y for _, y in db_points), default=0))
        step.calc_lag_max = int(max((y for _, y in calc_points), default=0))
        limit = max(2 * rate, 10_000)  # at most ~2 s of events in flight
        step.bounded = (
            step.db_lag_end is not None
            and step.calc_lag_end is not None
            and step.db_lag_end <= limit
            and step.calc_lag_end <= limit
            and step.db_slope < 0.05 * rate
            and step.calc_slope < 0.05 * rate
        )
        step.drain_s = await self.wait_drained(self.args.drain_timeout)
        await asyncio.sleep(1.5)  # windows of the last second close (idle close) and arrive
        for _, _, proc in profiles:
            with contextlib.suppress(Exception):
                proc.wait(timeout=30)
        step.emitted = (await self.sim_call("GET", ""))["events_emitted"]
        step.stored = await self.stored() - self.stored_before_ramp
        step.passed = (
            step.bounded
            and step.drain_s is not None
            and step.stored == step.emitted
            and step.achieved >= 0.95 * rate
        )
        samples = self.freshness.between(wall0, wall1)
        step.fresh_n = len(samples)
        step.fresh_p50 = percentile(samples, 0.5) * 1000
        step.fresh_p99 = percentile(samples, 0.99) * 1000
        step.engine_p50 = histogram_quantile(engine_before, engine_after, 0.5) * 1000
        step.engine_p99 = histogram_quantile(engine_before, engine_after, 0.99) * 1000
        count = checkpoints_after.get(math.inf, 0.0) - checkpoints_before.get(math.inf, 0.0)
        if count:
            spent = checkpoints_after.get(-1.0, 0.0) - checkpoints_before.get(-1.0, 0.0)
            step.checkpoints = int(count)
            step.checkpoint_mean_ms = 1000 * spent / count
            step.checkpoint_p99_ms = (
                histogram_quantile(checkpoints_before, checkpoints_after, 0.99) * 1000
            )
        step.slowest = self.freshness.slowest_windows(wall0, wall1, 3)
        for name, out, _ in profiles:
            print(f"profile of {name} at {rate:g}/s ({out}):\n{summarise(out)}", flush=True)
        return step

    async def ramp(self) -> list[Step]:
        self.stored_before_ramp = await self.stored()
        ready = asyncio.Event()
        listener = asyncio.create_task(listen(self.reader, self.freshness, ready))
        await ready.wait()
        steps: list[Step] = []
        try:
            rates = [float(r) for r in self.args.rates.split(",")]
            good, bad = 0.0, None
            for rate in rates:
                step = await self.step(rate)
                steps.append(step)
                log(describe(step))
                if not step.passed:
                    bad = rate
                    break
                good = rate
            for _ in range(self.args.refine if bad is not None else 0):
                rate = round((good + bad) / 2 / 500) * 500 if bad else good
                if rate in (good, bad):
                    break
                step = await self.step(rate)
                steps.append(step)
                log(describe(step))
                if step.passed:
                    good = rate
                else:
                    bad = rate
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        return steps


def describe(s: Step) -> str:
    verdict = "PASS" if s.passed else "FAIL"
    drain = f"{s.drain_s:.1f}s" if s.drain_s is not None else "timeout"
    return (
        f"rate {s.rate:>7g}/s achieved {s.achieved:8.0f}/s  lag db end/max {s.db_lag_end}/"
        f"{s.db_lag_max} (slope {s.db_slope:+.0f}/s) calc end/max {s.calc_lag_end}/"
        f"{s.calc_lag_max} (slope {s.calc_slope:+.0f}/s)  drain {drain}  stored {s.stored}/"
        f"{s.emitted}  fresh p50/p99 {s.fresh_p50:.0f}/{s.fresh_p99:.0f} ms (n={s.fresh_n}; "
        f"engine {s.engine_p50:g}/{s.engine_p99:g} ms)  {verdict}"
        + (
            f"\n      AOF rewrites {s.aof_rewrites}; checkpoints {s.checkpoints} "
            f"mean {s.checkpoint_mean_ms:.0f} ms p99 <= {s.checkpoint_p99_ms:g} ms; "
            "slowest windows "
            + ", ".join(
                f"{time.strftime('%H:%M:%S', time.localtime(close))} {1000 * lat:.0f} ms"
                for close, lat in s.slowest
            )
            if s.checkpoints or s.slowest
            else ""
        )
    )


def start_profile(p: Pipeline, name: str, what: str) -> tuple[str, Path, Any] | None:
    """py-spy the freshly spawned service for the drain (when --profile)."""
    if not p.args.profile:
        return None
    out = p.stack.base_dir / f"profile-{name}-{what}.txt"
    proc = record(p.stack.pid(name), p.args.profile_seconds, out)
    return (name, out, proc) if proc is not None else None


def finish_profile(profile: tuple[str, Path, Any] | None) -> None:
    if profile is None:
        return
    name, out, proc = profile
    with contextlib.suppress(Exception):
        proc.send_signal(signal.SIGINT)  # py-spy writes what it has on Ctrl-C
        proc.wait(timeout=30)
    print(f"profile of {name} ({out}):\n{summarise(out)}", flush=True)


async def print_redis_commands(redis: Redis, events: int, rate: float) -> None:
    """Where Redis's time went since the last CONFIG RESETSTAT: µs per event by command."""
    stats = await redis.info("commandstats")
    rows = sorted(
        ((k.removeprefix("cmdstat_"), v) for k, v in stats.items() if isinstance(v, dict)),
        key=lambda kv: -float(kv[1]["usec"]),
    )
    total = sum(float(v["usec"]) for _, v in rows)
    print(
        f"redis at {rate:g}/s: {total / max(events, 1):.1f} us per event in commands; "
        + ", ".join(
            f"{name} {float(v['usec']) / max(events, 1):.1f} ({int(v['calls'])} calls)"
            for name, v in rows[:8]
        ),
        flush=True,
    )


def log_cpu_per_item(
    label: str, before: Mapping[str, float], after: Mapping[str, float], items: int
) -> None:
    """CPU time per item of each process between two `cpu_seconds` readings."""
    used = {k: v - before.get(k, 0.0) for k, v in after.items()}
    log(
        f"{label}, by process: "
        + "  ".join(f"{k} {1e6 * v / items:.1f}" for k, v in sorted(used.items()) if v >= 0.01)
        + f"  | total {1e6 * sum(used.values()) / items:.1f}"
    )


# -- quiet before a drain ---------------------------------------------------------------------
SUBSCRIPTIONS_KEY = f"{channels.KEY_PREFIX}db:subs"


async def open_backfills(p: Pipeline) -> tuple[list[str], int]:
    """(KPIs whose backfill the calculation engine has not finished, stream replays the database
    is serving): the calculation engine's `GET /api/v1/kpis` status `backfill_pending`, and the
    database's set of live subscriptions (`ae:db:subs`)."""
    async with p.http.get(f"{p.stack.url('calculation')}/api/v1/kpis") as r:
        r.raise_for_status()
        items = (await r.json())["items"]
    pending = sorted(i["code"] for i in items if i.get("status") == "backfill_pending")
    replays = int(await p.redis.scard(SUBSCRIPTIONS_KEY))  # type: ignore[misc]
    return pending, replays


async def settle(p: Pipeline, part: str) -> None:
    """Wait until no backfill is pending and no replay is being served, so a drain measures the
    drain alone (a backfill replays up to an hour of stored events through the database and the
    calculation engine). Prints what was waited for; gives up after `--settle-timeout`."""
    started = time.monotonic()
    pending, replays = first = await open_backfills(p)
    while pending or replays:
        if time.monotonic() - started > p.args.settle_timeout:
            log(
                f"({part}) WARNING: still {len(pending)} backfills pending {pending} and "
                f"{replays} replays open after {p.args.settle_timeout:g}s; measuring anyway"
            )
            return
        await asyncio.sleep(0.2)
        pending, replays = await open_backfills(p)
    log(
        f"({part}) quiet after {time.monotonic() - started:.1f}s: waited for "
        f"{len(first[0])} pending backfills {first[0]} and {first[1]} open replays "
        f"(calculation /api/v1/kpis status, database {SUBSCRIPTIONS_KEY}); backfills "
        + ("enabled" if p.args.backfill else "disabled (CALCULATION_BACKFILL=false)")
    )


# -- (c) database drain -----------------------------------------------------------------------
async def drain_database(p: Pipeline, n: int) -> tuple[float, float, float]:
    """Returns (drain events/s from first read, events/s including startup, COPY rows/s)."""
    stack = p.stack
    log(f"(c) generating {n} events")
    items = generate(n, seed=4242, run_id=f"drain-{uuid.uuid4().hex[:8]}")
    await settle(p, "c")
    stack.stop("database")
    before = await p.stored()
    published_s = await publish(p.redis, items)
    log(f"(c) published {n} events with the database service stopped ({n / published_s:.0f}/s)")
    deadline = time.monotonic() + 120
    while (await group_state(p.redis, CALC_CHANNELS, CALC_GROUP)).lag != 0:
        if time.monotonic() > deadline:
            raise TimeoutError("calculation engine did not catch up")
        await asyncio.sleep(0.2)
    start = await group_state(p.redis, channels.ENTITY_CHANNELS, DB_GROUP)
    spawned = time.monotonic()
    stack.start("database")
    cpu0: dict[str, float] = {}
    profile = start_profile(p, "database", "drain")
    first: float | None = None
    while True:
        state = await group_state(p.redis, channels.ENTITY_CHANNELS, DB_GROUP)
        now = time.monotonic()
        if first is None and (state.entries_read > start.entries_read or state.pending):
            first = now
            cpu0 = cpu_seconds(stack.all_pids())  # from the first read: startup left out
        if state.drained:
            break
        if now - spawned > 600:
            raise TimeoutError(f"database drain did not finish: {state}")
        await asyncio.sleep(0.05)
    end = time.monotonic()
    cpu1 = cpu_seconds(stack.all_pids())
    await stack.wait_ready(["database"])
    finish_profile(profile)
    log_cpu_per_item("(c) CPU us per drained event", cpu0, cpu1, n)
    stored = await p.stored() - before
    log(
        f"(c) drained: stored {stored}/{n}; first read {first - spawned if first else 0:.2f}s "
        f"after spawn, lag 0 at {end - spawned:.2f}s"
    )
    if stored != n:
        log(f"(c) WARNING: {n - stored} events missing in PostgreSQL")
    drain_rate = n / (end - (first or spawned))
    with_startup = n / (end - spawned)
    # baseline: the same rows, COPY into a plain table with the same columns
    records = [parse_entity_event(ch, parse_event(data)).as_record() for ch, data in items]
    await p.pg.execute(
        "DROP TABLE IF EXISTS bench_copy;"
        " CREATE TABLE bench_copy (LIKE entity_events INCLUDING DEFAULTS)"
    )
    copy_rates = []
    for _ in range(3):
        await p.pg.execute("TRUNCATE bench_copy")
        t0 = time.perf_counter()
        await p.pg.copy_records_to_table("bench_copy", records=records, columns=_EVENT_COLUMNS)
        copy_rates.append(n / (time.perf_counter() - t0))
    await p.pg.execute("DROP TABLE bench_copy")
    return drain_rate, with_startup, statistics.median(copy_rates)


# -- (d) archival -----------------------------------------------------------------------------
def kpi_result_rows(n: int) -> list[dict[str, Any]]:
    codes = ["bench_a", "bench_b", "bench_c", "bench_d"]
    regions = ["eu", "us", "apac", "latam", "mea"]
    base = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    now = utcnow().isoformat()
    rows = []
    for i in range(n):
        window = i // (len(codes) * len(regions))
        start = base + timedelta(seconds=window)
        rows.append(
            {
                "kpi_code": codes[i % len(codes)],
                "value": float(i % 977) * 1.5,
                "window_start": start.isoformat(),
                "window_end": (start + timedelta(seconds=1)).isoformat(),
                "dimensions": {"region": regions[(i // len(codes)) % len(regions)]},
                "sample_count": 1 + i % 50,
                "definition_version": 1,
                "computed_at": now,
                "stored_at": now,
            }
        )
    return rows


def event_rows(items: Sequence[tuple[str, bytes]]) -> list[dict[str, Any]]:
    rows = []
    for channel, data in items:
        row = parse_entity_event(channel, parse_event(data))
        rows.append(
            {
                "event_id": row.event_id,
                "event_kind": row.event_kind,
                "entity_type": row.entity_type,
                "entity_id": row.entity_id,
                "version": row.version,
                "occurred_at": row.occurred_at.isoformat(),
                "published_at": row.published_at.isoformat(),
                "attributes": row.attributes,
                "reason": row.reason,
                "source": row.source,
            }
        )
    return rows


async def drain_archival(
    p: Pipeline, channel: str, messages: Sequence[tuple[str, bytes]], rows: int
) -> tuple[float, float]:
    """Backlog `messages` on `channel` with archival stopped; start it; (rows/s from first read,
    rows/s including startup)."""
    stack = p.stack
    stack.stop("archival")
    await publish(p.redis, messages, batch=200 if len(messages) < 1000 else 1000)
    start = await group_state(p.redis, [channel], ARCHIVAL_GROUP)
    spawned = time.monotonic()
    stack.start("archival")
    cpu0: dict[str, float] = {}
    profile = start_profile(p, "archival", channel)
    first: float | None = None
    while True:
        state = await group_state(p.redis, [channel], ARCHIVAL_GROUP)
        now = time.monotonic()
        if first is None and (state.entries_read > start.entries_read or state.pending):
            first = now
            cpu0 = cpu_seconds(stack.all_pids())  # from the first read: startup left out
            await p.redis.config_resetstat()
        if state.drained:
            break
        if now - spawned > 600:
            raise TimeoutError(f"archival drain did not finish: {state}")
        await asyncio.sleep(0.05)
    end = time.monotonic()
    log_cpu_per_item(
        f"(d) CPU us per archived row of {channel}", cpu0, cpu_seconds(stack.all_pids()), rows
    )
    await print_redis_commands(p.redis, rows, rows / (end - (first or spawned)))
    await stack.wait_ready(["archival"])
    finish_profile(profile)
    return rows / (end - (first or spawned)), rows / (end - spawned)


def s3_rows(stack: Stack, prefix: str) -> tuple[int, int]:
    """(objects, rows) under `prefix` (rows from the Parquet footers)."""
    assert stack.infra is not None
    client = stack.infra.s3.client()
    objects = rows = 0
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=stack.infra.bucket, Prefix=prefix
    ):
        for item in page.get("Contents", []):
            body = client.get_object(Bucket=stack.infra.bucket, Key=item["Key"])["Body"].read()
            rows += pq.ParquetFile(pa.BufferReader(body)).metadata.num_rows
            objects += 1
    return objects, rows


def parquet_put_baseline(stack: Stack, table_of: Any, rows: Any, key: str) -> float:
    """rows/s of: Arrow table from the rows, Parquet zstd in memory, one boto3 PUT."""
    assert stack.infra is not None
    client = stack.infra.s3.client()
    rates = []
    for i in range(3):
        t0 = time.perf_counter()
        table = table_of(rows)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        client.put_object(
            Bucket=stack.infra.bucket, Key=f"{key}-{i}", Body=sink.getvalue().to_pybytes()
        )
        rates.append(table.num_rows / (time.perf_counter() - t0))
    return statistics.median(rates)


def kpi_arrow(rows: Sequence[dict[str, Any]]) -> pa.Table:
    def us(text: str) -> int:
        moment = datetime.fromisoformat(text)
        return int(moment.timestamp() * 1_000_000)

    return pa.table(
        {
            "kpi_code": pa.array([r["kpi_code"] for r in rows], pa.string()),
            "window_start": pa.array([us(r["window_start"]) for r in rows], TS),
            "window_end": pa.array([us(r["window_end"]) for r in rows], TS),
            "dims_key": pa.array([dims_key(r["dimensions"]) for r in rows], pa.string()),
            "dimensions": pa.array(
                [list(r["dimensions"].items()) for r in rows], pa.map_(pa.string(), pa.string())
            ),
            "value": pa.array([r["value"] for r in rows], pa.float64()),
            "sample_count": pa.array([r["sample_count"] for r in rows], pa.int64()),
            "definition_version": pa.array([r["definition_version"] for r in rows], pa.int32()),
            "computed_at": pa.array([us(r["computed_at"]) for r in rows], TS),
        },
        schema=KPI_RESULTS_SCHEMA,
    )


def events_arrow(rows: Sequence[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows))


async def archival(p: Pipeline, n: int) -> dict[str, tuple[float, float, float]]:
    stack = p.stack
    out: dict[str, tuple[float, float, float]] = {}
    # KPI results
    rows = kpi_result_rows(n)
    now = utcnow()
    messages = [
        (
            channels.ARCHIVE_KPI_RESULTS,
            envelope(str(uuid.uuid4()), channels.ARCHIVE_KPI_RESULTS, "database_service", now, r),
        )
        for r in rows
    ]
    # the baseline first: a fresh SeaweedFS allocates its volumes on the first write (~1 s,
    # measured), which is the stack's first start, not the archival service's drain
    baseline = parquet_put_baseline(stack, kpi_arrow, rows, "bench/baseline-kpi.parquet")
    await settle(p, "d")
    log(f"(d) archive.kpi_results: {n} results backlogged, starting archival")
    rate, with_startup = await drain_archival(p, channels.ARCHIVE_KPI_RESULTS, messages, n)
    objects, archived = s3_rows(stack, "kpi_results/kpi_code=bench_")
    log(f"(d) kpi results: {archived}/{n} rows in {objects} objects")
    out["archive.kpi_results"] = (rate, with_startup, baseline)
    # entity event batches (the database's retention batches: one type and day, <= 5000 rows)
    items = generate(n, seed=99, run_id=f"arch-{uuid.uuid4().hex[:8]}")
    erows = event_rows(items)
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in erows:
        by_key.setdefault((row["entity_type"], row["occurred_at"][:10]), []).append(row)
    batches = []
    for (entity_type, day), group in by_key.items():
        for i in range(0, len(group), 5000):
            payload = {
                "batch_id": str(uuid.uuid4()),
                "entity_type": entity_type,
                "date": day,
                "rows": group[i : i + 5000],
            }
            batches.append(
                (
                    channels.ARCHIVAL_EVENTS,
                    envelope(
                        str(uuid.uuid4()),
                        channels.ARCHIVAL_EVENTS,
                        "database_service",
                        now,
                        payload,
                    ),
                )
            )
    log(f"(d) archival.events: {len(batches)} batches / {n} rows backlogged, starting archival")
    rate, with_startup = await drain_archival(p, channels.ARCHIVAL_EVENTS, batches, n)
    objects, archived = s3_rows(stack, "entity_events/")
    log(f"(d) entity events: {archived}/{n} rows in {objects} objects")
    baseline = parquet_put_baseline(stack, events_arrow, erows, "bench/baseline-events.parquet")
    out["archival.events"] = (rate, with_startup, baseline)
    return out


# -- main -------------------------------------------------------------------------------------
async def run(stack: Stack, args: argparse.Namespace) -> None:
    p = Pipeline(stack, args)
    p.pg = await asyncpg.connect(stack.database_url)
    results: list[tuple[str, float, float, str, str]] = []
    loads = [uptime_line()]
    try:
        sample = generate(args.raw_events, seed=7, run_id="raw")
        payloads = [data for _, data in sample]
        size = statistics.mean(len(b) for b in payloads)
        raw_rates = [await raw_stream_hop(p.redis, payloads) for _ in range(3)]
        raw = statistics.median(raw_rates)
        lat50, lat99 = await raw_hop_latency(p.redis, p.reader)
        log(
            f"raw stream hop: {raw:.0f} events/s ({size:.0f} B events); latency p50 {lat50:.2f}"
            f" ms p99 {lat99:.2f} ms"
        )
        if "a" in args.parts or "b" in args.parts:
            steps = await p.ramp()
            loads.append(uptime_line())
            passed = [s for s in steps if s.passed]
            best = max(passed, key=lambda s: s.achieved) if passed else None
            sustained = best.achieved if best else 0.0
            results.append(
                (
                    "(a) sustained events/s, zero loss",
                    sustained,
                    raw,
                    ">= 20000",
                    "raw XADD+XREADGROUP+XACK",
                )
            )
            print("\nper step: CPU % of one core over the hold, by process (and CPU us/event)")
            for s in steps:
                cpu = "  ".join(
                    f"{k} {v:.0f}% ({1e4 * v / max(s.achieved, 1):.0f})"
                    for k, v in sorted(s.cpu.items())
                    if v >= 0.5
                )
                total = sum(s.cpu.values())
                print(
                    f"  {s.rate:>7g}/s: {cpu}  | total {total:.0f}% = "
                    f"{1e4 * total / max(s.achieved, 1):.0f} us CPU per event"
                )
            print("\nramp steps:")
            for s in steps:
                print("  " + describe(s))
            ref = best or (steps[0] if steps else None)
            if ref is not None:
                results.append(
                    (
                        f"(b) freshness p50 ms @ {ref.rate:g}/s",
                        ref.fresh_p50,
                        lat50,
                        "(info)",
                        "raw stream hop p50 ms",
                    )
                )
                results.append(
                    (
                        f"(b) freshness p99 ms @ {ref.rate:g}/s",
                        ref.fresh_p99,
                        lat99,
                        "<= 100",
                        "raw stream hop p99 ms",
                    )
                )
        if "c" in args.parts:
            drain, with_startup, copy = await drain_database(p, args.drain_events)
            loads.append(uptime_line())
            results.append(
                ("(c) db drain events/s", drain, copy, ">= 100000", "asyncpg COPY, plain table")
            )
            results.append(
                (
                    "(c) db drain incl. process start",
                    with_startup,
                    copy,
                    "(info)",
                    "asyncpg COPY, plain table",
                )
            )
        if "d" in args.parts:
            arch = await archival(p, args.archive_rows)
            loads.append(uptime_line())
            for channel, (rate, with_startup, baseline) in arch.items():
                results.append(
                    (
                        f"(d) archival rows/s {channel}",
                        rate,
                        baseline,
                        ">= 100000",
                        "pyarrow zstd + 1 boto3 PUT",
                    )
                )
                results.append(
                    (
                        "(d)   incl. process start",
                        with_startup,
                        baseline,
                        "(info)",
                        "pyarrow zstd + 1 boto3 PUT",
                    )
                )
    finally:
        await p.close()
    print(f"\n{'measure':44} {'figure':>12} {'baseline':>12} {'ratio':>7}  {'target':10} baseline")
    for label, figure, baseline, target, what in results:
        ratio = figure / baseline if baseline else float("nan")
        print(f"{label:44} {figure:12.1f} {baseline:12.1f} {ratio:7.3f}  {target:10} {what}")
    print("load while measuring:")
    for line in loads:
        print(f"  {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="abcd", help="which measures (a, b, c, d)")
    parser.add_argument("--rates", default="2000,5000,10000,15000,20000,25000,30000")
    parser.add_argument("--refine", type=int, default=2, help="bisection steps after a failure")
    parser.add_argument("--hold", type=float, default=30.0, help="seconds per ramp step")
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--drain-events", type=int, default=200_000)
    parser.add_argument("--archive-rows", type=int, default=200_000)
    parser.add_argument("--raw-events", type=int, default=100_000)
    parser.add_argument("--profile", action="store_true", help="py-spy the services per step")
    parser.add_argument(
        "--backfill",
        action="store_true",
        help="let the calculation engine backfill new KPIs (off by default: no part measures "
        "backfills, and one replays up to an hour of stored events at times of its own)",
    )
    parser.add_argument(
        "--settle-timeout",
        type=float,
        default=120.0,
        help="longest wait for pending backfills before (c) and (d)",
    )
    parser.add_argument("--profile-seconds", type=float, default=20.0, help="for the drains")
    parser.add_argument("--data-dir", default=None, help="keep data here (default: temporary)")
    parser.add_argument(
        "--redis-config",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="CONFIG SET on the stack's Redis before measuring (for experiments, e.g. "
        "auto-aof-rewrite-percentage=0); repeatable",
    )
    args = parser.parse_args()
    with contextlib.ExitStack() as cleanup:
        if args.data_dir:
            base = Path(args.data_dir).absolute()
        else:
            base = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="ae-bench-")))
        kpi_dir = kpi_files(base / "kpis", FRESH_KPIS)
        stack = Stack(
            base / "stack",
            kpi_dir,
            rate=1000,
            extra_env={"SIMULATOR_AUTOSTART": "false"},
        )
        print(f"load before start: {uptime_line()}", flush=True)
        infra_s = stack.start_infra()
        cleanup.callback(stack.stop_all)
        exit_on_sigterm(cleanup.close)
        if not args.backfill:
            stack.envs["calculation"]["CALCULATION_BACKFILL"] = "false"
        log(f"servers up in {infra_s:.1f}s; starting services")
        for name in stack.services:
            stack.start(name)
        asyncio.run(stack.wait_ready(stack.services))
        log("services ready")
        if args.redis_config:
            asyncio.run(configure_redis(stack, args.redis_config))
        asyncio.run(run(stack, args))


async def configure_redis(stack: Stack, settings: list[str]) -> None:
    redis = stack.admin()
    try:
        for setting in settings:
            name, _, value = setting.partition("=")
            await redis.config_set(name, value)
            log(f"redis: {name} = {value}")
    finally:
        await redis.aclose()


if __name__ == "__main__":
    main()
