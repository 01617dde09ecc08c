"""The engine's dedupe ring in Redis, written as it grows rather than whole at each checkpoint.

The ring (the last `CALCULATION_DEDUPE_CAPACITY` event ids, 50,000 by default) was ~93% of a
checkpoint's bytes (1.95 of 2.1 MB at 20k events/s), rewritten every second at any event rate.
Here each checkpoint writes only the ids taken since the one before, into numbered chunks
`{key}:ids:{n}` (the last one, while not full, is rewritten with them), and deletes the chunks
whose ids have all left the ring, in the checkpoint's own MULTI; the checkpoint records which
chunks make up the ring (`RingManifest`). So what a checkpoint writes for the ring follows the
event rate (20k ids a second at 20k events/s; at most a chunk at low rates), the ring is a few
dozen keys at any rate, and a reader sees the whole new ring or the whole old one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import orjson

from analytics_engine.calculation.checkpoint_store import CorruptCheckpoint

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from analytics_engine.kpi import KPIEngine

log = logging.getLogger(__name__)

MAX_ID_BYTES: Final = 800
"""An event id is at most 200 characters (the envelope), 800 bytes in UTF-8: chunks of at most
`part_bytes // MAX_ID_BYTES` ids stay within the checkpoint's part size."""
CHUNK_IDS: Final = 1000
"""Ids per chunk (fewer with small parts). A checkpoint appends its new ids to the last chunk
while that one is not full, rewriting it: so the ring is at most `capacity / CHUNK_IDS + 1`
chunks at any event rate, and a checkpoint rewrites at most this many ids it wrote before."""

Chunk = tuple[int, int, int]
"""(chunk number, sequence number of its first id, ids in it)."""


def chunk_key(key: str, number: int) -> str:
    return f"{key}:ids:{number}"


@dataclass(frozen=True, slots=True)
class RingManifest:
    """Which chunks hold the ring, whose ids are numbered `start` to `end - 1`."""

    start: int
    end: int
    chunks: tuple[Chunk, ...]

    def to_json(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "chunks": [list(c) for c in self.chunks]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RingManifest:
        chunks = tuple((int(n), int(first), int(count)) for n, first, count in data["chunks"])
        return cls(int(data["start"]), int(data["end"]), chunks)


@dataclass(frozen=True, slots=True)
class RingWrite:
    """One checkpoint's share of the ring: the manifest to record and the keys to write."""

    manifest: RingManifest
    new: tuple[tuple[Chunk, bytes], ...]
    """The chunks to write, each with its ids as JSON."""
    dropped: tuple[Chunk, ...]

    @property
    def bytes(self) -> int:
        return sum(len(data) for _, data in self.new)


class RecentIdsLog:
    def __init__(self, redis: Redis, key: str, *, part_bytes: int) -> None:
        self._redis = redis
        self.key = key
        self._ids_per_chunk = max(1, min(CHUNK_IDS, part_bytes // MAX_ID_BYTES))
        self._stored: tuple[Chunk, ...] = ()
        self._end = 0  # the ids numbered below this are in the stored chunks
        self._rewrite = False  # the stored chunks are not to be trusted: store the ring anew

    def plan(self, engine: KPIEngine) -> RingWrite:
        """What the next checkpoint writes of `engine`'s ring (pass it to `add_to_pipeline`,
        its manifest to the checkpoint, and to `written` once the MULTI succeeded)."""
        start, end = engine.recent_start, engine.recent_end
        step = self._ids_per_chunk
        number = max((c[0] for c in self._stored), default=-1) + 1
        # a ring numbered below what is stored is another engine's: store it anew
        if self._rewrite or end < self._end:
            stored, since = [], start
        else:
            stored, since = list(self._stored), max(self._end, start)
        if stored and end > since and stored[-1][2] < step and stored[-1][1] >= start:
            number, since, _ = stored.pop()  # not full yet: rewritten with the new ids
            rewritten = {number}
        else:
            rewritten = set()
        # chunks are in order: those wholly below the ring's start go
        gone = next((i for i, c in enumerate(stored) if c[1] + c[2] > start), len(stored))
        kept = tuple(stored[gone:])
        live = {c[0] for c in kept} | rewritten
        dropped = tuple(c for c in self._stored if c[0] not in live)
        new_ids = engine.recent_ids(since)
        new = tuple(
            ((number + i, since + offset, len(part)), orjson.dumps(part))
            for i, offset in enumerate(range(0, len(new_ids), step))
            if (part := new_ids[offset : offset + step])
        )
        manifest = RingManifest(start, end, kept + tuple(c for c, _ in new))
        return RingWrite(manifest, new, dropped)

    def add_to_pipeline(self, pipe: Pipeline, write: RingWrite) -> None:
        for (number, _, _), data in write.new:
            pipe.set(chunk_key(self.key, number), data)
        if write.dropped:
            pipe.delete(*(chunk_key(self.key, c[0]) for c in write.dropped))

    def written(self, write: RingWrite) -> None:
        """The MULTI holding `write` succeeded."""
        self._stored = write.manifest.chunks
        self._end = write.manifest.end
        self._rewrite = False

    async def check_stored(self) -> None:
        """Make the next `plan` store the whole ring if a chunk this log wrote is gone.

        Redis can lose its last second of writes in a crash (`appendfsync everysec`) while
        this process lives on and believes them written; a checkpoint listing a chunk that
        is gone could not be restored."""
        if self._stored and not self._rewrite:
            keys = [chunk_key(self.key, c[0]) for c in self._stored]
            if await self._redis.exists(*keys) != len(keys):
                log.warning("dedupe ring chunks lost in Redis: storing the ring anew")
                self._rewrite = True

    def stored_keys(self) -> set[str]:
        """The chunk keys the stored ring lists (after `load` or `written`)."""
        return {chunk_key(self.key, c[0]) for c in self._stored}

    async def load(self, manifest: RingManifest) -> list[str]:
        """The ring's ids as the manifest's checkpoint stored them, oldest first."""
        chunks = manifest.chunks
        if not chunks:
            if manifest.start != manifest.end:
                raise CorruptCheckpoint(f"{self.key}: no chunks for a ring of ids")
            self._stored, self._end = (), manifest.end
            return []
        raws = await self._redis.mget([chunk_key(self.key, c[0]) for c in chunks])
        ids: list[str] = []
        expected = chunks[0][1]
        # if they do not make up the ring, the next checkpoint replaces (and deletes) them all
        self._stored, self._rewrite = chunks, True
        for (number, first, count), raw in zip(chunks, raws, strict=True):
            if not isinstance(raw, bytes):
                raise CorruptCheckpoint(f"{chunk_key(self.key, number)} is missing")
            part: list[str] = orjson.loads(raw)
            if first != expected or len(part) != count:
                raise CorruptCheckpoint(f"{chunk_key(self.key, number)} does not fit the ring")
            ids += part
            expected = first + count
        if expected != manifest.end or chunks[0][1] > manifest.start:
            raise CorruptCheckpoint(f"{self.key}: the chunks do not cover the ring")
        self._end, self._rewrite = manifest.end, False
        return ids[manifest.start - chunks[0][1] :]
