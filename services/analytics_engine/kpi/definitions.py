"""The KPI definition model (docs/architecture.md, "KPI definition model").

Validation is where bad definitions must stop: the metadata service and the gateway call
:func:`validation_errors` to show messages next to form fields, so every rule reports a field path
(``window.slide``, ``group_by.2``) rather than a model-level blob. Cross-field rules raise a
``ValidationError`` from inside the model validator, which pydantic merges with the location
prefixed; that is what keeps them field-level.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any, Final, Literal, Self, TypeAlias

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from analytics_engine.kpi._cel import RESERVED_NAMES, FilterError
from analytics_engine.kpi.durations import Duration
from analytics_engine.kpi.filters import compile_filter, referenced_names

__all__ = [
    "Aggregation",
    "AttributeType",
    "EntityTypeDefinition",
    "FieldError",
    "KPIDefinition",
    "QuerySpec",
    "Thresholds",
    "VersionedKPIDefinition",
    "Window",
    "check_against_entity",
    "check_read_only_sql",
    "placeholder_errors",
    "sql_placeholders",
    "validation_errors",
]

Aggregation: TypeAlias = Literal["count", "sum", "avg", "min", "max", "count_distinct"]
AttributeType: TypeAlias = Literal["string", "integer", "number", "boolean", "timestamp"]
JsonScalar: TypeAlias = str | int | float | bool | None

NUMERIC_AGGREGATIONS: Final = frozenset({"sum", "avg", "min", "max"})
CODE_PATTERN: Final = r"^[a-z][a-z0-9_]{0,62}$"
ATTRIBUTE_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"
"""Attribute names must be CEL identifiers so filters can reference them."""

WINDOW_PARAMS: Final = 2
"""Parameters a query KPI with ``bind_window`` gets after its ``params``: the slot's start, end."""

MIN_WINDOW: Final = timedelta(seconds=1)
MAX_WINDOW: Final = timedelta(days=31)
MAX_WINDOWS_PER_EVENT: Final = 100
"""size/slide bound: each event lands in size/slide sliding windows."""
MAX_LATENESS: Final = timedelta(days=1)
MAX_LATENESS_FACTOR: Final = 10
"""allowed_lateness <= min(10 * size, 1 day): lateness keeps windows (and memory) open."""
MAX_GROUP_BY: Final = 5
MAX_SQL_LENGTH: Final = 20_000

_ATTRIBUTE_RE: Final = re.compile(ATTRIBUTE_PATTERN)


@dataclass(frozen=True, slots=True)
class FieldError:
    """One validation problem: ``field`` is a dotted path (``window.slide``), ``""`` for the
    document itself."""

    field: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


def _fail(title: str, errors: list[tuple[tuple[str | int, ...], str, Any]]) -> None:
    """Raise a pydantic ValidationError with field-level locations (see module docstring)."""
    if errors:
        raise ValidationError.from_exception_data(
            title,
            [
                InitErrorDetails(
                    type=PydanticCustomError("value_error", message),
                    loc=loc,
                    input=value,
                )
                for loc, message, value in errors
            ],
        )


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Window(_Model):
    """An event-time window, aligned to the Unix epoch."""

    type: Literal["tumbling", "sliding"]
    size: Duration
    slide: Duration | None = None
    allowed_lateness: Duration = Field(default=timedelta(0), json_schema_extra={"default": "0s"})

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors: list[tuple[tuple[str | int, ...], str, Any]] = []
        if self.size < MIN_WINDOW:
            errors.append((("size",), "must be at least 1s", self.size))
        elif self.size > MAX_WINDOW:
            errors.append((("size",), "must be at most 31d", self.size))
        if self.type == "tumbling" and self.slide is not None:
            errors.append(
                (
                    ("slide",),
                    "only sliding windows have a slide; remove it or use type: sliding",
                    self.slide,
                )
            )
        if self.type == "sliding":
            if self.slide is None:
                errors.append((("slide",), "required for sliding windows", None))
            elif self.slide <= timedelta(0):
                errors.append((("slide",), "must be positive", self.slide))
            elif self.slide > self.size:
                errors.append((("slide",), "must not exceed the window size", self.slide))
            elif self.size % self.slide:
                errors.append(
                    (("slide",), "the window size must be a multiple of the slide", self.slide)
                )
            elif self.size // self.slide > MAX_WINDOWS_PER_EVENT:
                errors.append(
                    (
                        ("slide",),
                        f"size/slide must be at most "
                        f"{MAX_WINDOWS_PER_EVENT} (every event lands in "
                        f"size/slide windows)",
                        self.slide,
                    )
                )
        limit = min(self.size * MAX_LATENESS_FACTOR, MAX_LATENESS)
        if self.allowed_lateness > limit:
            errors.append(
                (
                    ("allowed_lateness",),
                    "must be at most 10 times the window size and at most 1d",
                    self.allowed_lateness,
                )
            )
        _fail("Window", errors)
        return self


