"""Live KPI results for Server-Sent Events: a bounded ring of recent results with increasing
ids (for `Last-Event-ID` replay) and a fan-out hub with one bounded queue per client.

The Redis pub/sub callback (`LiveHub.on_message`) parses each result once and pre-renders its
SSE frame, so N clients cost N queue puts, not N serialisations. A client whose queue is full
(it reads slower than results arrive) is cut off rather than buffering without bound; its
`EventSource` reconnects with `Last-Event-ID` and catches up from the ring.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final, Literal

import orjson

from analytics_engine.core.channels import KPI_CALCULATED_PREFIX

log = logging.getLogger(__name__)

EVENT_NAME: Final = "kpi"
CLOSED: Final = None
"""Queue sentinel: the hub is shutting down or dropped this client."""


@dataclass(frozen=True, slots=True)
class LiveResult:
    id: int
    kpi_code: str
    frame: bytes


def sse_frame(event_id: int, event: str, data: bytes) -> bytes:
    """One SSE message. `data` is single-line JSON (orjson never emits raw newlines)."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event_id, event.encode(), data)


def sse_comment(text: str) -> bytes:
    return b": " + text.replace("\n", " ").encode() + b"\n\n"


def sse_retry(milliseconds: int) -> bytes:
    return b"retry: %d\n\n" % milliseconds


def parse_last_event_id(value: str | None) -> int | None:
    """A `Last-Event-ID` we issued is a non-negative integer; anything else means 'none'.

    ASCII digits only: `str.isdigit()` alone accepts "²", which `int()` then refuses.
    """
    if value is None:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 20:
        return None
    return int(text)


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a (re)connecting client's stream starts: results with ids above `after`, preceded
    by a `gap` event when some it should have had cannot be sent."""

    after: int
    gap: bool


class ResultRing:
    """The last `capacity` results, ids strictly increasing.

    Ids start near the wall clock in microseconds, so a restarted gateway issues ids above the
    previous process's: a client reconnecting with an old id gets the whole ring (and a `gap`
    notice) instead of nothing.
    """

    def __init__(self, capacity: int, *, clock: Callable[[], float] = time.time) -> None:
        self._items: deque[LiveResult] = deque(maxlen=capacity)
        self._clock = clock
        self._last_id = 0
        self._evicted: int | None = None
        """The newest evicted result's id (None: none evicted yet)."""

    def next_id(self) -> int:
        self._last_id = max(self._last_id + 1, int(self._clock() * 1_000_000))
        return self._last_id

    def append(self, kpi_code: str, data: bytes) -> LiveResult:
        event_id = self.next_id()
        result = LiveResult(event_id, kpi_code, sse_frame(event_id, EVENT_NAME, data))
        if self._items and len(self._items) == self._items.maxlen:
            self._evicted = self._items[0].id  # the append evicts it
        self._items.append(result)
        return result

    @property
    def last_id(self) -> int:
        return self._last_id

    @property
    def oldest_id(self) -> int | None:
        return self._items[0].id if self._items else None

    def after(self, last_id: int, kpi_code: str | None = None) -> Iterator[LiveResult]:
        """Results newer than `last_id` (optionally one KPI's), oldest first."""
        for item in self._items:
            if item.id > last_id and (kpi_code is None or item.kpi_code == kpi_code):
                yield item

    def missed(self, last_id: int) -> bool:
        """True when results after `last_id` were already evicted (the client lost some), or
        `last_id` is older than anything this ring issued (a previous process's: what came
        between is unknown). Ids follow the clock, not one another: the newest evicted id,
        not `oldest - 1`, is the last a client may have seen without losing any."""
        oldest = self.oldest_id
        if oldest is None or last_id >= self._last_id:
            return False
        return last_id < (self._evicted if self._evicted is not None else oldest)

    def resume(self, last_id: int | None) -> Resume:
        """Where a client sending `last_id` (None: a first connection) resumes.

        An id above the last one issued here was not issued by this ring: another replica's
        (ids are clock-based), a previous process's after a restart, or a client's invention.
        Taken as given it would hold back every result until the counter passed it, so it is
        unknown, like an id too old: the stream resumes from now, after a `gap` event.
        """
        if last_id is None:
            return Resume(self._last_id, gap=False)
        if last_id > self._last_id:
            return Resume(self._last_id, gap=True)
        return Resume(last_id, gap=self.missed(last_id))

    def __len__(self) -> int:
        return len(self._items)


