"""`MetadataRequestHandler`: the `metadata.lookup` request types (spec, "Example 3").

Replies carry the stored definition plus its `version`, the same shape as the HTTP API.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from analytics_engine.core.errors import HandlerError
from analytics_engine.metadata.store import ENTITY_TYPE, KPI, Kind, MetadataStore
from analytics_engine.metadata.validation import with_version

if TYPE_CHECKING:
    from analytics_engine.core.envelopes import Request
    from analytics_engine.core.request_reply import RequestHandler


def _text(payload: Mapping[str, Any], name: str, *, required: bool) -> str | None:
    value = payload.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise HandlerError(f"payload.{name} must be a non-empty string", code="bad_request")
    return value


class MetadataRequestHandler:
    def __init__(self, store: MetadataStore) -> None:
        self._store = store

    def handlers(self) -> dict[str, RequestHandler]:
        return {
            "get_kpi_definition": self.get_kpi_definition,
            "list_kpi_definitions": self.list_kpi_definitions,
            "get_entity_definition": self.get_entity_definition,
            "list_entity_definitions": self.list_entity_definitions,
        }

    async def _get(self, kind: Kind, key: str) -> dict[str, Any]:
        stored = await self._store.get(kind, key)
        if stored is None:
            raise HandlerError(f"{kind.label} {key!r} not found", code="not_found")
        return with_version(stored.spec, stored.version)

    async def get_kpi_definition(self, request: Request) -> dict[str, Any]:
        """`{code}` -> the definition with `version`."""
        code = _text(request.payload, "code", required=True)
        assert code is not None
        return await self._get(KPI, code)

    async def list_kpi_definitions(self, request: Request) -> dict[str, Any]:
        """`{entity_type?}` -> `{items: [definition + version]}` (disabled KPIs included)."""
        entity_type = _text(request.payload, "entity_type", required=False)
        items = await self._store.list_all(KPI, entity_type=entity_type)
        return {"items": [with_version(s.spec, s.version) for s in items]}

    async def get_entity_definition(self, request: Request) -> dict[str, Any]:
        """`{entity_type}` -> the entity type with `version`."""
        entity_type = _text(request.payload, "entity_type", required=True)
        assert entity_type is not None
        return await self._get(ENTITY_TYPE, entity_type)

    async def list_entity_definitions(self, _: Request) -> dict[str, Any]:
        items = await self._store.list_all(ENTITY_TYPE)
        return {"items": [with_version(s.spec, s.version) for s in items]}
