"""Composition of the Metadata Ingestion Service (`analytics-engine run metadata`).

- HTTP API on `METADATA_PORT` (gateway, operator), `metadata.lookup` responder,
- the outbox relay publishing `metadata.changed`,
- bootstrap (migrations, built-in entity types, `KPI_DEFINITIONS_DIR`): tried once at start and
  retried in the background while PostgreSQL is unreachable, so the process never crashes on a
  database outage; it serves 503 / `unavailable` until the schema is ready.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Final

from aiohttp import web
from pydantic import Field

from analytics_engine.core.channels import METADATA_LOOKUP
from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.core.settings import BaseServiceSettings, DatabaseSettings
from analytics_engine.metadata.errors import StoreUnavailable
from analytics_engine.metadata.http_api import MetadataHttpApi
from analytics_engine.metadata.lookup import MetadataRequestHandler
from analytics_engine.metadata.outbox import OutboxRelay
from analytics_engine.metadata.seeding import seed
from analytics_engine.metadata.store import MetadataStore

log = logging.getLogger(__name__)

SERVICE = "metadata_service"


class Settings(BaseServiceSettings, DatabaseSettings):
    port: int = Field(
        default=8083,
        ge=0,
        le=65535,
        validation_alias="METADATA_PORT",
        description="Port of the metadata service's HTTP API (and `/healthz`, `/readyz`, "
        "`/metrics`).",
    )
    kpi_definitions_dir: Path | None = Field(
        default=None,
        validation_alias="KPI_DEFINITIONS_DIR",
        description="YAML KPI definitions (plain or KPIDefinition resources) applied at start: "
        "each at the first start and again once its file changed. A file unchanged since is left "
        "alone, so edits and deletions made through the API survive restarts.",
    )
    max_body_bytes: int = Field(
        default=256 * 1024,
        ge=1024,
        validation_alias="METADATA_MAX_BODY_BYTES",
        description="Largest accepted request body; larger ones get 413.",
    )
    db_pool_size: int = Field(
        default=10,
        ge=1,
        le=200,
        validation_alias="METADATA_DB_POOL_SIZE",
        description="Most PostgreSQL connections this instance holds at once.",
    )
    outbox_poll_interval_s: float = Field(
        default=1.0,
        gt=0,
        validation_alias="METADATA_OUTBOX_POLL_INTERVAL",
        description="How often the outbox is checked for events committed elsewhere (another "
        "replica, a crashed process); local commits are published at once.",
    )


class MetadataService:
    """Owns the store and the background work; the runtime calls its hooks."""

    def __init__(self, settings: Settings, runtime: ServiceRuntime) -> None:
        self.settings = settings
        self.store = MetadataStore(
            str(settings.database_url), max_connections=settings.db_pool_size
        )
        self.relay = OutboxRelay(
            self.store, runtime.publisher, poll_interval=settings.outbox_poll_interval_s
        )
        self.bootstrapped = asyncio.Event()

    async def start(self) -> None:
        await self.store.open()
        try:
            await self.bootstrap()
        except StoreUnavailable as exc:
            log.warning("database unavailable at start, will retry", extra={"error": str(exc)})

    async def stop(self) -> None:
        await self.store.close()

    async def bootstrap(self) -> None:
        """Migrate and seed (both idempotent)."""
        await self.store.migrate()
        await seed(self.store, self.settings.kpi_definitions_dir)
        self.bootstrapped.set()

    async def bootstrap_until_done(self) -> None:
        backoff = 0.5
        while not self.bootstrapped.is_set():
            await asyncio.sleep(backoff)
            try:
                await self.bootstrap()
            except StoreUnavailable as exc:
                log.warning("database still unavailable", extra={"error": str(exc)[:200]})
                backoff = min(backoff * 2, 10.0)

    async def ready(self) -> bool:
        return self.store.schema_ready and await self.store.ping()


SERVICE_KEY: Final = web.AppKey("metadata_service", MetadataService)
"""Where tests and tools find the composed service on `runtime.http`."""


def create(settings: Settings) -> ServiceRuntime:
    runtime = ServiceRuntime(
        service=SERVICE,
        settings=settings,
        port=settings.port,
        client_max_size=settings.max_body_bytes,
    )
    service = MetadataService(settings, runtime)
    MetadataHttpApi(service.store).register(runtime.http)
    runtime.respond(METADATA_LOOKUP, MetadataRequestHandler(service.store).handlers())
    runtime.on_startup(service.start)
    runtime.on_shutdown(service.stop)
    runtime.add_task("metadata-bootstrap", service.bootstrap_until_done)
    runtime.add_task("metadata-outbox", service.relay.run)
    runtime.add_readiness_check("database", service.ready)
    runtime.http[SERVICE_KEY] = service
    return runtime
