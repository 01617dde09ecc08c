"""The REST and SSE handlers of the gateway and their route declarations.

Business data comes from the business services' HTTP APIs (metadata, calculation, simulator,
observability); entity state has no business service, so it is the one read made directly on
the bus (`database.query`: `get_entity`, `list_entities`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from analytics_engine.core import channels
from analytics_engine.core.bus import REDIS_ERRORS
from analytics_engine.core.envelopes import new_id
from analytics_engine.core.errors import NoResponder, RemoteError, RequestError, RequestTimeout
from analytics_engine.core.jsontext import contains_nul
from analytics_engine.core.payloads import ENTITY_PAGE_DEFAULT, ENTITY_PAGE_LIMIT
from analytics_engine.core.request_reply import RequestReplyClient
from analytics_engine.gateway.auth import ANONYMOUS_ID, Principal, StreamTokens
from analytics_engine.gateway.errors import ApiError, json_response
from analytics_engine.gateway.live import (
    LiveHub,
    LiveResult,
    StreamSlots,
    parse_last_event_id,
    sse_comment,
    sse_retry,
)
from analytics_engine.gateway.metrics import GatewayMetrics
from analytics_engine.gateway.routes import (
    KPI_CODE_REGEX,
    NAME_REGEX,
    RouteSpec,
    errors,
    ref,
)
from analytics_engine.gateway.upstream import Upstream
from analytics_engine.kpi.history_query import (
    DIMENSION_PREFIX,
    HISTORY_LIMIT,
    HISTORY_PARAMETERS,
    InvalidHistoryQuery,
    dimension_name,
    parse_history_query,
    parse_limit,
)

log = logging.getLogger(__name__)

PRINCIPAL_KEY: Final = web.RequestKey("gateway.principal", Principal)
REQUEST_ID_KEY: Final = web.RequestKey("gateway.request_id", str)
STREAM_BATCH: Final = 256
"""Most SSE frames written in one `write()` when results arrive in a burst."""

_IF_MATCH: Final = {
    "name": "If-Match",
    "in": "header",
    "required": False,
    "description": 'Entity tag from a previous GET (`"<version>"`); 412 when it is stale.',
    "schema": {"type": "string"},
}


_IF_NONE_MATCH: Final = {
    "name": "If-None-Match",
    "in": "header",
    "required": False,
    "description": 'Entity tag from a previous GET (`"<version>"`); 304 without a body while '
    "the stored version is still that one.",
    "schema": {"type": "string"},
}


def request_id(request: web.Request) -> str:
    value = request.get(REQUEST_ID_KEY)
    return value if isinstance(value, str) else new_id()


def principal(request: web.Request) -> Principal | None:
    value = request.get(PRINCIPAL_KEY)
    return value if isinstance(value, Principal) else None


async def read_json_body(request: web.Request) -> bytes:
    """The raw body after checking that it is JSON (400 otherwise; 413 past the size limit)."""
    try:
        raw = await request.read()
    except web.RequestPayloadError as exc:
        # The body's framing or `Content-Encoding` is broken (gzip that is not gzip, a cut
        # chunk): the client's fault, not an internal error.
        cause = exc.__cause__
        reason = cause.message if isinstance(cause, HttpProcessingError) else str(exc)
        raise ApiError(
            400, f"the body cannot be read: {reason.strip() or 'malformed'}", code="bad_request"
        ) from None
    if not raw.strip():
        raise ApiError(400, "a JSON body is required", code="bad_request")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"malformed JSON body: {exc}", code="bad_request") from None
    if contains_nul(body):
        # PostgreSQL text and jsonb cannot hold NUL: refuse it here rather than fail later.
        # The decoded values, not the bytes: `"\\\\u0000"` is a backslash and "u0000".
        raise ApiError(400, "NUL characters (\\u0000) are not accepted", code="bad_request")
    return raw


class _Stalled(Exception):
    """An SSE client stopped reading: a write did not complete within the heartbeat interval."""


def _refuse_repeated(query: Mapping[str, str]) -> None:
    """A query parameter (or history dimension, in either spelling) given more than once is
    ambiguous: the checks read the first value, the engine would get the last. Raises
    `InvalidHistoryQuery`."""
    seen: set[str] = set()
    problems: list[dict[str, str]] = []
    for name, _ in query.items():  # a MultiDict's items repeat a name; iterating it does not
        dimension = dimension_name(name)
        field = name if dimension is None else f"{DIMENSION_PREFIX}{dimension}"
        if field in seen and not any(p["field"] == field for p in problems):
            problems.append({"field": field, "message": "given more than once"})
        seen.add(field)
    if problems:
        raise InvalidHistoryQuery(problems)


_ENTITY_LIST_PARAMETERS: Final = ("active", "after", "limit")
_MAX_ENTITY_ID: Final = 200
"""The longest entity id the database stores (`EntityEvent.entity_id`)."""


def _entity_list_payload(entity_type: str, query: Mapping[str, str]) -> dict[str, Any]:
    """The `list_entities` payload of `GET /api/v1/entities/{entity_type}`'s query, every
    problem reported at once. Raises `InvalidHistoryQuery` (the same `{field, message}` list
    as history's): an unknown parameter, a misspelt `active` say, would list everything."""
    problems: list[dict[str, str]] = []
    payload: dict[str, Any] = {"entity_type": entity_type}
    active = query.get("active")
    if active is not None:
        if active not in ("true", "false"):
            problems.append({"field": "active", "message": "must be true or false"})
        payload["active"] = active == "true"
    after = query.get("after")
    if after is not None:
        if not 1 <= len(after) <= _MAX_ENTITY_ID:  # NUL: refused for every route (400)
            problems.append(
                {"field": "after", "message": f"must be 1 to {_MAX_ENTITY_ID} characters long"}
            )
        payload["after"] = after
    if "limit" in query:
        try:
            payload["limit"] = parse_limit(query["limit"], ENTITY_PAGE_LIMIT)
        except InvalidHistoryQuery as exc:
            problems.extend(exc.problems)
    problems.extend(
        {"field": name, "message": "unknown parameter: expected active, after or limit"}
        for name in query
        if name not in _ENTITY_LIST_PARAMETERS
    )
    if problems:
        raise InvalidHistoryQuery(problems)
    return payload


def _invalid_query(exc: InvalidHistoryQuery) -> ApiError:
    return ApiError(422, str(exc), code="validation_error", details=exc.problems)


def _passthrough_headers(request: web.Request, names: tuple[str, ...]) -> dict[str, str]:
    return {name: request.headers[name] for name in names if name in request.headers}


class GatewayApi:
    def __init__(
        self,
        *,
        metadata: Upstream,
        calculation: Upstream,
        simulator: Upstream,
        observability: Upstream,
        requests: RequestReplyClient,
        hub: LiveHub,
        tokens: StreamTokens,
        metrics: GatewayMetrics,
        slots: StreamSlots,
        bus_timeout_s: float,
        sse_heartbeat_s: float,
        sse_retry_ms: int,
        bus_connected: Callable[[], bool] = lambda: True,
    ) -> None:
        self._metadata = metadata
        self._calculation = calculation
        self._simulator = simulator
        self._observability = observability
        self._requests = requests
        self._hub = hub
        self._tokens = tokens
        self._metrics = metrics
        self._slots = slots
        self._bus_timeout = bus_timeout_s
        self._heartbeat = sse_heartbeat_s
        self._retry_ms = sse_retry_ms
        self._bus_connected = bus_connected

    # -- KPI definitions (metadata service) -------------------------------------------------
    async def list_definitions(self, request: web.Request) -> web.Response:
        query = {k: v for k, v in request.query.items() if k == "entity_type"}
        return await self._metadata.call(
            "GET", "/api/v1/kpi-definitions", query=query, request_id=request_id(request)
        )

    async def get_definition(self, request: web.Request) -> web.Response:
        code = request.match_info["code"]
        return await self._metadata.call(
            "GET",
            f"/api/v1/kpi-definitions/{code}",
            request_id=request_id(request),
            headers=_passthrough_headers(request, ("If-None-Match",)),
        )

    async def put_definition(self, request: web.Request) -> web.Response:
        code = request.match_info["code"]
        body = await read_json_body(request)
        return await self._metadata.call(
            "PUT",
            f"/api/v1/kpi-definitions/{code}",
            body=body,
            request_id=request_id(request),
            headers=_passthrough_headers(request, ("If-Match", "If-None-Match")),
        )

    async def delete_definition(self, request: web.Request) -> web.Response:
        code = request.match_info["code"]
        return await self._metadata.call(
            "DELETE",
            f"/api/v1/kpi-definitions/{code}",
            request_id=request_id(request),
            headers=_passthrough_headers(request, ("If-Match",)),
        )

    async def list_entity_types(self, request: web.Request) -> web.Response:
        return await self._metadata.call(
            "GET", "/api/v1/entity-types", request_id=request_id(request)
        )

    # -- KPI values (calculation engine) ----------------------------------------------------
    async def list_kpis(self, request: web.Request) -> web.Response:
        return await self._calculation.call("GET", "/api/v1/kpis", request_id=request_id(request))

    async def latest(self, request: web.Request) -> web.Response:
        code = request.match_info["code"]
        return await self._calculation.call(
            "GET", f"/api/v1/kpis/{code}/latest", request_id=request_id(request)
        )

    async def history(self, request: web.Request) -> web.Response:
        code = request.match_info["code"]
        try:  # at the edge: nothing out of range travels further
            _refuse_repeated(request.query)
            parsed = parse_history_query(request.query)
        except InvalidHistoryQuery as exc:
            raise _invalid_query(exc) from None
        query = {k: v for k, v in request.query.items() if k in HISTORY_PARAMETERS}
        # Either spelling of a dimension filter goes on as `dimension.<name>`.
        query.update({f"{DIMENSION_PREFIX}{k}": v for k, v in parsed.dimensions.items()})
        return await self._calculation.call(
            "GET", f"/api/v1/kpis/{code}/history", query=query, request_id=request_id(request)
        )

    # -- simulator --------------------------------------------------------------------------
    async def simulator_status(self, request: web.Request) -> web.Response:
        return await self._simulator.call(
            "GET", "/api/v1/simulator", request_id=request_id(request)
        )

    async def simulator_start(self, request: web.Request) -> web.Response:
        return await self._simulator.call(
            "POST", "/api/v1/simulator/start", request_id=request_id(request)
        )

    async def simulator_stop(self, request: web.Request) -> web.Response:
        return await self._simulator.call(
            "POST", "/api/v1/simulator/stop", request_id=request_id(request)
        )

    async def simulator_rate(self, request: web.Request) -> web.Response:
        body = await read_json_body(request)
        return await self._simulator.call(
            "PUT", "/api/v1/simulator/rate", body=body, request_id=request_id(request)
        )

    # -- platform status (observability) ----------------------------------------------------
    async def platform_status(self, request: web.Request) -> web.Response:
        return await self._observability.call(
            "GET", "/api/v1/status", request_id=request_id(request)
        )

    # -- entities (bus: database.query) ------------------------------------------------------
    async def entity(self, request: web.Request) -> web.Response:
        entity_type = request.match_info["entity_type"]
        entity_id = request.match_info["entity_id"]
        reply = await self._query_database(
            request, "get_entity", {"entity_type": entity_type, "entity_id": entity_id}
        )
        entity = reply.get("entity")
        if not isinstance(entity, dict):
            raise ApiError(404, f"entity {entity_type}/{entity_id} not found", code="not_found")
        return json_response(entity)

    async def list_entities(self, request: web.Request) -> web.Response:
        try:  # at the edge: nothing out of range travels further
            _refuse_repeated(request.query)
            payload = _entity_list_payload(request.match_info["entity_type"], request.query)
        except InvalidHistoryQuery as exc:
            raise _invalid_query(exc) from None
        reply = await self._query_database(request, "list_entities", payload)
        return json_response(
            {"items": reply.get("rows", []), "next_after": reply.get("next_after")}
        )

    async def _query_database(
        self, request: web.Request, request_type: str, payload: dict[str, Any]
    ) -> dict[str, Any]:
        """The reply of a `database.query` request, or the `ApiError` that says whose fault
        it is that there is none."""
        # The request id prefixes the bus correlation id (logs join up), made unique per call:
        # responders claim requests by correlation id, so a client reusing an X-Request-ID must
        # not collide with its own earlier request.
        correlation_id = f"{request_id(request)}.{new_id()[:8]}"
        if not self._bus_connected():
            # Redis is down (the gateway's own subscription lost it): say so now rather than
            # wait out the request timeout for a 504.
            raise _bus_unreachable()
        try:
            return await self._requests.request(
                channels.DATABASE_QUERY,
                request_type,
                payload,
                timeout=self._bus_timeout,
                correlation_id=correlation_id,
            )
        except RequestError as exc:
            raise _bus_error(exc, "database") from None
        except REDIS_ERRORS:  # lost before the subscription noticed
            raise _bus_unreachable() from None

    # -- live values (SSE) ------------------------------------------------------------------
    async def stream_all(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, None)

    async def stream_kpi(self, request: web.Request) -> web.StreamResponse:
        code = request.match_info["code"]
        # Before taking a slot: a refused stream holds none, and none waits on metadata.
        await self._refuse_undefined(request, code)
        return await self._stream(request, code)

    async def _refuse_undefined(self, request: web.Request, code: str) -> None:
        """404 for a KPI the metadata service says is not defined: a stream for it would stay
        silent forever, so a typo in a client's URL would look like a quiet KPI. When metadata
        cannot say (unreachable, slow, failing), the stream opens anyway: live values must not
        depend on the metadata service being up."""
        try:
            reply = await self._metadata.call(
                "GET", f"/api/v1/kpi-definitions/{code}", request_id=request_id(request)
            )
        except ApiError as exc:  # unreachable, timeout, 5xx, an answer not in metadata's shape
            status, answered = exc.status, False
        else:
            status, answered = reply.status, True
        if answered and status == 404:  # metadata's own answer: no such definition
            raise ApiError(404, f"KPI {code!r} is not defined", code="not_found")
        if status >= 400:  # also a 503/504 relayed in metadata's error shape
            log.info(
                "metadata cannot say whether the KPI exists; streaming it unchecked",
                extra={"kpi_code": code, "status": status},
            )

    async def _stream(self, request: web.Request, kpi_code: str | None) -> web.StreamResponse:
        last_id = parse_last_event_id(
            request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
        )
        owner = _stream_owner(request)
        refused = self._slots.acquire(owner)
        if refused == "key":
            raise ApiError(
                429,
                f"this key already has {self._slots.max_per_key} streams open; close one first",
                code="too_many_streams",
                headers={"Retry-After": "5"},
            )
        if refused == "total":
            raise ApiError(
                503,
                f"the gateway serves at most {self._slots.max_total} streams; try again later",
                code="too_many_streams",
                headers={"Retry-After": "5"},
            )
        try:
            return await self._serve_stream(request, kpi_code, last_id)
        finally:
            self._slots.release(owner)

    async def _serve_stream(
        self, request: web.Request, kpi_code: str | None, last_id: int | None
    ) -> web.StreamResponse:
        client = self._hub.connect(kpi_code)  # before replaying: nothing falls in between
        self._metrics.sse_clients.inc()
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache, no-transform",
                "X-Accel-Buffering": "no",
            }
        )
        resume = self._hub.ring.resume(last_id)
        sent = resume.after
        try:
            await response.prepare(request)
            head = [sse_retry(self._retry_ms)]
            if last_id is None:
                head.append(sse_comment("connected"))
            if resume.gap:
                oldest = self._hub.ring.oldest_id
                head.append(b"event: gap\ndata: %s\n\n" % orjson.dumps({"oldest_id": oldest}))
            for item in self._hub.ring.after(resume.after, kpi_code):
                head.append(item.frame)
                sent = item.id
            await self._write(response, b"".join(head))
            await self._pump(response, client.queue, sent)
        except _Stalled:
            # Its socket buffers are full and stay full: a write would wait forever, holding
            # the connection and the stream slot. Drop the connection; nothing more to send.
            log.info("cut off an SSE client that stopped reading")
            if request.transport is not None:
                request.transport.abort()
            return response
        except (ConnectionError, asyncio.CancelledError):
            # The client went away (a write blocked on a full buffer fails with a plain
            # ConnectionError "Connection lost", not a reset), or we are shutting down.
            pass
        finally:
            self._hub.disconnect(client)
            self._metrics.sse_clients.dec()
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write_eof()
        return response

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:
        """Write to a stream; `_Stalled` when the client does not take it within a heartbeat
        interval (a write waits while the socket's buffers are full)."""
        try:
            async with asyncio.timeout(self._heartbeat):
                await response.write(data)
        except TimeoutError:
            raise _Stalled from None

    async def _pump(
        self, response: web.StreamResponse, queue: asyncio.Queue[LiveResult | None], sent: int
    ) -> None:
        while True:
            try:
                async with asyncio.timeout(self._heartbeat):
                    item = await queue.get()
            except TimeoutError:
                await self._write(response, sse_comment("ping"))
                continue
            frames: list[bytes] = []
            while item is not None:
                if item.id > sent:
                    frames.append(item.frame)
                    sent = item.id
                if len(frames) >= STREAM_BATCH or queue.empty():
                    break
                item = queue.get_nowait()
            if frames:
                await self._write(response, b"".join(frames))
            if item is None:
                return  # dropped (too slow) or shutting down: the client reconnects

    async def stream_token(self, request: web.Request) -> web.Response:
        who = principal(request)
        if who is None:  # pragma: no cover - the auth middleware guarantees one
            raise ApiError(401, "an API key is required")
        token, expires = self._tokens.issue(who, now=time.time())
        return json_response(
            {"token": token, "expires_in": int(self._tokens.ttl_s), "expires_at": int(expires)},
            status=201,
        )

    async def me(self, request: web.Request) -> web.Response:
        who = principal(request)
        if who is None:  # pragma: no cover
            raise ApiError(401, "an API key is required")
        return json_response({"key_id": who.key_id, "scope": who.scope})

    # -- the route table --------------------------------------------------------------------
    def routes(self) -> list[RouteSpec]:
        code = {"code": KPI_CODE_REGEX}
        history_query = [
            _query("start", "Window start, inclusive (ISO 8601)", {"type": "string"}, True),
            _query("end", "Window end, exclusive (ISO 8601)", {"type": "string"}, True),
            _query(
                "limit",
                "Most rows (default 1000), the oldest windows first; `truncated` is true when"
                " the range holds more",
                {"type": "integer", "minimum": 1, "maximum": HISTORY_LIMIT},
                False,
            ),
            {
                "name": "dimension",
                "in": "query",
                "required": False,
                "style": "deepObject",
                "explode": True,
                "description": "Filter by dimension: `dimension[<name>]=<value>` or "
                "`dimension.<name>=<value>` (repeatable, one value per name). Any other "
                "parameter, or one given twice, is a 422.",
                "schema": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        ]
        last_event_id = [
            {
                "name": "Last-Event-ID",
                "in": "header",
                "required": False,
                "description": "Replay the results after this id (sent by EventSource on "
                "reconnect).",
                "schema": {"type": "string"},
            }
        ]
        stream_query = [
            _query(
                "token",
                "Stream token from POST /api/v1/sse-token (for EventSource, "
                "which cannot send headers)",
                {"type": "string"},
                False,
            ),
            _query("last_event_id", "Same as the Last-Event-ID header", {"type": "string"}, False),
        ]
        sse_ok = {200: ("`text/event-stream`: `event: kpi` messages, `id` increasing", None)}
        return [
            RouteSpec(
                "GET",
                "/api/v1/kpi-definitions",
                "listKpiDefinitions",
                "List KPI definitions",
                "KPI definitions",
                "read",
                self.list_definitions,
                query=[_query("entity_type", "Only this entity type", {"type": "string"}, False)],
                responses={
                    200: ("Definitions", ref("KPIDefinitionList")),
                    **errors(401, 429, 502, 503, 504),
                },
            ),
            RouteSpec(
                "GET",
                "/api/v1/kpi-definitions/{code}",
                "getKpiDefinition",
                "Get a KPI definition (ETag: its version)",
                "KPI definitions",
                "read",
                self.get_definition,
                path_patterns=code,
                request_headers=[_IF_NONE_MATCH],
                responses={
                    200: ("The definition", ref("StoredKPIDefinition")),
                    304: ("Not modified: If-None-Match holds the stored version", None),
                    **errors(401, 404, 429, 502, 503, 504),
                },
            ),
            RouteSpec(
                "PUT",
                "/api/v1/kpi-definitions/{code}",
                "putKpiDefinition",
                "Create or replace a KPI definition",
                "KPI definitions",
                "admin",
                self.put_definition,
                path_patterns=code,
                request_headers=[_IF_MATCH],
                body=ref("KPIDefinition"),
                responses={
                    200: ("Replaced (or unchanged)", ref("StoredKPIDefinition")),
                    201: ("Created", ref("StoredKPIDefinition")),
                    **errors(400, 401, 403, 412, 413, 422, 429, 502, 503, 504),
                },
                description="Idempotent: an identical definition keeps its version. "
                "422 lists field errors in `error.details`.",
            ),
            RouteSpec(
                "DELETE",
                "/api/v1/kpi-definitions/{code}",
                "deleteKpiDefinition",
                "Delete a KPI definition",
                "KPI definitions",
                "admin",
                self.delete_definition,
                path_patterns=code,
                request_headers=[_IF_MATCH],
                responses={
                    204: ("Deleted", None),
                    **errors(401, 403, 404, 412, 429, 502, 503, 504),
                },
            ),
            RouteSpec(
                "GET",
                "/api/v1/entity-types",
                "listEntityTypes",
                "List entity types (what KPIs can aggregate)",
                "KPI definitions",
                "read",
                self.list_entity_types,
                responses={
                    200: ("Entity types", ref("ItemList")),
                    **errors(401, 429, 502, 503, 504),
                },
            ),
            RouteSpec(
                "GET",
                "/api/v1/kpis",
                "listKpis",
                "KPIs the engine runs, with status",
                "KPI values",
                "read",
                self.list_kpis,
                responses={200: ("KPIs", ref("ItemList")), **errors(401, 429, 502, 503, 504)},
            ),
            RouteSpec(
                "GET",
                "/api/v1/kpis/{code}/latest",
                "getLatestKpiValues",
                "Latest value per group",
                "KPI values",
                "read",
                self.latest,
                path_patterns=code,
                responses={
                    200: ("Latest results", ref("LatestValues")),
                    **errors(401, 404, 429, 502, 503, 504),
                },
            ),
            RouteSpec(
                "GET",
                "/api/v1/kpis/{code}/history",
                "getKpiHistory",
                "Results in a time range, optionally filtered by dimensions",
                "KPI values",
                "read",
                self.history,
                path_patterns=code,
                query=history_query,
                responses={
                    200: ("Results, oldest first", ref("History")),
                    **errors(401, 404, 422, 429, 502, 503, 504),
                },
            ),
            RouteSpec(
                "GET",
                "/api/v1/kpis/{code}/stream",
                "streamKpi",
                "Live results of one KPI (Server-Sent Events)",
                "Live",
                "read",
                self.stream_kpi,
                path_patterns=code,
                query=stream_query,
                request_headers=last_event_id,
                responses={**sse_ok, **errors(401, 404, 429, 503)},
                content_type="text/event-stream",
                stream=True,
                description="As `/api/v1/stream`, for one KPI. 404 when the metadata service "
                "says the KPI is not defined; while metadata cannot be asked (down, slow), "
                "the stream opens unchecked.",
            ),
            RouteSpec(
                "GET",
                "/api/v1/stream",
                "streamAll",
                "Live results of every KPI (Server-Sent Events)",
                "Live",
                "read",
                self.stream_all,
                query=stream_query,
                request_headers=last_event_id,
                responses={**sse_ok, **errors(401, 429, 503)},
                content_type="text/event-stream",
                stream=True,
                description="Each message: `id` (increasing), `event: kpi`, `data` = the "
                "KPI result JSON. Reconnect with `Last-Event-ID` to replay what was "
                "missed from a bounded buffer; `event: gap` says some were lost (also sent "
                "for an id this gateway did not issue, e.g. another replica's: the stream "
                "then resumes from now). Comments "
                "(`: ping`) keep the connection alive.",
            ),
            RouteSpec(
                "POST",
                "/api/v1/sse-token",
                "createStreamToken",
                "A short-lived, read-only token for the stream routes",
                "Live",
                "read",
                self.stream_token,
                responses={201: ("Token", ref("StreamToken")), **errors(401, 429)},
            ),
            RouteSpec(
                "GET",
                "/api/v1/simulator",
                "getSimulator",
                "Simulator status",
                "Simulator",
                "read",
                self.simulator_status,
                responses={
                    200: ("Status", ref("SimulatorStatus")),
                    **errors(401, 429, 502, 503, 504),
                },
            ),
            RouteSpec(
                "POST",
                "/api/v1/simulator/start",
                "startSimulator",
                "Start the simulator",
                "Simulator",
                "admin",
                self.simulator_start,
                responses={
                    200: ("Status", ref("SimulatorStatus")),
                    **errors(401, 403, 409, 429, 502, 503, 504),
                },
            ),
            RouteSpec(
                "POST",
                "/api/v1/simulator/stop",
                "stopSimulator",
                "Stop the simulator",
                "Simulator",
                "admin",
                self.simulator_stop,
                responses={
                    200: ("Status", ref("SimulatorStatus")),
                    **errors(401, 403, 429, 502, 503, 504),
                },
            ),
            RouteSpec(
                "PUT",
                "/api/v1/simulator/rate",
                "setSimulatorRate",
                "Set the event rate (events/s)",
                "Simulator",
                "admin",
                self.simulator_rate,
                body=ref("SimulatorRate"),
                responses={
                    200: ("Status", ref("SimulatorStatus")),
                    **errors(400, 401, 403, 413, 422, 429, 502, 503, 504),
                },
            ),
            RouteSpec(
                "GET",
                "/api/v1/entities/{entity_type}",
                "listEntities",
                "Entities of one type, by id, a page at a time",
                "Entities",
                "read",
                self.list_entities,
                path_patterns={"entity_type": KPI_CODE_REGEX},
                query=[
                    _query(
                        "active",
                        "Only active (true) or only deactivated (false) entities; all when left"
                        " out",
                        {"type": "boolean"},
                        False,
                    ),
                    _query(
                        "after",
                        "Only ids after this one: the previous page's `next_after`",
                        {"type": "string", "minLength": 1, "maxLength": _MAX_ENTITY_ID},
                        False,
                    ),
                    _query(
                        "limit",
                        f"Most entities (default {ENTITY_PAGE_DEFAULT})",
                        {"type": "integer", "minimum": 1, "maximum": ENTITY_PAGE_LIMIT},
                        False,
                    ),
                ],
                responses={
                    200: ("A page of entities", ref("EntityPage")),
                    **errors(400, 401, 422, 429, 502, 503, 504),
                },
                description="Ordered by `entity_id`. `next_after` is set when the page is "
                "full: pass it as `after` for the next page (null: there is no more). Any "
                "other parameter, or one given twice, is a 422.",
            ),
            RouteSpec(
                "GET",
                "/api/v1/entities/{entity_type}/{entity_id}",
                "getEntity",
                "Current state of an entity",
                "Entities",
                "read",
                self.entity,
                path_patterns={"entity_type": KPI_CODE_REGEX, "entity_id": NAME_REGEX},
                responses={
                    200: ("The entity", ref("Entity")),
                    **errors(400, 401, 404, 429, 502, 503, 504),
                },
            ),
            RouteSpec(
                "GET",
                "/api/v1/status",
                "getPlatformStatus",
                "Platform health: services, consumer lag, dead letters, rates",
                "Platform",
                "read",
                self.platform_status,
                responses={
                    200: ("Status", ref("PlatformStatus")),
                    **errors(401, 429, 502, 503, 504),
                },
            ),
            RouteSpec(
                "GET",
                "/api/v1/me",
                "whoAmI",
                "The calling key's id and scope",
                "Platform",
                "read",
                self.me,
                responses={200: ("Key", ref("Principal")), **errors(401, 429)},
            ),
        ]


def _query(
    name: str, description: str, schema: Mapping[str, Any], required: bool
) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": dict(schema),
    }


