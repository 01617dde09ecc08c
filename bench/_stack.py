"""The local stack for benchmarks, started the way `analytics-engine up` starts it (same servers,
same per-service ACL users, same environment, every service a real child process) but with
per-service start/stop, so a benchmark can stop one service, build a backlog and restart it.

Also: stream lag of a consumer group, RSS of a process, the admin Redis connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from redis.asyncio import Redis

from analytics_engine.core import channels
from analytics_engine.core.redis import connect
from analytics_engine.localstack import LocalInfra, free_ports
from analytics_engine.localstack.supervisor import service_argv
from analytics_engine.localstack.up import LOCAL_SERVICES, service_env, start_infra

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Stack:
    """Servers + services under `base_dir`. `start_infra()` first (synchronous: it runs its own
    event loop for the database roles), then `start(name)` / `stop(name)`."""

    base_dir: Path
    kpi_dir: Path
    services: Sequence[str] = LOCAL_SERVICES
    rate: float | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)
    infra: LocalInfra | None = None
    admin_url: str = ""
    envs: dict[str, dict[str, str]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    connections: dict[str, str] = field(default_factory=dict)

    def start_infra(self) -> float:
        """Redis, PostgreSQL (+ writer and reader roles), S3 exactly as `up` starts them
        (`localstack.up.start_infra`); returns the seconds it took."""
        started = time.monotonic()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        stack = start_infra(self.base_dir)
        self.infra = stack.infra
        self.connections = stack.connections
        self.admin_url = stack.admin_redis_url
        self.ports = dict(zip(self.services, free_ports(len(self.services)), strict=True))
        self.envs = service_env(self.connections, self.ports, kpi_dir=self.kpi_dir, rate=self.rate)
        for name, env in self.envs.items():
            env["REDIS_URL"] = stack.redis_urls[name]
            env.update(self.extra_env)
        if "gateway" in self.envs:
            self.envs["gateway"]["GATEWAY_API_KEYS"] = f"{secrets.token_urlsafe(24)}:admin"
        return time.monotonic() - started

    @property
    def database_url(self) -> str:
        return self.connections["DATABASE_URL"]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def start(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        log_path = self.base_dir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                service_argv(name),
                env={**os.environ, **self.envs[name], **env},
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.processes[name] = process
        return process

    def stop(self, name: str, timeout: float = 30.0) -> None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def pid(self, name: str) -> int:
        return self.processes[name].pid

    def all_pids(self) -> dict[str, int]:
        """Every running service and server process, by name."""
        pids = {name: p.pid for name, p in self.processes.items() if p.poll() is None}
        if self.infra is not None:
            for server in self.infra.servers:
                if server.pid is not None:
                    pids[server.name] = server.pid
        return pids

    def stop_all(self) -> None:
        for name in reversed(list(self.processes)):
            self.stop(name)
        if self.infra is not None:
            self.infra.stop()

    async def wait_ready(self, names: Iterable[str], timeout: float = 120.0) -> None:
        pending = set(names)
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while pending:
                for name in sorted(pending):
                    process = self.processes[name]
                    if process.poll() is not None:
                        raise RuntimeError(f"{name} exited with {process.returncode}; see logs")
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with http.get(f"{self.url(name)}/readyz") as resp:
                            if resp.status == 200:
                                pending.discard(name)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not ready after {timeout}s: {sorted(pending)}")
                await asyncio.sleep(0.1)

    def admin(self) -> Redis:
        return connect(self.admin_url)


@dataclass(frozen=True)
class GroupState:
    lag: int | None  # entries not yet delivered (None: Redis cannot tell)
    pending: int  # delivered, not acknowledged
    entries_read: int

    @property
    def drained(self) -> bool:
        return self.lag == 0 and self.pending == 0


async def group_state(redis: Redis, chans: Sequence[str], group: str) -> GroupState:
    """Sum over `chans` of the consumer group's lag and pending counts."""
    pipe = redis.pipeline(transaction=False)
    for channel in chans:
        pipe.xinfo_groups(channels.stream_key(channel))
    replies = await pipe.execute(raise_on_error=False)
    lag: int | None = 0
    pending = 0
    read = 0
    for reply in replies:
        if isinstance(reply, Exception):
            continue  # stream not created yet
        for info in reply:
            name = info.get("name")
            if name not in (group, group.encode()):
                continue
            pending += int(info.get("pending") or 0)
            read += int(info.get("entries-read") or 0)
            if info.get("lag") is None:
                lag = None
            elif lag is not None:
                lag += int(info["lag"])
    return GroupState(lag, pending, read)


def exit_on_sigterm(cleanup: Callable[[], object]) -> None:
    """On SIGTERM (`timeout`, a CI stop) run `cleanup` (stop the stack) and exit at once: the
    stack's servers and services run in sessions of their own and would outlive us, busy, for
    good; unwinding through `asyncio.run` instead can wait for ever on a task that does not
    cancel."""

    def stop(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            cleanup()
        finally:
            os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def rss_mb(pid: int) -> float | None:
    """Resident set size of a process in MB (from /proc), None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope dy/dx."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def uptime_line() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def kpi_files(directory: Path, extra: Mapping[str, str], *, samples: bool = True) -> Path:
    """A KPI directory: the sample KPIs `up` loads by default plus `extra` (file -> YAML)."""
    directory.mkdir(parents=True, exist_ok=True)
    if samples:
        for sample in sorted((REPO / "k8s" / "samples").glob("*.yaml")):
            (directory / sample.name).write_text(sample.read_text())
    for name, text in extra.items():
        (directory / name).write_text(text)
    return directory


def _processes() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds used so far) of every process, including what its
    children that have ended used (Redis's AOF rewrites, PostgreSQL backends that closed)."""
    tick = os.sysconf("SC_CLK_TCK")
    table: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        used = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
        table[int(entry.name)] = (int(fields[1]), used / tick)
    return table


def cpu_seconds(pids: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds used by each named process and its descendants (PostgreSQL backends)."""
    table = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[str, float] = {}
    for name, root in pids.items():
        total, stack = 0.0, [root]
        while stack:
            pid = stack.pop()
            if pid in table:
                total += table[pid][1]
            stack.extend(children.get(pid, ()))
        out[name] = total
    return out
