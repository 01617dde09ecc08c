"""What a consumer hands its handler: stream entries decoded into deliveries (or a lazy batch of
them), and the entries to dead-letter with their reason."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from analytics_engine.core.bus.streams import FIELD, Entry
from analytics_engine.core.envelopes import (
    ENVELOPE_FIELDS,
    Event,
    MalformedMessage,
    common_event_fields,
    event_fields,
    parse_event,
)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event as delivered from a stream: `id` is the stream entry id, `attempt` starts at 1."""

    id: bytes
    channel: str
    event: Event
    attempt: int = 1


class DeliveryBatch(Sequence[Delivery]):
    """A batch of deliveries whose `Event`s are built only when a delivery is looked at (a
    consumer's `lazy_events`). The envelopes were checked as for any batch (a malformed one is
    dead-lettered before the handler sees the batch); a handler that reads only fields takes
    them from the parallel lists (`ids`, `channels`, `envelopes` — each envelope's five fields
    as `envelopes.event_fields` gives them —, `payloads`, `attempts`) and saves the ~10 objects
    per message that an `Event` and its `Delivery` cost."""

    __slots__ = ("_built", "_raws", "attempts", "channels", "envelopes", "ids", "payloads")

    def __init__(
        self,
        *,
        ids: list[bytes],
        channels: list[str],
        raws: list[bytes],
        envelopes: list[dict[str, Any]],
        attempts: list[int],
    ) -> None:
        self.ids = ids
        self.channels = channels
        self.envelopes = envelopes
        self.payloads: list[dict[str, Any]] = [e["payload"] for e in envelopes]
        self.attempts = attempts
        self._raws = raws
        self._built: dict[int, Delivery] = {}

    @classmethod
    def of(cls, deliveries: Sequence[Delivery]) -> DeliveryBatch:
        """`deliveries` as a batch (itself if it is one), so a handler reads one shape whichever
        way its consumer decodes."""
        if isinstance(deliveries, DeliveryBatch):
            return deliveries
        batch = cls(
            ids=[d.id for d in deliveries],
            channels=[d.channel for d in deliveries],
            raws=[],  # never read: every delivery is built already
            envelopes=[
                {name: getattr(d.event, name) for name in ENVELOPE_FIELDS} for d in deliveries
            ],
            attempts=[d.attempt for d in deliveries],
        )
        batch._built = dict(enumerate(deliveries))
        return batch

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, index: int) -> Delivery: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Delivery]: ...

    def __getitem__(self, index: int | slice) -> Delivery | Sequence[Delivery]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("delivery index out of range")
        delivery = self._built.get(index)
        if delivery is None:
            # the envelope was checked when the batch was made: this cannot raise
            event = parse_event(self._raws[index])
            delivery = Delivery(self.ids[index], self.channels[index], event, self.attempts[index])
            self._built[index] = delivery
        return delivery


BatchHandler = Callable[[Sequence[Delivery]], Awaitable[None]]
_Parsed = TypeVar("_Parsed")
Rejected = tuple[bytes, bytes, bytes, str]
"""(stream key, entry id, original bytes, reason) of a message to dead-letter."""


def decode_entries(
    entries: Sequence[tuple[bytes, Entry]],
    channels: Mapping[bytes, str],
    attempts: Mapping[bytes, int],
    max_deliveries: int,
) -> tuple[list[Delivery], list[Rejected]]:
    """Stream entries (stream key, (entry id, fields)) -> the deliveries to hand to a handler,
    and the entries to dead-letter: not an envelope, or delivered more than `max_deliveries`
    times (`attempts`: entry id -> deliveries so far, 1 if absent)."""
    rejected: list[Rejected] = []
    accepted = _accepted(entries, attempts, max_deliveries, parse_event, rejected)
    deliveries = [Delivery(i, channels[key], event, n) for key, i, _, event, n in accepted]
    return deliveries, rejected


def decode_lazily(
    entries: Sequence[tuple[bytes, Entry]],
    channels: Mapping[bytes, str],
    attempts: Mapping[bytes, int],
    max_deliveries: int,
) -> tuple[DeliveryBatch, list[Rejected]]:
    """`decode_entries` (the same checks, the same outcome) as a `DeliveryBatch`."""
    if not attempts:  # first deliveries (none over `max_deliveries`): try the batch at once
        raws = [fields.get(FIELD, b"") for _, (_, fields) in entries]
        envelopes = common_event_fields(raws)
        if envelopes is not None:
            batch = DeliveryBatch(
                ids=[entry_id for _, (entry_id, _) in entries],
                channels=[channels[key] for key, _ in entries],
                raws=raws,
                envelopes=envelopes,
                attempts=[1] * len(raws),
            )
            return batch, []
    rejected: list[Rejected] = []
    accepted = list(_accepted(entries, attempts, max_deliveries, event_fields, rejected))
    batch = DeliveryBatch(
        ids=[a[1] for a in accepted],
        channels=[channels[a[0]] for a in accepted],
        raws=[a[2] for a in accepted],
        envelopes=[a[3] for a in accepted],
        attempts=[a[4] for a in accepted],
    )
    return batch, rejected


def _accepted(
    entries: Sequence[tuple[bytes, Entry]],
    attempts: Mapping[bytes, int],
    max_deliveries: int,
    parse: Callable[[bytes], _Parsed],
    rejected: list[Rejected],
) -> Iterator[tuple[bytes, bytes, bytes, _Parsed, int]]:
    """(stream key, entry id, raw, parsed, attempt) of each entry to hand over; one that is not
    an envelope, or was delivered more than `max_deliveries` times, goes to `rejected`."""
    for key, (entry_id, fields) in entries:
        raw = fields.get(FIELD, b"")
        try:
            parsed = parse(raw)
        except MalformedMessage as exc:
            rejected.append((key, entry_id, raw, f"malformed event: {exc}"))
            continue
        attempt = attempts.get(entry_id, 1)
        if attempt > max_deliveries:
            rejected.append((key, entry_id, raw, f"gave up after {attempt - 1} deliveries"))
            continue
        yield key, entry_id, raw, parsed, attempt
