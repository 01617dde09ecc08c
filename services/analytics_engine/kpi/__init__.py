"""Pure KPI domain: definition model, CEL filters, windows, aggregation, the streaming engine.

No I/O here (the YAML loader reads files it is pointed at, nothing else); services wire it to the
bus and the database.
"""

from analytics_engine.kpi.aggregation import (
    Accumulator,
    accumulator_from_state,
    new_accumulator,
)
from analytics_engine.kpi.definitions import (
    Aggregation,
    AttributeType,
    EntityTypeDefinition,
    FieldError,
    KPIDefinition,
    QuerySpec,
    Thresholds,
    VersionedKPIDefinition,
    Window,
    check_against_entity,
    check_read_only_sql,
    validation_errors,
)
from analytics_engine.kpi.durations import Duration, format_duration, parse_duration
from analytics_engine.kpi.engine import (
    EngineStats,
    EntityEventView,
    EventFields,
    KPICounters,
    KPIEngine,
    KPIResult,
)
from analytics_engine.kpi.filters import (
    RESERVED_NAMES,
    CompiledFilter,
    FilterError,
    compile_filter,
    filter_to_sql,
    referenced_names,
)
from analytics_engine.kpi.loader import (
    DefinitionLoadError,
    load_definitions_dir,
    load_definitions_file,
)
from analytics_engine.kpi.sql import aggregate_sql, dimension_sql, number_sql
from analytics_engine.kpi.windows import windows_for

__all__ = [
    "RESERVED_NAMES",
    "Accumulator",
    "Aggregation",
    "AttributeType",
    "CompiledFilter",
    "DefinitionLoadError",
    "Duration",
    "EngineStats",
    "EntityEventView",
    "EntityTypeDefinition",
    "EventFields",
    "FieldError",
    "FilterError",
    "KPICounters",
    "KPIDefinition",
    "KPIEngine",
    "KPIResult",
    "QuerySpec",
    "Thresholds",
    "VersionedKPIDefinition",
    "Window",
    "accumulator_from_state",
    "aggregate_sql",
    "check_against_entity",
    "check_read_only_sql",
    "compile_filter",
    "dimension_sql",
    "filter_to_sql",
    "format_duration",
    "load_definitions_dir",
    "load_definitions_file",
    "new_accumulator",
    "number_sql",
    "parse_duration",
    "referenced_names",
    "validation_errors",
    "windows_for",
]
