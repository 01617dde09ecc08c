"""The incremental KPI engine: events in, window results out. Pure: no I/O, no clock of its own.

Semantics (docs/architecture.md, "KPI semantics"):

* window assignment by the payload's ``occurred_at`` (epoch-aligned, see ``windows.py``);
* the *watermark* is the highest ``published_at`` seen (envelope ``timestamp``), or
  ``now - idle_close_grace`` after :meth:`KPIEngine.advance`;
* a window ``W`` accepts an event iff ``W.end + allowed_lateness > watermark`` (the watermark
  already includes the event's own ``published_at``); otherwise the event is *late* for ``W``:
  counted per KPI, never mixed in;
* ``W`` is emitted exactly once, as soon as the watermark reaches ``W.end + allowed_lateness``;
* state is per (window, group); ``group_by`` values become ``dimensions`` (missing -> ``None``;
  an event with a list or an object there is left out of the KPI and counted);
* duplicates (same ``event_id`` within the last ``dedupe_capacity`` events) are dropped.

Hot path design: definitions are compiled once into ``_KPIState`` objects (no pydantic per event),
grouped per ``entity_type``; times are integer microseconds; the filter activation is the
attributes mapping itself unless the filter reads a reserved name.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from analytics_engine.kpi.aggregation import (
    ACCUMULATOR_TYPES,
    Accumulator,
    accumulator_from_state,
    distinct_key,
)
from analytics_engine.kpi.definitions import VersionedKPIDefinition
from analytics_engine.kpi.filters import CompiledFilter, compile_filter
from analytics_engine.kpi.windows import EPOCH, from_micros, to_micros, window_starts

__all__ = [
    "SNAPSHOT_FORMAT",
    "EngineStats",
    "EntityEventView",
    "EventFields",
    "KPICounters",
    "KPIEngine",
    "KPIResult",
]

SNAPSHOT_FORMAT: Final = 1
_US: Final = timedelta(microseconds=1)
_NEVER: Final = -(2**63)
_INF: Final = 2**63
_COUNT_ALL, _COUNT_PRESENT, _NUMERIC, _DISTINCT = range(4)
_AGGREGATED_KINDS: Final = frozenset({"created", "updated"})


@dataclass(frozen=True, slots=True)
class EntityEventView:
    """What the engine needs from a ``simulation.entity.created|updated`` envelope.

    Any object with these attributes works (the engine only reads them)."""

    event_id: str
    event_kind: str
    entity_type: str
    entity_id: str
    version: int
    occurred_at: datetime
    published_at: datetime
    attributes: Mapping[str, Any]


EventFields = tuple[str, str, str, str, int, int, int, Mapping[str, Any]]
"""An event as :meth:`KPIEngine.feed` takes it: the fields of :class:`EntityEventView` in that
order, ``occurred_at`` and ``published_at`` as epoch microseconds."""


def iso_utc(value: datetime) -> str:
    """ISO 8601 in UTC with `Z`, as results carry their timestamps."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class KPIResult:
    """One emitted (window, group) value."""

    kpi_code: str
    value: float
    window_start: datetime
    window_end: datetime
    dimensions: dict[str, Any]
    sample_count: int
    definition_version: int
    computed_at: datetime

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (timestamps as ISO 8601 with ``Z``)."""
        return {
            "kpi_code": self.kpi_code,
            "value": self.value,
            "window_start": iso_utc(self.window_start),
            "window_end": iso_utc(self.window_end),
            "dimensions": dict(self.dimensions),
            "sample_count": self.sample_count,
            "definition_version": self.definition_version,
            "computed_at": iso_utc(self.computed_at),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KPIResult:
        return cls(
            kpi_code=str(data["kpi_code"]),
            value=float(data["value"]),
            window_start=datetime.fromisoformat(data["window_start"]),
            window_end=datetime.fromisoformat(data["window_end"]),
            dimensions=dict(data["dimensions"]),
            sample_count=int(data["sample_count"]),
            definition_version=int(data["definition_version"]),
            computed_at=datetime.fromisoformat(data["computed_at"]),
        )


@dataclass(slots=True)
class KPICounters:
    """Monotonic per-KPI counters (kept across hot reloads; not part of snapshots)."""

    late_events: int = 0
    """Events that passed the filter but missed at least one of their windows."""
    filtered_out: int = 0
    evaluation_errors: int = 0
    """Filter evaluations that errored (missing attribute, wrong type): treated as no match."""
    invalid_values: int = 0
    """Matched events whose ``field`` was not a number for sum/avg/min/max (value ignored)."""
    invalid_dimensions: int = 0
    """Matched events with a list or an object in a ``group_by`` attribute: no dimension value
    (results carry scalars only), so the event is left out of this KPI."""


@dataclass(frozen=True, slots=True)
class EngineStats:
    events_processed: int
    duplicates: int
    ignored_events: int
    results_emitted: int
    open_windows: int
    watermark: datetime | None
    kpis: dict[str, KPICounters] = field(default_factory=dict)


def _micros(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - EPOCH) // _US


class _NotADimension(Exception):
    """A ``group_by`` attribute holds a list or an object."""


def _dim_key(value: Any) -> Hashable:
    """Group identity of a dimension value (``True`` must not merge with ``1``)."""
    kind = type(value)
    if kind is list or kind is dict:
        raise _NotADimension
    return value if kind is str else distinct_key(value)


def _fingerprint(definition: VersionedKPIDefinition) -> str:
    data = definition.model_dump(mode="json")
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class _Group:
    __slots__ = ("acc", "dims", "n")

    def __init__(self, dims: tuple[Any, ...], acc: Accumulator, n: int = 0) -> None:
        self.dims = dims
        self.acc = acc
        self.n = n


class _KPIState:
    """A compiled definition plus its open windows."""

    __slots__ = (
        "aggregation",
        "apply",
        "close_offset",
        "code",
        "counters",
        "definition",
        "field",
        "filter",
        "fingerprint",
        "group_by",
        "heap",
        "mode",
        "size",
        "slide",
        "uses_reserved",
        "version",
        "windows",
    )

    def __init__(self, definition: VersionedKPIDefinition, counters: KPICounters) -> None:
        window = definition.window
        aggregation = definition.aggregation
        assert window is not None and aggregation is not None  # streaming KPIs only
        self.definition = definition
        self.fingerprint = _fingerprint(definition)
        self.code = definition.code
        self.version = definition.version
        self.counters = counters
        self.filter: CompiledFilter | None = (
            None if definition.filter is None else compile_filter(definition.filter)
        )
        self.uses_reserved = self.filter is not None and self.filter.uses_reserved
        self.field = definition.field
        self.aggregation = aggregation
        if aggregation == "count":
            self.mode = _COUNT_ALL if definition.field is None else _COUNT_PRESENT
        elif aggregation == "count_distinct":
            self.mode = _DISTINCT
        else:
            self.mode = _NUMERIC
        self.group_by = tuple(definition.group_by)
        self.size = to_micros(window.size)
        self.slide = None if window.slide is None else to_micros(window.slide)
        self.close_offset = self.size + to_micros(window.allowed_lateness)
        self.windows: dict[int, dict[Hashable, _Group]] = {}
        self.heap: list[int] = []
        self.apply: _Apply = _compile_apply(self)

    def next_close(self) -> int:
        return self.heap[0] + self.close_offset if self.heap else _INF

    def open_window(self, start: int) -> dict[Hashable, _Group]:
        groups: dict[Hashable, _Group] = {}
        self.windows[start] = groups
        heapq.heappush(self.heap, start)
        return groups


_Apply = Callable[[Mapping[str, Any], int, int], int]
"""``apply(attributes, occurred_us, watermark_us)`` of a compiled KPI: adds one event that
passed the filter; returns the close time of the earliest window it opened (``_INF`` if none)."""


def _compile_apply(k: _KPIState) -> _Apply:
    """The per-event update of one KPI as a closure specialised on its definition.

    Everything fixed per definition (aggregation mode, field, group-by names, window shape) is
    bound here once, so the hot path reads no attributes and takes no per-definition decisions:
    it runs once per KPI of the event's entity type, the engine's main per-event cost.
    """
    mode = k.mode
    field_name = k.field if k.field is not None else ""
    group_by = k.group_by
    single = group_by[0] if len(group_by) == 1 else None
    size, slide, offset = k.size, k.slide, k.close_offset
    windows, open_window, counters = k.windows, k.open_window, k.counters
    accumulator = ACCUMULATOR_TYPES[k.aggregation]
    count_all, numeric = mode == _COUNT_ALL, mode == _NUMERIC

    def apply(attrs: Mapping[str, Any], occurred: int, watermark: int) -> int:
        value: Any = None
        usable = True
        if not count_all:
            value = attrs.get(field_name)
            if value is None:
                usable = False
            elif numeric:
                vt = type(value)
                if vt is int:
                    value = float(value)
                elif vt is not float:
                    usable = False
                    counters.invalid_values += 1
        try:
            if single is not None:
                v = attrs.get(single)
                dims: tuple[Any, ...] = (v,)
                key: Hashable = dims if type(v) is str else (_dim_key(v),)
            elif group_by:
                dims = tuple([attrs.get(name) for name in group_by])
                key = tuple([v if type(v) is str else _dim_key(v) for v in dims])
            else:
                dims = key = ()
        except _NotADimension:
            counters.invalid_dimensions += 1
            return _INF
        opened = _INF
        if slide is None:
            start = occurred - occurred % size
            if start + offset <= watermark:
                counters.late_events += 1
                return opened
            groups = windows.get(start)
            if groups is None:
                groups = open_window(start)
                opened = start + offset
            group = groups.get(key)
            if group is None:
                group = groups[key] = _Group(dims, accumulator())
            group.n += 1
            if usable:
                group.acc.add(value)
            return opened
        late = False
        for start in window_starts(occurred, size, slide):
            if start + offset <= watermark:
                late = True
                continue
            groups = windows.get(start)
            if groups is None:
                groups = open_window(start)
                if start + offset < opened:  # noqa: PLR1730 - hot path
                    opened = start + offset
            group = groups.get(key)
            if group is None:
                group = groups[key] = _Group(dims, accumulator())
            group.n += 1
            if usable:
                group.acc.add(value)
        if late:
            counters.late_events += 1
        return opened

    return apply


class KPIEngine:
    """Incremental streaming-KPI computation; see the module docstring for the semantics.

    ``clock`` supplies ``computed_at`` (the only wall-clock input, so results are otherwise a
    pure function of the events). Not thread-safe: drive it from one task.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], datetime],
        idle_close_grace: timedelta = timedelta(seconds=5),
        dedupe_capacity: int = 100_000,
    ) -> None:
        if dedupe_capacity < 0:
            raise ValueError("dedupe_capacity must be >= 0")
        self._clock = clock
        self._grace = to_micros(idle_close_grace)
        self._capacity = dedupe_capacity
        self._recent: deque[str] = deque()
        self._seen: set[str] = set()
        self._recent_base = 0  # ids the ring had taken before `_events` started counting
        self._kpis: dict[str, _KPIState] = {}
        self._by_type: dict[str, tuple[_KPIState, ...]] = {}
        self._counters: dict[str, KPICounters] = {}
        self._results: list[KPIResult] = []
        self._watermark = _NEVER
        self._next_close = _INF
        self._events = 0
        self._duplicates = 0
        self._ignored = 0
        self._emitted = 0

    # -- definitions -----------------------------------------------------------------------

    def set_definitions(self, definitions: Iterable[VersionedKPIDefinition]) -> None:
        """Replace the active definitions (hot reload).

        Unchanged definitions keep their state; new or changed ones (other version or content)
        start empty; removed, disabled and query KPIs are dropped without emitting.
        """
        active: dict[str, _KPIState] = {}
        for definition in definitions:
            if definition.code in active:
                raise ValueError(f"duplicate KPI code {definition.code!r}")
            if not definition.enabled or definition.query is not None:
                continue
            current = self._kpis.get(definition.code)
            if current is not None and current.definition == definition:
                active[definition.code] = current
                continue
            counters = self._counters.setdefault(definition.code, KPICounters())
            active[definition.code] = _KPIState(definition, counters)
        self._kpis = active
        by_type: dict[str, list[_KPIState]] = {}
        for code in sorted(active):
            by_type.setdefault(active[code].definition.entity_type, []).append(active[code])
        self._by_type = {k: tuple(v) for k, v in by_type.items()}
        self._refresh_next_close()

    @property
    def definitions(self) -> dict[str, VersionedKPIDefinition]:
        return {code: state.definition for code, state in self._kpis.items()}

    # -- events ----------------------------------------------------------------------------

    def process(self, event: EntityEventView) -> None:
        """Feed one event (any order; duplicates are dropped)."""
        self.feed(
            (
                event.event_id,
                event.event_kind,
                event.entity_type,
                event.entity_id,
                event.version,
                _micros(event.occurred_at),
                _micros(event.published_at),
                event.attributes,
            )
        )

    def feed(self, fields: EventFields) -> None:
        """:meth:`process` for callers that hold the event's fields already, with its times
        as epoch microseconds (the stream processor's hot path: no view object per event)."""
        event_id, kind, entity_type, _, _, _, published, _ = fields
        seen = self._seen
        if event_id in seen:
            self._duplicates += 1
            return
        if self._capacity:
            seen.add(event_id)
            recent = self._recent
            recent.append(event_id)
            if len(recent) > self._capacity:
                seen.discard(recent.popleft())
        self._events += 1
        if published > self._watermark:  # noqa: PLR1730 - hot path: no max() call
            self._watermark = published
        if kind not in _AGGREGATED_KINDS:
            self._ignored += 1
        else:
            kpis = self._by_type.get(entity_type)
            if kpis:
                self._aggregate(kpis, fields)
        if self._watermark >= self._next_close:
            self._close()

    def _aggregate(self, kpis: tuple[_KPIState, ...], fields: EventFields) -> None:
        _, kind, _, entity_id, version, occurred, _, attrs = fields
        watermark = self._watermark
        next_close = self._next_close
        activation: Mapping[str, Any] | None = None
        for k in kpis:
            flt = k.filter
            if flt is not None:
                if k.uses_reserved:
                    if activation is None:
                        activation = {
                            **attrs,
                            "event": kind,
                            "entity_id": entity_id,
                            "version": version,
                        }
                    verdict = flt.evaluate(activation)
                else:
                    verdict = flt.evaluate(attrs)
                if verdict is not True:
                    if verdict is None:
                        k.counters.evaluation_errors += 1
                    else:
                        k.counters.filtered_out += 1
                    continue
            opened = k.apply(attrs, occurred, watermark)
            if opened < next_close:  # noqa: PLR1730 - hot path
                next_close = opened
        self._next_close = next_close

    def advance(self, now: datetime) -> None:
        """Idle-close path: close windows whose close time is ``idle_close_grace`` before
        ``now`` (wall clock). Moves the watermark to ``now - idle_close_grace``, so events
        published before a window's close but arriving after this are counted late."""
        floor = _micros(now) - self._grace
        self._watermark = max(self._watermark, floor)
        if self._watermark >= self._next_close:
            self._close()

    def _close(self) -> None:
        watermark = self._watermark
        ready: list[tuple[int, str, int, _KPIState]] = []
        for k in self._kpis.values():
            heap = k.heap
            while heap and heap[0] + k.close_offset <= watermark:
                start = heapq.heappop(heap)
                ready.append((start + k.close_offset, k.code, start, k))
        ready.sort(key=lambda item: item[:3])
        computed_at: datetime | None = None
        for _, code, start, k in ready:
            groups = k.windows.pop(start)
            window_start, window_end = from_micros(start), from_micros(start + k.size)
            for group in groups.values():
                value = group.acc.result()
                if value is None:
                    continue
                if computed_at is None:
                    computed_at = self._clock()
                self._results.append(
                    KPIResult(
                        kpi_code=code,
                        value=value,
                        window_start=window_start,
                        window_end=window_end,
                        dimensions=dict(zip(k.group_by, group.dims, strict=True)),
                        sample_count=group.n,
                        definition_version=k.version,
                        computed_at=computed_at,
                    )
                )
                self._emitted += 1
        self._refresh_next_close()

    def _refresh_next_close(self) -> None:
        self._next_close = min((k.next_close() for k in self._kpis.values()), default=_INF)

    def drain_results(self) -> list[KPIResult]:
        """Results emitted since the last call, ordered by close time, KPI code, window."""
        results, self._results = self._results, []
        return results

    # -- introspection -----------------------------------------------------------------------

    def closes_by(self, published: datetime) -> bool:
        """Whether an event published at ``published`` would close a window (moving the
        watermark to its close time), so the caller can hurry to feed it."""
        return _micros(published) >= self._next_close

    @property
    def watermark(self) -> datetime | None:
        return None if self._watermark == _NEVER else from_micros(self._watermark)

    def stats(self) -> EngineStats:
        return EngineStats(
            events_processed=self._events,
            duplicates=self._duplicates,
            ignored_events=self._ignored,
            results_emitted=self._emitted,
            open_windows=sum(len(k.windows) for k in self._kpis.values()),
            watermark=self.watermark,
            kpis={code: replace(c) for code, c in self._counters.items()},
        )

    # -- checkpoints -------------------------------------------------------------------------

    # -- the dedupe ring ---------------------------------------------------------------------
    @property
    def recent_end(self) -> int:
        """Event ids the dedupe ring has taken in all (the next one's sequence number): it holds
        those numbered `recent_end - len` to `recent_end - 1`. Every event that is not a
        duplicate enters it, so this is what `_events` counts, without a counter per event."""
        return self._recent_base + (self._events if self._capacity else 0)

    @property
    def recent_start(self) -> int:
        """The number of the oldest id in the dedupe ring (`recent_end` when it is empty)."""
        return self.recent_end - len(self._recent)

    def recent_ids(self, since: int = 0) -> list[str]:
        """The ring's ids numbered `since` or later, oldest first."""
        skip = max(0, since - self.recent_start)
        return list(itertools.islice(self._recent, skip, None))

    def restore_recent(self, ids: Iterable[str], end: int) -> None:
        """Load the ring as `recent_ids()` gave it, `end` being `recent_end` then."""
        self._recent = deque(ids)
        while len(self._recent) > self._capacity:
            self._recent.popleft()
        self._seen = set(self._recent)
        self._recent_base = end - (self._events if self._capacity else 0)

    def snapshot(self, *, recent_ids: bool = True) -> dict[str, Any]:
        """JSON-serialisable state: watermark, open windows, recent event ids, undrained
        results. Counters are not included (Prometheus counters restart with the process).

        `recent_ids=False` leaves the dedupe ring's ids out (its owner stores them apart:
        they are most of a snapshot and change by only what came since the last one)."""
        return {
            "format": SNAPSHOT_FORMAT,
            "watermark": None if self._watermark == _NEVER else self._watermark,
            "kpis": {
                code: {
                    "version": k.version,
                    "fingerprint": k.fingerprint,
                    "windows": [
                        [
                            start,
                            [
                                [list(g.dims), g.n, g.acc.to_state()]
                                for g in k.windows[start].values()
                            ],
                        ]
                        for start in sorted(k.windows)
                    ],
                }
                for code, k in sorted(self._kpis.items())
            },
            **({"recent_event_ids": list(self._recent)} if recent_ids else {}),
            "recent_end": self.recent_end,
            "pending_results": [r.to_dict() for r in self._results],
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        """Load a :meth:`snapshot`. Call :meth:`set_definitions` first: window state is restored
        only for KPIs whose current definition is identical to the checkpointed one (others
        start empty, as a hot reload would)."""
        if data.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"unsupported snapshot format {data.get('format')!r}")
        watermark = data.get("watermark")
        self._watermark = _NEVER if watermark is None else int(watermark)
        ids = [str(i) for i in data.get("recent_event_ids", [])]
        self.restore_recent(ids, int(data.get("recent_end", len(ids))))
        self._results = [KPIResult.from_dict(r) for r in data.get("pending_results", [])]
        saved: Mapping[str, Any] = data.get("kpis", {})
        for code, k in self._kpis.items():
            k.windows.clear()
            k.heap.clear()
            state = saved.get(code)
            if state is None or state.get("fingerprint") != k.fingerprint:
                continue
            for start, groups in state["windows"]:
                window = k.open_window(int(start))
                for dims, n, acc in groups:
                    values = tuple(dims)
                    try:
                        key = tuple(_dim_key(v) for v in values)
                    except _NotADimension:
                        continue  # grouped by an earlier release: a result nothing would store
                    window[key] = _Group(values, accumulator_from_state(acc), int(n))
        self._refresh_next_close()
