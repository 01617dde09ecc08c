"""kmock's Kubernetes emulator plus the API-server behaviours kopf relies on.

kmock 0.8 stores objects as plain JSON and leaves server-side bookkeeping to the caller. These
gaps matter for kopf, and this subclass (test-only; it hooks kmock's private `_handle`,
`_serve_list` and `_serve_watch`) fills them:

* `metadata.resourceVersion` is bumped on every create/patch, lists report the current one and
  a watch from resourceVersion N only streams newer changes. Without this kopf receives every
  existing object twice (list + the watch's replay) and cannot tell stale events from fresh
  ones; its optimistic JSON-patch `test` on resourceVersion fails with 422 as on a real server.
* `metadata.generateName` is honoured, so kopf's Events (all `generateName: kopf-event-`) do not
  collide with 409 Conflict.
* A list's `labelSelector` is applied (equality-based: `k=v`, `k==v`, `k!=v`, `k`, `!k`), so a
  client that selects by labels sees only what a real server would return.

kmock still does not bump `metadata.generation` or validate against the CRD schema; the tests set
`generation` themselves and tests/unit/k8s checks the schema.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import aiohttp.web
import jsonpatch
import kmock


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """An equality-based label selector (what the API server accepts, minus set-based terms)."""
    for term in (part.strip() for part in selector.split(",")):
        if "!=" in term:
            key, value = (side.strip() for side in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (side.strip() for side in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term and term not in labels:
            return False
    return True


class KubeEmulator(kmock.KubernetesEmulator):
    def __attrs_post_init__(self) -> None:
        self._versions = itertools.count(1)
        self._last_version = 0
        super().__attrs_post_init__()

    def _next_version(self) -> str:
        self._last_version = next(self._versions)
        return str(self._last_version)

    async def _serve_list(self, request: Any) -> Any:
        listing = await super()._serve_list(request)
        listing["metadata"]["resourceVersion"] = str(self._last_version)
        selector = request.params.get("labelSelector", "")
        if selector:
            listing["items"] = [
                item
                for item in listing["items"]
                if selector_matches(selector, item.get("metadata", {}).get("labels") or {})
            ]
        return listing

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        since = request.params.get("resourceVersion", "")
        threshold = int(since) if since.isdigit() else 0
        async for event in super()._serve_watch(request):
            if isinstance(event, dict):
                version = event.get("object", {}).get("metadata", {}).get("resourceVersion", "")
                if version.isdigit() and int(version) <= threshold:
                    continue  # already in the list the client watches from
            yield event

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        if request.resource is not None:
            if request.action == kmock.action.CREATE and isinstance(request.data, dict):
                meta = request.data.setdefault("metadata", {})
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = f"{meta['generateName']}{next(self._versions):05d}"
                meta["resourceVersion"] = self._next_version()
            elif request.action == kmock.action.UPDATE:
                version = self._next_version()
                if isinstance(request.data, dict):
                    request.data.setdefault("metadata", {})["resourceVersion"] = version
                elif isinstance(request.data, list):
                    request.data.append(
                        {"op": "replace", "path": "/metadata/resourceVersion", "value": version}
                    )
        try:
            return await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as exc:
            error = kmock.KubernetesError(status=422, reason="Invalid", message=str(exc))
            return await self._render_error(error)
