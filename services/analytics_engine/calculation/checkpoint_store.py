"""Where the engine's checkpoint lives in Redis: one key, or one key and its parts.

Redis refuses any single value larger than `proto-max-bulk-len` (8 MB in the chart) by closing
the connection, and an engine's state outgrows that with high-cardinality KPIs (an hourly
`count_distinct`, a `group_by` over customers). A checkpoint larger than `part_bytes` is
therefore written as parts, `{key}:part:{i}`, with a small manifest under `{key}`, all in the
checkpoint's own MULTI: a reader sees the whole new checkpoint or the whole old one. Parts a
smaller checkpoint no longer needs are deleted in that MULTI too.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Final

import orjson

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

MANIFEST_MARK: Final = "checkpoint_parts"


class CorruptCheckpoint(RuntimeError):
    """The stored parts do not add up to what the manifest says."""


def part_key(key: str, index: int) -> str:
    return f"{key}:part:{index}"


async def delete_strays(redis: Redis, prefix: str, keep: Collection[str]) -> int:
    """Delete the keys starting with `prefix` but those in `keep` (one SCAN of the keyspace);
    how many went."""
    pattern = "".join(f"\\{c}" if c in "*?[]\\" else c for c in prefix) + "*"
    found = [key async for key in redis.scan_iter(match=pattern, count=1000)]
    strays = [key for key in found if key.decode() not in keep]
    if strays:
        await redis.delete(*strays)
    return len(strays)


class CheckpointStore:
    def __init__(self, redis: Redis, key: str, *, part_bytes: int) -> None:
        self._redis = redis
        self.key = key
        self.part_bytes = part_bytes
        self._parts_stored = 0  # parts under `key` now (0: a single value)

    def add_to_pipeline(self, pipe: Pipeline, data: bytes) -> int:
        """Queue the writes of `data` on a MULTI pipeline; returns how many parts it takes
        (pass it to `written` once the MULTI succeeded)."""
        size, step = len(data), self.part_bytes
        parts = [data[i : i + step] for i in range(0, size, step)] if size > step else []
        if parts:
            pipe.set(self.key, orjson.dumps({MANIFEST_MARK: len(parts), "bytes": size}))
            for index, part in enumerate(parts):
                pipe.set(part_key(self.key, index), part)
        else:
            pipe.set(self.key, data)
        stale = [part_key(self.key, i) for i in range(len(parts), self._parts_stored)]
        if stale:
            pipe.delete(*stale)
        return len(parts)

    def written(self, parts: int) -> None:
        self._parts_stored = parts

    async def load(self) -> bytes | None:
        """The stored checkpoint's bytes, None when there is none."""
        raw = await self._redis.get(self.key)
        assert raw is None or isinstance(raw, bytes)  # the platform's clients never decode
        if raw is None or not raw.startswith(b'{"' + MANIFEST_MARK.encode()):
            # none, or a checkpoint in one value: no parts
            self._parts_stored = 0
            return raw
        head = orjson.loads(raw)
        count, size = int(head[MANIFEST_MARK]), int(head["bytes"])
        parts = await self._redis.mget([part_key(self.key, i) for i in range(count)])
        found = [p for p in parts if isinstance(p, bytes)]
        if len(found) != count:
            raise CorruptCheckpoint(f"{self.key}: a part of {count} is missing")
        data = b"".join(found)
        if len(data) != size:
            raise CorruptCheckpoint(f"{self.key}: parts hold {len(data)} bytes, not {size}")
        self._parts_stored = count
        return data

    def stored_keys(self) -> set[str]:
        """The part keys the stored checkpoint lists (after `load` or `written`)."""
        return {part_key(self.key, i) for i in range(self._parts_stored)}