def _stream_owner(request: web.Request) -> str:
    """Whose share of the streams a request uses: its key (a token counts as the key that
    issued it); keyless development requests, like the rate limit, per client address."""
    who = principal(request)
    if who is None or who.key_id == ANONYMOUS_ID:
        return f"{ANONYMOUS_ID}:{request.remote}"
    return who.key_id


def _bus_unreachable() -> ApiError:
    return ApiError(
        503,
        "the bus (Redis) is unreachable",
        code="upstream_unavailable",
        headers={"Retry-After": "2"},
    )


def _bus_error(exc: RequestError, service: str) -> ApiError:
    if isinstance(exc, RequestTimeout):
        return ApiError(
            504, f"the {service} service did not answer in time", code="upstream_timeout"
        )
    if isinstance(exc, NoResponder):
        return ApiError(
            503,
            f"the {service} service is not running",
            code="upstream_unavailable",
            headers={"Retry-After": "2"},
        )
    if isinstance(exc, RemoteError):
        if exc.code in ("invalid_request", "bad_request"):
            return ApiError(400, exc.message, code="bad_request")
        if exc.code == "unavailable":
            return ApiError(
                503, exc.message, code="upstream_unavailable", headers={"Retry-After": "2"}
            )
        if exc.code == "query_timeout":  # the database's statement timeout: slow, not broken
            return ApiError(504, exc.message, code="upstream_timeout")
    log.warning("bus request failed", extra={"service": service, "error": str(exc)[:200]})
    return ApiError(502, f"the {service} service failed", code="bad_gateway")


__all__ = ["PRINCIPAL_KEY", "REQUEST_ID_KEY", "GatewayApi", "principal", "request_id"]
