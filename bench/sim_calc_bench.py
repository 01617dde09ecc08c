"""The simulator and the calculation engine alone (each a real process, as `analytics-engine up`
runs them, on the local Redis): CPU per event of each process and KPI freshness, per rate.

Run: `.venv/bin/python bench/sim_calc_bench.py [--rates 5000,10000,20000] [--hold 15]`

`pipeline_bench.py` measures the whole pipeline, where every process shares the 2 cores; this
one leaves out the database, archival and other services, so the figures of these two move
less with what the others do. CPU is utime + stime from /proc over the hold; freshness is
window close (end + lateness) -> result received on `kpi.calculated.fresh_*` (1 s windows).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from _profile import record, summarise
from _stack import (
    Stack,
    cpu_seconds,
    exit_on_sigterm,
    group_state,
    kpi_files,
    percentile,
    uptime_line,
)
from pipeline_bench import CALC_CHANNELS, CALC_GROUP, FRESH_KPIS, Freshness, listen

SERVICES = ("calculation", "simulator")


async def checkpoint_stats(http: aiohttp.ClientSession, url: str) -> tuple[float, float, float]:
    """(seconds, count) of the engine's checkpoints so far, and the last one's bytes."""
    async with http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    values = {}
    for line in text.splitlines():
        if line.startswith("analytics_calc_checkpoint_"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return (
        values.get("analytics_calc_checkpoint_duration_seconds_sum", 0.0),
        values.get("analytics_calc_checkpoint_duration_seconds_count", 0.0),
        values.get("analytics_calc_checkpoint_bytes", 0.0),
    )


async def measure(stack: Stack, rates: list[float], hold: float, *, profile: bool) -> None:
    redis, reader = stack.admin(), stack.admin()
    freshness = Freshness()
    ready = asyncio.Event()
    listener = asyncio.create_task(listen(reader, freshness, ready))
    await ready.wait()
    sim = f"{stack.url('simulator')}/api/v1/simulator"
    rows: list[str] = []
    try:
        async with aiohttp.ClientSession() as http:

            async def call(method: str, path: str, body: Any = None) -> dict[str, Any]:
                async with http.request(method, f"{sim}{path}", json=body) as resp:
                    resp.raise_for_status()
                    result: dict[str, Any] = await resp.json()
                    return result

            for rate in rates:
                await call("PUT", "/rate", {"rate": rate})
                await call("POST", "/start")
                await asyncio.sleep(3.0)
                profiles = []
                for name in SERVICES if profile else ():
                    out = stack.base_dir / f"profile-{name}-{int(rate)}.txt"
                    proc = record(stack.pid(name), hold, out)
                    if proc is not None:
                        profiles.append((name, out, proc))
                ckpt0 = await checkpoint_stats(http, stack.url("calculation"))
                cpu0 = cpu_seconds(stack.all_pids())
                emitted0 = (await call("GET", ""))["events_emitted"]
                wall0, t0 = time.time(), time.monotonic()
                lags = []
                while time.monotonic() - t0 < hold:
                    await asyncio.sleep(1.0)
                    lags.append((await group_state(redis, CALC_CHANNELS, CALC_GROUP)).lag)
                elapsed = time.monotonic() - t0
                cpu1 = cpu_seconds(stack.all_pids())
                ckpt1 = await checkpoint_stats(http, stack.url("calculation"))
                emitted = (await call("GET", ""))["events_emitted"] - emitted0
                wall1 = time.time()
                await call("POST", "/stop")
                achieved = emitted / elapsed
                ckpt_s, ckpt_n = ckpt1[0] - ckpt0[0], ckpt1[1] - ckpt0[1]
                samples = freshness.between(wall0, wall1)
                per_event = {
                    name: 1e6 * (cpu1[name] - cpu0.get(name, 0.0)) / max(emitted, 1)
                    for name in (*SERVICES, "redis")
                }
                row = (
                    f"rate {rate:>6g}/s achieved {achieved:7.0f}/s  CPU us/event: "
                    + "  ".join(f"{k} {v:5.1f}" for k, v in per_event.items())
                    + f"  | calc lag max {max((x or 0) for x in lags)}"
                    + f"  checkpoint {1000 * ckpt_s / max(ckpt_n, 1):.1f} ms x{ckpt_n:.0f}"
                    + f", {ckpt1[2] / 1e6:.1f} MB"
                    + f"  fresh p50/p99 {percentile(samples, 0.5) * 1000:.0f}/"
                    + f"{percentile(samples, 0.99) * 1000:.0f} ms (n={len(samples)})"
                )
                for name, out, proc in profiles:
                    with contextlib.suppress(Exception):
                        proc.wait(timeout=30)
                    print(f"profile of {name} at {rate:g}/s:\n{summarise(out)}", flush=True)
                print(row, flush=True)
                rows.append(row)
                deadline = time.monotonic() + 60
                while (await group_state(redis, CALC_CHANNELS, CALC_GROUP)).lag != 0:
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.2)
                await asyncio.sleep(1.5)
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        await redis.aclose()
        await reader.aclose()
    print("\n".join(["", *rows, f"load: {uptime_line()}"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="5000,10000,20000")
    parser.add_argument("--hold", type=float, default=15.0)
    parser.add_argument("--profile", action="store_true", help="py-spy both services per rate")
    parser.add_argument("--other", default="", help="services to run from --pythonpath")
    parser.add_argument("--pythonpath", default="", help="another checkout's services/ dir")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ae-simcalc-") as tmp:
        base = Path(tmp)
        stack = Stack(
            base / "stack",
            kpi_files(base / "kpis", FRESH_KPIS),
            services=SERVICES,
            rate=1000,
            extra_env={"SIMULATOR_AUTOSTART": "false", "CALCULATION_BACKFILL": "false"},
        )
        exit_on_sigterm(stack.stop_all)
        print(f"load before start: {uptime_line()}", flush=True)
        try:
            stack.start_infra()
            for name in SERVICES:
                stack.start(name, **({"PYTHONPATH": args.pythonpath} if name in args.other else {}))
            asyncio.run(stack.wait_ready(SERVICES))
            rates = [float(r) for r in args.rates.split(",")]
            asyncio.run(measure(stack, rates, args.hold, profile=args.profile))
        finally:
            stack.stop_all()


if __name__ == "__main__":
    main()
