"""Compaction of `kpi_results/` partitions: which files to merge, and the intent that makes a
merge crash-safe (pure, no I/O; `compactor.py` does the I/O).

Why: a flush writes one file per partition, so at low rates a KPI gets a small file every
`ARCHIVAL_FLUSH_INTERVAL` (up to ~17,000 a day), and a reader of one day opens thousands of
objects. A pass merges the files of each partition old enough to be mostly complete into
`compacted-<uuid>.parquet` objects (same schema, same writer, rows in lake order).

What is merged:

* only `kpi_results/`, never `entity_events/`: an entity-events object has a key derived from
  its batch, so a batch re-sent after its object was merged away would be written again;
* partitions whose day ended at least `ARCHIVAL_COMPACTION_MIN_AGE` ago (late results, e.g.
  from a backfill, still land afterwards as new small files: a later pass merges them too) and
  that hold at least `ARCHIVAL_COMPACTION_MIN_FILES` small files;
* at most `ARCHIVAL_COMPACTION_MAX_BYTES` of objects per merge (memory: well-compressed files
  take ~7x their size as Arrow, ~17x while merged and sorted), so a big partition is merged in
  several groups; a file of half that size or more is left as it is (merging it again would
  only rewrite it);
* never an object named by an open flush intent (`Ledger.intents()`), nor by an open
  compaction intent: a crashed flush is resolved by reading its objects back, and had one been
  merged and deleted, resolution would think its PUT never landed and the re-delivered entries
  would be written twice.

The ledger is keyed by result fingerprints, not by objects, so a merge does not touch it: a
result re-delivered after its file was merged is still dropped.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from urllib.parse import unquote

import orjson
import pyarrow as pa

from analytics_engine.archival.layout import KPI_RESULTS_PREFIX
from analytics_engine.archival.tables import KPI_RESULTS_SCHEMA, lake_order, to_parquet

COMPACTED_PREFIX = "compacted-"


@dataclass(frozen=True, slots=True)
class LakeObject:
    """One object of a listing."""

    key: str
    size: int


@dataclass(frozen=True, slots=True)
class Partition:
    """`kpi_results/kpi_code=<c>/date=<d>` (`prefix`, as in the keys) and what it names."""

    prefix: str
    kpi_code: str
    day: date


def partition_of(key: str) -> Partition | None:
    """The KPI-results partition of an object key; None for anything else (other prefixes,
    deeper or shallower keys, a bad date, not Parquet)."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != KPI_RESULTS_PREFIX or not parts[3].endswith(".parquet"):
        return None
    code, day = parts[1], parts[2]
    if not code.startswith("kpi_code=") or not day.startswith("date="):
        return None
    try:
        parsed = date.fromisoformat(day.removeprefix("date="))
    except ValueError:
        return None
    return Partition(f"{parts[0]}/{code}/{day}", unquote(code.removeprefix("kpi_code=")), parsed)


def compacted_key(partition: Partition, token: str | None = None) -> str:
    """A new, unique object key in the partition."""
    return f"{partition.prefix}/{COMPACTED_PREFIX}{token or uuid.uuid4().hex}.parquet"


def old_enough(day: date, *, now: datetime, min_age: timedelta) -> bool:
    """Whether `day` (UTC) ended at least `min_age` before `now`."""
    end = datetime.combine(day + timedelta(days=1), time(), tzinfo=UTC)
    return now - end >= min_age


@dataclass(frozen=True, slots=True)
class CompactionGroup:
    """Files of one partition to merge into one object."""

    partition: Partition
    keys: tuple[str, ...]
    size: int


def plan_compaction(
    objects: Iterable[LakeObject],
    *,
    now: datetime,
    min_age: timedelta,
    min_files: int,
    max_bytes: int,
    busy: Collection[str] = (),
) -> list[CompactionGroup]:
    """The merges of one pass, partition by partition, files in key order (flush batch names
    sort by time). `busy`: keys named by open intents, never merged.

    A group closes when the next file would take it past `max_bytes`; as every file merged is
    smaller than half of that, a closed group holds two files or more. A last group of a single
    file is dropped (nothing to merge)."""
    large = max_bytes // 2
    small: dict[str, tuple[Partition, list[LakeObject]]] = {}
    for obj in objects:
        part = partition_of(obj.key)
        if part is None or obj.key in busy or obj.size >= large:
            continue
        if not old_enough(part.day, now=now, min_age=min_age):
            continue
        entry = small.get(part.prefix)
        if entry is None:
            small[part.prefix] = entry = (part, [])
        entry[1].append(obj)
    groups: list[CompactionGroup] = []
    for prefix in sorted(small):
        part, files = small[prefix]
        if len(files) < min_files:
            continue
        files.sort(key=lambda o: o.key)
        current: list[LakeObject] = []
        size = 0
        for obj in files:
            if current and size + obj.size > max_bytes:
                groups.append(_group(part, current))
                current, size = [], 0
            current.append(obj)
            size += obj.size
        if len(current) >= 2:
            groups.append(_group(part, current))
    return groups


def _group(partition: Partition, files: list[LakeObject]) -> CompactionGroup:
    return CompactionGroup(partition, tuple(o.key for o in files), sum(o.size for o in files))


@dataclass(frozen=True, slots=True)
class CompactionIntent:
    """Written before the merged object's PUT, dropped after the old objects' deletion.

    Resolving one (at start and before each pass): if `new_key` exists, the merge landed and the
    old objects still there are deleted (their rows are in the new one); if not, the intent is
    dropped and the old objects, untouched, are merged again by a later pass."""

    name: str
    new_key: str
    old_keys: tuple[str, ...]
    owner: str
    created_at: float

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "new_key": self.new_key,
                "old_keys": list(self.old_keys),
                "owner": self.owner,
                "created_at": self.created_at,
            }
        )

    @classmethod
    def decode(cls, name: str, raw: bytes) -> CompactionIntent:
        data = orjson.loads(raw)
        return cls(
            name=name,
            new_key=str(data["new_key"]),
            old_keys=tuple(str(k) for k in data["old_keys"]),
            owner=str(data["owner"]),
            created_at=float(data["created_at"]),
        )


def may_drop_unlanded(
    intent: CompactionIntent, *, owner: str, now: float, in_flight_s: float
) -> bool:
    """Whether an intent whose merged object does not exist may be dropped: ours (we are not in
    the middle of that merge when we resolve), or older than a merge can take while holding the
    lock (its owner is gone). A younger intent of a peer is kept, and its old objects stay out of
    the plans: the peer may have lost the lock while stalled and still be about to PUT."""
    return intent.owner == owner or now - intent.created_at >= in_flight_s


def archive_table(table: pa.Table) -> pa.Table:
    """A file's table in the archive's schema; raises (KeyError, `pa.ArrowException`) when it
    does not hold the archive's columns."""
    return table.select(KPI_RESULTS_SCHEMA.names).cast(KPI_RESULTS_SCHEMA)


def merged_parquet(tables: Sequence[pa.Table], *, compression_level: int | None) -> bytes:
    """The rows of `tables` as one Parquet file, in lake order, as a flush writes them."""
    merged = pa.concat_tables([archive_table(t) for t in tables])
    return to_parquet(lake_order(merged), compression_level=compression_level)
