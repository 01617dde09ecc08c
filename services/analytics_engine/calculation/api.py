"""The calculation engine's HTTP API (called by the gateway):

- `GET /api/v1/kpis`: the definitions the engine runs, with status
- `GET /api/v1/kpis/{code}/latest`: the latest result per group (in-memory, else the database's
  `latest_kpi_values`)
- `GET /api/v1/kpis/{code}/history?start&end&limit&dimension.<name>=<value>`: the database's
  `kpi_history`, oldest first, `truncated` when the range holds more than `limit` (422 for a
  bad or out-of-range parameter, 404 for a KPI nobody defined)

Errors are `{error: {code, message, details}}`; an upstream timeout is 504, no responder 503.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from analytics_engine.core import channels
from analytics_engine.core.errors import NoResponder, RemoteError, RequestError, RequestTimeout
from analytics_engine.core.request_reply import RequestReplyClient
from analytics_engine.kpi.history_query import InvalidHistoryQuery, parse_history_query


def error_response(
    status: int, code: str, message: str, details: Any | None = None
) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message, "details": details or []}}, status=status
    )


def upstream_error(exc: RequestError) -> web.Response:
    if isinstance(exc, RequestTimeout):
        return error_response(504, "upstream_timeout", "the database service did not answer")
    if isinstance(exc, NoResponder):
        return error_response(503, "upstream_unavailable", "the database service is not running")
    if isinstance(exc, RemoteError):
        if exc.code in ("invalid_request", "bad_request"):
            return error_response(422, "validation_error", exc.message)
        if exc.code == "unavailable":
            return error_response(503, "upstream_unavailable", exc.message)
        return error_response(502, "upstream_error", exc.message, [{"code": exc.code}])
    return error_response(502, "upstream_error", str(exc))


class KPIApi:
    def __init__(
        self,
        *,
        kpis: Callable[[], list[dict[str, Any]]],
        latest: Callable[[str], list[dict[str, Any]]],
        known: Callable[[str], bool],
        requests: Callable[[], RequestReplyClient],
        timeout_s: float = 10.0,
    ) -> None:
        self._kpis = kpis
        self._latest = latest
        self._known = known
        self._requests = requests
        self._timeout = timeout_s

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/api/v1/kpis", self.list_kpis)
        app.router.add_get("/api/v1/kpis/{code}/latest", self.latest)
        app.router.add_get("/api/v1/kpis/{code}/history", self.history)

    async def _query(self, request_type: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        return await self._requests().request(
            channels.DATABASE_QUERY, request_type, dict(payload), timeout=self._timeout
        )

    async def list_kpis(self, _: web.Request) -> web.Response:
        return web.json_response({"items": self._kpis()})

    async def latest(self, request: web.Request) -> web.Response:
        code = request.match_info["code"]
        items = self._latest(code)
        if items:
            return web.json_response({"kpi_code": code, "items": items, "source": "engine"})
        try:
            reply = await self._query("latest_kpi_values", {"kpi_code": code})
        except RequestError as exc:
            if not self._known(code):
                return error_response(404, "not_found", f"KPI {code!r} not found")
            return upstream_error(exc)
        rows = reply.get("rows", reply.get("items", []))
        if not rows and not self._known(code):
            return error_response(404, "not_found", f"KPI {code!r} not found")
        return web.json_response({"kpi_code": code, "items": rows, "source": "database"})

    async def history(self, request: web.Request) -> web.Response:
        code = request.match_info["code"]
        try:
            query = parse_history_query(request.query)
        except InvalidHistoryQuery as exc:
            return error_response(422, "validation_error", str(exc), exc.problems)
        start, end = query.start.isoformat(), query.end.isoformat()
        payload: dict[str, Any] = {"kpi_code": code, "start": start, "end": end}
        if query.dimensions:
            payload["dimensions"] = query.dimensions
        if query.limit is not None:
            payload["limit"] = query.limit
        try:
            reply = await self._query("kpi_history", payload)
        except RequestError as exc:
            if not self._known(code):
                return error_response(404, "not_found", f"KPI {code!r} not found")
            return upstream_error(exc)
        rows = reply.get("rows", reply.get("items", []))
        if not rows and not self._known(code):  # as `latest`: a KPI nobody defined is 404
            return error_response(404, "not_found", f"KPI {code!r} not found")
        return web.json_response(
            {
                "kpi_code": code,
                "start": start,
                "end": end,
                "dimensions": query.dimensions,
                "items": rows,
                "truncated": reply.get("truncated") is True,  # the range holds more than `limit`
            }
        )