class Thresholds(_Model):
    """Alerting thresholds; ``direction`` says which side is bad."""

    warning: float | None = None
    critical: float | None = None
    direction: Literal["above", "below"] = "above"

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.warning is not None and self.critical is not None:
            worse = (
                self.critical >= self.warning
                if self.direction == "above"
                else self.critical <= self.warning
            )
            if not worse:
                side = "at or above" if self.direction == "above" else "at or below"
                _fail(
                    "Thresholds",
                    [
                        (
                            ("critical",),
                            f"must be {side} warning when direction is {self.direction}",
                            self.critical,
                        )
                    ],
                )
        return self

    def level(self, value: float) -> Literal["ok", "warning", "critical"]:
        """Classify a KPI value."""

        def bad(limit: float | None) -> bool:
            if limit is None:
                return False
            return value >= limit if self.direction == "above" else value <= limit

        if bad(self.critical):
            return "critical"
        if bad(self.warning):
            return "warning"
        return "ok"


_SQL_TOKENS: Final = re.compile(
    r"""(?P<comment>--[^\n]*|/\*.*?\*/)"""
    r"""|(?P<string>[eE]?'(?:[^']|'')*')"""
    r"""|(?P<ident>"(?:[^"]|"")*")"""
    r"""|(?P<dollar>\$(?P<tag>[A-Za-z_][A-Za-z0-9_]*|)\$.*?\$(?P=tag)\$)""",
    re.S,
)
_SQL_WRITES: Final = re.compile(
    r"\b(insert|update|delete|merge|upsert|create|alter|drop|truncate|grant|revoke|copy|call"
    r"|vacuum|lock|refresh|cluster|reindex|listen|notify|prepare|execute|deallocate|discard"
    r"|import|into)\b|\bfor\s+(no\s+key\s+)?(key\s+)?share\b",
    re.I,
)
_SQL_PARAM: Final = re.compile(r"(?<![\w$])\$(\d+)")
"""A ``$n`` placeholder; not inside an identifier (``a$1`` is one in PostgreSQL)."""


def check_read_only_sql(sql: str) -> int:
    """Lexical check that ``sql`` is one read-only statement; returns the highest ``$n`` used.

    Deliberately simple (comments and quoted text are blanked, then keywords are scanned): the
    database service's read-only role is the real guarantee. Raises ``ValueError``.
    """
    return max(sql_placeholders(sql), default=0)


def sql_placeholders(sql: str) -> frozenset[int]:
    """The ``$n`` numbers a read-only statement uses (outside comments and quoted text), after
    the checks of `check_read_only_sql`. Raises ``ValueError``."""
    if len(sql) > MAX_SQL_LENGTH:
        raise ValueError(f"at most {MAX_SQL_LENGTH} characters")
    blanked = _SQL_TOKENS.sub(
        lambda m: " " if m.group("comment") else ("''" if m.group("ident") is None else '""'),
        sql,
    ).strip()
    if not blanked:
        raise ValueError("the query is empty")
    if "'" in blanked.replace("''", "") or '"' in blanked.replace('""', "") or "/*" in blanked:
        raise ValueError("unterminated string, identifier or comment")
    body = blanked.removesuffix(";").rstrip()
    if ";" in body:
        raise ValueError("must be a single statement (';' only allowed at the end)")
    first = re.match(r"[\s(]*([A-Za-z]+)", body)
    if first is None or first.group(1).lower() not in ("select", "with"):
        raise ValueError("must be a read-only query starting with SELECT or WITH")
    write = _SQL_WRITES.search(body)
    if write is not None:
        raise ValueError(f"read-only queries may not use {write.group(0).upper()!r}")
    return frozenset(int(n) for n in _SQL_PARAM.findall(body))


