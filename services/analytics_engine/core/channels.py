"""Channel names from the architecture document, and every Redis key prefix the bus uses.

The names here are the product's public interface: external tools SUBSCRIBE to them by name.
Keep every Redis key the platform writes derivable from this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# Fire-and-forget event channels (spec: "Fire-and-Forget Events").
ENTITY_CREATED: Final = "simulation.entity.created"
ENTITY_UPDATED: Final = "simulation.entity.updated"
ENTITY_DEACTIVATED: Final = "simulation.entity.deactivated"
SIMULATION_TICK: Final = "simulation.tick"
KPI_CALCULATED: Final = "kpi.calculated"
KPI_CALCULATED_PREFIX: Final = "kpi.calculated."
ARCHIVE_KPI_RESULTS: Final = "archive.kpi_results"
ARCHIVAL_EVENTS: Final = "archival.events"
ARCHIVAL_CONFIRMED: Final = "archival.confirmed"
STREAM_SUBSCRIBE: Final = "stream.subscribe"
STREAM_UNSUBSCRIBE: Final = "stream.unsubscribe"
STREAM_HEARTBEAT: Final = "stream.heartbeat"
METADATA_CHANGED: Final = "metadata.changed"
SERVICE_HEARTBEAT: Final = "observability.heartbeat"

ENTITY_CHANNELS: Final = (ENTITY_CREATED, ENTITY_UPDATED, ENTITY_DEACTIVATED)

# Where the database service replays stored events for a stream subscription.
REPLAY_PREFIX: Final = "stream.replay."

# Request/reply channels (spec: "Request/Reply Pattern").
DATABASE_QUERY: Final = "database.query"
DATABASE_COMMAND: Final = "database.command"
METADATA_LOOKUP: Final = "metadata.lookup"

REQUEST_CHANNELS: Final = (DATABASE_QUERY, DATABASE_COMMAND, METADATA_LOOKUP)

# Redis key layout. Streams carry the durable copy of each event channel.
KEY_PREFIX: Final = "ae:"


def kpi_channel(kpi_code: str) -> str:
    """The per-KPI results channel `kpi.calculated.{kpi_code}`."""
    return f"{KPI_CALCULATED_PREFIX}{kpi_code}"


def reply_channel(service: str, instance: str) -> str:
    """The reply channel `reply.{service}.{instance}` a requester listens on."""
    return f"reply.{service}.{instance}"


def stream_key(channel: str) -> str:
    """The Redis Stream holding the durable copy of an event channel."""
    return f"{KEY_PREFIX}stream:{channel}"


def channel_of_stream(key: str) -> str:
    """The channel whose durable copy is the stream `key` (`stream_key`'s inverse)."""
    return key.removeprefix(stream_key(""))


def stream_hold_key(channel: str) -> str:
    """Positions in a channel's stream that groups reading it without acknowledgements still
    need (hash: group -> entry id; see `core.retention`)."""
    return f"{KEY_PREFIX}hold:{channel}"


StreamId = tuple[int, int]
"""A stream entry id, `<milliseconds>-<sequence>`, as numbers (ids compare as numbers)."""


def parse_stream_id(raw: bytes | str) -> StreamId:
    if isinstance(raw, str):
        raw = raw.encode()
    ms, _, seq = raw.partition(b"-")
    return int(ms), int(seq or b"0")


def format_stream_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


def dead_letter_key(channel: str) -> str:
    """The dead-letter stream for a channel (events and requests that could not be handled)."""
    return f"{KEY_PREFIX}dlq:{channel}"


def request_claim_key(correlation_id: str) -> str:
    """Claim marker making one responder replica (or the cancelling caller) own a request."""
    return f"{KEY_PREFIX}rr:claim:{correlation_id}"


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """How an event channel is delivered.

    Every event is PUBLISHed on the pub/sub channel of its name. A *durable* channel is also
    appended to a Redis Stream, read by one consumer group per subscribing service.

    A durable stream holds at most about `BUS_STREAM_MAXLEN` entries (or `maxlen`, if fewer).
    What happens at that length is the channel's `backpressure`:
    - True: the stream is never trimmed below an entry a reader still needs (`core.retention`
      trims it as its readers consume); a publisher that finds it full waits for room
      (`EventPublisher.wait_for_room`). Nothing unread is ever dropped.
    - False: the stream is trimmed to its length (`XADD MAXLEN ~`), unread or not. Only for
      channels whose producer already guarantees delivery another way.
    """

    name: str
    durable: bool = True
    maxlen: int | None = None
    """Entries its stream holds (approximately), if fewer than `BUS_STREAM_MAXLEN`."""
    backpressure: bool = True


# Live-only channels: a late reader has no use for old values, so no stream backs them.
_PUBSUB_ONLY: Final = frozenset({SERVICE_HEARTBEAT})

# `archival.events` entries are whole retention batches (up to 5000 rows, ~2 MB each), so its
# stream is capped by entries far below the default: it needs to hold only the batches in flight
# (`DATABASE_ARCHIVAL_MAX_INFLIGHT`, 8), and a batch trimmed unread is not lost: the database
# service re-sends every batch the archival service has not confirmed.
_STREAM_CAPS: Final = {ARCHIVAL_EVENTS: 64}


def channel_spec(channel: str) -> ChannelSpec:
    """Per-KPI result channels and heartbeats are pub/sub only; every other event channel is
    durable. Two trim at their length instead of applying backpressure: `archival.events` (see
    above) and the replay channels, whose producer (a subscription's replay worker) pauses
    while the subscriber lags instead, and whose streams retention does not trim."""
    if channel.startswith(KPI_CALCULATED_PREFIX) or channel in _PUBSUB_ONLY:
        return ChannelSpec(channel, durable=False, backpressure=False)
    trims = channel == ARCHIVAL_EVENTS or channel.startswith(REPLAY_PREFIX)
    return ChannelSpec(channel, maxlen=_STREAM_CAPS.get(channel), backpressure=not trims)
