"""The event generator: a pure, seeded state machine (no I/O, no clock).

`next_batch(n, now)` returns `n` `(channel, payload)` pairs. Everything is drawn from one
`random.Random(seed)` in a fixed order, so the same seed, entity definitions and sequence of
`now` arguments yield the same payloads; only `occurred_at` depends on `now` (it must follow the
wall clock for event-time windows to close). Event ids are `uuid5(seed, run_id, sequence)`;
entity ids carry a tag of `(seed, run_id)` too (none for an empty run id), so that a new run's
entities, which start at version 1, never take the ids of an earlier run's.

Entities live in a fixed ring of `max_live_entities` slots per type: a created entity takes the
next slot and forgets whatever lived there (bounded memory at any rate). Updates and
deactivations pick a random live slot; when none qualifies the event becomes a creation, so the
mix is exact once a population exists.
"""

from __future__ import annotations

import itertools
import random
import uuid
from bisect import bisect_right
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Final

from analytics_engine.core import channels
from analytics_engine.simulator.config import EVENT_KINDS, GeneratorConfig
from analytics_engine.simulator.entities import (
    Attributes,
    EntityModel,
    EntityShape,
    GenericModel,
    builtin_models,
)

KIND_CHANNELS: Final = {
    "created": channels.ENTITY_CREATED,
    "updated": channels.ENTITY_UPDATED,
    "deactivated": channels.ENTITY_DEACTIVATED,
}
_PICK_TRIES: Final = 4
_NAMESPACE: Final = uuid.UUID("6f1c7f3e-5b7a-4d0e-9a53-5e0b7c1d2a90")


class _Population:
    """The live entities of one type in a ring of slots.

    Stored column-wise (id, version and attributes per slot) rather than as an object per
    entity: attribute dicts of plain values are not tracked by the garbage collector, so the
    ring (up to `max_live_entities`) stays out of its full collections, which would otherwise
    walk every entity (tens of ms each, every few seconds at high rates).
    """

    __slots__ = (
        "attributes",
        "capacity",
        "created",
        "entity_ids",
        "entity_type",
        "model",
        "projection",
        "versions",
    )

    def __init__(self, model: EntityModel, capacity: int) -> None:
        self.model = model
        self.entity_type = model.entity_type
        self.capacity = capacity
        self.entity_ids: list[str | None] = [None] * capacity
        self.versions: list[int] = [0] * capacity
        self.attributes: list[Attributes | None] = [None] * capacity
        self.created = 0
        self.projection: tuple[str, ...] | None = None

    def pick(self, rng: random.Random, *, for_update: bool) -> int | None:
        filled = min(self.created, self.capacity)
        if filled == 0:
            return None
        rand = rng.random
        entity_ids, attributes = self.entity_ids, self.attributes
        updatable = self.model.updatable
        for _ in range(_PICK_TRIES):
            i = int(rand() * filled)
            if entity_ids[i] is not None:
                current = attributes[i]
                if not for_update or (current is not None and updatable(current)):
                    return i
        return None


