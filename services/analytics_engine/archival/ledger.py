"""Redis state of the KPI-results archiver: write-ahead intents and the archived fingerprints.

All Redis I/O of the archival protocol lives here; `kpi_results.py` describes the protocol.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from analytics_engine.archival.layout import FINGERPRINT_BYTES, intents_key, seen_key
from analytics_engine.core.bus import REDIS_ERRORS
from analytics_engine.core.errors import TransientError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline


@dataclass(frozen=True, slots=True)
class PlannedObject:
    """One file of a flush: where it goes and which partition's ledger it updates."""

    object_key: str
    kpi_code: str
    day: str


@dataclass(frozen=True, slots=True)
class Intent:
    batch: str
    owner: str
    created_at: float
    objects: tuple[PlannedObject, ...]

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "owner": self.owner,
                "created_at": self.created_at,
                "objects": [[o.object_key, o.kpi_code, o.day] for o in self.objects],
            }
        )

    @classmethod
    def decode(cls, batch: str, raw: bytes) -> Intent:
        data = orjson.loads(raw)
        return cls(
            batch=batch,
            owner=str(data["owner"]),
            created_at=float(data["created_at"]),
            objects=tuple(PlannedObject(k, c, d) for k, c, d in data["objects"]),
        )


# The fingerprints of a partition travel as ONE argument, their concatenation (each is
# FINGERPRINT_BYTES long), split by a script: redis-py packs every argument of a command in
# Python, which for HMGET/HSET of 10k fields cost more than the rest of a flush. The data stays
# a plain hash (field = fingerprint, value "1"), as before. Commands go in slices of 1000 fields
# (Lua's unpack has a stack limit).
LOOKUP_SCRIPT = """
local size, blob, flags = tonumber(ARGV[1]), ARGV[2], {}
for first = 1, #blob, 1000 * size do
  local fields = {}
  for i = first, math.min(first + 1000 * size, #blob + 1) - 1, size do
    fields[#fields + 1] = string.sub(blob, i, i + size - 1)
  end
  for _, value in ipairs(redis.call('HMGET', KEYS[1], unpack(fields))) do
    flags[#flags + 1] = value and '1' or '0'
  end
end
return table.concat(flags)
"""
"""KEYS: the partition's hash; ARGV: fingerprint size, the fingerprints. Returns one flag byte
per fingerprint: "1" if it is in the hash."""

RECORD_SCRIPT = """
local size, blob = tonumber(ARGV[2]), ARGV[3]
for first = 1, #blob, 1000 * size do
  local items = {}
  for i = first, math.min(first + 1000 * size, #blob + 1) - 1, size do
    items[#items + 1] = string.sub(blob, i, i + size - 1)
    items[#items + 1] = '1'
  end
  redis.call('HSET', KEYS[1], unpack(items))
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 0
"""
"""KEYS: the partition's hash; ARGV: time to live (s), fingerprint size, the fingerprints. Adds
them; the hash expires that long after its last write."""

_FOUND = ord("1")


def _blob(fingerprints: Iterable[bytes]) -> bytes:
    """The fingerprints as one argument (each exactly FINGERPRINT_BYTES long)."""
    items = fingerprints if isinstance(fingerprints, list) else list(fingerprints)
    blob = b"".join(items)
    if len(blob) != FINGERPRINT_BYTES * len(items):
        raise ValueError(f"fingerprints are {FINGERPRINT_BYTES} bytes each")
    return blob


class Ledger:
    """Intents (`ae:archival:intents`) and per-partition fingerprint hashes
    (`ae:archival:seen:{kpi_code}:{date}`, expiring `ttl_s` after their last write)."""

    def __init__(self, redis: Redis, *, ttl_s: int) -> None:
        self._redis = redis
        self._ttl = ttl_s
        self._lookup = redis.register_script(LOOKUP_SCRIPT)
        self._record = redis.register_script(RECORD_SCRIPT)

    async def archived(self, candidates: Mapping[tuple[str, str], Sequence[bytes]]) -> set[bytes]:
        """Which of the fingerprints (grouped by partition) are already in the lake."""
        groups = [(part, list(fps)) for part, fps in candidates.items() if fps]
        if not groups:
            return set()
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.scripts.add(self._lookup)  # type: ignore[arg-type]  # loaded first if missing
            for (code, day), fps in groups:
                pipe.evalsha(
                    self._lookup.sha, 1, seen_key(code, day), FINGERPRINT_BYTES, _blob(fps)
                )
            replies = await pipe.execute()
        except REDIS_ERRORS as exc:
            raise TransientError(f"redis unavailable: {exc}") from exc
        found: set[bytes] = set()
        for (_, fps), flags in zip(groups, replies, strict=True):
            found.update(fp for fp, flag in zip(fps, flags, strict=True) if flag == _FOUND)
        return found

    def record(
        self, pipe: Pipeline, partition: tuple[str, str], fingerprints: Iterable[bytes]
    ) -> None:
        """Queue: these fingerprints are now in the lake."""
        blob = _blob(fingerprints)
        if not blob:
            return
        pipe.scripts.add(self._record)  # type: ignore[arg-type]
        pipe.evalsha(self._record.sha, 1, seen_key(*partition), self._ttl, FINGERPRINT_BYTES, blob)

    async def write_intent(self, intent: Intent) -> None:
        try:
            await self._redis.hset(intents_key(), intent.batch, intent.encode())
        except REDIS_ERRORS as exc:
            raise TransientError(f"redis unavailable: {exc}") from exc

    def drop_intent(self, pipe: Pipeline, batch: str) -> None:
        pipe.hdel(intents_key(), batch)

    async def intents(self) -> list[Intent]:
        try:
            raw = await self._redis.hgetall(intents_key())
        except REDIS_ERRORS as exc:
            raise TransientError(f"redis unavailable: {exc}") from exc
        return [
            Intent.decode(k.decode() if isinstance(k, bytes) else k, _bytes(v))
            for k, v in raw.items()
        ]

    async def settle(
        self,
        intent: Intent,
        found: Mapping[tuple[str, str], Sequence[bytes]],
        *,
        drop: bool = True,
    ) -> None:
        """Resolve an intent: record the fingerprints of the objects that exist, and drop it
        (unless `drop` is false: more of its objects may still be written)."""
        pipe = self._redis.pipeline(transaction=True)
        for partition, fps in found.items():
            self.record(pipe, partition, fps)
        if drop:
            self.drop_intent(pipe, intent.batch)
        try:
            await pipe.execute()
        except REDIS_ERRORS as exc:
            raise TransientError(f"redis unavailable: {exc}") from exc


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def now() -> float:
    return time.time()
