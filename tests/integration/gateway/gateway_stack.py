"""The gateway with real business services, in-process on free ports, against real Redis and
PostgreSQL. `start_stack` composes it from a `start(runtime)` function: the `running` fixture
(async tests) or `ThreadedStack` (tests that must block: schemathesis, Playwright)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDict

from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.gateway.service import GATEWAY_KEY, Gateway
from analytics_engine.gateway.service import Settings as GatewaySettings
from analytics_engine.gateway.service import build as build_gateway

ADMIN_KEY = "admin-key-0123456789abcdef"
READ_KEY = "read-key-0123456789abcdef"
API_KEYS = f"{ADMIN_KEY}:admin,{READ_KEY}:read"
ALL_SERVICES = ("database", "metadata", "calculation", "observability", "simulator")

Start = Callable[[ServiceRuntime], Awaitable[ServiceRuntime]]
StackFactory = Callable[..., Awaitable["Stack"]]


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any
    headers: Mapping[str, str]


@dataclass
class Stack:
    runtimes: dict[str, ServiceRuntime]
    gateway: Gateway
    http: aiohttp.ClientSession = field(repr=False)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.gateway.runtime.bound_port}"

    async def call(
        self,
        method: str,
        path: str,
        *,
        key: str | None = ADMIN_KEY,
        json: Any = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        send = dict(headers or {})
        if key is not None:
            send.setdefault("Authorization", f"Bearer {key}")
        kwargs: dict[str, Any] = {"headers": send}
        if json is not None:
            kwargs["json"] = json
        if data is not None:
            kwargs["data"] = data
        async with self.http.request(method, f"{self.base}{path}", **kwargs) as resp:
            raw = await resp.read()
            body: Any = None
            if raw and resp.content_type == "application/json":
                body = await resp.json()
            elif raw:
                body = raw.decode(errors="replace")
            return Reply(resp.status, body, CIMultiDict(resp.headers))


def _service_settings(
    name: str, redis_url: str, database_url: str | None, overrides: Mapping[str, Any]
) -> Any:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "instance_id": f"{name}-test",
        # Long: the core's heartbeat loop may survive cancellation when it hits a Redis call
        # (see the report), which makes stopping a runtime wait for the `running` timeout.
        "heartbeat_interval_s": 30.0,
    }
    if name == "database":
        from analytics_engine.database.service import Settings

        values.update(database_url=database_url, port=0)
        return Settings(**{**values, **overrides})
    if name == "metadata":
        from analytics_engine.metadata.service import Settings as MetadataSettings

        values.update(database_url=database_url, port=0, outbox_poll_interval_s=0.2)
        return MetadataSettings(**{**values, **overrides})
    if name == "calculation":
        from analytics_engine.calculation.service import Settings as CalculationSettings

        values.update(calculation_port=0)
        return CalculationSettings(**{**values, **overrides})
    if name == "observability":
        from analytics_engine.observability.service import Settings as ObservabilitySettings

        values.update(port=0)
        return ObservabilitySettings(**{**values, **overrides})
    if name == "simulator":
        from analytics_engine.simulator.service import Settings as SimulatorSettings

        values.update(simulator_port=0, autostart=False, rate=50.0)
        return SimulatorSettings(**{**values, **overrides})
    raise ValueError(name)


def _create(name: str, settings: Any) -> ServiceRuntime:
    module = {
        "database": "analytics_engine.database.service",
        "metadata": "analytics_engine.metadata.service",
        "calculation": "analytics_engine.calculation.service",
        "observability": "analytics_engine.observability.service",
        "simulator": "analytics_engine.simulator.service",
    }[name]
    import importlib

    runtime: ServiceRuntime = importlib.import_module(module).create(settings)
    return runtime


def unreachable_url() -> str:
    """A loopback URL where nothing listens (a port we bound and released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def start_stack(
    start: Start,
    *,
    redis_url: str,
    database_url: str | None = None,
    services: Sequence[str] = ALL_SERVICES,
    gateway: Mapping[str, Any] | None = None,
    service_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    http: aiohttp.ClientSession | None = None,
) -> Stack:
    overrides = service_overrides or {}
    runtimes: dict[str, ServiceRuntime] = {}
    for name in ALL_SERVICES:
        if name in services:
            settings = _service_settings(name, redis_url, database_url, overrides.get(name, {}))
            runtimes[name] = await start(_create(name, settings))

    def url(name: str) -> str:
        runtime = runtimes.get(name)
        return f"http://127.0.0.1:{runtime.bound_port}" if runtime else unreachable_url()

    values: dict[str, Any] = {
        "redis_url": redis_url,
        "instance_id": "gateway-test",
        "gateway_port": 0,
        "api_keys": API_KEYS,
        "heartbeat_interval_s": 30.0,
        "metadata_url": url("metadata"),
        "calculation_url": url("calculation"),
        "simulator_url": url("simulator"),
        "observability_url": url("observability"),
        "upstream_timeout_s": 5.0,
        "rate_limit": 1000.0,
        "rate_burst": 1000,
    }
    values.update(gateway or {})
    gw = build_gateway(GatewaySettings(**values))
    await start(gw.runtime)
    runtimes["gateway"] = gw.runtime
    return Stack(runtimes, gw.runtime.http[GATEWAY_KEY], http or aiohttp.ClientSession())


class ThreadedStack:
    """Runs `start_stack` on an event loop in a background thread (for blocking test clients)."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._tasks: list[tuple[ServiceRuntime, asyncio.Task[None]]] = []
        self.stack: Stack | None = None

    async def _start_runtime(self, runtime: ServiceRuntime) -> ServiceRuntime:
        task = asyncio.create_task(runtime.run())
        self._tasks.append((runtime, task))
        ready = asyncio.create_task(runtime.ready.wait())
        done, _ = await asyncio.wait([ready, task], timeout=30, return_when="FIRST_COMPLETED")
        if task in done:
            task.result()
        assert ready in done, "runtime did not become ready"
        return runtime

    def run(self, coro: Awaitable[Any], timeout: float = 60) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        return future.result(timeout)

    def __enter__(self) -> ThreadedStack:
        self._thread.start()

        async def go() -> Stack:
            return await start_stack(self._start_runtime, **self._kwargs)

        self.stack = self.run(go())
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self.stack is not None:
                await self.stack.http.close()
            for runtime, _ in reversed(self._tasks):
                runtime.stop()
            for _, task in self._tasks:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 30)

        try:
            self.run(stop(), timeout=90)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    @property
    def base(self) -> str:
        assert self.stack is not None
        return self.stack.base


def kpi_definition(code: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "code": code,
        "display_name": code.replace("_", " ").title(),
        "entity_type": "order",
        "aggregation": "count",
        "window": {"type": "tumbling", "size": "1s", "allowed_lateness": "0s"},
        "unit": "orders",
    }
    body.update(overrides)
    return body


def repo_root() -> Path:
    return Path(__file__).resolve().parents[3]
