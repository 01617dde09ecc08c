"""Observability Service: composes the runtime with the registry, a status API and metrics."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import Counter, Gauge
from pydantic import Field, ValidationError, field_validator

from analytics_engine.core import channels
from analytics_engine.core.acl import SERVICE_ACCESS, running_services
from analytics_engine.core.bus import FIELD, REDIS_ERRORS, Delivery, LiveSubscription, encode_event
from analytics_engine.core.durations import Duration
from analytics_engine.core.envelopes import MalformedMessage, parse_event, validation_summary
from analytics_engine.core.errors import describe_error
from analytics_engine.core.payloads import KPIResult, ServiceHeartbeat, SimulationTick
from analytics_engine.core.retention import readers_of, trim_all, trimmed_channels
from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.core.settings import BaseServiceSettings
from analytics_engine.observability.registry import Registry

SERVICE = "observability_service"
_LAST_TICKS = 10
"""The newest `simulation.tick` entries searched for a valid one (the status's last tick)."""
_STATUS_REDIS_TIMEOUT_S = 3.0
"""How long the status waits for what it reads from Redis before reporting it unreachable."""
_GAUGE_INTERVAL_S = 2.0
"""How often the gauges (services up, dead letters) are brought up to date for /metrics."""

log = logging.getLogger(__name__)


def absent_services(text: str) -> frozenset[str]:
    """`OBSERVABILITY_ABSENT_READERS` as service names."""
    return frozenset(name.strip() for name in text.split(",") if name.strip())


class Settings(BaseServiceSettings):
    port: int = Field(
        default=8086,
        validation_alias="OBSERVABILITY_PORT",
        ge=0,
        le=65535,
        description="Port of the observability service's HTTP API (`/api/v1/status`, "
        "`/healthz`, `/readyz`, `/metrics`).",
    )
    missing_after_s: float = Field(
        default=15.0,
        gt=0,
        validation_alias="OBSERVABILITY_MISSING_AFTER",
        description="Seconds without a heartbeat before an instance is reported missing "
        "(three missed heartbeats at the default interval of 5 s). An instance silent for an "
        "hour is forgotten (each pod restart is a new one); a deployed service with none left "
        "is still reported missing.",
    )
    trim_interval: Duration = Field(
        default=timedelta(seconds=2),
        validation_alias="OBSERVABILITY_TRIM_INTERVAL",
        description="How often durable streams are trimmed below what all their readers have "
        "consumed. A full stream (`BUS_STREAM_MAXLEN`) gains room only so: 0 turns trimming "
        "off, and then publishers wait once their streams are full.",
    )
    absent_readers: str = Field(
        default="",
        validation_alias="OBSERVABILITY_ABSENT_READERS",
        description="Services not deployed, comma-separated (e.g. `data_simulator`): the "
        "streams they would read are trimmed without waiting for them, and the status does not "
        "report them missing (every other service is, once no heartbeat of it came for "
        "`OBSERVABILITY_MISSING_AFTER`, even one never heard from since this service started).",
    )

    @field_validator("absent_readers")
    @classmethod
    def _known_services(cls, value: str) -> str:
        absent = absent_services(value)
        unknown = absent - set(SERVICE_ACCESS)
        if unknown:
            raise ValueError(
                f"unknown services {sorted(unknown)}; expected some of {sorted(SERVICE_ACCESS)}"
            )
        # a stream none of whose readers is deployed would never be trimmed (nor read)
        orphaned = [c for c in trimmed_channels() if not readers_of(c, absent)]
        if orphaned:
            raise ValueError(f"no reader of {', '.join(orphaned)} would be left")
        return value


class Observability:
    """Feeds the registry from the bus and renders the status API and gauges."""

    def __init__(self, runtime: ServiceRuntime, settings: Settings) -> None:
        self.runtime = runtime
        self.absent = absent_services(settings.absent_readers)
        """Services not deployed: retention does not wait for them, the status expects none."""
        self.registry = Registry(
            missing_after_s=settings.missing_after_s,
            expected=set(running_services()) - self.absent,
        )
        r = runtime.metrics.registry
        self.services_up = Gauge(
            "analytics_service_up",
            "1 when the service has a live instance",
            ["service"],
            registry=r,
        )
        self.dead_letters = Gauge(
            "analytics_dead_letters",
            "Entries in each dead-letter stream",
            ["channel"],
            registry=r,
        )
        self.trimmed = Counter(
            "analytics_stream_entries_trimmed_total",
            "Stream entries removed once every reader had consumed them",
            ["channel"],
            registry=r,
        )
        self._up_services: set[str] = set()
        """The services `services_up` has a sample of."""
        self._dead_letter_channels: set[str] = set()
        """The channels `dead_letters` has a sample of (removed when their stream goes)."""
        # Not `analytics_kpi_freshness_seconds`: that name is the calculation engine's
        # histogram (window close to published); one name, one type across the platform.
        self.freshness = Gauge(
            "analytics_kpi_result_delay_seconds",
            "Window end to result received, for the last result of each KPI",
            ["kpi_code"],
            registry=r,
        )

    async def listening(self, live: LiveSubscription) -> None:
        """Start the registry's clock for services never heard from once heartbeats can reach
        us: a slow start (Redis not up yet) must not make services that are up look missing."""
        await live.subscribed.wait()
        self.registry.started = time.monotonic()

    def on_live(self, channel: bytes, data: bytes) -> None:
        now = time.monotonic()
        name = channel.decode()
        self.registry.count(name, now=now)
        try:
            envelope = orjson.loads(data)
            payload = envelope["payload"]
            if name == channels.SERVICE_HEARTBEAT:
                beat = ServiceHeartbeat.model_validate(payload)
                self.registry.heartbeat(beat.model_dump(), now=now)
            elif name.startswith(channels.KPI_CALCULATED_PREFIX):
                result = KPIResult.model_validate(payload)
                self.registry.kpi_result(
                    result.kpi_code,
                    value=result.value,
                    window_end=result.window_end,
                    received=datetime.now(UTC),
                    now=now,
                )
                self.freshness.labels(result.kpi_code).set(
                    self.registry.kpis[result.kpi_code].freshness_s
                )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValidationError):
            self.registry.count("invalid", now=now)

    async def on_ticks(self, batch: Sequence[Delivery]) -> None:
        """Dead-letter invalid ticks. (The status reads the last tick from the stream,
        `last_tick`, and their rate from its length, `sample_streams`: replicas share this
        consumer group, and each is delivered only some of the ticks.)"""
        invalid: list[tuple[Delivery, str]] = []
        for delivery in batch:
            try:
                SimulationTick.model_validate(delivery.event.payload)
            except ValidationError as exc:
                # informational, so not retried; but never dropped silently (protocol.md)
                invalid.append((delivery, validation_summary(exc)))
        if invalid:
            pipe = self.runtime.redis.pipeline(transaction=True)
            for delivery, reason in invalid:
                self.runtime.dead_letters.add_to_pipeline(
                    pipe,
                    channel=delivery.channel,
                    reason=f"invalid payload: {reason}",
                    original=encode_event(delivery.event),
                    kind="event",
                    stream_id=delivery.id,
                )
            await pipe.execute()

    async def sample_streams(self) -> None:
        """Every few seconds, turn each durable stream's `entries-added` into a rate."""
        previous: dict[str, int] = {}
        while True:
            now = time.monotonic()
            match = channels.stream_key("*")
            seen: dict[str, int] = {}  # the streams of this pass only: deleted ones are dropped
            async for key in self.runtime.redis.scan_iter(match=match, count=500):
                name = channels.channel_of_stream(key.decode() if isinstance(key, bytes) else key)
                info = await self.runtime.redis.xinfo_stream(key)
                added = int(info.get("entries-added", info.get("length", 0)))
                if name in previous and added >= previous[name]:
                    self.registry.count(name, now=now, n=added - previous[name])
                seen[name] = added
            previous = seen
            await asyncio.sleep(2.0)

    async def trim_streams(self, interval_s: float) -> None:
        """Every `interval_s`, trim each durable stream below what its readers consumed."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                removed = await trim_all(self.runtime.redis, self.absent)
            except REDIS_ERRORS as exc:
                log.warning("stream trimming skipped", extra={"error": str(exc)[:200]})
                continue
            for channel, count in removed.items():
                if count:
                    self.trimmed.labels(channel).inc(count)

    def set_services_up(self, services: Sequence[dict[str, Any]]) -> None:
        """The service-up gauge as `services`: a service no longer listed (forgotten by the
        registry, not deployed) loses its sample."""
        listed = {str(entry["service"]) for entry in services}
        for service in self._up_services - listed:
            self.services_up.remove(service)
        for entry in services:
            self.services_up.labels(entry["service"]).set(1 if entry["status"] == "up" else 0)
        self._up_services = listed

    def set_dead_letters(self, counts: dict[str, int]) -> None:
        """The dead-letter gauge as `counts`: a stream deleted (its letters handled) loses its
        sample, instead of reporting its last count for good."""
        for channel in self._dead_letter_channels - counts.keys():
            self.dead_letters.remove(channel)
        for channel, count in counts.items():
            self.dead_letters.labels(channel).set(count)
        self._dead_letter_channels = set(counts)

    async def refresh_gauges(self) -> None:
        """Every few seconds, the gauges from the registry and Redis: Prometheus scrapes
        /metrics and never asks for the status, whose reads would otherwise be their only
        update (an alert on them would never fire, or never clear)."""
        while True:
            self.set_services_up(self.registry.services(now=time.monotonic()))
            try:
                async with asyncio.timeout(_STATUS_REDIS_TIMEOUT_S):
                    self.set_dead_letters(await self.dead_letter_counts())
            except (TimeoutError, *REDIS_ERRORS) as exc:
                log.warning("dead-letter counts not read", extra={"error": str(exc)[:200]})
            await asyncio.sleep(_GAUGE_INTERVAL_S)

    async def dead_letter_counts(self) -> dict[str, int]:
        prefix = channels.dead_letter_key("")
        counts: dict[str, int] = {}
        async for key in self.runtime.redis.scan_iter(match=f"{prefix}*", count=500):
            name = key.decode() if isinstance(key, bytes) else str(key)
            counts[name[len(prefix) :]] = int(await self.runtime.redis.xlen(key))
        return counts

    async def full_streams(self) -> list[str]:
        """The channels whose streams are full: their readers are down or behind, and their
        publishers wait (backpressure)."""
        names = [c for c in trimmed_channels() if channels.channel_spec(c).backpressure]
        return await self.runtime.publisher.full(names)

    async def last_tick(self) -> tuple[dict[str, Any] | None, float | None]:
        """The newest valid simulation tick and how long ago it was published, read from its
        stream: every replica answers alike, although the replicas share the tick stream's
        consumer group and each is delivered only some of the ticks."""
        entries: list[tuple[bytes, dict[bytes, bytes]]] = await self.runtime.redis.xrevrange(
            channels.stream_key(channels.SIMULATION_TICK), count=_LAST_TICKS
        )  # type: ignore[assignment]  # redis-py's stubs allow str: this client returns bytes
        for entry_id, fields in entries:
            try:
                event = parse_event(fields.get(FIELD, b""))
                tick = SimulationTick.model_validate(event.payload)
            except (MalformedMessage, ValidationError):
                continue  # dead-lettered by `on_ticks`
            published_ms, _ = channels.parse_stream_id(entry_id)
            seconds, micros = await self.runtime.redis.time()  # the clock of the entry ids
            age = max(0.0, seconds + micros / 1e6 - published_ms / 1000)
            return tick.model_dump(mode="json"), round(age, 3)
        return None, None

    async def from_redis(self) -> dict[str, Any]:
        """The parts of the status read from Redis (dead letters, full streams, last tick)."""
        dead = await self.dead_letter_counts()
        full = await self.full_streams()
        tick, tick_age = await self.last_tick()
        self.set_dead_letters(dead)
        return {
            "full_streams": full,
            "dead_letters": dead,
            "simulation": {"last_tick": tick, "seconds_ago": tick_age},
        }

    async def status(self, request: web.Request) -> web.Response:
        """The platform status. Redis unreachable is itself a finding, not a failure of the
        report: what this service knows from memory is still reported, with status degraded,
        `redis.reachable` false, and the parts read from Redis left out (unknown)."""
        now = time.monotonic()
        services = self.registry.services(now=now)
        self.set_services_up(services)
        redis: dict[str, Any] = {"reachable": True}
        stored: dict[str, Any] = {}
        try:
            async with asyncio.timeout(_STATUS_REDIS_TIMEOUT_S):
                stored = await self.from_redis()
        except (TimeoutError, *REDIS_ERRORS) as exc:
            redis = {"reachable": False, "error": f"Redis is unreachable: {describe_error(exc)}"}
            log.warning("status: Redis unreachable", extra={"error": str(exc)[:200]})
        healthy = (
            redis["reachable"]
            and all(s["status"] == "up" for s in services)
            and not stored.get("full_streams")
        )
        return web.json_response(
            {
                "status": "ok" if healthy else "degraded",
                "redis": redis,
                "services": services,
                **stored,
                "message_rates": self.registry.message_rates(now=now),
                "kpi_freshness": self.registry.kpi_freshness(now=now),
                "generated_at": datetime.now(UTC).isoformat(),
            }
        )


def create(settings: Settings) -> ServiceRuntime:
    runtime = ServiceRuntime(service=SERVICE, settings=settings, port=settings.port)
    observability = Observability(runtime, settings)
    live = runtime.listen(
        observability.on_live,
        channels=[channels.SERVICE_HEARTBEAT],
        patterns=[f"{channels.KPI_CALCULATED_PREFIX}*"],
    )
    runtime.add_task("listening", functools.partial(observability.listening, live))
    runtime.consume([channels.SIMULATION_TICK], observability.on_ticks)
    runtime.add_task("sample-streams", observability.sample_streams)
    runtime.add_task("gauges", observability.refresh_gauges)
    interval = settings.trim_interval.total_seconds()
    if interval > 0:
        trim = functools.partial(observability.trim_streams, interval)
        runtime.add_task("trim-streams", trim)
    runtime.http.router.add_get("/api/v1/status", observability.status)
    return runtime
