"""Stream retention by consumption: a durable stream keeps what one of its readers still needs.

Every event of a durable channel is appended to its stream, and nothing else removes entries
from a stream with backpressure (`channels.ChannelSpec`): each is trimmed here, below the oldest
entry any of its readers still needs. Its publishers wait while it holds `BUS_STREAM_MAXLEN`
entries, so this trim is what gives them room again; and without it a stream would hold entries
every reader consumed long ago: in Redis memory, in every append-only-file rewrite and in every
restart's replay.

- The readers of a channel are the services that consume it (`acl.SERVICE_ACCESS`: a service
  can read only those streams, through the consumer group named after it), but for those not
  deployed (`OBSERVABILITY_ABSENT_READERS`; the chart lists the simulator when it is off).
  Only they hold entries: a consumer group the platform does not declare (an operator's ad hoc
  reader, or what a removed service left) gets no guarantee, as its publishers would otherwise
  wait for it for good once the stream is full.
- An acknowledging group still needs its oldest pending entry and what it has not been
  delivered yet: everything from its oldest pending entry, or after its last delivered one.
- A group read `checkpointed` (the ACL's `rewinds`) acknowledges nothing: after a restart it
  rewinds to the position its last checkpoint covers. It keeps that position in the hash
  `ae:hold:{channel}` (field: the group), written in the checkpoint's own transaction.
- Nothing is trimmed while a reader's group does not exist yet, or a rewinding reader has no
  hold: at install the simulator may publish before the database service has created its
  group, which then reads the stream from its start.

The trim is approximate (`XTRIM MINID ~`: whole stream nodes only) and never reaches an entry a
reader needs. One service runs it (the observability service), so only one holds the right to
trim; its replicas may trim at once without harm, since each trims only below what every reader
had consumed when it looked (as one trimmer does a moment after it looked), and the chart runs
two so that retention outlives the loss of a pod.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final

from redis.exceptions import ResponseError

from analytics_engine.core.acl import SERVICE_ACCESS
from analytics_engine.core.channels import parse_stream_id, stream_hold_key, stream_key

log = logging.getLogger(__name__)

_MAX_TRIM_CALLS: Final = 500
"""Per stream and run: ~5M entries at Redis's default 100 entries per stream node."""


@dataclass(frozen=True, slots=True)
class GroupPosition:
    """Where a consumer group is in a stream (from XINFO GROUPS and XPENDING)."""

    last_delivered: str
    oldest_pending: str | None = None


def readers_of(channel: str, absent: Collection[str] = ()) -> dict[str, bool]:
    """The groups reading `channel`'s stream -> whether that group rewinds (is checkpointed);
    without the services in `absent` (not deployed)."""
    return {
        service: channel in access.rewinds
        for service, access in SERVICE_ACCESS.items()
        if channel in access.consumes and service not in absent
    }


def trimmed_channels() -> list[str]:
    """Every channel with declared readers (patterns, such as replays, are not trimmed)."""
    return sorted(
        {c for access in SERVICE_ACCESS.values() for c in access.consumes if "*" not in c}
    )


def trim_floor(
    readers: Mapping[str, bool],
    groups: Mapping[str, GroupPosition],
    holds: Mapping[str, str],
) -> str | None:
    """The oldest entry id any reader still needs (entries below it may go), or None: keep
    everything. Groups that are not among `readers` hold nothing."""
    needed: list[str] = []
    for name, rewinds in sorted(readers.items()):
        if rewinds:
            held = holds.get(name)
            if held is None:
                return None
            needed.append(held)
            continue
        group = groups.get(name)
        if group is None:
            return None
        needed.append(group.oldest_pending or group.last_delivered)
    if not needed:
        return None
    return min(needed, key=parse_stream_id)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def trim_consumed(redis: Any, channel: str, absent: Collection[str] = ()) -> int:
    """Trim `channel`'s stream below what every reader has consumed; returns entries removed."""
    readers = readers_of(channel, absent)
    if not readers:
        return 0
    key = stream_key(channel)
    try:
        infos = await redis.xinfo_groups(key)
    except ResponseError:  # no such stream yet
        return 0
    groups: dict[str, GroupPosition] = {}
    for info in infos:
        name = _text(info["name"])
        if name not in readers:
            continue
        oldest = None
        if int(info["pending"]):
            # None when the reader acknowledged them all since XINFO GROUPS: then it has
            # consumed everything up to the last delivered entry that XINFO reported
            smallest = (await redis.xpending(key, name))["min"]
            oldest = None if smallest is None else _text(smallest)
        groups[name] = GroupPosition(_text(info["last-delivered-id"]), oldest)
    raw_holds = await redis.hgetall(stream_hold_key(channel))
    holds = {_text(k): _text(v) for k, v in raw_holds.items()}
    floor = trim_floor(readers, groups, holds)
    if floor is None:
        return 0
    # An approximate XTRIM removes at most 100 stream nodes (~10,000 entries, about half a
    # millisecond of Redis) per call: repeat it, rather than block Redis for one long trim.
    removed = 0
    for _ in range(_MAX_TRIM_CALLS):
        step = int(await redis.xtrim(key, minid=floor, approximate=True))
        removed += step
        if not step:
            break
    return removed


async def trim_all(redis: Any, absent: Collection[str] = ()) -> dict[str, int]:
    """`trim_consumed` of every trimmed channel; a channel that fails is logged and skipped."""
    removed: dict[str, int] = {}
    for channel in trimmed_channels():
        try:
            removed[channel] = await trim_consumed(redis, channel, absent)
        except ResponseError as exc:
            log.warning("could not trim a stream", extra={"channel": channel, "error": str(exc)})
    return removed
