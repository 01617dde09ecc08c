"""What the service puts in an empty store: the built-in entity types, and the KPI definitions
of `KPI_DEFINITIONS_DIR` (plain YAML or Kubernetes `KPIDefinition` resources).

Both are idempotent: an entity type is only created when no live one has that name (an edited
built-in is left alone), and a KPI whose stored spec is identical keeps its version.

A directory KPI is applied when its file says something new: at its first start, and after the
file changed (`seeded_kpis` keeps the spec each file gave when last applied). A file unchanged
since then is left alone, so a KPI edited or deleted through the API since stays as the user
left it across restarts (the directory seeds; it does not overrule the API at every start).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from analytics_engine.kpi.definitions import EntityTypeDefinition, FieldError, KPIDefinition
from analytics_engine.kpi.loader import DefinitionLoadError, load_valid_definitions
from analytics_engine.metadata.errors import Conflict, Invalid
from analytics_engine.metadata.store import KPI
from analytics_engine.metadata.validation import canonical

if TYPE_CHECKING:
    from analytics_engine.metadata.store import MetadataStore

log = logging.getLogger(__name__)

BUILTIN_ENTITY_TYPES: Final = (
    EntityTypeDefinition(
        entity_type="order",
        description="A customer order",
        attributes={
            "amount": "number",
            "currency": "string",
            "region": "string",
            "status": "string",
            "customer_id": "string",
            "items": "integer",
        },
    ),
    EntityTypeDefinition(
        entity_type="sensor",
        description="An IoT sensor reading",
        attributes={
            "sensor_id": "string",
            "site": "string",
            "temperature": "number",
            "humidity": "number",
            "battery": "number",
            "status": "string",
        },
    ),
)


@dataclass
class SeedReport:
    entity_types_created: list[str] = field(default_factory=list)
    kpis_created: list[str] = field(default_factory=list)
    kpis_updated: list[str] = field(default_factory=list)
    kpis_unchanged: list[str] = field(default_factory=list)
    """Files unchanged since last applied: the stored KPI (maybe edited or deleted) stands."""
    errors: list[str] = field(default_factory=list)


def load_directory(directory: Path, report: SeedReport) -> list[KPIDefinition]:
    """Definitions of every valid file; invalid files and duplicate codes are reported (one
    entry per file) and skipped, so one bad file does not keep the good ones out."""
    definitions, problems = load_valid_definitions(directory)
    if problems is not None:
        by_file: dict[Path, list[tuple[Path, FieldError]]] = {}
        for path, error in problems.errors:
            by_file.setdefault(path, []).append((path, error))
        report.errors.extend(str(DefinitionLoadError(errors)) for errors in by_file.values())
    return definitions


async def seed(store: MetadataStore, kpi_dir: Path | None) -> SeedReport:
    """Create missing built-in entity types, then upsert the directory's KPI definitions."""
    report = SeedReport()
    for entity in BUILTIN_ENTITY_TYPES:
        if await store.ensure_entity_type(entity):
            report.entity_types_created.append(entity.entity_type)
    if kpi_dir is not None:
        seeded = await store.seeded_kpis()
        for kpi in load_directory(kpi_dir, report):
            spec = canonical(kpi)
            applied = seeded.get(kpi.code)
            if applied is not None and KPI.same(applied, spec):
                report.kpis_unchanged.append(kpi.code)
                continue
            try:
                result = await store.put_kpi(kpi)
            except (Invalid, Conflict) as exc:
                report.errors.append(f"{kpi_dir}: KPI {kpi.code!r}: {exc}")
                continue
            await store.record_seeded_kpi(kpi.code, spec)
            if result.created:
                report.kpis_created.append(kpi.code)
            elif result.changed:
                report.kpis_updated.append(kpi.code)
            else:
                report.kpis_unchanged.append(kpi.code)
    for error in report.errors:
        log.error("KPI definition not loaded", extra={"error": error[:2000]})
    log.info(
        "metadata seeded",
        extra={
            "entity_types_created": report.entity_types_created,
            "kpis_created": report.kpis_created,
            "kpis_updated": report.kpis_updated,
            "kpis_unchanged": len(report.kpis_unchanged),
        },
    )
    return report
