"""Composition of the API Gateway (`analytics-engine run gateway`).

The platform's only external HTTP interface: REST under `/api/v1` proxied to the business
services' HTTP APIs (metadata, calculation, simulator, observability) through one shared
`aiohttp.ClientSession`, live KPI values over Server-Sent Events from `kpi.calculated.*`, the
OpenAPI document and docs page, and the Demo UI at `/`.

Settings (environment variables):
  GATEWAY_PORT (8080), GATEWAY_API_KEYS (`key:scope,...`, scope read|admin; required unless
  GATEWAY_ALLOW_ANONYMOUS=true, a development-only switch that lets keyless requests act as
  admin), GATEWAY_RATE_LIMIT (requests/s per key) and GATEWAY_RATE_BURST, GATEWAY_CORS_ORIGINS
  (comma-separated origins or `*`; none by default), GATEWAY_MAX_BODY_BYTES,
  GATEWAY_UPSTREAM_TIMEOUT / GATEWAY_UPSTREAM_CONNECT_TIMEOUT, GATEWAY_SSE_* (buffer, heartbeat,
  retry, token TTL, per-client queue, streams open in total and per key), METADATA_URL,
  CALCULATION_URL, SIMULATOR_URL, OBSERVABILITY_URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import orjson
from aiohttp import web
from pydantic import Field, ValidationInfo, field_validator

from analytics_engine.core import channels
from analytics_engine.core.bus import LiveSubscription
from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.core.settings import BaseServiceSettings
from analytics_engine.gateway import ui
from analytics_engine.gateway.api import GatewayApi
from analytics_engine.gateway.auth import KeyRing, StreamTokens, parse_api_keys
from analytics_engine.gateway.live import LiveHub, StreamSlots
from analytics_engine.gateway.metrics import GatewayMetrics
from analytics_engine.gateway.middleware import Middlewares, parse_origins
from analytics_engine.gateway.openapi import build_document, operational_routes
from analytics_engine.gateway.ratelimit import RateLimiter
from analytics_engine.gateway.routes import RouteSpec, spec_index
from analytics_engine.gateway.upstream import Upstream, Upstreams

SERVICE: Final = "api_gateway"


class Settings(BaseServiceSettings):
    gateway_port: int = Field(
        default=8080,
        ge=0,
        le=65535,
        validation_alias="GATEWAY_PORT",
        description="Port of the gateway's HTTP server: the API under `/api/v1`, the UI at `/`, "
        "`/healthz`, `/readyz` and `/metrics`.",
    )
    allow_anonymous: bool = Field(
        default=False,
        validation_alias="GATEWAY_ALLOW_ANONYMOUS",
        description="Development only: requests without a key are served as admin.",
    )
    api_keys: str = Field(
        default="",
        validation_alias="GATEWAY_API_KEYS",
        repr=False,
        validate_default=True,
        description="Comma-separated `key:scope` pairs; scope `read` or `admin`.",
    )
    rate_limit: float = Field(
        default=50.0,
        gt=0,
        validation_alias="GATEWAY_RATE_LIMIT",
        description="Requests per second one API key may make, on average (a token bucket per "
        "key; keyless requests, when allowed, and requests refused with 401, per client "
        "address). Past it: 429 with `Retry-After`.",
    )
    rate_burst: int = Field(
        default=100,
        ge=1,
        validation_alias="GATEWAY_RATE_BURST",
        description="Size of each key's token bucket: requests a key that has been idle may "
        "make at once before `GATEWAY_RATE_LIMIT` paces it.",
    )
    cors_origins: str = Field(
        default="",
        validation_alias="GATEWAY_CORS_ORIGINS",
        description="Comma-separated browser origins allowed to call the API cross-origin "
        "(`*`: any). Empty: none, so only pages the gateway serves itself (the UI) can.",
    )
    max_body_bytes: int = Field(
        default=256 * 1024,
        ge=1024,
        validation_alias="GATEWAY_MAX_BODY_BYTES",
        description="Largest accepted request body, bytes; larger ones get 413.",
    )
    upstream_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        validation_alias="GATEWAY_UPSTREAM_TIMEOUT",
        description="Seconds a call to a business service (HTTP, or `get_entity` and "
        "`list_entities` to the database service over the bus) may take in all; then the "
        "client gets 504.",
    )
    upstream_connect_timeout_s: float = Field(
        default=2.0,
        gt=0,
        le=60,
        validation_alias="GATEWAY_UPSTREAM_CONNECT_TIMEOUT",
        description="Seconds to open a connection to a business service's HTTP API (504 past "
        "it); a refused connection is 503 at once.",
    )
    sse_buffer: int = Field(
        default=2000,
        ge=10,
        le=1_000_000,
        validation_alias="GATEWAY_SSE_BUFFER",
        description="Recent KPI results kept for SSE clients reconnecting with "
        "`Last-Event-ID`; one that missed more than these gets a `gap` event.",
    )
    sse_heartbeat_s: float = Field(
        default=15.0,
        gt=0,
        le=300,
        validation_alias="GATEWAY_SSE_HEARTBEAT",
        description="Seconds without a result after which an SSE stream gets a `: ping` "
        "comment, so proxies and clients keep the idle connection open; also how long a write "
        "to a stream may wait for a client that stopped reading before it is disconnected.",
    )
    sse_retry_ms: int = Field(
        default=3000,
        ge=100,
        le=600_000,
        validation_alias="GATEWAY_SSE_RETRY_MS",
        description="Reconnection delay (milliseconds) sent to SSE clients as `retry:`: how "
        "long a browser waits before reconnecting a dropped stream.",
    )
    sse_token_ttl_s: float = Field(
        default=300.0,
        ge=10,
        le=86_400,
        validation_alias="GATEWAY_SSE_TOKEN_TTL",
        description="Lifetime (seconds) of the read-only stream tokens `POST /api/v1/sse-token` "
        "issues for the SSE routes' `?token=`.",
    )
    sse_client_queue: int = Field(
        default=1000,
        ge=10,
        le=100_000,
        validation_alias="GATEWAY_SSE_CLIENT_QUEUE",
        description="KPI results queued per SSE client; a client this far behind is "
        "disconnected (it reconnects and catches up from `GATEWAY_SSE_BUFFER`).",
    )
    sse_max_clients: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        validation_alias="GATEWAY_SSE_MAX_CLIENTS",
        description="Streams this gateway serves at once; more get 503.",
    )
    sse_max_per_key: int = Field(
        default=100,
        ge=1,
        le=1_000_000,
        validation_alias="GATEWAY_SSE_MAX_PER_KEY",
        description="Streams one key (with its tokens) holds open at once; more get 429.",
    )
    metadata_url: str = Field(
        default="http://localhost:8083",
        validation_alias="METADATA_URL",
        pattern=r"^https?://",
        description="Base URL of the metadata service's HTTP API (KPI definitions and entity "
        "types are proxied there).",
    )
    calculation_url: str = Field(
        default="http://localhost:8082",
        validation_alias="CALCULATION_URL",
        pattern=r"^https?://",
        description="Base URL of the calculation engine's HTTP API (KPI list, latest values, "
        "history).",
    )
    simulator_url: str = Field(
        default="http://localhost:8081",
        validation_alias="SIMULATOR_URL",
        pattern=r"^https?://",
        description="Base URL of the simulator's HTTP API (its status, start, stop and rate).",
    )
    observability_url: str = Field(
        default="http://localhost:8086",
        validation_alias="OBSERVABILITY_URL",
        pattern=r"^https?://",
        description="Base URL of the observability service's HTTP API (`/api/v1/status`).",
    )

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, value: str, info: ValidationInfo) -> str:
        keys = parse_api_keys(value)  # ValueError names the pair's position, never the key
        if not keys and not info.data.get("allow_anonymous", False):
            raise ValueError(
                "no API keys configured: set key:scope pairs (scope read or admin), or "
                "GATEWAY_ALLOW_ANONYMOUS=true for local development only"
            )
        return value


@dataclass(frozen=True)
class Gateway:
    """The composed gateway, with handles on its parts (tests use them)."""

    runtime: ServiceRuntime
    hub: LiveHub
    specs: tuple[RouteSpec, ...]
    document: dict[str, object]
    limiter: RateLimiter
    live: LiveSubscription


GATEWAY_KEY: Final = web.AppKey("gateway", Gateway)


def create(settings: Settings) -> ServiceRuntime:
    return build(settings).runtime


def build(settings: Settings) -> Gateway:
    runtime = ServiceRuntime(
        service=SERVICE,
        settings=settings,
        port=settings.gateway_port,
        client_max_size=settings.max_body_bytes,
    )
    metrics = GatewayMetrics(runtime.metrics.registry)
    keys = KeyRing(parse_api_keys(settings.api_keys))
    tokens = StreamTokens(keys.token_secret(), ttl_s=settings.sse_token_ttl_s)
    limiter = RateLimiter(rate=settings.rate_limit, burst=settings.rate_burst)
    hub = LiveHub(ring_size=settings.sse_buffer, client_queue=settings.sse_client_queue)
    upstreams = Upstreams(
        timeout_s=settings.upstream_timeout_s,
        connect_timeout_s=settings.upstream_connect_timeout_s,
    )

    def upstream(name: str, url: str) -> Upstream:
        return Upstream(name, url, upstreams, metrics)

    def on_result(channel: bytes, data: bytes) -> None:
        metrics.sse_results.inc()
        hub.on_message(channel, data)

    live = runtime.listen(on_result, patterns=[f"{channels.KPI_CALCULATED_PREFIX}*"])

    api = GatewayApi(
        metadata=upstream("metadata", settings.metadata_url),
        calculation=upstream("calculation", settings.calculation_url),
        simulator=upstream("simulator", settings.simulator_url),
        observability=upstream("observability", settings.observability_url),
        requests=runtime.requests,
        hub=hub,
        tokens=tokens,
        metrics=metrics,
        slots=StreamSlots(max_total=settings.sse_max_clients, max_per_key=settings.sse_max_per_key),
        bus_timeout_s=settings.upstream_timeout_s,
        sse_heartbeat_s=settings.sse_heartbeat_s,
        sse_retry_ms=settings.sse_retry_ms,
        bus_connected=live.subscribed.is_set,
    )
    document: dict[str, object] = {}
    document_bytes: list[bytes] = []

    async def openapi(_: web.Request) -> web.Response:
        return web.Response(body=document_bytes[0], content_type="application/json")

    specs = tuple(api.routes() + operational_routes(openapi, ui.docs))
    document.update(build_document(specs))
    document_bytes.append(orjson.dumps(document))

    Middlewares(
        specs=spec_index(specs),
        keys=keys,
        tokens=tokens,
        limiter=limiter,
        metrics=metrics,
        cors=parse_origins(settings.cors_origins),
        allow_anonymous=settings.allow_anonymous,
    ).install(runtime.http)
    runtime.http.on_response_prepare.append(ui.add_asset_headers)
    for spec in specs:
        spec.register(runtime.http)
    ui.add_ui_routes(runtime.http)

    async def close_streams(_: web.Application) -> None:
        hub.close()

    runtime.on_startup(upstreams.start)
    # The upstream session closes once the HTTP requests in flight are done (the runtime drains
    # them first); SSE streams never finish on their own, so they end when HTTP shuts down.
    runtime.on_shutdown(upstreams.close)
    runtime.http.on_shutdown.append(close_streams)
    gateway = Gateway(runtime, hub, specs, document, limiter, live)
    runtime.http[GATEWAY_KEY] = gateway
    return gateway
