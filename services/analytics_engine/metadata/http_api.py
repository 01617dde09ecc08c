"""The metadata HTTP API (docs/architecture.md, "Metadata service HTTP API").

Routes (same for `/api/v1/entity-types/{entity_type}`):
  GET    /api/v1/kpi-definitions[?entity_type=]  -> {items: [definition + version]}
  POST   /api/v1/kpi-definitions                 -> 201, or 409 when the code exists
  GET    /api/v1/kpi-definitions/{code}          -> definition + version, ETag; 404;
                                                    304 when If-None-Match holds the version
  PUT    /api/v1/kpi-definitions/{code}          -> 201 created / 200 replaced or unchanged
  DELETE /api/v1/kpi-definitions/{code}          -> 204; 404
  GET    /api/v1/kpi-definitions/{code}/history  -> {items: [{version, action, changed_at, spec}]}

Errors are `{error: {code, message, details?}}`: 400 `bad_request` (malformed JSON, a NUL
character anywhere in the request),
404 `not_found`, 409 `conflict`, 412 `precondition_failed`, 413 `payload_too_large`,
422 `validation_error` (details: [{field, message}]), 503 `unavailable` (database down).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import orjson
from aiohttp import web

from analytics_engine.core.jsontext import contains_nul
from analytics_engine.kpi.definitions import FieldError
from analytics_engine.metadata.errors import (
    BadInput,
    Conflict,
    Invalid,
    NotFound,
    PreconditionFailed,
    StoreUnavailable,
)
from analytics_engine.metadata.preconditions import (
    Precondition,
    etag,
    not_modified,
    parse_conditions,
)
from analytics_engine.metadata.store import ENTITY_TYPE, KPI, Kind, MetadataStore, PutResult
from analytics_engine.metadata.validation import (
    NUL_REFUSED,
    parse_entity_type,
    parse_kpi,
    with_version,
)

log = logging.getLogger(__name__)

KPI_PATH: Final = "/api/v1/kpi-definitions"
ENTITY_PATH: Final = "/api/v1/entity-types"
RETRY_AFTER_S: Final = "2"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def json_response(
    body: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(body, status=status, headers=headers, dumps=_dumps)


def error_response(
    status: int,
    code: str,
    message: str,
    details: Sequence[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = [d.to_dict() for d in details]
    return json_response({"error": error}, status=status, headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map the store's outcomes to the documented statuses and JSON error bodies."""
    if not request.path.startswith("/api/"):
        return await handler(request)
    if _nul_in_url(request):
        return error_response(400, "bad_request", NUL_REFUSED)
    try:
        return await handler(request)
    except BadInput as exc:
        return error_response(400, "bad_request", exc.message)
    except Invalid as exc:
        return error_response(422, "validation_error", exc.message, exc.errors)
    except NotFound as exc:
        return error_response(404, "not_found", exc.message)
    except PreconditionFailed as exc:
        headers = {"ETag": etag(exc.current)} if exc.current is not None else None
        return error_response(412, "precondition_failed", exc.message, headers=headers)
    except Conflict as exc:
        return error_response(409, "conflict", exc.message, exc.errors or None)
    except StoreUnavailable as exc:
        log.warning("request failed, store unavailable", extra={"error": str(exc)[:200]})
        return error_response(503, "unavailable", str(exc), headers={"Retry-After": RETRY_AFTER_S})
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(413, "payload_too_large", exc.text or "request body too large")
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            code = "not_found" if exc.status == 404 else exc.reason.lower().replace(" ", "_")
            return error_response(exc.status, code, exc.reason, headers=None)
        raise
    except Exception:
        log.exception("unexpected error while serving %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error; see the service log")


def _nul_in_url(request: web.Request) -> bool:
    """A NUL in the decoded path or query (keys are codes, never NUL; PostgreSQL refuses it)."""
    return "\x00" in request.path or any(
        "\x00" in k or "\x00" in v for k, v in request.query.items()
    )


