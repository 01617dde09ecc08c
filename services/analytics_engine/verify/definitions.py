"""Where verify gets the KPI definitions: the metadata service over `metadata.lookup` when one
answers (authoritative, with versions and entity attribute types), else `KPI_DEFINITIONS_DIR`."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from analytics_engine.core.channels import METADATA_LOOKUP
from analytics_engine.core.errors import RequestError
from analytics_engine.core.redis import connect
from analytics_engine.core.request_reply import RequestReplyClient
from analytics_engine.core.settings import default_instance_id
from analytics_engine.kpi.definitions import KPIDefinition, VersionedKPIDefinition
from analytics_engine.kpi.loader import load_definitions_dir

log = logging.getLogger(__name__)


class DefinitionsUnavailable(RuntimeError):
    """Neither the metadata service nor a definitions directory gave definitions."""


@dataclass(frozen=True, slots=True)
class Catalog:
    definitions: list[KPIDefinition]
    versions: dict[str, int] = field(default_factory=dict)
    attribute_types: dict[str, dict[str, str]] = field(default_factory=dict)
    source: str = ""


async def from_metadata(redis_url: str, *, timeout: float = 3.0) -> Catalog | None:
    """Definitions from the metadata service; None when nobody answers."""
    redis = connect(redis_url, max_connections=4)
    client = RequestReplyClient(
        redis, service="cli", instance=default_instance_id(), default_timeout=timeout
    )

    async def ask() -> tuple[dict[str, Any], dict[str, Any]]:
        reply = await client.request(METADATA_LOOKUP, "list_kpi_definitions", {})
        try:
            entities = await client.request(METADATA_LOOKUP, "list_entity_definitions", {})
        except RequestError:
            entities = {"items": []}
        return reply, entities

    try:
        await asyncio.wait_for(redis.ping(), 2.0)  # no Redis: do not wait for retries
        # Bounded as a whole: the client's subscription waits for Redis indefinitely.
        reply, entities = await asyncio.wait_for(ask(), timeout * 2 + 2)
    except (RequestError, OSError, ConnectionError, TimeoutError) as exc:
        log.info("metadata service unavailable: %s", exc)
        return None
    except Exception as exc:  # redis errors (connection refused, auth): fall back to the dir
        log.info("metadata lookup failed: %s", exc)
        return None
    finally:
        await client.close()
        await redis.aclose()
    definitions: list[KPIDefinition] = []
    versions: dict[str, int] = {}
    for item in reply.get("items", []):
        try:
            versioned = VersionedKPIDefinition.model_validate(item)
        except ValidationError as exc:
            log.warning("skipping an invalid definition from metadata: %s", exc)
            continue
        definitions.append(versioned.definition())
        versions[versioned.code] = versioned.version
    types: dict[str, dict[str, str]] = {}
    for entity in entities.get("items", []):
        attrs: Any = entity.get("attributes") if isinstance(entity, dict) else None
        if isinstance(attrs, dict) and isinstance(entity.get("entity_type"), str):
            types[entity["entity_type"]] = {str(k): str(v) for k, v in attrs.items()}
    return Catalog(definitions, versions, types, source="metadata service")


async def load_catalog(redis_url: str | None, directory: str | None) -> Catalog:
    if redis_url:
        catalog = await from_metadata(redis_url)
        if catalog is not None:
            return catalog
    if directory:
        return Catalog(load_definitions_dir(directory), source=f"directory {directory}")
    raise DefinitionsUnavailable(
        "no KPI definitions: no metadata service answered on metadata.lookup and "
        "KPI_DEFINITIONS_DIR is not set"
    )
