"""`analytics-engine up` to the first KPI result, median of `--runs`.

Run: `.venv/bin/python bench/startup_bench.py [--runs 3]`

Each run starts `analytics-engine up` as a subprocess with a fresh data directory and a KPI
directory holding a 1 s tumbling KPI (lateness 0), reads the Redis port from the data dir's
`stack.env` and the `admin` password from its ACL file as soon as they appear, PSUBSCRIBEs
`kpi.calculated.*`, and stops the clock at the first result. Baseline (same run): the three
servers alone (`LocalInfra.start()`). Target: under 20 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _stack import free_port, kpi_files, uptime_line
from analytics_engine.core.redis import connect
from analytics_engine.localstack import LocalInfra

KPI = {
    "startup-orders.yaml": """
code: startup_orders
display_name: Orders per second
entity_type: order
aggregation: count
window: {type: tumbling, size: 1s, allowed_lateness: 0s}
"""
}
TARGET_S = 20.0


def read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out


def admin_password(acl: Path) -> str:
    for line in acl.read_text().splitlines():
        if line.startswith("user admin "):
            return next(w[1:] for w in line.split() if w.startswith(">"))
    raise RuntimeError("no admin user in the ACL file")


async def first_result(data_dir: Path, started: float, proc: subprocess.Popen[bytes]) -> float:
    env_path, acl_path = data_dir / "stack.env", data_dir / "redis-users.acl"
    while not (env_path.exists() and "REDIS_URL=" in env_path.read_text()):
        if proc.poll() is not None:
            raise RuntimeError(f"up exited with {proc.returncode}")
        await asyncio.sleep(0.02)
    port = read_env(env_path)["REDIS_URL"].rsplit(":", 1)[1].split("/", 1)[0]
    redis = connect(f"redis://admin:{admin_password(acl_path)}@127.0.0.1:{port}/0")
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.psubscribe("kpi.calculated.*")
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None and message["type"] == "pmessage":
                return time.monotonic() - started
            if proc.poll() is not None:
                raise RuntimeError(f"up exited with {proc.returncode}")
            if time.monotonic() - started > 180:
                raise TimeoutError("no KPI result within 180 s")
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await redis.aclose()


def one_run(base: Path, kpi_dir: Path, rate: float) -> float:
    data_dir = base / "data"
    log = (base / "up.log").open("wb")
    started = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "analytics_engine.cli",
            "up",
            "--data-dir",
            str(data_dir),
            "--kpi-dir",
            str(kpi_dir),
            "--rate",
            str(rate),
            "--gateway-port",
            str(free_port()),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        return asyncio.run(first_result(data_dir, started, proc))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def infra_only(base: Path) -> float:
    started = time.monotonic()
    infra = LocalInfra(base / "infra")
    infra.start()
    elapsed = time.monotonic() - started
    infra.stop()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=1000.0, help="simulator events/s")
    args = parser.parse_args()
    ups, infras = [], []
    print(f"load before: {uptime_line()}", flush=True)
    for i in range(args.runs):
        with contextlib.ExitStack() as cleanup:
            base = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="ae-start-")))
            kpi_dir = kpi_files(base / "kpis", KPI, samples=False)
            ups.append(one_run(base, kpi_dir, args.rate))
            infras.append(infra_only(base))
        print(
            f"run {i + 1}: up -> first KPI result {ups[-1]:.2f}s; servers alone "
            f"{infras[-1]:.2f}s  ({uptime_line()})",
            flush=True,
        )
    up, infra = statistics.median(ups), statistics.median(infras)
    print(f"\n{'measure':40} {'figure s':>9} {'baseline s':>11} {'ratio':>7}  target")
    print(
        f"{'up -> first KPI result (median)':40} {up:9.2f} {infra:11.2f} {up / infra:7.2f}"
        f"  < {TARGET_S:g} s ({'ok' if up < TARGET_S else 'MISSED'})"
    )
    print(f"baseline: LocalInfra start (Redis, PostgreSQL, S3) alone, same run; runs {ups}")


if __name__ == "__main__":
    main()
