"""The gateway's one error shape: `{error: {code, message, details}}` with the right status."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson
from aiohttp import web

REASON_CODES: Final = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    412: "precondition_failed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    500: "internal",
    502: "bad_gateway",
    503: "upstream_unavailable",
    504: "upstream_timeout",
}


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


class ApiError(Exception):
    """Raised by handlers and middlewares; rendered by the error middleware."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        details: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or REASON_CODES.get(status, "error")
        self.message = message
        self.details = details if details is not None else []
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return error_response(
            self.status, self.code, self.message, self.details, headers=self.headers
        )


def error_response(
    status: int,
    code: str,
    message: str,
    details: Any = None,
    *,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = {"error": {"code": code, "message": message, "details": details or []}}
    return web.json_response(body, status=status, headers=headers, dumps=dumps)


def json_response(
    body: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.json_response(body, status=status, headers=headers, dumps=dumps)
