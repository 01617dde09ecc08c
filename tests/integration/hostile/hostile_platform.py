"""The whole platform in-process for the hostile-input tests, and probes.

`platform` starts every service (database with the read-only role, metadata, calculation,
observability, simulator, archival, gateway) through the `running` fixture, against the real
Redis, PostgreSQL and S3 fixtures. `Bridge` lets a hypothesis test (synchronous, run in a worker
thread) drive coroutines on the test's event loop, where the services run, so every generated
example is checked against the live services and failures shrink as usual.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import aiohttp
from redis.asyncio import Redis

from analytics_engine.core.bus import LiveSubscription
from analytics_engine.core.channels import dead_letter_key
from analytics_engine.core.runtime import ServiceRuntime

T = TypeVar("T")
Start = Callable[[ServiceRuntime], Awaitable[ServiceRuntime]]

READ_KEY = "hostile-read-key-0123456789"
ADMIN_KEY = "hostile-admin-key-0123456789"
SERVICE_NAMES = (
    "database",
    "metadata",
    "calculation",
    "observability",
    "simulator",
    "archival",
    "gateway",
)


class Bridge:
    """Run coroutines on the event loop of the services from another thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


class ReplyInbox:
    """Every message published on `reply.hostile.*`, by channel (the fuzzer's reply_to)."""

    PATTERN = "reply.hostile.*"

    def __init__(self, redis: Redis) -> None:
        self.messages: list[tuple[bytes, bytes]] = []
        self.arrived = asyncio.Event()
        self._sub = LiveSubscription(redis, self._on, patterns=[self.PATTERN], with_channel=True)

    def _on(self, channel: bytes, data: bytes) -> None:
        self.messages.append((channel, data))
        self.arrived.set()

    async def start(self) -> None:
        await self._sub.start()

    async def stop(self) -> None:
        await self._sub.stop()

    async def wait_for(
        self, predicate: Callable[[bytes, bytes], bool], timeout: float
    ) -> tuple[bytes, bytes] | None:
        """The first message (old or new) matching `predicate`, or None after `timeout`."""
        deadline = asyncio.get_running_loop().time() + timeout
        seen = 0
        while True:
            for channel, data in self.messages[seen:]:
                if predicate(channel, data):
                    return channel, data
            seen = len(self.messages)
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return None
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), left)
            except TimeoutError:
                return None


@dataclass
class Platform:
    runtimes: dict[str, ServiceRuntime]
    tasks: dict[str, asyncio.Task[None]]
    redis: Redis
    http: aiohttp.ClientSession
    database_url: str
    reader_url: str
    inbox: ReplyInbox
    gateway: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.runtimes[name].bound_port}"

    async def assert_alive(self) -> None:
        """Every service's runtime task still runs and its `/healthz` answers 200."""
        for name, task in self.tasks.items():
            if task.done():
                exc = None if task.cancelled() else task.exception()
                raise AssertionError(f"{name} stopped: {exc!r}")
            assert not self.runtimes[name].stopping.is_set(), f"{name} is stopping"
            async with self.http.get(
                f"{self.url(name)}/healthz", timeout=aiohttp.ClientTimeout(total=5)
            ) as resp:
                assert resp.status == 200, f"{name} /healthz -> {resp.status}"
                body = await resp.json()
                assert body["status"] == "ok", (name, body)

    async def dead_letters(self, channel: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
        return list(await self.redis.xrange(dead_letter_key(channel)))  # type: ignore[arg-type]


def runtime_task(before: set[asyncio.Task[Any]]) -> asyncio.Task[None]:
    """The task the `running` fixture created for `ServiceRuntime.run` (it does not return it)."""
    found = [
        t
        for t in asyncio.all_tasks() - before
        if getattr(t.get_coro(), "__qualname__", "") == "ServiceRuntime.run"
    ]
    assert len(found) == 1, found
    return found[0]


def service_settings(
    name: str,
    *,
    redis_url: str,
    database_url: str,
    reader_url: str,
    s3: Any,
    bucket: str,
    urls: dict[str, Any],
) -> Any:
    common: dict[str, Any] = {
        "redis_url": redis_url,
        "instance_id": f"{name}-hostile",
        "heartbeat_interval_s": 30.0,
        "max_deliveries": 2,  # a failing event reaches the dead letters after 2 tries
    }
    if name == "database":
        from analytics_engine.database.service import Settings as DatabaseSettings

        return DatabaseSettings(
            **common,
            database_url=database_url,
            database_readonly_url=reader_url,
            port=0,
            archival_interval=timedelta(seconds=0),
            query_timeout=timedelta(seconds=1),
            query_max_rows=1000,
        )
    if name == "metadata":
        from analytics_engine.metadata.service import Settings as MetadataSettings

        return MetadataSettings(
            **common, database_url=database_url, port=0, outbox_poll_interval_s=0.2
        )
    if name == "calculation":
        from analytics_engine.calculation.service import Settings as CalculationSettings

        return CalculationSettings(
            **common, calculation_port=0, backfill_enabled=False, checkpoint_interval_s=0.2
        )
    if name == "observability":
        from analytics_engine.observability.service import Settings as ObservabilitySettings

        return ObservabilitySettings(**common, port=0)
    if name == "simulator":
        from analytics_engine.simulator.service import Settings as SimulatorSettings

        return SimulatorSettings(**common, simulator_port=0, autostart=False)
    if name == "archival":
        from analytics_engine.archival.service import Settings as ArchivalSettings

        return ArchivalSettings(
            **common,
            port=0,
            s3_endpoint_url=s3.endpoint_url,
            s3_bucket=bucket,
            aws_access_key_id=s3.access_key,
            aws_secret_access_key=s3.secret_key,
            aws_region=s3.region,
            flush_interval_s=0.2,
        )
    if name == "gateway":
        from analytics_engine.gateway.service import Settings as GatewaySettings

        return GatewaySettings(
            **common,
            gateway_port=0,
            api_keys=f"{ADMIN_KEY}:admin,{READ_KEY}:read",
            rate_limit=10_000.0,
            rate_burst=10_000,
            upstream_timeout_s=5.0,
            **urls,
        )
    raise ValueError(name)


def create_service(name: str, settings: Any) -> ServiceRuntime:
    if name == "gateway":
        from analytics_engine.gateway.service import GATEWAY_KEY, build

        gateway = build(settings)
        assert gateway.runtime.http[GATEWAY_KEY] is gateway
        return gateway.runtime
    import importlib

    module = importlib.import_module(f"analytics_engine.{name}.service")
    runtime: ServiceRuntime = module.create(settings)
    return runtime
