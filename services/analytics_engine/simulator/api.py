"""The simulator's HTTP control API (called by the gateway):

- `GET  /api/v1/simulator`        status: running, rate, events_emitted, seed, started_at, counts,
                                   waiting_for (channels whose full streams hold it back)
- `POST /api/v1/simulator/start`  start (idempotent); 409 once `SIMULATOR_MAX_EVENTS` were sent
- `POST /api/v1/simulator/stop`   stop (idempotent)
- `PUT  /api/v1/simulator/rate`   `{rate}` with 0 < rate <= 100000, else 422

Errors are `{error: {code, message, details}}`.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from analytics_engine.simulator.controller import MAX_RATE, MaxEventsReached, SimulatorController


def error_response(
    status: int, code: str, message: str, details: Any | None = None
) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message, "details": details or []}}, status=status
    )


def add_routes(app: web.Application, controller: SimulatorController) -> None:
    async def get_status(_: web.Request) -> web.Response:
        return web.json_response(controller.status())

    async def start(_: web.Request) -> web.Response:
        try:
            controller.start()
        except MaxEventsReached as exc:
            return error_response(409, "max_events_reached", str(exc))
        return web.json_response(controller.status())

    async def stop(_: web.Request) -> web.Response:
        controller.stop()
        return web.json_response(controller.status())

    async def set_rate(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            # RecursionError: nested too deep for the parser (`[[[[...`), not a server fault
            return error_response(400, "invalid_json", "the request body is not valid JSON")
        if not isinstance(body, dict):
            return error_response(
                422,
                "validation_error",
                'the body must be a JSON object {"rate": <events/s>}',
                [{"field": "rate", "message": f"expected an object, got {type(body).__name__}"}],
            )
        rate = body.get("rate")
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= MAX_RATE:
            return error_response(
                422,
                "validation_error",
                f"rate must be a number with 0 < rate <= {MAX_RATE:g}",
                [{"field": "rate", "message": f"expected 0 < rate <= {MAX_RATE:g}, got {rate!r}"}],
            )
        controller.set_rate(float(rate))
        return web.json_response(controller.status())

    app.router.add_get("/api/v1/simulator", get_status)
    app.router.add_post("/api/v1/simulator/start", start)
    app.router.add_post("/api/v1/simulator/stop", stop)
    app.router.add_put("/api/v1/simulator/rate", set_rate)