@dataclass(eq=False)
class Client:
    """One connected SSE client: its filter and its bounded queue."""

    kpi_code: str | None
    queue: asyncio.Queue[LiveResult | None] = field(
        default_factory=lambda: asyncio.Queue(maxsize=1000)
    )
    dropped: bool = False


class StreamSlots:
    """How many SSE streams are open, per key and in total, against their caps.

    A stream holds a connection and a queue for as long as its client likes, so the rate limit
    (which counts requests) does not bound them: one key could otherwise open streams until the
    gateway runs out of memory or file descriptors. Pure: the handler acquires before it
    connects a client and releases when the stream ends.
    """

    def __init__(self, *, max_total: int, max_per_key: int) -> None:
        self.max_total = max_total
        self.max_per_key = max_per_key
        self._per_key: dict[str, int] = {}
        self.in_use = 0

    def acquire(self, owner: str) -> Literal["key", "total"] | None:
        """Take a slot for `owner`; None on success, else which cap refused it."""
        held = self._per_key.get(owner, 0)
        if held >= self.max_per_key:
            return "key"
        if self.in_use >= self.max_total:
            return "total"
        self._per_key[owner] = held + 1
        self.in_use += 1
        return None

    def release(self, owner: str) -> None:
        held = self._per_key.get(owner, 0)
        if held <= 0:
            return
        if held == 1:
            del self._per_key[owner]
        else:
            self._per_key[owner] = held - 1
        self.in_use -= 1


class LiveHub:
    def __init__(self, *, ring_size: int, client_queue: int = 1000) -> None:
        self.ring = ResultRing(ring_size)
        self._clients: set[Client] = set()
        self._client_queue = client_queue
        self.received = 0
        self.invalid = 0

    def on_message(self, channel: bytes, data: bytes) -> None:
        """Pub/sub callback for `kpi.calculated.*`: keep the result's payload, fan it out."""
        name = channel.decode(errors="replace")
        code = name[len(KPI_CALCULATED_PREFIX) :] if name.startswith(KPI_CALCULATED_PREFIX) else ""
        try:
            envelope = orjson.loads(data)
            payload = envelope["payload"]
            if not isinstance(payload, dict):
                raise TypeError("payload is not an object")
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.invalid += 1
            return
        code = str(payload.get("kpi_code") or code)
        self.received += 1
        self.publish(code, orjson.dumps(payload))

    def publish(self, kpi_code: str, data: bytes) -> LiveResult:
        result = self.ring.append(kpi_code, data)
        for client in list(self._clients):
            if client.kpi_code is not None and client.kpi_code != kpi_code:
                continue
            try:
                client.queue.put_nowait(result)
            except asyncio.QueueFull:
                self._drop(client)
        return result

    def _drop(self, client: Client) -> None:
        """Cut off a client that does not keep up: empty its queue and wake it with CLOSED."""
        client.dropped = True
        self._clients.discard(client)
        while not client.queue.empty():
            client.queue.get_nowait()
        client.queue.put_nowait(CLOSED)
        log.info("dropped a slow SSE client", extra={"kpi_code": client.kpi_code})

    def connect(self, kpi_code: str | None) -> Client:
        client = Client(kpi_code, asyncio.Queue(maxsize=self._client_queue))
        self._clients.add(client)
        return client

    def disconnect(self, client: Client) -> None:
        self._clients.discard(client)

    def close(self) -> None:
        """Wake every client with CLOSED so their handlers return (graceful shutdown)."""
        for client in list(self._clients):
            self._drop(client)

    @property
    def clients(self) -> int:
        return len(self._clients)
