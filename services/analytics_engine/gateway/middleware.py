"""The gateway's aiohttp middlewares, outermost first:

request id -> CORS (preflight) -> metrics -> errors -> auth -> rate limit -> handler.

Response headers that must be on every response, streams included (`X-Request-ID`, CORS), are
added in `on_response_prepare`, which runs before headers are sent even for a
`StreamResponse`; middlewares would see a stream only after it ended.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from analytics_engine.core.logs import correlation_id_var
from analytics_engine.gateway.api import PRINCIPAL_KEY, REQUEST_ID_KEY
from analytics_engine.gateway.auth import (
    ANONYMOUS_ID,
    KeyRing,
    Principal,
    StreamTokens,
    allows,
    presented_key,
)
from analytics_engine.gateway.errors import REASON_CODES, ApiError, error_response
from analytics_engine.gateway.metrics import GatewayMetrics
from analytics_engine.gateway.ratelimit import RateLimiter, retry_after_header
from analytics_engine.gateway.routes import RouteSpec

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID_HEADER: Final = "X-Request-ID"
API_PREFIX: Final = "/api/"
_REQUEST_ID_RE: Final = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
ALLOWED_HEADERS: Final = (
    "Authorization, X-API-Key, Content-Type, If-Match, If-None-Match, X-Request-ID, Last-Event-ID"
)
EXPOSED_HEADERS: Final = "X-Request-ID, ETag, Retry-After"
SPEC_KEY: Final = web.RequestKey("gateway.spec", RouteSpec)
UNAUTHENTICATED_ID: Final = "unauthenticated"
"""Rate-limit bucket (per client address) and metric label of requests refused with 401."""


def route_template(request: web.Request) -> str | None:
    """The matched route's path template (`/api/v1/kpis/{code}/latest`), None when unmatched."""
    match_info = request.match_info
    if match_info.http_exception is not None:
        return None
    resource = match_info.route.resource
    return resource.canonical if resource is not None else None


def valid_request_id(value: str | None) -> str | None:
    return value if value is not None and _REQUEST_ID_RE.match(value) else None


@dataclass(frozen=True)
class Cors:
    origins: frozenset[str]

    @property
    def any_origin(self) -> bool:
        return "*" in self.origins

    def allowed(self, origin: str | None) -> bool:
        return origin is not None and (self.any_origin or origin in self.origins)


def parse_origins(text: str) -> Cors:
    return Cors(frozenset(o.strip().rstrip("/") for o in text.split(",") if o.strip()))


