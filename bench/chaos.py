"""Chaos run of the local stack: proof that no fault loses, duplicates or corrupts data.

    python bench/chaos.py [--rate 5000] [--quick] [--redis-crash] [--json out.json]

Starts the stack exactly like `analytics-engine up` (see `stackctl.py`), lets the simulator
produce a steady load (`--rate` entity events/s, default `SIMULATOR_RATE` or 5000) and then, in
turn: SIGKILLs the database service, the calculation engine and the archival service (the
supervisor restarts each), freezes the database service (SIGSTOP) for 30 s, restarts Redis
(AOF, `appendfsync everysec`), stops PostgreSQL for 10 s and the S3 store for 30 s (`--quick`:
1000 events/s, freeze 8 s, 3 s and 5 s). `--redis-crash` adds a SIGKILL of Redis, where
`everysec` may lose up to ~1 s of acknowledged writes.

Streams hold `--stream-cap` entries (`BUS_STREAM_MAXLEN`, default 3 s of the load), so the
freeze and the outages fill them: the publishers wait for room (backpressure) instead of
anything unread being trimmed, and the table shows how long the simulator waited.

After each fault it measures, under the running load:
- recovery: seconds from the end of the fault until every consumer group is caught up again
  (oldest unacknowledged entry younger than 3 s; the archival service's allowance adds its
  flush interval);
- lost / duplicated entity events: the simulator numbers its events (the last group of the
  event id is the sequence), so every id below the count it had emitted 6 s earlier must be in
  PostgreSQL exactly once;
- restarts: the supervisor's restart count of each service must grow by exactly the one kill;
- verify (in-process `analytics-engine verify`) over the windows around the fault.
At the end it pauses the simulator, lets the pipeline settle and checks everything exactly:
every emitted event stored once, every KPI window of the run right, every result archived once.

Windows of the stack's start-up (before the warm-up) are judged separately: see the note the
run prints. Exit code 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from analytics_engine.verify.report import Report
from stackctl import WIDEST_WINDOW_S, StackConfig, StackController

LOOKBACK_S = 6.0  # events emitted this long before a check must all be stored by then
VERIFY_END_LAG_S = 8.0  # windows ending this long before a check must be closed and stored
ARCHIVE_GRACE_S = 15.0  # results stored this long before a check must be in the lake
LEFTOVER_S = 10.0  # entries pending this long when a fault starts are an earlier fault's


@dataclass
class Row:
    fault: str
    outage_s: float
    recovery_s: float | None
    lost: int
    duplicates: int
    restarts: str
    restarts_ok: bool
    verify: str
    waited_s: float
    """Seconds the simulator waited for room in full streams meanwhile (backpressure)."""
    verify_ok: bool
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.verify_ok and self.restarts_ok and self.lost == 0 and self.duplicates == 0


@dataclass(frozen=True)
class Fault:
    name: str
    inject: Callable[[StackController], Awaitable[float]]
    """Cause the fault and end it; returns how long the stack was without the component."""
    killed: str | None = None


def kill(service: str) -> Fault:
    async def inject(stack: StackController) -> float:
        return await stack.kill_service(service)

    return Fault(f"kill -9 {service}", inject, killed=service)


def outage(name: str, seconds: float, stop: str, start: str) -> Fault:
    async def inject(stack: StackController) -> float:
        began = time.monotonic()
        await getattr(stack, stop)()
        await asyncio.sleep(max(0.0, seconds - (time.monotonic() - began)))
        await getattr(stack, start)()
        return time.monotonic() - began

    return Fault(f"stop {name} {seconds:g}s", inject)


def freeze(service: str, seconds: float) -> Fault:
    async def inject(stack: StackController) -> float:
        return await stack.freeze_service(service, seconds)

    return Fault(f"freeze {service} {seconds:g}s", inject)


def redis_fault(crash: bool) -> Fault:
    async def inject(stack: StackController) -> float:
        began = time.monotonic()
        await (stack.crash_redis() if crash else stack.restart_redis())
        return time.monotonic() - began

    return Fault("kill -9 redis" if crash else "restart redis", inject)


def faults(quick: bool, redis_crash: bool) -> list[Fault]:
    frozen, pg, s3 = (8.0, 3.0, 5.0) if quick else (30.0, 10.0, 30.0)
    out = [
        kill("database"),
        kill("calculation"),
        kill("archival"),
        freeze("database", frozen),
        redis_fault(crash=False),
        outage("postgresql", pg, "stop_postgres", "start_postgres"),
        outage("s3", s3, "stop_s3", "start_s3"),
    ]
    if redis_crash:
        out.append(redis_fault(crash=True))
    return out


class EmittedLog:
    """Samples the simulator's `events_emitted` twice a second: what had been emitted at a
    given moment (for exact loss accounting under a running load)."""

    def __init__(self, stack: StackController) -> None:
        self._stack = stack
        self.samples: list[tuple[float, int]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                status = await self._stack.simulator()
                self.samples.append((time.monotonic(), int(status["events_emitted"])))
            await asyncio.sleep(0.5)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def emitted_before(self, seconds: float) -> int:
        cutoff = time.monotonic() - seconds
        return max((n for t, n in self.samples if t <= cutoff), default=0)


def summarize(report: Report) -> str:
    if report.ok:
        checked = sum(k.compared for k in report.kpis)
        lake = report.lake.get("results_checked", 0)
        return f"OK ({checked} windows, {lake} archived)"
    problems: dict[str, int] = {}
    for m in report.mismatches:
        problems[m.problem] = problems.get(m.problem, 0) + 1
    return "FAIL " + ", ".join(f"{n} {p}" for p, n in sorted(problems.items()))


async def check_events(
    stack: StackController, emitted: EmittedLog, missing_before: int
) -> tuple[int, int, int, list[int]]:
    """(new missing, duplicates, total missing, sample of missing sequence numbers); waits up to
    15 s for stragglers before calling an event lost."""
    deadline = time.monotonic() + 15
    while True:
        expected = emitted.emitted_before(LOOKBACK_S)
        acc = await stack.accounting(expected)
        if acc.missing <= missing_before or time.monotonic() > deadline:
            return (
                max(0, acc.missing - missing_before),
                acc.duplicates,
                acc.missing,
                acc.missing_sample,
            )
        await asyncio.sleep(2)


async def run(args: argparse.Namespace, stack: StackController) -> list[Row]:
    rows: list[Row] = []
    started = time.monotonic()
    await stack.start()
    if args.acl_workaround:
        await stack.grant_default_user_for_aof()
    emitted = EmittedLog(stack)
    emitted.start()
    try:
        await stack.wait_caught_up(timeout=120)
        await asyncio.sleep(args.warmup)
        await stack.wait_caught_up(timeout=120)
        baseline = datetime.now(UTC)
        print(f"  stack up and caught up after {time.monotonic() - started:.1f}s", flush=True)
        missing = 0
        for fault in faults(args.quick, args.redis_crash):
            rows.append(
                await one_fault(
                    stack, emitted, fault, baseline=baseline, missing_before=missing, args=args
                )
            )
            missing += rows[-1].lost
            print_row(rows[-1])
        rows.append(await final_check(stack, baseline))
        print_row(rows[-1])
        stuck = await stack.stuck_elsewhere()
        if stuck:
            rows[-1].notes.append(
                "control streams with entries unacknowledged > 30 s: "
                + (
                    ", ".join(
                        f"{g.group}<-{g.stream} ({g.pending} pending, {g.lag} undelivered,"
                        f" oldest {g.age_s:.0f}s)"
                        for g in stuck
                    )
                )
            )
        startup = await stack.verify(archive_grace=0, idle_close=3)
        rows[-1].notes.append(
            f"start-up windows (before the {args.warmup:g}s warm-up, not part of the fault "
            f"checks): verify over the whole run from the first event: {summarize(startup)}"
        )
    finally:
        await emitted.stop()
    print(f"chaos: finished in {time.monotonic() - started:.0f}s", flush=True)
    return rows


async def one_fault(
    stack: StackController,
    emitted: EmittedLog,
    fault: Fault,
    *,
    baseline: datetime,
    missing_before: int,
    args: argparse.Namespace,
) -> Row:
    before = stack.restarts()
    waited_before = await stack.publish_wait_s("simulator")
    t0 = datetime.now(UTC)
    stale = await stack.stale_pending(older_than=LEFTOVER_S)
    print(f"  fault: {fault.name} ...", flush=True)
    outage_s = await fault.inject(stack)
    cleared = time.monotonic()
    notes: list[str] = []
    try:
        recovery: float | None = await stack.wait_caught_up(
            timeout=args.catch_up_timeout, since=t0.timestamp() - LEFTOVER_S
        )
    except Exception as exc:
        recovery = None
        notes.append(str(exc))
    if stale:
        notes.append(
            "entries left unacknowledged by an earlier fault (ignored for this recovery): "
            + ", ".join(f"{g.group}<-{g.stream} oldest {g.age_s:.0f}s" for g in stale)
        )
    lost, dups, _, sample = await check_events(stack, emitted, missing_before)
    if lost:
        notes.append(f"missing event sequence numbers (first 20): {sample}")
    after = stack.restarts()
    waited = await stack.publish_wait_s("simulator") - waited_before
    delta = {n: after[n] - before[n] for n in after if after[n] != before[n]}
    expected = {fault.killed: 1} if fault.killed else {}
    restarts = ", ".join(f"{n} +{d}" for n, d in sorted(delta.items())) or "none"
    # Judge the windows from before the fault to some after it: wait until those are closed.
    await asyncio.sleep(
        max(0.0, cleared + VERIFY_END_LAG_S + 2 * WIDEST_WINDOW_S - time.monotonic())
    )
    end = datetime.now(UTC) - timedelta(seconds=VERIFY_END_LAG_S)
    start = max(baseline, t0 - timedelta(seconds=3 * WIDEST_WINDOW_S))
    report = await stack.verify(start=start, end=end, archive_grace=ARCHIVE_GRACE_S)
    if not report.ok:
        notes += [
            f"{m.problem} {m.kpi_code} {m.window_start} {m.dims} expected={m.expected} "
            f"stored={m.stored} {m.detail}"
            for m in report.mismatches[:10]
        ]
    return Row(
        fault=fault.name,
        outage_s=outage_s,
        recovery_s=recovery,
        lost=lost,
        duplicates=dups,
        restarts=restarts,
        restarts_ok=delta == expected,
        verify=summarize(report),
        verify_ok=report.ok,
        waited_s=waited,
        notes=notes,
    )


async def final_check(stack: StackController, baseline: datetime) -> Row:
    """Pause the load, settle, check every event and every window since the warm-up exactly."""
    began = time.monotonic()
    emitted = await stack.settle()
    settle_s = time.monotonic() - began
    acc = await stack.accounting(emitted)
    report = await stack.verify(start=baseline, archive_grace=0, idle_close=3)
    notes = [f"{emitted} events emitted, {acc.distinct_ids} stored, settled in {settle_s:.1f}s"]
    if acc.missing:
        notes.append(f"missing sequence numbers (first 20): {acc.missing_sample}")
    if acc.unexpected:
        notes.append(f"{acc.unexpected} stored events with ids the simulator did not number")
    if not report.ok:
        notes += [
            f"{m.problem} {m.kpi_code} {m.window_start} {m.dims} expected={m.expected} "
            f"stored={m.stored} {m.detail}"
            for m in report.mismatches[:10]
        ]
    stale = await stack.stale_pending(older_than=LEFTOVER_S)
    if stale:
        notes.append(
            "data-path entries never acknowledged: "
            + ", ".join(
                f"{g.group}<-{g.stream} {g.pending} pending, oldest {g.age_s:.0f}s" for g in stale
            )
        )
    restarts = stack.restarts()
    return Row(
        fault="final (paused, settled)",
        outage_s=0.0,
        recovery_s=settle_s,
        lost=acc.missing,
        duplicates=acc.duplicates,
        restarts=", ".join(f"{n} {c}" for n, c in restarts.items() if c) or "none",
        restarts_ok=True,
        verify=summarize(report),
        verify_ok=report.ok,
        waited_s=await stack.publish_wait_s("simulator"),
        notes=notes,
    )


HEADERS = (
    "fault",
    "outage",
    "recovery",
    "simulator waited",
    "events lost",
    "duplicates",
    "restarts",
    "verify",
)


def cells(row: Row) -> tuple[str, ...]:
    recovery = "-" if row.recovery_s is None else f"{row.recovery_s:.1f}s"
    restarts = row.restarts + ("" if row.restarts_ok else " (!)")
    return (
        row.fault,
        f"{row.outage_s:.1f}s",
        recovery,
        f"{row.waited_s:.1f}s",
        str(row.lost),
        str(row.duplicates),
        restarts,
        row.verify,
    )


def print_row(row: Row) -> None:
    print(
        "    " + " | ".join(f"{h}: {c}" for h, c in zip(HEADERS, cells(row), strict=True)),
        flush=True,
    )
    for note in row.notes:
        print(f"      {note}", flush=True)


def table(rows: list[Row]) -> str:
    body = [cells(r) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(HEADERS)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(HEADERS, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    notes = [f"- {r.fault}: {n}" for r in rows for n in r.notes]
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="1000 events/s, PostgreSQL down 3 s, S3 down 5 s"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="entity events/s (default SIMULATOR_RATE, else 5000; --quick 1000)",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--stream-cap",
        type=int,
        default=None,
        help="BUS_STREAM_MAXLEN of the run (default 3 s of --rate, at least 1000)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds of load before the first fault (default 15, --quick 8)",
    )
    parser.add_argument(
        "--redis-crash",
        action="store_true",
        help="also SIGKILL Redis (appendfsync everysec: may lose ~1 s of writes)",
    )
    parser.add_argument("--data-dir", default=None, help="default: a new temporary directory")
    parser.add_argument(
        "--catch-up-timeout",
        type=float,
        default=None,
        help="seconds to wait for the pipeline to catch up (default 180, --quick 60)",
    )
    parser.add_argument(
        "--acl-workaround",
        action="store_true",
        help="give Redis's disabled `default` user permissions so that AOF "
        "replay keeps transactions (see stackctl.grant_default_user_for_aof)",
    )
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.rate is None:
        args.rate = 1000.0 if args.quick else float(os.environ.get("SIMULATOR_RATE", "5000"))
    if args.stream_cap is None:
        args.stream_cap = max(1000, int(3 * args.rate))
    if args.warmup is None:
        args.warmup = 3.0 if args.quick else 15.0
    if args.catch_up_timeout is None:
        args.catch_up_timeout = 60.0 if args.quick else 180.0
    args.data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="ae-chaos-")).absolute()
    return args


async def run_until_signal(args: argparse.Namespace) -> list[Row] | None:
    """`run` in a task that SIGTERM or SIGINT cancels; the stack is stopped here, outside that
    task, so that it is stopped in every case (its servers and services run in their own
    sessions and would outlive us). None when interrupted."""
    print(
        f"chaos: rate {args.rate:g}/s, streams hold {args.stream_cap} entries, "
        f"data and logs in {args.data_dir}",
        flush=True,
    )
    config = StackConfig(
        args.data_dir,
        rate=args.rate,
        seed=args.seed,
        extra_env={"BUS_STREAM_MAXLEN": str(args.stream_cap)},
    )
    stack = StackController(config)
    task = asyncio.create_task(run(args, stack))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        print("chaos: interrupted, stopping the stack", file=sys.stderr, flush=True)
        return None
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut the stop
            loop.add_signal_handler(sig, lambda: None)
        await stack.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = asyncio.run(run_until_signal(args))
    if rows is None:
        return 130
    print()
    print(table(rows))
    ok = all(r.ok for r in rows)
    print("\nchaos: " + ("PASSED" if ok else "FAILED"))
    if args.json:
        Path(args.json).write_text(json.dumps([{**asdict(r), "ok": r.ok} for r in rows], indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
