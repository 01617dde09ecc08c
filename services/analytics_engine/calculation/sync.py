"""Keeps the registry in line with the metadata service: a full `list_kpi_definitions` at start
and every `resync_interval` (heals a missed event), `get_kpi_definition {code}` on each
`metadata.changed` about a KPI. Without a metadata service (`NoResponder`, timeouts) the
`KPI_DEFINITIONS_DIR` definitions stay in force, and so do the metadata service's definitions
a restored checkpoint ran with (`registry`), and the full list is asked for again every
`retry_interval_s` until it comes: the engine usually starts before the metadata service
answers, and a checkpoint holds no query KPI, so waiting a whole `resync_interval` would leave
the metadata service's query KPIs (and any change made while the engine was down) out for a
minute, their slots missed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from analytics_engine.calculation.registry import DefinitionRegistry
from analytics_engine.core import channels
from analytics_engine.core.bus import Delivery
from analytics_engine.core.errors import RemoteError, RequestError
from analytics_engine.core.payloads import parse_change
from analytics_engine.core.request_reply import RequestReplyClient

log = logging.getLogger(__name__)


class DefinitionSync:
    def __init__(
        self,
        registry: DefinitionRegistry,
        requests: Callable[[], RequestReplyClient],
        *,
        apply: Callable[[], None],
        timeout_s: float = 5.0,
        resync_interval_s: float = 60.0,
        retry_interval_s: float = 2.0,
    ) -> None:
        self._registry = registry
        self._requests = requests
        self._apply = apply
        self._timeout = timeout_s
        self._resync = resync_interval_s
        self._retry = min(retry_interval_s, resync_interval_s)
        self._failures = 0
        """Full lists refused in a row (the current outage)."""
        self._wake = asyncio.Event()
        self._listing: list[set[str]] = []
        """Per list request in flight, the codes `on_changed` has touched since it was sent."""
        self.syncs = 0

    async def _lookup(self, request_type: str, payload: dict[str, Any]) -> dict[str, Any]:
        return await self._requests().request(
            channels.METADATA_LOOKUP, request_type, payload, timeout=self._timeout
        )

    async def full_sync(self) -> bool:
        """Replace the metadata service's definitions with its full list. A code `on_changed`
        handled while the list was on its way keeps what the handler made of it: the list may
        predate that change (the service answered the list before the change, the handler's
        lookup after it), and taking it would undo the change until the next resync (a
        redefinition back to the old version, its windows reset, and forward again). A change
        the handler's lookup predates is announced after it, so the handler takes it next."""
        touched: set[str] = set()
        self._listing.append(touched)
        try:
            reply = await self._lookup("list_kpi_definitions", {})
        except RequestError as exc:
            # once per outage at INFO: while it lasts, `run` asks again every few seconds
            log.log(
                logging.INFO if self._failures == 0 else logging.DEBUG,
                "metadata service unavailable, keeping current definitions",
                extra={"reason": type(exc).__name__},
            )
            self._failures += 1
            return False
        finally:
            self._listing = [t for t in self._listing if t is not touched]  # not by equality
        items = reply.get("items", [])
        self._registry.replace_remote((i for i in items if isinstance(i, dict)), keep=touched)
        self._failures = 0
        self.syncs += 1
        self._apply()
        return True

    async def run(self) -> None:
        while True:
            synced = self.syncs > 0 and self._failures == 0  # the last full list came
            interval = self._resync if synced else self._retry
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            await self.full_sync()

    async def on_changed(self, deliveries: Sequence[Delivery]) -> None:
        """`metadata.changed` handler: re-fetch each changed KPI definition."""
        changed = False
        for delivery in deliveries:
            change = parse_change(delivery)
            if change.kind != "kpi_definition":
                continue
            code = change.code
            for touched in self._listing:
                touched.add(code)
            if change.action == "deleted":
                self._registry.delete_remote(code)
                changed = True
                continue
            try:
                item = await self._lookup("get_kpi_definition", {"code": code})
            except RemoteError as exc:
                if exc.code == "not_found":
                    self._registry.delete_remote(code)
                    changed = True
                else:
                    self._wake.set()  # heal with a full sync once metadata answers again
                continue
            except RequestError:
                self._wake.set()  # heal with a full sync when the service is back
                continue
            changed = self._registry.upsert_remote(item) or changed
        if changed:
            self._apply()