class EventGenerator:
    def __init__(
        self,
        config: GeneratorConfig,
        shapes: Mapping[str, EntityShape] | None = None,
    ) -> None:
        self.config = config
        self._rng = random.Random(config.seed)
        self._builtins = builtin_models(customer_pool=config.customer_pool)
        self._populations: dict[str, _Population] = {}
        self._type_names: tuple[str, ...] = ()
        self._type_cum: tuple[float, ...] = ()
        mix = config.resolved_mix()
        self._kind_cum = tuple(itertools.accumulate(mix[k] for k in EVENT_KINDS))
        self.sequence = 0
        self._id_prefix = str(uuid.uuid5(_NAMESPACE, f"{config.seed}:{config.run_id}"))[:24]
        # Entity ids carry the run too (`order-1a2b3c4d-00000001`): a restarted simulator starts
        # its entities at version 1 again, and consumers keep each entity's highest version, so
        # the ids of the last run's entities must not come back. Unsalted for an empty run id.
        self._entity_run = f"{self._id_prefix[:8]}-" if config.run_id else ""
        self._entities_issued: dict[str, int] = {}
        """Entities created per type: numbering outlives a type's population (replaced when
        the definitions change its model, dropped with the type), so no id comes back."""
        self.counts: dict[str, dict[str, int]] = {}
        self.set_entity_definitions(shapes)

    # -- configuration ---------------------------------------------------------------------
    def set_entity_definitions(self, shapes: Mapping[str, EntityShape] | None) -> None:
        """Use the metadata service's entity types (`None`: the built-in ones).

        A built-in type keeps its realistic model but emits only the attributes the definition
        lists (plus values drawn by declared type for attributes it does not model); a type with
        no built-in model gets `GenericModel`. Live entities of unchanged types are kept.
        """
        weights = self.config.resolved_entity_weights()
        if shapes:
            names = [n for n in shapes if weights.get(n, 0.0) > 0 or n not in weights]
            chosen = {n: weights.get(n, 1.0 / max(len(shapes), 1)) for n in names}
        else:
            chosen = {n: w for n, w in weights.items() if n in self._builtins and w > 0}
        if not chosen:
            chosen = {"order": 0.6, "sensor": 0.4}
            shapes = None
        populations: dict[str, _Population] = {}
        for name in chosen:
            shape = shapes.get(name) if shapes else None
            model = self._model_for(name, shape)
            population = self._populations.get(name)
            if population is None or type(population.model) is not type(model):
                population = _Population(model, self.config.max_live_entities)
            population.model = model
            population.entity_type = model.entity_type
            population.projection = _projection(model, shape)
            populations[name] = population
            self.counts.setdefault(name, dict.fromkeys(EVENT_KINDS, 0))
        self._populations = populations
        self._type_names = tuple(chosen)
        total = sum(chosen.values())
        self._type_cum = tuple(itertools.accumulate(w / total for w in chosen.values()))

    def _model_for(self, name: str, shape: EntityShape | None) -> EntityModel:
        builtin = self._builtins.get(name)
        if builtin is not None:
            if shape is None:
                return builtin
            unknown = [a for a in shape.attributes if a.name not in _BUILTIN_ATTRIBUTES[name]]
            if not unknown:
                return builtin
            return _Extended(builtin, EntityShape(name, tuple(unknown)))
        return GenericModel(shape or EntityShape(name, ()))

    @property
    def entity_types(self) -> tuple[str, ...]:
        return self._type_names

    def event_id(self, sequence: int) -> str:
        """The id of the event with this sequence number (0-based), stable across runs: the
        first 20 hex digits are `uuid5(seed, run_id)`, the last 12 the sequence (a UUID in
        form, 50x cheaper than one uuid5 per event)."""
        return f"{self._id_prefix}{sequence & 0xFFFFFFFFFFFF:012x}"

    # -- generation ------------------------------------------------------------------------
    def next_batch(self, n: int, now: datetime) -> list[tuple[str, dict[str, Any]]]:
        # The hot path of the simulator: names are bound to locals and the per-event helpers
        # are inlined, but the draws from `rng` are exactly those of the plain version (same
        # seed, same stream).
        rng = self._rng
        rand = rng.random
        cfg = self.config
        now_text = now.isoformat()
        ooo = cfg.out_of_order_ratio
        late = cfg.late_ratio
        late_or_ooo = late + ooo
        ooo_span = cfg.out_of_order_span.total_seconds()
        max_late = cfg.max_lateness.total_seconds()
        type_cum, type_names, kind_cum = self._type_cum, self._type_names, self._kind_cum
        last_type = len(type_names) - 1
        populations, counts, event = self._populations, self.counts, self._event
        out: list[tuple[str, dict[str, Any]]] = []
        append = out.append
        for _ in range(n):
            t = bisect_right(type_cum, rand())
            name = type_names[t if t < last_type else last_type]
            k = bisect_right(kind_cum, rand())
            kind = EVENT_KINDS[k if k < 2 else 2]
            roll = rand()
            if roll < late:
                occurred = now - timedelta(seconds=max_late * (0.5 + 0.5 * rand()))
                occurred_text = occurred.isoformat()
            elif roll < late_or_ooo:
                occurred = now - timedelta(seconds=ooo_span * rand())
                occurred_text = occurred.isoformat()
            else:
                occurred, occurred_text = now, now_text
            payload, kind = event(rng, populations[name], kind, occurred)
            payload["occurred_at"] = occurred_text
            counts[name][kind] += 1
            append((KIND_CHANNELS[kind], payload))
        self.sequence += n
        return out

    def _event(
        self, rng: random.Random, population: _Population, kind: str, occurred: datetime
    ) -> tuple[dict[str, Any], str]:
        model = population.model
        if kind != "created":
            i = population.pick(rng, for_update=kind == "updated")
            if i is not None:
                entity_id = population.entity_ids[i]
                attributes = population.attributes[i]
                assert entity_id is not None and attributes is not None
                version = population.versions[i] + 1
                if kind == "updated":
                    attributes = model.update(rng, attributes, occurred)
                    population.versions[i] = version
                    population.attributes[i] = attributes
                    return _payload(population, entity_id, version, attributes), kind
                population.entity_ids[i] = population.attributes[i] = None
                payload = _payload(population, entity_id, version, None)
                reason = model.deactivation_reason(rng, attributes)
                if reason is not None:
                    payload["reason"] = reason
                return payload, kind
        population.created += 1
        number = self._entities_issued.get(population.entity_type, 0) + 1
        self._entities_issued[population.entity_type] = number
        entity_id = model.entity_id(number, self._entity_run)
        attributes = model.create(rng, occurred)
        slot = (population.created - 1) % population.capacity
        population.entity_ids[slot] = entity_id
        population.versions[slot] = 1
        population.attributes[slot] = attributes
        return _payload(population, entity_id, 1, attributes), "created"


