"""The payload of every channel and request type: the protocol, as pydantic models.

`docs/protocol.md` documents them and `docs/schemas/` holds the JSON Schemas generated from this
module (`python scripts/gen_schemas.py`); a test fails when the two drift apart.
Services validate what they receive with these models, so the documentation is what runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from analytics_engine.core import channels
from analytics_engine.core.envelopes import validation_summary
from analytics_engine.core.errors import InvalidEvent

Identifier = str
DimensionValue = str | int | float | bool | None


def scalar_dimensions(dimensions: Mapping[str, object]) -> bool:
    """Whether every value of a result's `dimensions` is a `DimensionValue` (no object, no
    list): the database and the archive accept the same results."""
    return all(v is None or isinstance(v, str | int | float) for v in dimensions.values())


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _OpenPayload(BaseModel):
    """A payload that may grow fields later without breaking older readers."""

    model_config = ConfigDict(extra="allow", frozen=True)


# -- events ------------------------------------------------------------------------------------
class EntityEvent(_OpenPayload):
    """`simulation.entity.created` and `simulation.entity.updated`."""

    entity_type: str = Field(min_length=1, max_length=200)
    entity_id: str = Field(min_length=1, max_length=200)
    version: int = Field(ge=0, description="Increases with every event of one entity.")
    occurred_at: datetime = Field(description="Event time: when it happened at the source.")
    attributes: dict[str, Any] = Field(
        description="Required (`{}` when there are none): the database service dead-letters "
        "an event without it, and the calculation engine does not count it."
    )


class EntityDeactivated(_OpenPayload):
    """`simulation.entity.deactivated`."""

    entity_type: str = Field(min_length=1, max_length=200)
    entity_id: str = Field(min_length=1, max_length=200)
    version: int = Field(ge=0)
    occurred_at: datetime
    reason: str | None = Field(default=None, max_length=1000)


class SimulationTick(_OpenPayload):
    tick: int = Field(ge=0)
    simulated_time: datetime
    events_emitted: int = Field(ge=0)
    rate_per_s: float = Field(ge=0)


class KPIResult(_OpenPayload):
    """`kpi.calculated`, `kpi.calculated.{kpi_code}` and `archive.kpi_results`."""

    kpi_code: str = Field(min_length=1, max_length=63)
    value: float
    window_start: datetime
    window_end: datetime
    dimensions: dict[str, DimensionValue] = Field(default_factory=dict)
    sample_count: int = Field(ge=0)
    definition_version: int = Field(ge=0)
    computed_at: datetime
    version_since: datetime | None = Field(
        default=None,
        description="Where this definition version's results begin (its backfill's since), "
        "when the engine knows it: the database hides older versions' results from there on, "
        "also in windows this version computed and found empty.",
    )


class ArchivedEventRow(_OpenPayload):
    event_id: str
    event_kind: Literal["created", "updated", "deactivated"]
    entity_type: str
    entity_id: str
    version: int
    occurred_at: datetime
    published_at: datetime
    attributes: dict[str, Any] | None = None
    reason: str | None = None
    source: str | None = None


class ArchivalBatch(_OpenPayload):
    """`archival.events`: stored entity events past retention, to be written to the lake.

    The database deletes the rows only after `archival.confirmed` names the batch; a batch
    re-sent with the same `batch_id` carries the same rows.
    """

    batch_id: str = Field(min_length=1, max_length=100)
    entity_type: str
    date: date
    rows: list[ArchivedEventRow]


class ArchivalConfirmed(_OpenPayload):
    """`archival.confirmed`: the archival service wrote a batch durably."""

    batch_id: str
    object_key: str
    row_count: int = Field(ge=0)


class StreamSubscribe(_OpenPayload):
    """`stream.subscribe`: replay stored entity events of a type into `channel`."""

    subscription_id: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.\-]+$")
    entity_type: str
    since: datetime
    until: datetime | None = None
    channel: str = Field(
        min_length=1, max_length=200, pattern=r"^stream\.replay\.[A-Za-z0-9_.\-]+$"
    )


class StreamHeartbeat(_OpenPayload):
    subscription_id: str


class StreamUnsubscribe(_OpenPayload):
    subscription_id: str


class MetadataChanged(_OpenPayload):
    """`metadata.changed`: a definition was created, replaced or deleted."""

    kind: Literal["kpi_definition", "entity_type"]
    code: str
    action: Literal["upserted", "deleted"]
    version: int = Field(ge=0)


class ServiceHeartbeat(_OpenPayload):
    """`observability.heartbeat`: published by every service instance."""

    service: str
    instance: str
    version: str
    status: Literal["starting", "running", "stopping"]
    uptime_s: float
    consumer_lag: dict[str, int] = Field(default_factory=dict)
    port: int | None = None
    sent_at: datetime


EVENT_PAYLOADS: dict[str, type[BaseModel]] = {
    channels.ENTITY_CREATED: EntityEvent,
    channels.ENTITY_UPDATED: EntityEvent,
    channels.ENTITY_DEACTIVATED: EntityDeactivated,
    channels.SIMULATION_TICK: SimulationTick,
    channels.KPI_CALCULATED: KPIResult,
    channels.KPI_CALCULATED_PREFIX + "{kpi_code}": KPIResult,
    channels.ARCHIVE_KPI_RESULTS: KPIResult,
    channels.ARCHIVAL_EVENTS: ArchivalBatch,
    channels.ARCHIVAL_CONFIRMED: ArchivalConfirmed,
    channels.STREAM_SUBSCRIBE: StreamSubscribe,
    channels.STREAM_UNSUBSCRIBE: StreamUnsubscribe,
    channels.STREAM_HEARTBEAT: StreamHeartbeat,
    channels.METADATA_CHANGED: MetadataChanged,
    channels.SERVICE_HEARTBEAT: ServiceHeartbeat,
}


# -- requests ----------------------------------------------------------------------------------
class ExecuteQuery(_Payload):
    sql: str = Field(min_length=1, max_length=100_000)
    params: list[Any] = Field(default_factory=list, max_length=1000)
    max_rows: int | None = Field(default=None, ge=1)


class QueryResult(_OpenPayload):
    columns: list[str]
    rows: list[list[Any]]
    row_count: int
    truncated: bool


class KPIHistory(_Payload):
    kpi_code: str
    start: datetime
    end: datetime
    dimensions: dict[str, DimensionValue] | None = None
    limit: int | None = Field(default=None, ge=1)


class LatestKPIValues(_Payload):
    kpi_code: str | None = None


class GetEntity(_Payload):
    entity_type: str
    entity_id: str


ENTITY_PAGE_DEFAULT: Final = 100
ENTITY_PAGE_LIMIT: Final = 1000
"""Most entities one `list_entities` reply holds: a larger `limit` is cut to it."""


class ListEntities(_Payload):
    entity_type: str
    active: bool | None = Field(
        default=None, description="Only active (true) or deactivated (false) ones; else all."
    )
    after: str | None = Field(
        default=None,
        min_length=1,
        description="Only ids after this one: the previous page's `next_after`.",
    )
    limit: int | None = Field(
        default=None,
        ge=1,
        description=f"Most rows (default {ENTITY_PAGE_DEFAULT}; more than {ENTITY_PAGE_LIMIT} "
        f"is taken as {ENTITY_PAGE_LIMIT}).",
    )


class PurgeKPIResults(_Payload):
    kpi_code: str


class RecordKPIVersion(_Payload):
    kpi_code: str
    definition_version: int = Field(ge=1, lt=2**31)
    since: datetime = Field(description="Where this definition version's results begin.")


class RequestArchival(_Payload):
    older_than: str | None = Field(
        default=None,
        max_length=20,
        description="A duration such as `7d` or `0s` (default: the configured retention).",
    )


class GetKPIDefinition(_Payload):
    code: str


class GetEntityDefinition(_Payload):
    entity_type: str


class ListKPIDefinitions(_Payload):
    entity_type: str | None = Field(default=None, description="Only KPIs over this type.")


class Empty(_Payload):
    pass


REQUEST_PAYLOADS: dict[tuple[str, str], type[BaseModel]] = {
    (channels.DATABASE_QUERY, "execute_query"): ExecuteQuery,
    (channels.DATABASE_QUERY, "kpi_history"): KPIHistory,
    (channels.DATABASE_QUERY, "latest_kpi_values"): LatestKPIValues,
    (channels.DATABASE_QUERY, "get_entity"): GetEntity,
    (channels.DATABASE_QUERY, "list_entities"): ListEntities,
    (channels.DATABASE_COMMAND, "purge_kpi_results"): PurgeKPIResults,
    (channels.DATABASE_COMMAND, "request_archival"): RequestArchival,
    (channels.DATABASE_COMMAND, "record_kpi_version"): RecordKPIVersion,
    (channels.METADATA_LOOKUP, "get_kpi_definition"): GetKPIDefinition,
    (channels.METADATA_LOOKUP, "list_kpi_definitions"): ListKPIDefinitions,
    (channels.METADATA_LOOKUP, "get_entity_definition"): GetEntityDefinition,
    (channels.METADATA_LOOKUP, "list_entity_definitions"): Empty,
}


def parse_change(delivery: Any) -> MetadataChanged:
    """The `metadata.changed` payload of a delivery; `InvalidEvent` when it breaks the protocol."""
    try:
        return MetadataChanged.model_validate(delivery.event.payload)
    except ValidationError as exc:
        raise InvalidEvent(validation_summary(exc)) from None
