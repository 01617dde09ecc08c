"""Data Simulator service: composes the generator, the controller, the metadata sync and the
HTTP control API on a `ServiceRuntime`.

Entity types come from the metadata service (`metadata.lookup` / `list_entity_definitions`,
spec Example 3) when it answers, else the built-in `order` and `sensor`; a `metadata.changed`
event about an entity type triggers a re-fetch. Changing the definitions changes what is
generated from then on (determinism holds for a given seed *and* sequence of definitions).

Event ids are a function of `SIMULATOR_SEED`, the run id and the sequence number, and entity ids
carry a tag of the seed and run id. Unset, `SIMULATOR_RUN_ID` is random per process, so a
restarted simulator never re-sends event ids that consumers have already seen (they deduplicate
by event id and would drop the new events), nor restarts at version 1 an entity id the last run
took further (consumers keep each entity's highest version); set it, with the seed, to reproduce
a run's ids exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydantic import Field, field_validator, model_validator

from analytics_engine.core import channels
from analytics_engine.core.bus import Delivery
from analytics_engine.core.errors import RequestError
from analytics_engine.core.payloads import parse_change
from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.core.settings import BaseServiceSettings
from analytics_engine.kpi.durations import parse_duration
from analytics_engine.simulator import api
from analytics_engine.simulator.config import EVENT_KINDS, GeneratorConfig, parse_weights
from analytics_engine.simulator.controller import MAX_RATE, SimulatorController
from analytics_engine.simulator.entities import parse_entity_definitions
from analytics_engine.simulator.generator import EventGenerator

log = logging.getLogger(__name__)

SERVICE = "data_simulator"
METADATA_RETRY_S = 30.0
METADATA_RESYNC_S = 300.0


class Settings(BaseServiceSettings):
    simulator_port: int = Field(
        default=8081,
        ge=0,
        le=65535,
        validation_alias="SIMULATOR_PORT",
        description="Port of the simulator's HTTP control API (and `/healthz`, `/readyz`, "
        "`/metrics`).",
    )
    seed: int = Field(
        default=42,
        validation_alias="SIMULATOR_SEED",
        description="Seed of the generator: the same seed and entity definitions give the same "
        "events but for their timestamps and the sensor readings (which follow the time of day); "
        "the same event and entity ids also need `SIMULATOR_RUN_ID`.",
    )
    rate: float = Field(
        default=100.0,
        gt=0,
        le=MAX_RATE,
        validation_alias="SIMULATOR_RATE",
        description="Events generated per second (at most 100000) at start; "
        "`PUT /api/v1/simulator/rate` changes it while running.",
    )
    mix: str = Field(
        default="created=0.5,updated=0.45,deactivated=0.05",
        validation_alias="SIMULATOR_MIX",
        description="Share of created, updated and deactivated events, as `kind=weight` pairs "
        "(normalised). An update or deactivation with no live entity to act on is generated "
        "as a creation.",
    )
    entity_types: str = Field(
        default="order=0.6,sensor=0.4",
        validation_alias="SIMULATOR_ENTITY_TYPES",
        description="Share of each entity type (types without a metadata definition or "
        "built-in model are ignored).",
    )
    out_of_order_ratio: float = Field(
        default=0.02,
        ge=0,
        le=1,
        validation_alias="SIMULATOR_OUT_OF_ORDER_RATIO",
        description="Share of events whose `occurred_at` is back-dated by up to 2 s (out of "
        "order, usually still within a window's allowed lateness).",
    )
    late_ratio: float = Field(
        default=0.005,
        ge=0,
        le=1,
        validation_alias="SIMULATOR_LATE_RATIO",
        description="Share of events back-dated by between half and all of "
        "`SIMULATOR_MAX_LATENESS`, to exercise late-event handling. With "
        "`SIMULATOR_OUT_OF_ORDER_RATIO`, at most 1.",
    )
    max_lateness: timedelta = Field(
        default=timedelta(seconds=120),
        validation_alias="SIMULATOR_MAX_LATENESS",
        description="How far back a late event (`SIMULATOR_LATE_RATIO`) is dated at most "
        "(e.g. '120s', '5m').",
    )
    tick_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        validation_alias="SIMULATOR_TICK_INTERVAL",
        description="Seconds between `simulation.tick` events (events emitted, measured rate) "
        "while the simulator runs.",
    )
    max_events: int | None = Field(
        default=None,
        ge=1,
        validation_alias="SIMULATOR_MAX_EVENTS",
        description="Stop after this many events in all (a finite run; a later start is "
        "refused). Unset: no limit.",
    )
    autostart: bool = Field(
        default=True,
        validation_alias="SIMULATOR_AUTOSTART",
        description="Start generating when the service starts (once its first request for the "
        "metadata service's entity types has an outcome, at most `SIMULATOR_METADATA_TIMEOUT` + "
        "1 s), unless `POST /api/v1/simulator/stop` (or `start`) came first; false waits for "
        "`POST /api/v1/simulator/start`.",
    )
    run_id: str = Field(
        default="",
        max_length=100,
        validation_alias="SIMULATOR_RUN_ID",
        description="Salt of the event and entity ids. Empty: a random one per process, so a "
        "restart never re-sends ids consumers have already seen, nor starts an entity of the last "
        "run at version 1 again; set it (with the seed) to reproduce a run's ids.",
    )
    max_live_entities: int = Field(
        default=50_000,
        ge=1,
        le=10_000_000,
        validation_alias="SIMULATOR_MAX_LIVE_ENTITIES",
        description="Live entities remembered per entity type (bounds memory); a new entity "
        "takes the oldest one's place, and that one gets no further events.",
    )
    metadata_timeout_s: float = Field(
        default=2.0,
        gt=0,
        validation_alias="SIMULATOR_METADATA_TIMEOUT",
        description="Timeout (seconds) of the request for entity types to the metadata "
        "service; without an answer the built-in `order` and `sensor` are used (asked again "
        "every 30 s).",
    )

    @field_validator("max_lateness", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> timedelta:
        return parse_duration(value)

    @field_validator("mix")
    @classmethod
    def _mix(cls, value: str) -> str:
        parse_weights(value, allowed=EVENT_KINDS)
        return value

    @field_validator("entity_types")
    @classmethod
    def _types(cls, value: str) -> str:
        parse_weights(value)
        return value

    @model_validator(mode="after")
    def _ratios(self) -> Settings:
        if self.out_of_order_ratio + self.late_ratio > 1:
            raise ValueError("SIMULATOR_OUT_OF_ORDER_RATIO + SIMULATOR_LATE_RATIO must be <= 1")
        return self

    def generator_config(self) -> GeneratorConfig:
        return GeneratorConfig(
            seed=self.seed,
            mix=parse_weights(self.mix, allowed=EVENT_KINDS),
            entity_weights=parse_weights(self.entity_types),
            out_of_order_ratio=self.out_of_order_ratio,
            late_ratio=self.late_ratio,
            max_lateness=self.max_lateness,
            max_live_entities=self.max_live_entities,
            # A fresh run id per process unless set: a restarted simulator must not re-send the
            # event ids of its earlier run (consumers would drop them as duplicates).
            run_id=self.run_id or secrets.token_hex(8),
        )


class EntityDefinitionSync:
    """Keeps the generator's entity types in line with the metadata service."""

    def __init__(
        self,
        runtime: ServiceRuntime,
        generator: EventGenerator,
        *,
        timeout: float,
    ) -> None:
        self._runtime = runtime
        self._generator = generator
        self._timeout = timeout
        self._changed = asyncio.Event()
        self.first_attempt = asyncio.Event()
        self.source = "builtin"

    async def fetch(self) -> bool:
        """One lookup; True when the metadata service answered (its types are now in use)."""
        try:
            payload = await self._runtime.requests.request(
                channels.METADATA_LOOKUP,
                "list_entity_definitions",
                {},
                timeout=self._timeout,
            )
        except RequestError as exc:
            log.info(
                "metadata service unavailable, using built-in entity types",
                extra={"reason": type(exc).__name__},
            )
            return False
        shapes = parse_entity_definitions(payload)
        self._generator.set_entity_definitions(shapes or None)
        self.source = "metadata" if shapes else "builtin"
        log.info("entity types loaded", extra={"entity_types": sorted(shapes), "src": self.source})
        return True

    async def run(self) -> None:
        while True:
            ok = await self.fetch()
            self.first_attempt.set()
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait(), METADATA_RESYNC_S if ok else METADATA_RETRY_S
                )

    async def on_changed(self, deliveries: Sequence[Delivery]) -> None:
        if any(parse_change(d).kind == "entity_type" for d in deliveries):
            self._changed.set()