def _payload(
    population: _Population, entity_id: str, version: int, attributes: Attributes | None
) -> dict[str, Any]:
    """An event payload; `attributes` None for a deactivation."""
    payload: dict[str, Any] = {
        "entity_type": population.entity_type,
        "entity_id": entity_id,
        "version": version,
        "occurred_at": "",  # set by the caller; first here for the key order of the JSON
    }
    if attributes is not None:
        projection = population.projection
        payload["attributes"] = (
            attributes
            if projection is None
            else {name: attributes[name] for name in projection if name in attributes}
        )
    return payload


_BUILTIN_ATTRIBUTES: Final = {
    "order": frozenset({"amount", "currency", "region", "status", "customer_id", "items"}),
    "sensor": frozenset({"site", "temperature", "humidity", "battery", "status"}),
}


def _projection(model: EntityModel, shape: EntityShape | None) -> tuple[str, ...] | None:
    if shape is None or isinstance(model, GenericModel):
        return None
    return tuple(a.name for a in shape.attributes)


class _Extended:
    """A built-in model plus attributes it does not model, drawn by declared type."""

    def __init__(self, base: EntityModel, extra: EntityShape) -> None:
        self._base = base
        self._extra = GenericModel(extra)
        self.entity_type = base.entity_type

    def entity_id(self, n: int, run: str = "") -> str:
        return self._base.entity_id(n, run)

    def create(self, rng: random.Random, now: datetime) -> Attributes:
        return {**self._base.create(rng, now), **self._extra.create(rng, now)}

    def update(self, rng: random.Random, current: Attributes, now: datetime) -> Attributes:
        return {**self._base.update(rng, current, now), **self._extra.create(rng, now)}

    def updatable(self, current: Attributes) -> bool:
        return self._base.updatable(current)

    def deactivation_reason(self, rng: random.Random, current: Attributes) -> str | None:
        return self._base.deactivation_reason(rng, current)
