"""Pure configuration values of the simulator: the event-kind mix and the entity-type weights.

Both are written in the environment as `name=weight` pairs (`created=0.5,updated=0.45,...`);
weights are normalised, so `created=2,updated=1` means two thirds created.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

EVENT_KINDS: Final = ("created", "updated", "deactivated")


def parse_weights(text: str, *, allowed: tuple[str, ...] | None = None) -> dict[str, float]:
    """Parse `a=0.5,b=0.5` into normalised weights; raises `ValueError` with a clear message."""
    weights: dict[str, float] = {}
    for raw_part in text.split(","):
        part = raw_part.strip()
        if not part:
            continue
        name, sep, raw = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"expected name=weight pairs, got {part!r}")
        if allowed is not None and name not in allowed:
            raise ValueError(f"unknown name {name!r}; expected one of {', '.join(allowed)}")
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"weight of {name!r} is not a number: {raw!r}") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"weight of {name!r} must be a finite number >= 0")
        weights[name] = value
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("at least one weight must be positive")
    return {name: value / total for name, value in weights.items()}


@dataclass(frozen=True, slots=True)
class GeneratorConfig:
    """What shapes the generated stream (everything but the rate, which only paces it)."""

    seed: int = 42
    mix: Mapping[str, float] | None = None
    """Share of created/updated/deactivated events; default 0.5/0.45/0.05."""
    entity_weights: Mapping[str, float] | None = None
    """Share of each entity type; default order 0.6, sensor 0.4."""
    out_of_order_ratio: float = 0.02
    """Events back-dated by up to `out_of_order_span` (usually still inside a window's lateness)."""
    out_of_order_span: timedelta = timedelta(seconds=2)
    late_ratio: float = 0.005
    """Events back-dated by between half and all of `max_lateness` (usually too late)."""
    max_lateness: timedelta = timedelta(seconds=120)
    max_live_entities: int = 50_000
    """Live entities remembered per type; the oldest is forgotten when a new one needs its slot
    (bounded memory at any rate: a forgotten entity simply receives no further events)."""
    customer_pool: int = 10_000
    sensor_count: int = 500
    run_id: str = ""
    """Salt of the event ids; empty keeps ids a function of the seed and sequence alone (the
    service never leaves it empty: `SIMULATOR_RUN_ID`, or a random one per process)."""

    def resolved_mix(self) -> dict[str, float]:
        mix = dict(self.mix or {"created": 0.5, "updated": 0.45, "deactivated": 0.05})
        return {kind: mix.get(kind, 0.0) for kind in EVENT_KINDS}

    def resolved_entity_weights(self) -> dict[str, float]:
        return dict(self.entity_weights or {"order": 0.6, "sensor": 0.4})
