"""Which KPI definitions the engine runs (pure): the `KPI_DEFINITIONS_DIR` seed plus the
metadata service's definitions, the metadata service winning for a code both define.

The directory is the local stack's seed, read at every start; the metadata service is the source
of truth once it answers. A code deleted in the metadata service but present in the directory
falls back to the directory's definition.

Every running definition has an origin (`directory` or `metadata`), stored with it in the
engine's checkpoint. At a restart (`DefinitionRegistry.restore`) the two differ:

* a metadata definition the checkpoint ran with stands in until the metadata service answers
  (a restart while it is down must not look like a redefinition: that resets the KPI's windows);
* a directory definition comes from the directory as it is now: unchanged, it keeps the
  checkpoint's version (its windows carry on); edited, it takes the next version (a definition
  change, as a new metadata version is: fresh windows, a backfill, results told apart by
  `definition_version`); deleted, it stops.

The directory's versions therefore live in the checkpoint (`directory_record`): every
definition the directory numbered, running or not (disabled, query KPIs, a metadata
definition's code, and files since deleted, so a code re-created or enabled again goes on
from its last version instead of reusing a number its earlier results carry for another
definition); 0 for a code the directory never defined (or once the checkpoint is deleted).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from typing import Any, Literal, TypeGuard, get_args

from pydantic import ValidationError

from analytics_engine.kpi import KPIDefinition, VersionedKPIDefinition

log = logging.getLogger(__name__)

Origin = Literal["directory", "metadata"]
ORIGINS: tuple[Origin, ...] = get_args(Origin)


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


def is_origin(value: object) -> TypeGuard[Origin]:
    return value in ORIGINS


def restored_origin(definition: VersionedKPIDefinition, recorded: Mapping[str, object]) -> Origin:
    """Where a definition restored from a checkpoint came from: as the checkpoint records it,
    else (a checkpoint written before origins were recorded) inferred from its version. Then
    the directory's definitions were always version 0, and the metadata service numbers a
    code's versions from 1 (a placeholder row of version 0 is never listed), so version 0
    came from the directory and any other version from the metadata service."""
    origin = recorded.get(definition.code)
    if is_origin(origin):
        return origin
    return "directory" if definition.version == 0 else "metadata"


def directory_definition(
    current: KPIDefinition, checkpointed: VersionedKPIDefinition | None
) -> VersionedKPIDefinition:
    """A directory definition as it runs after a restart, given the one the checkpoint ran from
    the directory for its code (None: none): that one when the file is unchanged, else the
    file's with the next version."""
    if checkpointed is None:
        return versioned(current)
    unchanged = versioned(current, checkpointed.version)
    if unchanged == checkpointed:
        return checkpointed
    return versioned(current, checkpointed.version + 1)


def split_by_origin(
    definitions: Iterable[VersionedKPIDefinition], recorded: Mapping[str, object]
) -> dict[Origin, dict[str, VersionedKPIDefinition]]:
    """A checkpoint's definitions by origin (see `restored_origin`)."""
    split: dict[Origin, dict[str, VersionedKPIDefinition]] = {o: {} for o in ORIGINS}
    for definition in definitions:
        split[restored_origin(definition, recorded)][definition.code] = definition
    return split


def recorded_directory(checkpoint: Mapping[str, Any] | None) -> list[VersionedKPIDefinition]:
    """The `directory_record` a checkpoint holds (none: written before it was recorded);
    an unreadable entry is logged and left out."""
    recorded = (checkpoint or {}).get("directory_definitions")
    definitions: list[VersionedKPIDefinition] = []
    for item in recorded if isinstance(recorded, list) else []:
        try:
            definitions.append(VersionedKPIDefinition.model_validate(item))
        except ValidationError:
            log.warning("dropping an unreadable directory definition from the checkpoint")
    return definitions


class DefinitionRegistry:
    def __init__(self, seed: Iterable[KPIDefinition] = ()) -> None:
        self._seed: dict[str, VersionedKPIDefinition] = {d.code: versioned(d) for d in seed}
        self._retired: dict[str, VersionedKPIDefinition] = {}
        """The directory's last definitions of codes it no longer has (files deleted)."""
        self._remote: dict[str, VersionedKPIDefinition] = {}
        self.remote_synced = False

    def replace_remote(
        self, items: Iterable[Mapping[str, Any]], keep: Collection[str] = ()
    ) -> None:
        """The full list from `list_kpi_definitions`; the codes in `keep` stay as they are
        (present or not): changes applied while the list was on its way, which it may predate
        (see `sync.DefinitionSync.full_sync`)."""
        remote: dict[str, VersionedKPIDefinition] = {}
        for item in items:
            definition = parse_definition(item)
            if definition is not None and definition.code not in keep:
                remote[definition.code] = definition
        for code in keep:
            if code in self._remote:
                remote[code] = self._remote[code]
        self._remote = remote
        self.remote_synced = True

    def restore(
        self,
        definitions: Iterable[VersionedKPIDefinition],
        origins: Mapping[str, object],
        directory: Iterable[VersionedKPIDefinition] = (),
    ) -> None:
        """Take in what a checkpoint ran with (`origins`: code -> origin as it recorded them)
        and its `directory_record` (`directory`; empty in a checkpoint written before it was
        recorded, which knows the versions of its running directory definitions only): its
        metadata definitions stand in for the metadata service's list until it answers; its
        directory definitions only carry their versions over to the directory's current ones
        (see the module docstring), and those the directory no longer has stop."""
        split = split_by_origin(definitions, origins)
        self._remote = split["metadata"]
        numbered = {**split["directory"], **{d.code: d for d in directory}}
        self._seed = {
            code: directory_definition(definition, numbered.get(code))
            for code, definition in self._seed.items()
        }
        self._retired = {c: d for c, d in numbered.items() if c not in self._seed}

    def directory_record(self) -> list[VersionedKPIDefinition]:
        """Every definition the directory numbered, current and retired, for the checkpoint
        (`restore` takes it back)."""
        return [d for _, d in sorted({**self._retired, **self._seed}.items())]

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

    def origins(self) -> dict[str, Origin]:
        """The origin of each of `effective()`'s definitions."""
        origins: dict[str, Origin] = dict.fromkeys(self._seed, "directory")
        origins.update(dict.fromkeys(self._remote, "metadata"))
        return origins

    def source_of(self, code: str) -> str:
        if code in self._remote:
            return "metadata"
        return "directory" if code in self._seed else "unknown"
