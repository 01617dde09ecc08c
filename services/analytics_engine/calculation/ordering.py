"""Merging several Redis Streams back into one publication order (pure).

The engine's watermark is the highest `published_at` it has seen, so it must see events in
publication order: an event fed after a later-published one may find its window already closed.
The consumer reads `simulation.entity.created` and `.updated` as two streams, up to a batch of
each per read, so under backlog one stream runs ahead of the other. `StreamMerger` holds events
back until no other stream can still deliver an earlier one, and releases them in stream-id
order (ids of all streams come from the one Redis clock, and the publisher stamps `timestamp`
just before XADD, so id order is publication order for a single publisher).

A stream cannot deliver an earlier entry when we have already received one at or past it
(`delivered`), or when Redis said it holds nothing we have not received (`mark_caught_up`, with
the Redis time of that check: later entries get later ids).

Redeliveries (the bus re-reads pending entries after a reconnect, and claims idle ones) are
recognised by id and dropped: ids of one stream only grow.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Any, Generic, TypeVar

from analytics_engine.core.channels import StreamId

T = TypeVar("T")

ZERO: StreamId = (0, 0)
_first = itemgetter(0)


class StreamMerger(Generic[T]):
    """Buffers items per stream; releases those no stream can still precede.

    Ids are compared at millisecond granularity: within one millisecond the sequence numbers of
    different streams say nothing about their relative order, so an item is released once every
    stream is known complete *past* its millisecond, and items of one millisecond are ordered
    by `tiebreak` (the envelope timestamp).
    """

    def __init__(
        self,
        channels: Sequence[str],
        released: Mapping[str, StreamId] | None = None,
        *,
        tiebreak: Callable[[T], Any] = lambda _: 0,
    ) -> None:
        self.channels = tuple(channels)
        start = dict(released or {})
        self._tiebreak = tiebreak
        self._buffers: dict[str, deque[tuple[StreamId, T]]] = {c: deque() for c in channels}
        self._delivered: dict[str, StreamId] = {c: start.get(c, ZERO) for c in channels}
        self._released: dict[str, StreamId] = dict(self._delivered)
        self._complete_ms: dict[str, int] = dict.fromkeys(channels, 0)

    def offer(self, channel: str, sid: StreamId, item: T) -> bool:
        """Accept one delivery; False for a redelivery of something already received."""
        if sid <= self._delivered[channel]:
            return False
        self._delivered[channel] = sid
        self._buffers[channel].append((sid, item))
        return True

    def offer_many(self, items: Iterable[tuple[str, bytes, T]]) -> int:
        """`offer` for (channel, raw stream id, item) triples; returns how many were new."""
        delivered, buffers = self._delivered, self._buffers
        accepted = 0
        for channel, raw, item in items:
            ms, _, seq = raw.partition(b"-")
            sid = (int(ms), int(seq or b"0"))
            if sid > delivered[channel]:
                delivered[channel] = sid
                buffers[channel].append((sid, item))
                accepted += 1
        return accepted

    def delivered(self, channel: str) -> StreamId:
        return self._delivered[channel]

    def mark_caught_up(self, channel: str, until_ms: int) -> None:
        """Every entry of `channel` with an id below `until_ms`-0 has been offered."""
        self._complete_ms[channel] = max(self._complete_ms[channel], until_ms)

    def _safe_ms(self) -> int:
        """Items with an id millisecond below this cannot be preceded any more."""
        # a stream that delivered an id in millisecond M is complete below M
        return min(max(self._complete_ms[c], self._delivered[c][0]) for c in self.channels)

    def release(self) -> list[tuple[str, T]]:
        """Items no earlier entry can precede any more, in publication order."""
        safe = self._safe_ms()
        sources = [
            (index, channel, buf)
            for index, channel in enumerate(self.channels)
            if (buf := self._buffers[channel]) and buf[0][0][0] < safe
        ]
        if not sources:
            return []
        if len(sources) == 1:  # one stream's items are in order already
            _, channel, buf = sources[0]
            out = [(channel, item) for _, item in self._take(channel, buf, safe)]
            return out
        tiebreak = self._tiebreak
        ready = [
            ((sid[0], tiebreak(item), index, sid), channel, item)
            for index, channel, buf in sources
            for sid, item in self._take(channel, buf, safe)
        ]
        ready.sort(key=_first)
        return [(channel, item) for _, channel, item in ready]

    def _take(
        self, channel: str, buf: deque[tuple[StreamId, T]], safe: int
    ) -> list[tuple[StreamId, T]]:
        """Remove and return the leading items of `buf` with an id millisecond below `safe`."""
        if buf[-1][0][0] < safe:
            taken = list(buf)
            buf.clear()
        else:
            taken = []
            while buf[0][0][0] < safe:
                taken.append(buf.popleft())
        self._released[channel] = taken[-1][0]
        return taken

    def newest_buffered(self) -> list[T]:
        """The last item held back on each stream (the newest, per stream)."""
        return [buf[-1][1] for buf in self._buffers.values() if buf]

    def released(self) -> dict[str, StreamId]:
        """Per stream, the highest id released (what a checkpoint covers)."""
        return dict(self._released)

    @property
    def buffered(self) -> int:
        return sum(len(b) for b in self._buffers.values())
