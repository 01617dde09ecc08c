"""The I/O of lake compaction (what to merge is decided in `compaction.py`): a periodic pass that
merges the small `kpi_results/` files of old partitions, one replica at a time.

A merge, for one group of files of one partition:

1. read the files and merge their rows (lake order) into one Parquet body;
2. renew the lock, then record the intent (`ae:archival:compactions`, name -> JSON
   {new_key, old_keys, owner, created_at});
3. PUT `compacted-<uuid>.parquet`;
4. delete the old objects;
5. drop the intent.

A crash after 3 leaves rows twice in the lake until the intent is resolved; resolution (at
start and before each pass, holding the lock) finishes the merge when the new object exists
(deletes the old objects still there) and otherwise drops the intent (the old objects are
intact), so once a pass completes every row is in the lake exactly once. Between 3 and 4
(milliseconds) a reader listing the partition can see the merged rows twice, and a reader that
listed before 4 can fail to GET an old object (it retries): documented, not prevented.

The lock (`ae:archival:compaction:lock`, SET NX PX with a token, renewed and released by its
holder only, through WATCH/MULTI: the service's Redis user may not run scripts on its keys)
keeps two replicas from merging the same files into two objects. A replica killed while holding
it holds it for up to `LOCK_TTL_S` more: passes (and the resolution of what it left) wait that
long. S3 or Redis down: the pass is logged as failed and retried soon after (`RETRY_S`); the
service never stops for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final

import pyarrow as pa
from redis.exceptions import WatchError

from analytics_engine.archival.compaction import (
    CompactionGroup,
    CompactionIntent,
    LakeObject,
    archive_table,
    compacted_key,
    may_drop_unlanded,
    merged_parquet,
    plan_compaction,
)
from analytics_engine.archival.layout import (
    KPI_RESULTS_PREFIX,
    compaction_lock_key,
    compactions_key,
)
from analytics_engine.archival.tables import from_parquet
from analytics_engine.core.bus import redis_outage_is_transient
from analytics_engine.core.errors import TransientError, describe_error

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from analytics_engine.archival.ledger import Ledger
    from analytics_engine.archival.metrics import CompactionMetrics
    from analytics_engine.archival.s3 import ObjectStore

log = logging.getLogger(__name__)

LOCK_TTL_S: Final = 600.0
"""How long the lock outlives its holder's last renewal (renewed before each merge; a merge of
`ARCHIVAL_COMPACTION_MAX_BYTES` takes seconds). Also how old a peer's intent must be before a
resolver may drop it while its merged object does not exist."""
FIRST_PASS_DELAY_S: Final = 60.0
"""The first pass comes this long after start (at most the interval): a service restarted more
often than the interval still compacts."""
RETRY_S: Final = 60.0
"""After a failed pass, the next comes this soon (at most the interval)."""


@dataclass(frozen=True, slots=True)
class CompactionHooks:
    """Test seam: called with the merged object's key right after its PUT, before the deletes."""

    after_put: Callable[[str], Awaitable[None]] | None = None


@dataclass(slots=True)
class PassOutcome:
    """What one pass did."""

    resolved: int = 0
    merged: int = 0  # objects written
    files: int = 0  # objects merged and deleted
    rows: int = 0


class LockLost(TransientError):
    """The compaction lock expired or was taken over: the pass stops before its next merge."""


class CompactionLock:
    """`SET NX PX` with a random token; renew and release check the token first (WATCH/MULTI)."""

    def __init__(self, redis: Redis, *, owner: str, ttl_s: float) -> None:
        self._redis = redis
        self._ttl_ms = int(ttl_s * 1000)
        self._token = f"{owner}:{uuid.uuid4().hex}".encode()

    async def acquire(self) -> bool:
        with redis_outage_is_transient():
            return bool(
                await self._redis.set(compaction_lock_key(), self._token, nx=True, px=self._ttl_ms)
            )

    async def renew(self) -> None:
        """Extend the lock; raises `LockLost` when it is no longer ours."""
        if not await self._if_held(lambda pipe: pipe.pexpire(compaction_lock_key(), self._ttl_ms)):
            raise LockLost("the compaction lock was lost")

    async def release(self) -> None:
        await self._if_held(lambda pipe: pipe.delete(compaction_lock_key()))

    async def _if_held(self, then: Callable[[Pipeline], object]) -> bool:
        key = compaction_lock_key()
        with redis_outage_is_transient():
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    await pipe.watch(key)
                    if await pipe.get(key) != self._token:
                        return False  # leaving the block resets the pipeline (UNWATCH)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    then(pipe)
                    await pipe.execute()
                    return True
            except WatchError:
                return False


