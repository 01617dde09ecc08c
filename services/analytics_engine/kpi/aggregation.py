"""Mergeable accumulators for the KPI aggregations, with JSON checkpoints.

``sum``/``avg`` use Neumaier compensated summation: the streaming result must match a SQL
recomputation (``sum(...::numeric)``) to 1e-9 relative even over millions of money-like values,
which naive float accumulation does not guarantee. Accumulators receive already-extracted values
(the engine drops missing/null values and, for numeric aggregations, non-numbers); they do no
type checking on the hot path.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Hashable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Final, Self

__all__ = [
    "ACCUMULATOR_TYPES",
    "Accumulator",
    "AvgAccumulator",
    "CountAccumulator",
    "CountDistinctAccumulator",
    "MaxAccumulator",
    "MinAccumulator",
    "SumAccumulator",
    "accumulator_from_state",
    "distinct_key",
    "new_accumulator",
]


class Accumulator(ABC):
    """State of one aggregation over one (window, group)."""

    __slots__ = ()
    kind: ClassVar[str]

    @abstractmethod
    def add(self, value: Any) -> None: ...

    @abstractmethod
    def merge(self, other: Self) -> None:
        """Fold ``other`` (same kind) into this accumulator."""

    @abstractmethod
    def result(self) -> float | None:
        """The aggregate, ``None`` when undefined (avg/min/max of no values)."""

    @abstractmethod
    def _state(self) -> Any: ...

    def to_state(self) -> dict[str, Any]:
        """JSON-serialisable state; :func:`accumulator_from_state` restores it exactly."""
        return {"kind": self.kind, "state": self._state()}

    @classmethod
    @abstractmethod
    def _from(cls, state: Any) -> Self: ...

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> Accumulator:
        return accumulator_from_state(data)


class CountAccumulator(Accumulator):
    __slots__ = ("n",)
    kind = "count"

    def __init__(self, n: int = 0) -> None:
        self.n = n

    def add(self, value: Any = None) -> None:
        self.n += 1

    def merge(self, other: Self) -> None:
        self.n += other.n

    def result(self) -> float:
        return float(self.n)

    def _state(self) -> int:
        return self.n

    @classmethod
    def _from(cls, state: Any) -> Self:
        return cls(int(state))


class SumAccumulator(Accumulator):
    """Neumaier-compensated sum; ``result()`` is 0.0 for no values (SQL ``coalesce(sum, 0)``)."""

    __slots__ = ("c", "s")
    kind = "sum"

    def __init__(self, s: float = 0.0, c: float = 0.0) -> None:
        self.s = s
        self.c = c

    def _accumulate(self, value: float) -> None:
        s = self.s
        t = s + value
        if abs(s) >= abs(value):
            self.c += (s - t) + value
        else:
            self.c += (value - t) + s
        self.s = t

    add = _accumulate

    def merge(self, other: Self) -> None:
        self._accumulate(other.s)
        self.c += other.c

    def result(self) -> float:
        return self.s + self.c

    def _state(self) -> list[float]:
        return [self.s, self.c]

    @classmethod
    def _from(cls, state: Any) -> Self:
        return cls(float(state[0]), float(state[1]))


class AvgAccumulator(SumAccumulator):
    __slots__ = ("n",)
    kind = "avg"

    def __init__(self, s: float = 0.0, c: float = 0.0, n: int = 0) -> None:
        super().__init__(s, c)
        self.n = n

    def add(self, value: float) -> None:
        self._accumulate(value)
        self.n += 1

    def merge(self, other: Self) -> None:
        SumAccumulator.merge(self, other)
        self.n += other.n

    def result(self) -> float | None:  # type: ignore[override]
        return (self.s + self.c) / self.n if self.n else None

    def _state(self) -> list[float]:
        return [self.s, self.c, self.n]

    @classmethod
    def _from(cls, state: Any) -> Self:
        return cls(float(state[0]), float(state[1]), int(state[2]))


class MinAccumulator(Accumulator):
    __slots__ = ("value",)
    kind = "min"

    def __init__(self, value: float | None = None) -> None:
        self.value = value

    def add(self, value: float) -> None:
        if self.value is None or value < self.value:
            self.value = value

    def merge(self, other: Self) -> None:
        if other.value is not None:
            self.add(other.value)

    def result(self) -> float | None:
        return None if self.value is None else float(self.value)

    def _state(self) -> float | None:
        return self.value

    @classmethod
    def _from(cls, state: Any) -> Self:
        return cls(None if state is None else float(state))


class MaxAccumulator(MinAccumulator):
    __slots__ = ()
    kind = "max"

    def add(self, value: float) -> None:
        if self.value is None or value > self.value:
            self.value = value


def distinct_key(value: Any) -> Hashable:
    """Hashable identity of a JSON value matching jsonb equality: ``1 == 1.0``, ``true != 1``,
    ``"1" != 1``; arrays/objects compare structurally (canonical JSON, in which a whole float
    is written as the integer it equals, so ``{"a": 1.0}`` is ``{"a": 1}`` as in jsonb)."""
    kind = type(value)
    if kind is str:
        return str(value)
    if kind is bool:
        return ("b", value)
    if kind is int or kind is float:
        return ("n", value)
    if value is None:
        return None
    return ("j", json.dumps(_whole_floats_as_ints(value), sort_keys=True, separators=(",", ":")))


def _whole_floats_as_ints(value: Any) -> Any:
    """`value` with every float that equals an integer replaced by that integer (exactly:
    ``1e16`` -> ``10000000000000000``), at any depth."""
    if type(value) is float:
        return int(value) if value.is_integer() else value
    if isinstance(value, list):
        return [_whole_floats_as_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: _whole_floats_as_ints(v) for k, v in value.items()}
    return value


def _encode_key(key: Hashable) -> Any:
    return ["s", key] if isinstance(key, str) else list(key)  # type: ignore[call-overload]


def _decode_key(data: Any) -> Hashable:
    return data[1] if data[0] == "s" else (data[0], data[1])


class CountDistinctAccumulator(Accumulator):
    """Exact distinct count of non-null JSON values (values go through :func:`distinct_key`)."""

    __slots__ = ("keys",)
    kind = "count_distinct"

    def __init__(self, keys: set[Hashable] | None = None) -> None:
        self.keys: set[Hashable] = keys if keys is not None else set()

    def add(self, value: Any) -> None:
        self.keys.add(distinct_key(value))

    def merge(self, other: Self) -> None:
        self.keys |= other.keys

    def result(self) -> float:
        return float(len(self.keys))

    def _state(self) -> list[Any]:
        # sorted for reproducible checkpoints: strings (the usual values) natively, then the
        # tagged keys, which compare within a tag (a JSON dump per key as the sort key cost
        # most of a checkpoint with thousands of distinct values)
        strings = sorted([k for k in self.keys if type(k) is str])
        tagged = sorted([k for k in self.keys if type(k) is not str])  # type: ignore[type-var]
        return [["s", k] for k in strings] + [_encode_key(k) for k in tagged]

    @classmethod
    def _from(cls, state: Any) -> Self:
        return cls({_decode_key(item) for item in state})


ACCUMULATOR_TYPES: Final[Mapping[str, type[Accumulator]]] = MappingProxyType(
    {
        cls.kind: cls
        for cls in (
            CountAccumulator,
            SumAccumulator,
            AvgAccumulator,
            MinAccumulator,
            MaxAccumulator,
            CountDistinctAccumulator,
        )
    }
)
"""The accumulator class of each aggregation (calling one makes an empty accumulator)."""
_KINDS: Final = ACCUMULATOR_TYPES


def new_accumulator(aggregation: str) -> Accumulator:
    """An empty accumulator for ``count|sum|avg|min|max|count_distinct``."""
    try:
        return _KINDS[aggregation]()
    except KeyError:
        raise ValueError(f"unknown aggregation {aggregation!r}") from None


def accumulator_from_state(data: dict[str, Any]) -> Accumulator:
    """Inverse of :meth:`Accumulator.to_state`."""
    try:
        cls = _KINDS[data["kind"]]
    except (KeyError, TypeError):
        raise ValueError(f"not an accumulator state: {data!r}") from None
    return cls._from(data["state"])
