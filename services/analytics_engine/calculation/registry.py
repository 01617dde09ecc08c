"""Which KPI definitions the engine runs (pure): the `KPI_DEFINITIONS_DIR` seed plus the
metadata service's definitions, the metadata service winning for a code both define.

The directory is the local stack's seed (version 0 unless the file says otherwise); the metadata
service is the source of truth once it answers. A code deleted in the metadata service but
present in the directory falls back to the directory's definition.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from analytics_engine.kpi import KPIDefinition, VersionedKPIDefinition

log = logging.getLogger(__name__)


def versioned(definition: KPIDefinition, version: int = 0) -> VersionedKPIDefinition:
    return VersionedKPIDefinition.model_validate(
        {**definition.model_dump(mode="json"), "version": version}
    )


def parse_definition(data: Mapping[str, Any]) -> VersionedKPIDefinition | None:
    """A metadata item as a definition; None (logged) when it does not validate."""
    try:
        return VersionedKPIDefinition.model_validate({"version": 0, **data})
    except ValidationError as exc:
        log.warning(
            "ignoring an invalid KPI definition from the metadata service",
            extra={"code": data.get("code"), "errors": exc.error_count()},
        )
        return None


class DefinitionRegistry:
    def __init__(self, seed: Iterable[KPIDefinition] = ()) -> None:
        self._seed: dict[str, VersionedKPIDefinition] = {d.code: versioned(d) for d in seed}
        self._remote: dict[str, VersionedKPIDefinition] = {}
        self.remote_synced = False

    def replace_remote(self, items: Iterable[Mapping[str, Any]]) -> None:
        """The full list from `list_kpi_definitions`."""
        remote: dict[str, VersionedKPIDefinition] = {}
        for item in items:
            definition = parse_definition(item)
            if definition is not None:
                remote[definition.code] = definition
        self._remote = remote
        self.remote_synced = True

    def seed_remote(self, definitions: Iterable[VersionedKPIDefinition]) -> None:
        """What a checkpoint ran with stands in for the metadata service's list until it answers:
        a restart must not look like a redefinition (that would reset every KPI's windows)."""
        self._remote = {d.code: d for d in definitions}

    def upsert_remote(self, item: Mapping[str, Any]) -> bool:
        """One definition from `get_kpi_definition`; False when an older version is offered."""
        definition = parse_definition(item)
        if definition is None:
            return False
        current = self._remote.get(definition.code)
        if current is not None and current.version > definition.version:
            return False
        self._remote[definition.code] = definition
        return True

    def delete_remote(self, code: str) -> None:
        self._remote.pop(code, None)

    def effective(self) -> dict[str, VersionedKPIDefinition]:
        return {**self._seed, **self._remote}

    def source_of(self, code: str) -> str:
        if code in self._remote:
            return "metadata"
        return "directory" if code in self._seed else "unknown"