class Compactor:
    def __init__(
        self,
        *,
        store: ObjectStore,
        redis: Redis,
        ledger: Ledger,
        owner: str,
        interval_s: float,
        min_age_s: float,
        min_files: int,
        max_bytes: int,
        compression_level: int | None = None,
        metrics: CompactionMetrics | None = None,
        hooks: CompactionHooks | None = None,
        lock_ttl_s: float = LOCK_TTL_S,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._store = store
        self._redis = redis
        self._ledger = ledger
        self._owner = owner
        self._interval = interval_s
        self._min_age = timedelta(seconds=min_age_s)
        self._min_files = min_files
        self._max_bytes = max_bytes
        self._level = compression_level
        self._metrics = metrics
        self._hooks = hooks or CompactionHooks()
        self._lock_ttl = lock_ttl_s
        self._clock = clock or (lambda: datetime.now(UTC))

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Background task: resolve what an earlier life left, then a pass every interval (none
        when the interval is 0). Failures are logged and retried, never raised."""
        await self._attempt(self.resolve_at_start, "compaction resolution at start")
        if self._interval <= 0:
            return
        delay = min(self._interval, FIRST_PASS_DELAY_S)
        while True:
            await asyncio.sleep(delay)
            ok = await self._attempt(self.run_pass, "compaction pass")
            delay = self._interval if ok else min(self._interval, RETRY_S)

    async def _attempt(self, step: Callable[[], Awaitable[object]], what: str) -> bool:
        try:
            await step()
        except TransientError as exc:
            log.warning(
                f"{what} failed, will retry", extra={"error": describe_error(exc, limit=200)}
            )
        except Exception:
            log.exception(f"{what} failed, will retry")
        else:
            return True
        if self._metrics is not None:
            self._metrics.failures.inc()
        return False

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[CompactionLock | None]:
        """The lock if this replica got it (None: a peer is compacting), released after."""
        lock = CompactionLock(self._redis, owner=self._owner, ttl_s=self._lock_ttl)
        if not await lock.acquire():
            yield None
            return
        try:
            yield lock
        finally:
            with contextlib.suppress(TransientError):
                await lock.release()

    async def resolve_at_start(self) -> int | None:
        """Settle the compaction intents an earlier life (or a dead peer) left; None when a peer
        holds the lock (its pass resolves them first)."""
        async with self._locked() as lock:
            if lock is None:
                return None
            return await self._resolve()

    async def run_pass(self) -> PassOutcome | None:
        """Resolve, list, plan and merge; None when a peer holds the lock."""
        async with self._locked() as lock:
            if lock is None:
                log.debug("compaction skipped: a peer holds the lock")
                return None
            outcome = PassOutcome(resolved=await self._resolve())
            listing = await self._store.list_objects(f"{KPI_RESULTS_PREFIX}/")
            # Intents are read AFTER the listing: a flush writes its intent before its PUT, so
            # an object listed here was either committed (its intent gone, its rows in the
            # ledger) or is named by an intent still open now.
            busy = await self._busy()
            groups = plan_compaction(
                (LakeObject(key, size) for key, size in listing),
                now=self._clock(),
                min_age=self._min_age,
                min_files=self._min_files,
                max_bytes=self._max_bytes,
                busy=busy,
            )
            for group in groups:
                await lock.renew()
                await self._merge(group, lock, outcome)
        if self._metrics is not None:
            self._metrics.passes.inc()
        if outcome.merged or outcome.resolved:
            log.info(
                "lake compaction pass",
                extra={
                    "objects_written": outcome.merged,
                    "files_compacted": outcome.files,
                    "rows": outcome.rows,
                    "resolved": outcome.resolved,
                },
            )
        return outcome

    # -- one merge ---------------------------------------------------------------------------
    async def _merge(self, group: CompactionGroup, lock: CompactionLock, out: PassOutcome) -> None:
        read = await self._read(group.keys)
        if read is None:
            log.warning(
                "a file to compact vanished; skipped", extra={"partition": group.partition.prefix}
            )
            return
        # An object that is no archive file (not Parquet, damaged, other columns: written by
        # something else) is left where it is, so it cannot stop the merge of the others, nor
        # every later pass (the plan would put it first again).
        unreadable = [key for key, table in read.items() if table is None]
        if unreadable:
            log.warning(
                "lake objects that are no archive files are left out of compaction",
                extra={"partition": group.partition.prefix, "keys": unreadable[:10]},
            )
        tables = [table for table in read.values() if table is not None]
        if len(tables) < 2:
            return
        group = replace(group, keys=tuple(key for key, t in read.items() if t is not None))
        rows = sum(t.num_rows for t in tables)
        body = await asyncio.to_thread(merged_parquet, tables, compression_level=self._level)
        del tables
        name = uuid.uuid4().hex
        intent = CompactionIntent(
            name=name,
            new_key=compacted_key(group.partition, name),
            old_keys=group.keys,
            owner=self._owner,
            created_at=await self._ledger.now(),  # one clock for all replicas
        )
        await lock.renew()  # the merge itself may have taken a while
        await self._write_intent(intent)
        await self._store.put(intent.new_key, body)
        if self._hooks.after_put is not None:
            await self._hooks.after_put(intent.new_key)
        await self._store.delete_many(intent.old_keys)
        await self._drop_intent(intent.name)
        out.merged += 1
        out.files += len(group.keys)
        out.rows += rows
        if self._metrics is not None:
            self._metrics.objects_written.inc()
            self._metrics.files_compacted.inc(len(group.keys))
            self._metrics.rows.inc(rows)

    async def _read(self, keys: Sequence[str]) -> dict[str, pa.Table | None] | None:
        """The files' tables by key, None for a file that is no readable archive file; None
        altogether if one no longer exists (the listing is out of date)."""
        gone = object()

        async def load(key: str) -> pa.Table | object | None:
            data = await self._store.get(key)
            if data is None:
                return gone
            try:
                return archive_table(from_parquet(data))
            except (pa.ArrowException, OSError, KeyError, ValueError):
                return None

        tables = await asyncio.gather(*(load(k) for k in keys))
        if any(t is gone for t in tables):
            return None
        return {
            k: t if isinstance(t, pa.Table) else None for k, t in zip(keys, tables, strict=True)
        }

    # -- resolution --------------------------------------------------------------------------
    async def _resolve(self) -> int:
        """Settle open compaction intents (see the module docstring); returns how many."""
        settled = 0
        for intent in await self._intents():
            if await self._store.exists(intent.new_key):
                await self._store.delete_many(intent.old_keys)
            elif not may_drop_unlanded(
                intent, owner=self._owner, now=await self._ledger.now(), in_flight_s=self._lock_ttl
            ):
                continue
            await self._drop_intent(intent.name)
            settled += 1
            log.info(
                "resolved a compaction intent",
                extra={"new_key": intent.new_key, "old_objects": len(intent.old_keys)},
            )
        return settled

    async def _busy(self) -> set[str]:
        """Keys no merge may touch: named by an open flush or compaction intent."""
        busy = {o.object_key for i in await self._ledger.intents() for o in i.objects}
        for intent in await self._intents():
            busy.update(intent.old_keys)
            busy.add(intent.new_key)
        return busy

    async def _intents(self) -> list[CompactionIntent]:
        with redis_outage_is_transient():
            raw = await self._redis.hgetall(compactions_key())
        return [
            CompactionIntent.decode(_text(k), v if isinstance(v, bytes) else v.encode())
            for k, v in raw.items()
        ]

    async def _write_intent(self, intent: CompactionIntent) -> None:
        with redis_outage_is_transient():
            await self._redis.hset(compactions_key(), intent.name, intent.encode())

    async def _drop_intent(self, name: str) -> None:
        with redis_outage_is_transient():
            await self._redis.hdel(compactions_key(), name)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
