"""`DefinitionSync` against a stubbed metadata service: a full list and the `metadata.changed`
handler interleave (the periodic resync runs beside the handler)."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace
from typing import Any

import pytest

from analytics_engine.calculation.registry import DefinitionRegistry
from analytics_engine.calculation.sync import DefinitionSync
from analytics_engine.core.errors import NoResponder

pytestmark = pytest.mark.asyncio


def item(version: int, threshold: int) -> dict[str, Any]:
    return {
        "code": "big_orders",
        "display_name": "Big orders",
        "entity_type": "order",
        "aggregation": "count",
        "filter": f"amount > {threshold}",
        "window": {"type": "tumbling", "size": "60s"},
        "version": version,
    }


class Metadata:
    """Answers `get_kpi_definition` with `current` at once; holds the reply to
    `list_kpi_definitions` (the list as it was when the request came) until `release`."""

    def __init__(self, current: dict[str, Any] | None) -> None:
        self.current = current
        self.release = asyncio.Event()
        self.listing = asyncio.Event()

    async def request(
        self, _channel: str, request_type: str, payload: dict[str, Any], *, timeout: float
    ) -> dict[str, Any]:
        if request_type == "list_kpi_definitions":
            snapshot = [self.current] if self.current is not None else []
            self.listing.set()
            await self.release.wait()
            return {"items": snapshot}
        assert payload == {"code": "big_orders"}
        assert self.current is not None
        return self.current


def changed(action: str, version: int) -> Any:
    payload = {"kind": "kpi_definition", "code": "big_orders", "action": action}
    return SimpleNamespace(event=SimpleNamespace(payload={**payload, "version": version}))


async def interleaved(
    metadata: Metadata, registry: DefinitionRegistry, action: str, version: int
) -> list[int | None]:
    """A full sync whose list was taken before a change that the handler applies while the
    list's reply is on its way; returns the version applied at each `apply` (None: none)."""
    applied: list[int | None] = []

    def apply() -> None:
        definition = registry.effective().get("big_orders")
        applied.append(None if definition is None else definition.version)

    sync = DefinitionSync(registry, lambda: metadata, apply=apply)  # type: ignore[arg-type, return-value]
    full = asyncio.create_task(sync.full_sync())
    await metadata.listing.wait()
    if action == "deleted":
        metadata.current = None
    else:
        metadata.current = item(version, 500)
    await sync.on_changed([changed(action, version)])
    metadata.release.set()
    assert await full
    return applied


async def test_a_list_older_than_a_change_applied_meanwhile_does_not_undo_it() -> None:
    """Before the fix the stale list replaced the registry's view: the engine went back to
    version 1 (a redefinition: its windows reset, a backfill of the old definition) until the
    next resync, a minute later, changed it again."""
    registry = DefinitionRegistry()
    registry.replace_remote([item(1, 100)])
    applied = await interleaved(Metadata(item(1, 100)), registry, "upserted", 2)
    assert applied == [2, 2]
    assert registry.effective()["big_orders"].version == 2


async def test_a_list_older_than_a_deletion_applied_meanwhile_does_not_undo_it() -> None:
    registry = DefinitionRegistry()
    registry.replace_remote([item(1, 100)])
    applied = await interleaved(Metadata(item(1, 100)), registry, "deleted", 2)
    assert applied == [None, None]
    assert "big_orders" not in registry.effective()


async def test_a_list_older_than_a_creation_applied_meanwhile_does_not_undo_it() -> None:
    registry = DefinitionRegistry()
    registry.replace_remote([])
    applied = await interleaved(Metadata(None), registry, "upserted", 1)
    assert applied == [1, 1]
    assert registry.effective()["big_orders"].version == 1


class LateMetadata:
    """No metadata service for the first `down` list requests (`NoResponder`, as while it
    starts beside the engine), then one holding a query KPI."""

    def __init__(self, down: int) -> None:
        self.down = down
        self.lists = 0

    async def request(
        self, _channel: str, request_type: str, _payload: dict[str, Any], *, timeout: float
    ) -> dict[str, Any]:
        assert request_type == "list_kpi_definitions"
        self.lists += 1
        if self.lists <= self.down:
            raise NoResponder("no metadata service yet")
        query = {"sql": "SELECT count(*) FROM entity_events", "params": [], "schedule": "60s"}
        return {
            "items": [
                {
                    "code": "events_total",
                    "display_name": "Events",
                    "entity_type": "order",
                    "query": query,
                    "version": 1,
                }
            ]
        }


async def test_a_list_refused_at_start_is_asked_again_soon_not_after_a_resync_interval() -> None:
    """The engine's first list goes out before the metadata service answers (`up` starts every
    service at once) and a checkpoint holds no query KPI: before the fix the next list came a
    whole resync interval (60 s) later, and the metadata service's query KPIs missed their
    slots until then."""
    registry = DefinitionRegistry()
    metadata = LateMetadata(down=2)
    applied: list[set[str]] = []
    came = asyncio.Event()

    def apply() -> None:
        applied.append(set(registry.effective()))
        came.set()

    sync = DefinitionSync(
        registry,
        lambda: metadata,  # type: ignore[arg-type, return-value]
        apply=apply,
        resync_interval_s=3600.0,
        retry_interval_s=0.01,
    )
    assert not await sync.full_sync()  # startup's attempt
    runner = asyncio.create_task(sync.run())
    try:
        async with asyncio.timeout(5):
            await came.wait()
        assert applied == [{"events_total"}]
        assert metadata.lists == 3
        # once the list came, the next one waits for the resync interval again
        await asyncio.sleep(0.1)
        assert metadata.lists == 3
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
