"""A real-HTTP stand-in for the metadata service's KPI-definition API (docs/architecture.md).

It runs aiohttp in its own thread and event loop on a fixed loopback port, so it can be stopped
and started again on the same URL to simulate "metadata down". It keeps definitions in memory and
implements just enough of the contract for the operator: idempotent PUT (201 created / 200
replaced, identical spec keeps its version), GET (ETag), DELETE (204 / 404) and the 422 error
format `{error: {code: "validation_error", message, details: [{field, message}]}}`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from types import TracebackType
from typing import Any, Self

from aiohttp import web

PREFIX = "/api/v1/kpi-definitions"
INVALID_MESSAGE = "invalid KPI definition"
FIELD_REQUIRED = "field is required unless aggregation is count"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _error(status: int, code: str, message: str, details: list[dict[str, str]]) -> web.Response:
    body = {"error": {"code": code, "message": message, "details": details}}
    return web.json_response(body, status=status)


class MetadataStandIn:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._definitions: dict[str, dict[str, Any]] = {}
        self._versions: dict[str, int] = {}
        self.requests: list[tuple[str, str]] = []
        # Seconds a PUT waits between its arrival (recorded) and its write: a slow service.
        self.put_delay_s = 0.0
        # The same for the next PUT only (then reset): one request overtaken by later ones.
        self.next_put_delay_s = 0.0
        # (code, version, spec) of every write, in order.
        self.writes: list[tuple[str, int, dict[str, Any]]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    # --- lifecycle (called from the test thread) -------------------------------------------

    def __enter__(self) -> Self:
        self._thread.start()
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def start(self) -> None:
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(5)

    @property
    def running(self) -> bool:
        return self._runner is not None

    # --- state (thread-safe views for assertions) ------------------------------------------

    def get(self, code: str) -> dict[str, Any] | None:
        with self._lock:
            stored = self._definitions.get(code)
            return json.loads(json.dumps(stored)) if stored is not None else None

    def codes(self) -> set[str]:
        with self._lock:
            return set(self._definitions)

    def forget(self, code: str) -> None:
        with self._lock:
            self._definitions.pop(code, None)

    def restore_empty_database(self) -> None:
        """Lose every definition, as after restoring an old/empty database."""
        with self._lock:
            self._definitions.clear()

    def count(self, method: str, code: str) -> int:
        with self._lock:
            return sum(1 for m, c in self.requests if m == method and c == code)

    # --- server ------------------------------------------------------------------------------

    async def _start(self) -> None:
        if self._runner is not None:
            return
        app = web.Application()
        app.router.add_get(PREFIX, self._list)
        app.router.add_get(PREFIX + "/{code}", self._get)
        app.router.add_put(PREFIX + "/{code}", self._put)
        app.router.add_delete(PREFIX + "/{code}", self._delete)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True).start()
        self._runner = runner

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _record(self, method: str, code: str) -> None:
        with self._lock:
            self.requests.append((method, code))

    async def _list(self, request: web.Request) -> web.Response:
        with self._lock:
            items = list(self._definitions.values())
        return web.json_response({"items": items})

    async def _get(self, request: web.Request) -> web.Response:
        code = request.match_info["code"]
        self._record("GET", code)
        stored = self.get(code)
        if stored is None:
            return _error(404, "not_found", f"KPI {code} not found", [])
        return web.json_response(stored, headers={"ETag": f'"{stored["version"]}"'})

    async def _put(self, request: web.Request) -> web.Response:
        code = request.match_info["code"]
        self._record("PUT", code)
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "bad_request", "body is not JSON", [])
        with self._lock:
            delay, self.next_put_delay_s = self.put_delay_s + self.next_put_delay_s, 0.0
        if delay:
            await asyncio.sleep(delay)
        details = self._validate(code, body)
        if details:
            return _error(422, "validation_error", INVALID_MESSAGE, details)
        with self._lock:
            current = self._definitions.get(code)
            if_match = request.headers.get("If-Match")
            if if_match and (current is None or if_match.strip('"') != str(current["version"])):
                return _error(412, "precondition_failed", "version mismatch", [])
            spec = {k: v for k, v in body.items() if k != "version"}
            if current is not None and {k: v for k, v in current.items() if k != "version"} == spec:
                stored, status = current, 200
            else:
                version = self._versions.get(code, 0) + 1
                self._versions[code] = version
                stored = {**spec, "version": version}
                status = 200 if current is not None else 201
                self._definitions[code] = stored
                self.writes.append((code, version, json.loads(json.dumps(spec))))
            reply = json.loads(json.dumps(stored))
        return web.json_response(reply, status=status, headers={"ETag": f'"{reply["version"]}"'})

    async def _delete(self, request: web.Request) -> web.Response:
        code = request.match_info["code"]
        self._record("DELETE", code)
        with self._lock:
            existed = self._definitions.pop(code, None) is not None
        if not existed:
            return _error(404, "not_found", f"KPI {code} not found", [])
        return web.Response(status=204)

    def _validate(self, code: str, body: Any) -> list[dict[str, str]]:
        if not isinstance(body, dict):
            return [{"field": "", "message": "definition must be an object"}]
        details = []
        if body.get("code") != code:
            details.append({"field": "code", "message": "must equal the code in the URL"})
        if body.get("aggregation") not in (None, "count") and not body.get("field"):
            details.append({"field": "field", "message": FIELD_REQUIRED})
        return details