def placeholder_errors(
    placeholders: frozenset[int], params: int, *, bind_window: bool = False
) -> str | None:
    """Why `params` values cannot run a statement using `placeholders` (None: they can).

    The engine prepares the statement and PostgreSQL counts its parameters as the highest
    ``$n``; it refuses a statement whose ``$1..$n`` has a hole (the type of the missing one cannot
    be determined), and the database service refuses a params list of any other length. So the
    placeholders must be exactly ``$1..$len(params)``, or with `bind_window` (the engine appends
    the slot's start and end) exactly ``$1..$len(params)+2``.
    """
    highest = max(placeholders, default=0)
    if 0 in placeholders:
        return "placeholders are numbered from $1 ($0 does not exist)"
    holes = [n for n in range(1, highest + 1) if n not in placeholders]
    if holes:
        return (
            f"the query uses ${highest} but not ${holes[0]}: placeholders must be $1..$n "
            "without holes"
        )
    bound = params + (WINDOW_PARAMS if bind_window else 0)
    if highest != bound:
        given = (
            f"{params} params are given and bind_window adds ${params + 1} (window_start) "
            f"and ${params + 2} (window_end); use both"
            if bind_window
            else f"{params} params are given; give exactly one param per placeholder"
        )
        return (
            f"the query uses {highest} placeholder(s) ($1..${highest})"
            if highest
            else "the query uses no placeholder"
        ) + f" but {given}"
    return None


class QuerySpec(_Model):
    """A query KPI: ``sql`` runs every ``schedule`` on the read-only role.

    With ``bind_window``, each run binds its slot ``[window_start, window_end)`` after
    ``params``: ``$len(params)+1`` is the start and ``$len(params)+2`` the end, as ISO-8601
    UTC timestamps (the database service binds them to ``timestamptz`` parameters).

    The run for a slot starts ``delay`` after the slot ends (``0 <= delay < schedule``), so
    events stored shortly after the slot's end (still on their way through the stream and the
    database service's write batches) are counted in it. It defaults to 0s: no default fits
    every schedule (a 1s schedule allows less than 1s), a default would silently move the
    runs of every existing query KPI, and how long events take to be stored depends on the
    deployment (in normal operation a couple of seconds covers the stream and the database
    service's write batches; a backlog takes longer whatever the delay).
    """

    sql: str = Field(min_length=1)
    params: list[JsonScalar] = Field(default_factory=list)
    schedule: Duration = Field(default=timedelta(seconds=60), json_schema_extra={"default": "60s"})
    bind_window: bool = False
    delay: Duration = Field(default=timedelta(0), json_schema_extra={"default": "0s"})

    @field_validator("sql")
    @classmethod
    def _read_only(cls, value: str) -> str:
        check_read_only_sql(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors: list[tuple[tuple[str | int, ...], str, Any]] = []
        mismatch = placeholder_errors(
            sql_placeholders(self.sql), len(self.params), bind_window=self.bind_window
        )
        if mismatch is not None:
            errors.append((("params",), mismatch, self.params))
        if self.schedule < MIN_WINDOW:
            errors.append((("schedule",), "must be at least 1s", self.schedule))
        elif self.delay >= self.schedule:
            errors.append((("delay",), "must be shorter than schedule", self.delay))
        _fail("QuerySpec", errors)
        return self


def _attribute_name(value: str, what: str) -> str:
    if not _ATTRIBUTE_RE.match(value):
        raise ValueError(
            f"{what} must be an identifier (letters, digits, '_', not starting "
            f"with a digit, at most 63 characters)"
        )
    if value in RESERVED_NAMES:
        raise ValueError(f"{value!r} is reserved (event metadata, not an attribute)")
    return value


class KPIDefinition(_Model):
    """A KPI: either streaming (``aggregation`` + ``window``) or query (``query``)."""

    code: str = Field(pattern=CODE_PATTERN)
    display_name: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=2000)
    entity_type: str = Field(pattern=CODE_PATTERN)
    aggregation: Aggregation | None = None
    field: str | None = None
    filter: str | None = None
    group_by: list[str] = Field(default_factory=list)
    window: Window | None = None
    unit: str | None = Field(default=None, max_length=50)
    thresholds: Thresholds | None = None
    enabled: bool = True
    query: QuerySpec | None = None

    @field_validator("field")
    @classmethod
    def _field_name(cls, value: str | None) -> str | None:
        return None if value is None else _attribute_name(value, "field")

    @field_validator("group_by")
    @classmethod
    def _group_by(cls, value: list[str]) -> list[str]:
        if len(value) > MAX_GROUP_BY:
            raise ValueError(f"at most {MAX_GROUP_BY} attributes")
        if len(set(value)) != len(value):
            raise ValueError("attributes must be unique")
        _fail(
            "group_by",
            [((i,), str(exc), name) for i, name in enumerate(value) for exc in _name_errors(name)],
        )
        return value

    @field_validator("filter")
    @classmethod
    def _filter_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                compile_filter(value)
            except FilterError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors: list[tuple[tuple[str | int, ...], str, Any]] = []
        if self.query is not None:
            for name in ("aggregation", "field", "window", "filter"):
                if getattr(self, name) is not None:
                    errors.append(
                        (
                            (name,),
                            "not allowed for query KPIs (query.sql computes "
                            "the value); remove it or remove query",
                            getattr(self, name),
                        )
                    )
            if self.group_by:
                errors.append((("group_by",), "not allowed for query KPIs", self.group_by))
        else:
            if self.aggregation is None:
                errors.append(
                    (
                        ("aggregation",),
                        "required for a streaming KPI (or set query for a query KPI)",
                        None,
                    )
                )
            if self.window is None:
                errors.append(
                    (
                        ("window",),
                        "required for a streaming KPI (or set query for a query KPI)",
                        None,
                    )
                )
            if self.aggregation not in (None, "count") and self.field is None:
                errors.append((("field",), f"required for aggregation {self.aggregation!r}", None))
        _fail("KPIDefinition", errors)
        return self

    @property
    def is_streaming(self) -> bool:
        return self.query is None


