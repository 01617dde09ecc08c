"""`analytics-engine up`: the whole platform on one machine.

Starts Redis, PostgreSQL and an S3 store (SeaweedFS) on free loopback ports with data under one
directory (default `.run/`), then every service as a supervised child process, prints the URLs
and runs until Ctrl-C, SIGTERM or SIGHUP, then stops everything in order. One `up` at a time
runs on a data directory (`up.lock`); it stops what a killed one left running there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from analytics_engine.cli import SERVICES
from analytics_engine.core.acl import SERVICE_ACCESS, acl_file
from analytics_engine.localstack.infra import LocalInfra
from analytics_engine.localstack.ports import free_ports
from analytics_engine.localstack.process import write_private
from analytics_engine.localstack.supervisor import (
    ProcessSpec,
    Supervisor,
    service_argv,
    stop_leftover_services,
)

log = logging.getLogger("analytics_engine.up")

# Start order: consumers before producers, the gateway last. The operator needs a Kubernetes
# API server, so it is not part of the local stack.
LOCAL_SERVICES = (
    "database",
    "metadata",
    "archival",
    "calculation",
    "observability",
    "simulator",
    "gateway",
)
PORT_VARIABLES = {
    "gateway": "GATEWAY_PORT",
    "simulator": "SIMULATOR_PORT",
    "calculation": "CALCULATION_PORT",
    "metadata": "METADATA_PORT",
    "database": "DATABASE_SERVICE_PORT",
    "archival": "ARCHIVAL_PORT",
    "observability": "OBSERVABILITY_PORT",
}
URL_VARIABLES = {
    "simulator": "SIMULATOR_URL",
    "calculation": "CALCULATION_URL",
    "metadata": "METADATA_URL",
    "observability": "OBSERVABILITY_URL",
}
LOOPBACK = "127.0.0.1"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Ctrl-C, `kill`, and a closed terminal: each stops services, then servers, in order."""
CONNECTION_VARIABLES = (
    "REDIS_URL",
    "DATABASE_URL",
    "DATABASE_READONLY_URL",
    "S3_ENDPOINT_URL",
    "S3_BUCKET",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def service_ports(services: tuple[str, ...], gateway_port: int) -> dict[str, int]:
    ports = dict(zip(services, free_ports(len(services)), strict=True))
    if "gateway" in ports:
        if _port_is_free(gateway_port):
            ports["gateway"] = gateway_port
        else:
            log.warning("port %d is taken; the gateway uses %d", gateway_port, ports["gateway"])
    return ports


def service_env(
    connections: dict[str, str],
    ports: dict[str, int],
    *,
    kpi_dir: Path,
    rate: float | None,
) -> dict[str, dict[str, str]]:
    """Environment of each service: connections, its port, peers' URLs, a stable instance id
    (a restarted process re-reads its own pending stream entries at once); every service but
    the gateway listens on loopback only."""
    common = dict(connections)
    common["KPI_DEFINITIONS_DIR"] = str(kpi_dir)
    common.setdefault("LOG_LEVEL", os.environ.get("LOG_LEVEL", "INFO"))
    for name, variable in URL_VARIABLES.items():
        if name in ports:
            common[variable] = f"http://127.0.0.1:{ports[name]}"
    if rate is not None:
        common["SIMULATOR_RATE"] = str(rate)
    envs = {
        name: {
            **common,
            PORT_VARIABLES[name]: str(port),
            "SERVICE_INSTANCE_ID": f"{name}-local",
        }
        for name, port in ports.items()
    }
    for name, env in envs.items():
        if name != "gateway":
            # Only the gateway authenticates requests; the business services' HTTP APIs (KPI
            # definitions, simulator control) answer anyone who reaches them, so they stay
            # off the network (no NetworkPolicy guards a developer's machine).
            env["SERVICE_HOST"] = LOOPBACK
    return envs


def private_data_dir(path: Path) -> None:
    """Create `path` owner-only (it holds passwords, keys and the databases' files), or make it
    so when an earlier `up` created it readable by others. A directory that is not an earlier
    `up`'s (`--data-dir /tmp`, a home directory) keeps its mode: only a warning."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777
    if not mode & 0o077:
        return
    if (path / "stack.env").exists():
        log.info("making %s owner-only (was %o)", path, mode)
        path.chmod(mode & 0o700)
    else:
        log.warning(
            "%s is open to other users (mode %o): the servers' directories in it are "
            "owner-only, but give up a --data-dir of its own to keep its logs private",
            path,
            mode,
        )


def lock_data_dir(data_dir: Path) -> int:
    """Hold `data_dir/up.lock` (an exclusive lock) while this process lives; exit with a
    one-line error when another `up` holds it. Returns the lock's file descriptor."""
    fd = os.open(data_dir / "up.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise SystemExit(
            f"analytics-engine up is already running on {data_dir} (pid {holder}): "
            "stop it first, or give another --data-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd  # not inherited by children (PEP 446): a leftover server never holds it


def write_env_file(path: Path, connections: dict[str, str]) -> None:
    """`.run/stack.env` for `analytics-engine verify` and other tools (owner-only: secrets)."""
    write_private(path, "".join(f"{key}={value}\n" for key, value in connections.items()))


def redis_url_for(port: int, user: str, passwords: dict[str, str]) -> str:
    return f"redis://{user}:{passwords[user]}@127.0.0.1:{port}/0"


async def wait_ready(ports: dict[str, int], timeout: float = 90.0) -> dict[str, bool]:
    deadline = time.monotonic() + timeout
    ready = dict.fromkeys(ports, False)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while not all(ready.values()) and time.monotonic() < deadline:
            for name, port in ports.items():
                if ready[name]:
                    continue
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        ready[name] = resp.status == 200
            await asyncio.sleep(0.25)
    return ready


def select_services(only: str | None) -> tuple[str, ...]:
    """The services of `--only` (default all), in start order."""
    chosen = tuple(s for s in (only.split(",") if only else LOCAL_SERVICES) if s)
    unknown = set(chosen) - set(LOCAL_SERVICES)
    if unknown:
        raise SystemExit(f"unknown service(s) in --only: {', '.join(sorted(unknown))}")
    return tuple(s for s in LOCAL_SERVICES if s in chosen)


@dataclass
class LocalServices:
    """The supervised service processes of a local stack (what `serve` runs)."""

    supervisor: Supervisor
    services: tuple[str, ...]
    ports: dict[str, int]
    envs: dict[str, dict[str, str]]
    admin_key: str | None


def start_services(
    services: tuple[str, ...],
    connections: dict[str, str],
    data_dir: Path,
    *,
    kpi_dir: Path,
    rate: float | None,
    gateway_port: int,
    redis_urls: dict[str, str] | None = None,
    extra_env: dict[str, str] | None = None,
) -> LocalServices:
    """Start every service as a supervised child process (needs a running event loop).

    `extra_env` is added to every service's environment (benchmarks and tests tune the stack
    with it; `up` passes none)."""
    ports = service_ports(services, gateway_port)
    envs = service_env(connections, ports, kpi_dir=kpi_dir, rate=rate)
    configured_keys = os.environ.get("GATEWAY_API_KEYS")
    admin_key = None if configured_keys else secrets.token_urlsafe(24)
    if "gateway" in envs:
        envs["gateway"]["GATEWAY_API_KEYS"] = configured_keys or f"{admin_key}:admin"
    with (data_dir / "stack.env").open("a") as out:
        if "calculation" in ports:  # verify asks the engine which windows await a backfill
            out.write(f"CALCULATION_URL=http://127.0.0.1:{ports['calculation']}\n")
        if admin_key is not None:
            # The key goes to the owner-only settings file, never to a log or the terminal.
            out.write(f"GATEWAY_API_KEY={admin_key}\n")
    for name, url in (redis_urls or {}).items():
        if name in envs:
            envs[name]["REDIS_URL"] = url  # each service its own ACL user
    for env in envs.values():
        env.update(extra_env or {})
    supervisor = Supervisor(pid_dir=data_dir / "pids")
    for name in services:
        supervisor.start(
            ProcessSpec(name, service_argv(name), envs[name], data_dir / "logs" / f"{name}.log")
        )
    return LocalServices(supervisor, services, ports, envs, admin_key)


async def serve(
    args: argparse.Namespace,
    connections: dict[str, str],
    data_dir: Path,
    *,
    redis_urls: dict[str, str] | None = None,
    stop_requested: list[int] | None = None,
) -> None:
    """Run the services until a stop signal (or one already in `stop_requested`)."""
    services = select_services(args.only)
    kpi_dir = Path(args.kpi_dir) if args.kpi_dir else repo_root() / "k8s" / "samples"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    if stop_requested:
        stop.set()
    started = time.monotonic()
    local = start_services(
        services,
        connections,
        data_dir,
        kpi_dir=kpi_dir,
        rate=args.rate,
        gateway_port=args.gateway_port,
        redis_urls=redis_urls,
    )
    ports, admin_key, supervisor = local.ports, local.admin_key, local.supervisor
    waiting = asyncio.create_task(wait_ready(ports))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait((waiting, stopping), return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():  # stopped before every service was ready
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        print("stopping services...", flush=True)
        await supervisor.stop_all()
        return
    ready = waiting.result()
    print(f"\nAnalyticsEngine is up ({time.monotonic() - started:.1f}s):")
    for name in services:
        state = "ready" if ready[name] else "NOT READY (see log)"
        print(f"  {name:14} http://127.0.0.1:{ports[name]}  {state}")
    if "gateway" in ports:
        print(f"\n  Dashboard:  http://127.0.0.1:{ports['gateway']}/")
        print(f"  API docs:   http://127.0.0.1:{ports['gateway']}/api/v1/docs")
        if admin_key is not None:
            print(f"  API key:    GATEWAY_API_KEY in {data_dir / 'stack.env'} (admin)")
    print(f"  Logs:       {data_dir / 'logs'}/<service>.log")
    print(f"  Settings:   {data_dir / 'stack.env'} (for analytics-engine verify)")
    print("Press Ctrl-C to stop.", flush=True)
    await stopping
    print("stopping services...", flush=True)
    await supervisor.stop_all()


def run_up(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    select_services(args.only)  # a typo in --only fails now, not after the servers started
    data_dir = Path(args.data_dir).absolute()
    private_data_dir(data_dir)
    lock_data_dir(data_dir)  # held until this process exits
    stop_leftover_services(data_dir / "pids")
    if args.external:
        connections = {k: os.environ[k] for k in CONNECTION_VARIABLES if k in os.environ}
        missing = {"REDIS_URL", "DATABASE_URL", "S3_ENDPOINT_URL"} - set(connections)
        if missing:
            print(f"--external needs {', '.join(sorted(missing))} in the environment")
            return 2
        write_env_file(data_dir / "stack.env", connections)
        asyncio.run(serve(args, connections, data_dir))
        return 0
    print(f"starting Redis, PostgreSQL and S3 under {data_dir} ...", flush=True)
    # A stop signal while the servers start is obeyed once they have (stopping a server
    # halfway through its start would leave it running).
    stop_requested: list[int] = []

    def request_stop(signum: int, frame: object) -> None:
        if not stop_requested:  # os.write: print() may be what the signal interrupted
            os.write(sys.stdout.fileno(), b"stopping once the servers have started...\n")
        stop_requested.append(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, request_stop)
    stack = start_infra(data_dir)
    infra, connections, redis_urls = stack.infra, stack.connections, stack.redis_urls
    try:
        print(f"  redis     127.0.0.1:{infra.redis.port}")
        print(f"  postgres  127.0.0.1:{infra.postgres.port}")
        print(f"  s3        {infra.s3.endpoint_url} (bucket {infra.bucket})", flush=True)
        if not stop_requested:
            asyncio.run(
                serve(
                    args,
                    connections,
                    data_dir,
                    redis_urls=redis_urls,
                    stop_requested=stop_requested,
                )
            )
    except KeyboardInterrupt:
        pass
    finally:
        for sig in STOP_SIGNALS:  # already stopping: a second Ctrl-C must not cut it short
            signal.signal(sig, signal.SIG_IGN)
        print("stopping servers...", flush=True)
        infra.stop()
    return 0


@dataclass
class InfraStack:
    """Running servers with the local stack's credentials."""

    infra: LocalInfra
    connections: dict[str, str]
    """What tools get (`stack.env`): the `cli` Redis user, the database, S3."""
    redis_urls: dict[str, str]
    """Each service's own Redis ACL user."""
    admin_redis_url: str


def start_infra(data_dir: Path) -> InfraStack:
    """Generate the Redis ACL users, start Redis, PostgreSQL and S3, create the database roles
    and write `stack.env`. Blocking (call it outside an event loop or in a thread)."""
    passwords = {user: secrets.token_urlsafe(24) for user in SERVICE_ACCESS}
    admin_password = secrets.token_urlsafe(24)
    acl_path = data_dir / "redis-users.acl"
    write_private(acl_path, acl_file(passwords, admin_password=admin_password))
    # the admin user loads the Redis functions services call (they may not load any)
    infra = LocalInfra(data_dir, redis_acl_file=acl_path, redis_admin_password=admin_password)
    infra.start()
    try:
        connections = infra.env()
        connections.update(prepare_database(infra))
        redis_urls = {
            name: redis_url_for(infra.redis.port, SERVICES[name].source, passwords)
            for name in LOCAL_SERVICES
        }
        # Tools such as `analytics-engine verify` get the least-privileged `cli` user; the
        # admin user (for `redis-cli SUBSCRIBE <event channel>` and the like, which `cli` may
        # not do) goes to the same owner-only file under a name no service reads.
        connections["REDIS_URL"] = redis_url_for(infra.redis.port, "cli", passwords)
        admin_url = redis_url_for(infra.redis.port, "admin", {"admin": admin_password})
        write_env_file(data_dir / "stack.env", {**connections, "REDIS_ADMIN_URL": admin_url})
    except BaseException:
        infra.stop()
        raise
    return InfraStack(infra, connections, redis_urls, admin_url)


def prepare_database(infra: LocalInfra) -> dict[str, str]:
    """Roles for least privilege: services write as the database's owner `analytics_app` (no
    superuser), `execute_query` runs as the read-only `analytics_reader`."""
    from analytics_engine.database.roles import (
        WRITER_ROLE,
        ensure_reader_role,
        ensure_writer_role,
    )

    async def roles() -> dict[str, str]:
        admin = infra.postgres.dsn
        writer = await ensure_writer_role(admin)
        reader = await ensure_reader_role(admin, owner=WRITER_ROLE)
        return {"DATABASE_URL": writer, "DATABASE_READONLY_URL": reader}

    return asyncio.run(roles())


if __name__ == "__main__":
    from analytics_engine.cli import main

    sys.exit(main(["up", *sys.argv[1:]]))
