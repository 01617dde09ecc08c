"""The OpenAPI 3.1 document, generated from the route table and the pydantic models, so it
describes exactly the routes the gateway registers (a test compares the two)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final

from pydantic.json_schema import models_json_schema

from analytics_engine import __version__
from analytics_engine.core.payloads import KPIResult
from analytics_engine.gateway.routes import ERROR, RouteSpec, ref
from analytics_engine.kpi.definitions import KPIDefinition, VersionedKPIDefinition

OPENAPI_VERSION: Final = "3.1.0"
_PATH_PARAM: Final = re.compile(r"{([^}:]+)}")

DESCRIPTION: Final = """\
The AnalyticsEngine API: KPI definitions, KPI values (latest, history, live over Server-Sent
Events), the data simulator, entities and platform health.

**Authentication.** Send an API key as `Authorization: Bearer <key>` or `X-API-Key: <key>`.
Keys have the scope `read` or `admin`; every write needs `admin` (403 otherwise), no key is
401. Browsers' `EventSource` cannot send headers: get a short-lived read-only token from
`POST /api/v1/sse-token` and pass it as `?token=` to the stream routes (only they accept it).

**Errors** are `{"error": {"code", "message", "details"}}`. Requests are rate-limited per key,
and those refused with 401 per client address (429 with `Retry-After`). Every response
carries `X-Request-ID` (yours, or a generated one), passed on to the services as their
correlation id.
"""


def _object(
    properties: dict[str, Any], required: Sequence[str] = (), extra: bool = True
) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if not extra:
        schema["additionalProperties"] = False
    return schema


def component_schemas() -> dict[str, Any]:
    _, defs = models_json_schema(
        [
            (KPIDefinition, "validation"),
            (VersionedKPIDefinition, "serialization"),
            (KPIResult, "serialization"),
        ],
        ref_template="#/components/schemas/{model}",
    )
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    schemas["StoredKPIDefinition"] = ref("VersionedKPIDefinition")
    schemas["Error"] = _object(
        {
            "error": _object(
                {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "details": {
                        "description": "For validation errors: `[{field, message}]`",
                        "type": "array",
                        "items": {"type": "object"},
                    },
                },
                required=("code", "message"),
            )
        },
        required=("error",),
    )
    schemas["KPIDefinitionList"] = _object(
        {"items": {"type": "array", "items": ref("VersionedKPIDefinition")}}, required=("items",)
    )
    schemas["ItemList"] = _object(
        {"items": {"type": "array", "items": {"type": "object"}}}, required=("items",)
    )
    schemas["LatestValues"] = _object(
        {
            "kpi_code": {"type": "string"},
            "items": {"type": "array", "items": ref("KPIResult")},
            "source": {"type": "string", "enum": ["engine", "database"]},
        },
        required=("kpi_code", "items"),
    )
    schemas["History"] = _object(
        {
            "kpi_code": {"type": "string"},
            "start": {"type": "string"},
            "end": {"type": "string"},
            "dimensions": {"type": "object"},
            "items": {"type": "array", "items": ref("KPIResult")},
            "truncated": {
                "type": "boolean",
                "description": "The range holds more results than `limit` (the oldest came)",
            },
        },
        required=("kpi_code", "items"),
    )
    schemas["StreamToken"] = _object(
        {
            "token": {"type": "string"},
            "expires_in": {"type": "integer", "description": "seconds"},
            "expires_at": {"type": "integer", "description": "Unix time"},
        },
        required=("token", "expires_in", "expires_at"),
    )
    schemas["SimulatorStatus"] = _object(
        {"running": {"type": "boolean"}, "rate": {"type": "number"}}
    )
    schemas["SimulatorRate"] = _object(
        {"rate": {"type": "number", "exclusiveMinimum": 0, "maximum": 100_000}},
        required=("rate",),
    )
    schemas["Entity"] = _object(
        {
            "entity_type": {"type": "string"},
            "entity_id": {"type": "string"},
            "version": {"type": "integer"},
            "attributes": {"type": "object"},
            "active": {"type": "boolean"},
        },
        required=("entity_type", "entity_id"),
    )
    schemas["EntityPage"] = _object(
        {
            "items": {"type": "array", "items": ref("Entity")},
            "next_after": {
                "type": ["string", "null"],
                "description": "The last item's id when the page is full: `after` for the "
                "next page; null when there is no more",
            },
        },
        required=("items", "next_after"),
    )
    schemas["PlatformStatus"] = _object(
        {
            "status": {"type": "string", "enum": ["ok", "degraded"]},
            # reachable false: dead_letters, full_streams and simulation (read from Redis)
            # are left out, unknown; the rest is what the observability service holds
            "redis": _object(
                {"reachable": {"type": "boolean"}, "error": {"type": "string"}},
                required=("reachable",),
            ),
            "services": {"type": "array", "items": {"type": "object"}},
            "dead_letters": {"type": "object", "additionalProperties": {"type": "integer"}},
            # channels whose streams are full: their publishers wait for the readers
            "full_streams": {"type": "array", "items": {"type": "string"}},
            "message_rates": {"type": "object"},
            "kpi_freshness": {"type": "object"},
            "simulation": {"type": "object"},
        }
    )
    schemas["Principal"] = _object(
        {"key_id": {"type": "string"}, "scope": {"type": "string", "enum": ["read", "admin"]}},
        required=("key_id", "scope"),
    )
    return schemas


def _operation(spec: RouteSpec) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": spec.operation_id,
        "summary": spec.summary,
        "tags": [spec.tag],
    }
    if spec.description:
        operation["description"] = spec.description
    parameters: list[dict[str, Any]] = []
    for name in _PATH_PARAM.findall(spec.path):
        schema: dict[str, Any] = {"type": "string"}
        if name in spec.path_patterns:
            schema["pattern"] = f"^{spec.path_patterns[name]}$"
        parameters.append({"name": name, "in": "path", "required": True, "schema": schema})
    parameters.extend(dict(p) for p in spec.query)
    parameters.extend(dict(p) for p in spec.request_headers)
    if parameters:
        operation["parameters"] = parameters
    if spec.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": dict(spec.body)}},
        }
    responses: dict[str, Any] = {}
    for status, (description, body) in sorted(spec.responses.items()):
        entry: dict[str, Any] = {"description": description}
        if body is not None:
            entry["content"] = {"application/json": {"schema": dict(body)}}
        elif status < 300 and spec.content_type != "application/json":
            entry["content"] = {spec.content_type: {"schema": {"type": "string"}}}
        responses[str(status)] = entry
    if spec.scope is not None:
        responses.setdefault(
            "401",
            {
                "description": "No or unknown API key",
                "content": {"application/json": {"schema": ERROR}},
            },
        )
    operation["responses"] = responses
    if spec.scope is None:
        operation["security"] = []
    else:
        schemes: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"apiKeyHeader": []}]
        if spec.stream:
            schemes.append({"streamToken": []})
        operation["security"] = schemes
        operation["x-required-scope"] = spec.scope
    return operation


def build_document(specs: Sequence[RouteSpec]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for spec in specs:
        paths.setdefault(spec.path, {})[spec.method.lower()] = _operation(spec)
    tags: list[dict[str, str]] = []
    for spec in specs:
        if spec.tag not in [t["name"] for t in tags]:
            tags.append({"name": spec.tag})
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "AnalyticsEngine API",
            "version": __version__,
            "description": DESCRIPTION,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": "/"}],
        "tags": tags,
        "paths": paths,
        "components": {
            "schemas": component_schemas(),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key as a bearer token",
                },
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "streamToken": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "token",
                    "description": "From POST /api/v1/sse-token; stream routes only",
                },
            },
        },
    }


def operational_routes(openapi: Any, docs: Any) -> list[RouteSpec]:
    """Open routes: the runtime's health and metrics endpoints, this document, its docs page."""
    text = {200: ("OK", None)}
    health = {
        200: ("Healthy / ready", {"type": "object"}),
        503: ("Not ready", {"type": "object"}),
    }
    return [
        RouteSpec(
            "GET",
            "/healthz",
            "healthz",
            "Process is alive",
            "Operations",
            None,
            responses={200: ("Alive", {"type": "object"})},
        ),
        RouteSpec(
            "GET",
            "/readyz",
            "readyz",
            "Dependencies are reachable",
            "Operations",
            None,
            responses=health,
        ),
        RouteSpec(
            "GET",
            "/metrics",
            "metrics",
            "Prometheus metrics",
            "Operations",
            None,
            responses=text,
            content_type="text/plain",
        ),
        RouteSpec(
            "GET",
            "/api/v1/openapi.json",
            "openapi",
            "This OpenAPI document",
            "Operations",
            None,
            openapi,
            responses={200: ("OpenAPI 3.1 document", {"type": "object"})},
        ),
        RouteSpec(
            "GET",
            "/api/v1/docs",
            "docs",
            "Interactive API documentation (HTML)",
            "Operations",
            None,
            docs,
            responses=text,
            content_type="text/html",
        ),
    ]
