"""RSS of every service process while the local stack runs at a steady rate.

Run: `.venv/bin/python bench/memory_bench.py [--rate 5000] [--minutes 10] [--interval 10]`

Starts the stack as `analytics-engine up` does (real processes, sample KPIs), samples each
service's RSS (/proc/PID/status VmRSS) every `--interval` seconds, and prints per service: RSS at
the first sample, at the last, the maximum, and the least-squares slope over the second half
(MB/min; flat means |slope| small). Baseline (same run): an idle Python process that imported
the same service module. Target: flat, and under 150 MB each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _stack import Stack, exit_on_sigterm, group_state, kpi_files, rss_mb, slope, uptime_line
from analytics_engine.cli import SERVICES
from analytics_engine.core import channels

TARGET_MB = 150.0
FLAT_MB_PER_MIN = 1.0  # |slope| of the second half below this counts as flat


def idle_baseline(name: str) -> float:
    """RSS of a Python process that imported the service's module and does nothing."""
    code = (
        "import importlib, sys, time\n"
        f"importlib.import_module({SERVICES[name].module!r})\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        time.sleep(0.5)
        return rss_mb(proc.pid) or float("nan")
    finally:
        proc.kill()
        proc.wait()


async def sample(
    stack: Stack, minutes: float, interval: float
) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {name: [] for name in stack.services}
    redis = stack.admin()
    started = time.monotonic()
    try:
        while True:
            t = time.monotonic() - started
            for name in stack.services:
                rss = rss_mb(stack.pid(name))
                if rss is not None:
                    series[name].append((t / 60, rss))
            db = await group_state(redis, channels.ENTITY_CHANNELS, "database_service")
            calc = await group_state(
                redis, (channels.ENTITY_CREATED, channels.ENTITY_UPDATED), "calculation_engine"
            )
            line = "  ".join(f"{n} {s[-1][1]:.0f}" for n, s in series.items() if s)
            print(f"[{t:6.0f}s] RSS MB: {line}  | lag db {db.lag} calc {calc.lag}", flush=True)
            if t >= minutes * 60:
                return series
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started - t)))
    finally:
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=5000.0)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=10.0)
    args = parser.parse_args()
    with contextlib.ExitStack() as cleanup:
        base = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="ae-mem-")))
        stack = Stack(base / "stack", kpi_files(base / "kpis", {}), rate=args.rate)
        print(f"load before: {uptime_line()}", flush=True)
        stack.start_infra()
        cleanup.callback(stack.stop_all)
        exit_on_sigterm(cleanup.close)
        for name in stack.services:
            stack.start(name)
        asyncio.run(stack.wait_ready(stack.services))
        series = asyncio.run(sample(stack, args.minutes, args.interval))
        load_after = uptime_line()
        exits = {n: p.poll() for n, p in stack.processes.items() if p.poll() is not None}
        baselines = {name: idle_baseline(name) for name in stack.services}
    print(
        f"\nRSS per service at {args.rate:g} events/s for {args.minutes:g} min "
        f"(sample every {args.interval:g}s); baseline: idle python with the same imports"
    )
    print(
        f"{'service':14} {'start MB':>9} {'end MB':>9} {'max MB':>9} {'slope MB/min':>13} "
        f"{'baseline MB':>12} {'end/base':>9}  target"
    )
    for name, points in series.items():
        if not points:
            print(f"{name:14} (no samples)")
            continue
        half = [p for p in points if p[0] >= points[-1][0] / 2]
        rss = [r for _, r in points]
        flat = abs(slope(half)) < FLAT_MB_PER_MIN
        verdict = ("ok" if max(rss) < TARGET_MB else "OVER") + ("" if flat else ", NOT FLAT")
        print(
            f"{name:14} {rss[0]:9.1f} {rss[-1]:9.1f} {max(rss):9.1f} {slope(half):+13.2f} "
            f"{baselines[name]:12.1f} {rss[-1] / baselines[name]:9.2f}  <{TARGET_MB:g} MB "
            f"& flat: {verdict}"
        )
    if exits:
        print(f"processes that exited: {exits}")
    print(f"load: {load_after}")


if __name__ == "__main__":
    main()
