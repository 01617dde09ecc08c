"""Helpers of the metadata integration tests (imported by the tests and conftest)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, cast

import aiohttp
import orjson
from redis.asyncio import Redis

from analytics_engine.core.channels import METADATA_CHANGED, stream_key
from analytics_engine.core.envelopes import Event
from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.metadata.service import MetadataService


@dataclass
class MetadataHarness:
    runtime: ServiceRuntime
    service: MetadataService
    http: aiohttp.ClientSession
    base: str

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
    ) -> tuple[int, Any, Any]:
        """(status, parsed JSON body or None, headers)."""
        raw = orjson.dumps(body) if body is not None else data
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        async with self.http.request(method, self.base + path, data=raw, headers=hdrs) as resp:
            text = await resp.read()
            parsed = orjson.loads(text) if text else None
            return resp.status, parsed, resp.headers


async def changed_events(redis: Redis, count: int, *, timeout: float = 5.0) -> list[Event]:
    """The first `count` events of the durable `metadata.changed` stream (waits for them)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        entries = cast(
            "list[tuple[bytes, dict[bytes, bytes]]]",
            await redis.xrange(stream_key(METADATA_CHANGED)),
        )
        events = [Event.model_validate_json(fields[b"m"]) for _, fields in entries]
        if len(events) >= count or asyncio.get_running_loop().time() > deadline:
            return events
        await asyncio.sleep(0.02)


def revenue_kpi(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "code": "orders_revenue",
        "display_name": "Revenue",
        "entity_type": "order",
        "aggregation": "sum",
        "field": "amount",
        "filter": "status == 'completed' && amount > 0",
        "group_by": ["region"],
        "window": {"type": "tumbling", "size": "60s", "allowed_lateness": "10s"},
        "unit": "EUR",
    }
    body.update(overrides)
    return body
