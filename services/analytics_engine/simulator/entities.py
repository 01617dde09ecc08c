"""Entity models: how each entity type's attributes are born and evolve (pure, seeded RNG only).

Built-in models: `order` (a purchase moving through new -> paid -> shipped -> completed, some
cancelled) and `sensor` (an IoT sensor reporting temperature with a daily cycle). An entity type
the metadata service defines but no built-in model knows gets `GenericModel`, which draws each
declared attribute from its declared type.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Protocol

Attributes = dict[str, Any]

TERMINAL_ORDER_STATUSES: Final = frozenset({"completed", "cancelled"})


@dataclass(frozen=True, slots=True)
class AttributeSpec:
    name: str
    type: str = "string"


@dataclass(frozen=True, slots=True)
class EntityShape:
    """An entity type as the metadata service defines it: which attributes to emit."""

    entity_type: str
    attributes: tuple[AttributeSpec, ...]


class EntityModel(Protocol):
    entity_type: str

    def entity_id(self, n: int, run: str = "") -> str:
        """The id of the type's `n`th entity (1-based) of the run tagged `run` (a prefix of
        the number: ids of different runs never meet)."""
        ...

    def create(self, rng: random.Random, now: datetime) -> Attributes: ...

    def update(self, rng: random.Random, current: Attributes, now: datetime) -> Attributes: ...

    def updatable(self, current: Attributes) -> bool: ...

    def deactivation_reason(self, rng: random.Random, current: Attributes) -> str | None: ...


class _Weighted:
    """Draws from a fixed categorical distribution with one `random()` call and a bisect."""

    __slots__ = ("_cum", "_values")

    def __init__(self, weights: Mapping[str, float]) -> None:
        self._values = tuple(weights)
        total = sum(weights.values())
        self._cum = tuple(itertools.accumulate(w / total for w in weights.values()))

    def draw(self, rng: random.Random) -> str:
        i = bisect.bisect_right(self._cum, rng.random())
        return self._values[min(i, len(self._values) - 1)]


class _Zipf:
    """Ranks 1..n with P(k) proportional to 1/k^s: a few heavy customers, a long tail."""

    __slots__ = ("_cum",)

    def __init__(self, n: int, s: float = 1.07) -> None:
        weights = [1.0 / k**s for k in range(1, n + 1)]
        total = sum(weights)
        self._cum = tuple(itertools.accumulate(w / total for w in weights))

    def draw(self, rng: random.Random) -> int:
        return min(bisect.bisect_right(self._cum, rng.random()), len(self._cum) - 1) + 1


class OrderModel:
    """Orders: amount ~ lognormal (median ~40), Zipf customers, a status lifecycle."""

    entity_type = "order"
    # status -> (next statuses, cumulative probabilities)
    _TRANSITIONS: Final[Mapping[str, tuple[tuple[str, ...], tuple[float, ...]]]] = {
        "new": (("paid", "cancelled"), (0.85, 1.0)),
        "paid": (("shipped", "cancelled"), (0.93, 1.0)),
        "shipped": (("completed",), (1.0,)),
    }

    def __init__(self, customer_pool: int = 10_000) -> None:
        self._currency = _Weighted({"EUR": 0.5, "USD": 0.35, "GBP": 0.15})
        self._region = _Weighted(
            {"eu-west": 0.3, "eu-central": 0.2, "us-east": 0.25, "us-west": 0.15, "apac": 0.1}
        )
        self._customers = _Zipf(customer_pool)

    def entity_id(self, n: int, run: str = "") -> str:
        return f"order-{run}{n:08d}"

    def create(self, rng: random.Random, now: datetime) -> Attributes:
        return {
            "amount": round(rng.lognormvariate(3.7, 0.8), 2),
            "currency": self._currency.draw(rng),
            "region": self._region.draw(rng),
            "status": "new",
            "customer_id": f"cust-{self._customers.draw(rng):05d}",
            "items": min(1 + int(rng.expovariate(0.7)), 20),
        }

    def updatable(self, current: Attributes) -> bool:
        return current.get("status") not in TERMINAL_ORDER_STATUSES

    def update(self, rng: random.Random, current: Attributes, now: datetime) -> Attributes:
        attrs = dict(current)
        transition = self._TRANSITIONS.get(str(current.get("status")))
        if transition is not None:
            statuses, cum = transition
            attrs["status"] = statuses[min(bisect.bisect_right(cum, rng.random()), len(cum) - 1)]
        return attrs

    def deactivation_reason(self, rng: random.Random, current: Attributes) -> str | None:
        status = current.get("status")
        if status == "completed":
            return "archived"
        if status == "cancelled":
            return "cancelled"
        return "expired" if rng.random() < 0.7 else None


_SITES: Final = {
    # site -> mean temperature (°C)
    "berlin-dc1": 21.0,
    "frankfurt-dc2": 22.5,
    "paris-plant": 26.0,
    "dublin-wh": 15.0,
    "newyork-wh": 18.0,
    "austin-lab": 29.0,
    "singapore-dc": 31.0,
    "tokyo-plant": 24.0,
}


class SensorModel:
    """Sensors: temperature = site mean + daily cycle (peak 15:00 UTC) + noise; humidity falls
    as it warms; the battery drains with each reading; status follows battery and heat."""

    entity_type = "sensor"

    def __init__(self) -> None:
        self._sites = tuple(_SITES)
        self._cycle_at: datetime | None = None
        self._cycle = 0.0

    def entity_id(self, n: int, run: str = "") -> str:
        return f"sensor-{run}{n:06d}"

    def _daily_cycle(self, now: datetime) -> float:
        """The temperature offset of the time of day (remembered: a batch shares its `now`
        object)."""
        if now is not self._cycle_at:
            day_fraction = (now.hour * 3600 + now.minute * 60 + now.second) / 86_400
            self._cycle = 6.0 * math.sin(2 * math.pi * (day_fraction - 0.375))
            self._cycle_at = now
        return self._cycle

    def _reading(self, rng: random.Random, site: str, battery: float, now: datetime) -> Attributes:
        cycle = self._daily_cycle(now)
        base = _SITES.get(site, 20.0)
        temperature = round(base + cycle + rng.gauss(0.0, 0.8), 2)
        humidity = 55.0 - 1.5 * (temperature - base) + rng.gauss(0, 3)
        humidity = round(min(100.0, max(5.0, humidity)), 1)
        roll = rng.random()
        if battery <= 5.0 or roll < 0.002:
            status = "fault"
        elif temperature > 35.0 or battery < 20.0 or roll < 0.02:
            status = "warning"
        else:
            status = "ok"
        return {
            "temperature": temperature,
            "humidity": humidity,
            "battery": round(battery, 2),
            "status": status,
        }

    def create(self, rng: random.Random, now: datetime) -> Attributes:
        site = self._sites[int(rng.random() * len(self._sites))]
        battery = 60.0 + 40.0 * rng.random()
        return {"site": site, **self._reading(rng, site, battery, now)}

    def updatable(self, current: Attributes) -> bool:
        return True

    def update(self, rng: random.Random, current: Attributes, now: datetime) -> Attributes:
        site = str(current.get("site", self._sites[0]))
        battery = max(0.0, float(current.get("battery", 100.0)) - 0.05 * rng.random())
        attrs = dict(current)
        attrs.update(self._reading(rng, site, battery, now))
        return attrs

    def deactivation_reason(self, rng: random.Random, current: Attributes) -> str | None:
        return "battery_depleted" if float(current.get("battery", 100.0)) < 10 else "decommissioned"


class GenericModel:
    """An entity type known only from its metadata definition: each attribute drawn from its
    declared type (numbers ~ normal, integers uniform, strings from ten tokens, booleans)."""

    def __init__(self, shape: EntityShape) -> None:
        self.entity_type = shape.entity_type
        self._attributes = shape.attributes

    def entity_id(self, n: int, run: str = "") -> str:
        return f"{self.entity_type}-{run}{n:08d}"

    def create(self, rng: random.Random, now: datetime) -> Attributes:
        return {a.name: draw_value(rng, a, now) for a in self._attributes}

    def updatable(self, current: Attributes) -> bool:
        return True

    def update(self, rng: random.Random, current: Attributes, now: datetime) -> Attributes:
        return self.create(rng, now)

    def deactivation_reason(self, rng: random.Random, current: Attributes) -> str | None:
        return None


def draw_value(rng: random.Random, attribute: AttributeSpec, now: datetime) -> Any:
    """A plausible value for an attribute of a declared type."""
    kind = attribute.type.lower()
    if kind in ("number", "float", "double", "decimal", "numeric"):
        return round(rng.gauss(100.0, 25.0), 3)
    if kind in ("int", "integer", "long"):
        return int(rng.random() * 1000)
    if kind in ("bool", "boolean"):
        return rng.random() < 0.5
    if kind in ("timestamp", "datetime", "date-time"):
        return now.isoformat()
    return f"{attribute.name}-{int(rng.random() * 10)}"


def builtin_models(*, customer_pool: int = 10_000) -> dict[str, EntityModel]:
    return {"order": OrderModel(customer_pool), "sensor": SensorModel()}


def parse_entity_definitions(payload: Mapping[str, Any]) -> dict[str, EntityShape]:
    """Entity shapes from a metadata `list_entity_definitions` reply.

    Accepts `{items: [{entity_type|code|name, attributes: [name | {name, type}]}]}`, or a mapping
    `{attributes: {name: type}}`; entries it cannot read are skipped rather than failing the lot.
    """
    items = payload.get("items", payload.get("entity_types", []))
    shapes: dict[str, EntityShape] = {}
    if not isinstance(items, Sequence):
        return shapes
    for item in items:
        if not isinstance(item, Mapping):
            continue
        name = item.get("entity_type") or item.get("code") or item.get("name")
        if not isinstance(name, str) or not name:
            continue
        if item.get("enabled", True) is False:
            continue
        shapes[name] = EntityShape(name, tuple(_attribute_specs(item.get("attributes"))))
    return shapes


def _attribute_specs(raw: Any) -> list[AttributeSpec]:
    specs: list[AttributeSpec] = []
    if isinstance(raw, Mapping):
        for name, declared in raw.items():
            kind = declared.get("type", "string") if isinstance(declared, Mapping) else declared
            specs.append(AttributeSpec(str(name), str(kind)))
    elif isinstance(raw, Sequence) and not isinstance(raw, str):
        for entry in raw:
            if isinstance(entry, str):
                specs.append(AttributeSpec(entry))
            elif isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
                specs.append(AttributeSpec(entry["name"], str(entry.get("type", "string"))))
    return specs