async def read_json(request: web.Request) -> Any:
    """The request body as JSON; 400 when it is not JSON, does not decode as its
    `Content-Encoding` says, or holds a NUL character (413 past the size limit)."""
    try:
        raw = await request.read()
    except web.RequestPayloadError:
        # aiohttp inflates gzip/deflate bodies while reading; this one is not what it claims
        encoding = request.headers.get("Content-Encoding", "")[:50]
        raise _bad_request(
            f"the request body cannot be decoded as its Content-Encoding ({encoding!r}) says"
        ) from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _bad_request(f"malformed JSON body: {exc}") from None
    if contains_nul(body):
        raise _bad_request(NUL_REFUSED)
    return body


def _bad_request(message: str) -> web.HTTPBadRequest:
    body = _dumps({"error": {"code": "bad_request", "message": message}})
    return web.HTTPBadRequest(text=body, content_type="application/json")


def _conditions(request: web.Request) -> Precondition:
    return parse_conditions(request.headers.get("If-Match"), request.headers.get("If-None-Match"))


def _put_response(result: PutResult) -> web.Response:
    stored = result.stored
    return json_response(
        with_version(stored.spec, stored.version),
        status=201 if result.created else 200,
        headers={"ETag": etag(stored.version)},
    )


class MetadataHttpApi:
    def __init__(self, store: MetadataStore) -> None:
        self._store = store

    def register(self, app: web.Application) -> None:
        app.middlewares.append(errors_middleware)
        r = app.router
        routes = ((KPI_PATH, KPI, "code"), (ENTITY_PATH, ENTITY_TYPE, "entity_type"))
        for path, kind, param in routes:
            item = f"{path}/{{{param}}}"
            r.add_get(path, self._list_handler(kind))
            r.add_post(path, self._create_handler(kind))
            r.add_get(item, self._get_handler(kind, param))
            r.add_put(item, self._put_handler(kind, param))
            r.add_delete(item, self._delete_handler(kind, param))
            r.add_get(f"{item}/history", self._history_handler(kind, param))

    async def _save(
        self, kind: Kind, body: Any, key: str | None, condition: Precondition
    ) -> PutResult:
        if kind is KPI:
            return await self._store.put_kpi(parse_kpi(body, key), condition)
        return await self._store.put_entity_type(parse_entity_type(body, key), condition)

    def _list_handler(self, kind: Kind) -> Handler:
        async def handle(request: web.Request) -> web.Response:
            entity_type = request.query.get("entity_type") if kind is KPI else None
            items = await self._store.list_all(kind, entity_type=entity_type)
            return json_response({"items": [with_version(s.spec, s.version) for s in items]})

        return handle

    def _create_handler(self, kind: Kind) -> Handler:
        async def handle(request: web.Request) -> web.Response:
            body = await read_json(request)
            try:
                result = await self._save(kind, body, None, Precondition(absent=True))
            except PreconditionFailed as exc:
                raise Conflict(f"{kind.label} already exists; use PUT to replace it") from exc
            return _put_response(result)

        return handle

    def _get_handler(self, kind: Kind, param: str) -> Handler:
        async def handle(request: web.Request) -> web.Response:
            key = request.match_info[param]
            stored = await self._store.get(kind, key)
            if stored is None:
                raise NotFound(kind.label, key)
            headers = {"ETag": etag(stored.version)}
            if not_modified(request.headers.get("If-None-Match"), stored.version):
                return web.Response(status=304, headers=headers)
            return json_response(with_version(stored.spec, stored.version), headers=headers)

        return handle

    def _put_handler(self, kind: Kind, param: str) -> Handler:
        async def handle(request: web.Request) -> web.Response:
            body = await read_json(request)
            result = await self._save(kind, body, request.match_info[param], _conditions(request))
            return _put_response(result)

        return handle

    def _delete_handler(self, kind: Kind, param: str) -> Handler:
        async def handle(request: web.Request) -> web.Response:
            await self._store.delete(kind, request.match_info[param], _conditions(request))
            return web.Response(status=204)

        return handle

    def _history_handler(self, kind: Kind, param: str) -> Handler:
        async def handle(request: web.Request) -> web.Response:
            key = request.match_info[param]
            entries = await self._store.history(kind, key)
            if not entries:
                raise NotFound(kind.label, key)
            return json_response({"items": [e.to_json() for e in entries]})

        return handle