def _name_errors(name: str) -> list[ValueError]:
    try:
        _attribute_name(name, "a group_by attribute")
    except ValueError as exc:
        return [exc]
    return []


class VersionedKPIDefinition(KPIDefinition):
    """A stored definition as served by the metadata service (definition + ``version``).

    Unknown extra keys (timestamps etc. added by the store) are ignored here."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    version: int = Field(ge=0)

    def definition(self) -> KPIDefinition:
        """The definition without its version."""
        return KPIDefinition.model_validate(self.model_dump(exclude={"version"}))


class EntityTypeDefinition(_Model):
    """An entity type the simulator produces and KPIs aggregate."""

    entity_type: str = Field(pattern=CODE_PATTERN)
    description: str = Field(default="", max_length=2000)
    attributes: dict[Annotated[str, Field(pattern=ATTRIBUTE_PATTERN)], AttributeType] = Field(
        default_factory=dict
    )


def _loc_path(loc: tuple[str | int, ...]) -> str:
    return ".".join(str(part) for part in loc)


def _clean(message: str) -> str:
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def validation_errors(data: Any, model: type[BaseModel] = KPIDefinition) -> list[FieldError]:
    """Validate ``data`` and return field-level errors (empty list when valid)."""
    try:
        model.model_validate(data)
    except ValidationError as exc:
        return [FieldError(_loc_path(tuple(e["loc"])), _clean(e["msg"])) for e in exc.errors()]
    return []


def check_against_entity(kpi: KPIDefinition, entity: EntityTypeDefinition) -> list[FieldError]:
    """Check the attributes a KPI references against its entity type."""
    errors: list[FieldError] = []
    attrs: Mapping[str, str] = entity.attributes
    known = ", ".join(sorted(attrs)) or "none"
    if kpi.entity_type != entity.entity_type:
        errors.append(
            FieldError(
                "entity_type", f"the KPI is for {kpi.entity_type!r}, not {entity.entity_type!r}"
            )
        )
    if kpi.query is not None:
        return errors
    if kpi.field is not None:
        if kpi.field not in attrs:
            errors.append(
                FieldError(
                    "field",
                    f"unknown attribute {kpi.field!r} of entity type "
                    f"{entity.entity_type!r} (known: {known})",
                )
            )
        elif kpi.aggregation in NUMERIC_AGGREGATIONS and attrs[kpi.field] not in (
            "integer",
            "number",
        ):
            errors.append(
                FieldError(
                    "field",
                    f"{kpi.aggregation} needs a numeric attribute; "
                    f"{kpi.field!r} is {attrs[kpi.field]}",
                )
            )
    for i, name in enumerate(kpi.group_by):
        if name not in attrs:
            errors.append(
                FieldError(
                    f"group_by.{i}",
                    f"unknown attribute {name!r} of entity "
                    f"type {entity.entity_type!r} "
                    f"(known: {known})",
                )
            )
    if kpi.filter is not None:
        unknown = sorted(referenced_names(kpi.filter) - RESERVED_NAMES - set(attrs))
        if unknown:
            errors.append(
                FieldError(
                    "filter",
                    f"unknown attribute(s) "
                    f"{', '.join(map(repr, unknown))} of entity type "
                    f"{entity.entity_type!r} (known: {known})",
                )
            )
        else:
            try:
                compile_filter(kpi.filter, types=attrs)
            except FilterError as exc:
                errors.append(FieldError("filter", str(exc)))
    return errors
