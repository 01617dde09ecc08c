"""Calls to the business services' HTTP APIs through one shared `aiohttp.ClientSession`.

Outcomes map onto the gateway's error contract: upstream unreachable -> 503
`upstream_unavailable`, no answer in time -> 504 `upstream_timeout`, an upstream 5xx other than
503/504 -> 502 `bad_gateway`; upstream 2xx/4xx pass through unchanged (body, status, `ETag`,
`Retry-After`), with non-JSON error bodies rewrapped in the error shape.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Final

import aiohttp
import orjson
from aiohttp import web

from analytics_engine.gateway.errors import REASON_CODES, ApiError, json_response
from analytics_engine.gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)

PASSED_RESPONSE_HEADERS: Final = ("ETag", "Retry-After")
REQUEST_ID_HEADER: Final = "X-Request-ID"


class Upstreams:
    """Owns the session; one `Upstream` per business service shares it."""

    def __init__(
        self, *, timeout_s: float, connect_timeout_s: float, max_connections: int = 200
    ) -> None:
        # `sock_connect`, not `connect`: aiohttp's `connect` also counts the wait for a free
        # pooled connection, so a busy gateway would answer 504 while the service is healthy
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_timeout_s)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=60),
                raise_for_status=False,
                auto_decompress=True,
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise ApiError(503, "the gateway is starting", code="unavailable")
        return self._session


class Upstream:
    def __init__(
        self, name: str, base_url: str, upstreams: Upstreams, metrics: GatewayMetrics
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self._upstreams = upstreams
        self._metrics = metrics

    async def call(
        self,
        method: str,
        path: str,
        *,
        request_id: str,
        query: Mapping[str, str] | None = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        send_headers = {REQUEST_ID_HEADER: request_id, "Accept": "application/json"}
        if headers:
            send_headers.update(headers)
        if body is not None:
            send_headers["Content-Type"] = "application/json"
        url = f"{self.base_url}{path}"
        try:
            async with self._upstreams.session.request(
                method, url, params=query, data=body, headers=send_headers
            ) as resp:
                raw = await resp.read()
                return self._relay(resp, raw)
        except ApiError:
            raise
        except (TimeoutError, aiohttp.ServerTimeoutError):
            self._fail("timeout")
            raise ApiError(
                504, f"the {self.name} service did not answer in time", code="upstream_timeout"
            ) from None
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
            self._fail("unavailable")
            log.warning("upstream unreachable", extra={"upstream": self.name, "error": str(exc)})
            raise ApiError(
                503,
                f"the {self.name} service is unavailable",
                code="upstream_unavailable",
                headers={"Retry-After": "2"},
            ) from None
        except aiohttp.ClientError as exc:
            self._fail("error")
            log.warning("upstream call failed", extra={"upstream": self.name, "error": str(exc)})
            raise ApiError(
                502, f"the {self.name} service gave an invalid answer", code="bad_gateway"
            ) from None

    def _fail(self, outcome: str) -> None:
        self._metrics.upstream_errors.labels(self.name, outcome).inc()

    def _relay(self, resp: aiohttp.ClientResponse, raw: bytes) -> web.Response:
        headers = {h: resp.headers[h] for h in PASSED_RESPONSE_HEADERS if h in resp.headers}
        status = resp.status
        if status == 204 or (not raw and status < 400):
            return web.Response(status=status, headers=headers)
        try:
            parsed = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            parsed = None
        if status >= 500 and status not in (503, 504):
            self._fail(f"http_{status}")
            log.warning("upstream error", extra={"upstream": self.name, "status": status})
            raise ApiError(
                502,
                f"the {self.name} service failed ({status})",
                code="bad_gateway",
                details=[{"upstream_status": status}],
            )
        if status >= 400:
            if status in (503, 504):
                self._fail(f"http_{status}")
            if not (isinstance(parsed, dict) and isinstance(parsed.get("error"), dict)):
                code = REASON_CODES.get(status, "error")
                message = resp.reason or code
                raise ApiError(status, f"{self.name}: {message}", code=code, headers=headers)
            error = parsed["error"]
            error.setdefault("details", [])
            return json_response(parsed, status=status, headers=headers)
        if parsed is None:
            self._fail("invalid_json")
            raise ApiError(
                502, f"the {self.name} service answered with non-JSON", code="bad_gateway"
            )
        return web.Response(
            body=raw, status=status, headers=headers, content_type="application/json"
        )
