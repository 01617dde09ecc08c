"""The route table: one declaration per route drives registration, authorisation and the
OpenAPI document, so the three cannot drift apart.

`scope=None` marks an open route (health, metrics, docs, the UI); every other route needs a
key of at least that scope. `stream=True` marks Server-Sent Events routes: they also accept a
short-lived `?token=` (EventSource cannot send headers) and stay out of the latency histogram.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from analytics_engine.gateway.auth import Scope

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

KPI_CODE_REGEX: Final = r"[a-z][a-z0-9_]{0,62}"
"""Same rule as the KPI model's `code`; anything else is 404 before reaching a service."""
NAME_REGEX: Final = r"[A-Za-z0-9_.:\-]{1,200}"


@dataclass(frozen=True)
class RouteSpec:
    method: str
    path: str
    """OpenAPI path template (`/api/v1/kpis/{code}/latest`)."""
    operation_id: str
    summary: str
    tag: str
    scope: Scope | None
    handler: Handler | None = None
    """None: registered by the runtime (`/healthz`, `/readyz`, `/metrics`)."""
    path_patterns: Mapping[str, str] = field(default_factory=dict)
    """Regex per path parameter, used in the router and as the parameter's JSON Schema pattern."""
    query: Sequence[Mapping[str, Any]] = ()
    request_headers: Sequence[Mapping[str, Any]] = ()
    body: Mapping[str, Any] | None = None
    responses: Mapping[int, tuple[str, Mapping[str, Any] | None]] = field(default_factory=dict)
    """status -> (description, JSON Schema of the JSON body or None)."""
    content_type: str = "application/json"
    stream: bool = False
    description: str = ""

    @property
    def router_path(self) -> str:
        path = self.path
        for name, regex in self.path_patterns.items():
            path = path.replace(f"{{{name}}}", f"{{{name}:{regex}}}")
        return path

    def register(self, app: web.Application) -> None:
        if self.handler is None:
            return
        app.router.add_route(self.method, self.router_path, self.handler)


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


ERROR: Final = ref("Error")


def errors(*statuses: int) -> dict[int, tuple[str, Mapping[str, Any] | None]]:
    text = {
        400: "Malformed request (e.g. the body is not JSON)",
        401: "No or unknown API key",
        403: "The key's scope does not allow this",
        404: "Not found",
        409: "Conflict",
        412: "If-Match did not match the stored version",
        413: "Request body too large",
        422: "Validation failed; `details` lists `{field, message}`",
        429: "Rate limit exceeded; see Retry-After",
        502: "The upstream service failed",
        503: "The upstream service is unavailable",
        504: "The upstream service did not answer in time",
    }
    return {status: (text[status], ERROR) for status in statuses}


def spec_index(specs: Sequence[RouteSpec]) -> dict[tuple[str, str], RouteSpec]:
    """(method, path template) -> spec, for the auth middleware's lookup."""
    return {(s.method, s.path): s for s in specs}