@dataclass(frozen=True)
class SimulatorService:
    runtime: ServiceRuntime
    controller: SimulatorController
    generator: EventGenerator
    sync: EntityDefinitionSync


def create(settings: Settings) -> ServiceRuntime:
    return build(settings).runtime


def build(settings: Settings) -> SimulatorService:
    """The composed service, with handles on its parts (tests and benchmarks use them)."""
    runtime = ServiceRuntime(service=SERVICE, settings=settings, port=settings.simulator_port)
    generator = EventGenerator(settings.generator_config())
    controller = SimulatorController(
        generator,
        runtime.publisher,
        rate=settings.rate,
        max_events=settings.max_events,
        tick_interval_s=settings.tick_interval_s,
    )
    sync = EntityDefinitionSync(runtime, generator, timeout=settings.metadata_timeout_s)

    async def autostart() -> None:
        # Start with the metadata service's entity types when it answers (Example 3).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sync.first_attempt.wait(), settings.metadata_timeout_s + 1)
        controller.autostart()  # not over a start or stop requested meanwhile

    runtime.consume([channels.METADATA_CHANGED], sync.on_changed)
    runtime.add_task("metadata-sync", sync.run)
    runtime.add_task("generate", controller.run)
    runtime.add_task("ticks", controller.tick_loop)
    if settings.autostart:
        runtime.add_task("autostart", autostart)
    api.add_routes(runtime.http, controller)
    return SimulatorService(runtime, controller, generator, sync)