class Middlewares:
    def __init__(
        self,
        *,
        specs: Mapping[tuple[str, str], RouteSpec],
        keys: KeyRing,
        tokens: StreamTokens,
        limiter: RateLimiter,
        metrics: GatewayMetrics,
        cors: Cors,
        allow_anonymous: bool,
    ) -> None:
        self._specs = specs
        self._keys = keys
        self._tokens = tokens
        self._limiter = limiter
        self._metrics = metrics
        self._cors = cors
        self._anonymous = allow_anonymous

    def install(self, app: web.Application) -> None:
        app.middlewares.extend(self.all())
        app.on_response_prepare.append(self.on_prepare)

    def all(self) -> Sequence[Callable[..., Awaitable[web.StreamResponse]]]:
        return [
            self.request_id,
            self.cors_preflight,
            self.measure,
            self.errors,
            self.authenticate,
            self.rate_limit,
        ]

    # -- request id -----------------------------------------------------------------------
    @web.middleware
    async def request_id(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = valid_request_id(request.headers.get(REQUEST_ID_HEADER)) or uuid.uuid4().hex
        request[REQUEST_ID_KEY] = rid
        token = correlation_id_var.set(rid)
        try:
            return await handler(request)
        finally:
            correlation_id_var.reset(token)

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        rid = request.get(REQUEST_ID_KEY)
        if isinstance(rid, str):
            response.headers[REQUEST_ID_HEADER] = rid
        if request.path.startswith(API_PREFIX):
            # API answers are per key and change all the time: never stored by a cache; those
            # with an entity tag may be kept privately and revalidated (If-None-Match -> 304).
            response.headers.setdefault("X-Content-Type-Options", "nosniff")
            cache = "private, no-cache" if "ETag" in response.headers else "no-store"
            response.headers.setdefault("Cache-Control", cache)
        origin = request.headers.get("Origin")
        if self._cors.allowed(origin):
            response.headers["Access-Control-Allow-Origin"] = (
                "*" if self._cors.any_origin else str(origin)
            )
            response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
            if not self._cors.any_origin:
                response.headers.add("Vary", "Origin")

    # -- CORS -----------------------------------------------------------------------------
    @web.middleware
    async def cors_preflight(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return await handler(request)
        if not self._cors.allowed(request.headers.get("Origin")):
            return error_response(403, "cors_forbidden", "this origin is not allowed")
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": "GET, PUT, POST, DELETE, OPTIONS",
                "Access-Control-Allow-Headers": ALLOWED_HEADERS,
                "Access-Control-Max-Age": "600",
            },
        )

    # -- metrics --------------------------------------------------------------------------
    @web.middleware
    async def measure(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            route = route_template(request) or "unmatched"
            self._metrics.requests.labels(route, request.method, str(status)).inc()
            spec = self._specs.get((request.method, route))
            if spec is None or not spec.stream:
                self._metrics.latency.labels(route, request.method).observe(
                    time.perf_counter() - started
                )

    # -- errors ---------------------------------------------------------------------------
    @web.middleware
    async def errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every failure becomes the JSON error shape; nothing escapes as a stack trace."""
        try:
            if "\x00" in request.path or any(
                "\x00" in name or "\x00" in value for name, value in request.query.items()
            ):
                # No service stores NUL characters (PostgreSQL text cannot): refuse at the door,
                # in names too (`dimension.<name>` becomes a jsonb key).
                raise ApiError(400, "NUL characters are not accepted", code="bad_request")
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = REASON_CODES.get(exc.status, "error")
            message = exc.reason
            if isinstance(exc, web.HTTPRequestEntityTooLarge):
                message = "request body too large"
            elif exc.status == 404:
                message = f"no route for {request.path}"
            elif exc.status == 405:
                message = f"{request.method} is not allowed on {request.path}"
            headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
            return error_response(exc.status, code, message, headers=headers)
        except Exception:
            log.exception("unhandled error", extra={"path": request.path})
            return error_response(500, "internal", "internal error")

    # -- auth -----------------------------------------------------------------------------
    @web.middleware
    async def authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = route_template(request)
        spec = self._specs.get((request.method, route)) if route is not None else None
        if spec is None or spec.scope is None:
            return await handler(request)
        request[SPEC_KEY] = spec
        who = self._identify(request, spec)
        if who is None:
            # Refusals are rate-limited too, per client address: otherwise anyone could try
            # keys (or flood the log with "unknown API key") as fast as the gateway answers.
            self._limit(UNAUTHENTICATED_ID, f"{UNAUTHENTICATED_ID}:{request.remote}")
            raise ApiError(
                401,
                "an API key is required: Authorization: Bearer <key> or X-API-Key: <key>",
                code="unauthorized",
                headers={"WWW-Authenticate": 'Bearer realm="analytics-engine"'},
            )
        if not allows(who.scope, spec.scope):
            log.info("forbidden", extra={"key_id": who.key_id, "route": spec.path})
            raise ApiError(403, f"this needs a key with scope {spec.scope!r}", code="forbidden")
        request[PRINCIPAL_KEY] = who
        return await handler(request)

    def _identify(self, request: web.Request, spec: RouteSpec) -> Principal | None:
        key = presented_key(request.headers.items())
        if key is not None:
            found = self._keys.authenticate(key)
            if found is None:
                log.info("unknown API key", extra={"path": request.path})
            return found
        if spec.stream and "token" in request.query:
            return self._tokens.verify(request.query["token"], now=time.time())
        if self._anonymous:
            return Principal(ANONYMOUS_ID, "admin")
        return None

    # -- rate limit -----------------------------------------------------------------------
    @web.middleware
    async def rate_limit(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        who = request.get(PRINCIPAL_KEY)
        if not isinstance(who, Principal):
            return await handler(request)
        bucket = who.key_id
        if who.key_id == ANONYMOUS_ID:
            bucket = f"{ANONYMOUS_ID}:{request.remote}"
        self._limit(who.key_id, bucket)
        return await handler(request)

    def _limit(self, key_id: str, bucket: str) -> None:
        """Take a token from `bucket`; 429 with `Retry-After` when it is empty."""
        wait = self._limiter.acquire(bucket, now=time.monotonic())
        if wait > 0:
            self._metrics.rate_limited.labels(key_id).inc()
            raise ApiError(
                429,
                f"rate limit of {self._limiter.rate:g} requests/s exceeded",
                code="rate_limited",
                headers={"Retry-After": retry_after_header(wait)},
            )
