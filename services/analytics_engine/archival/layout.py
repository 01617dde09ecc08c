"""Where things live in the lake and in Redis, and how a KPI result is identified (pure).

Lake layout (Hive-partitioned, readable by pyarrow.dataset and DuckDB `hive_partitioning`):

    kpi_results/kpi_code=<code>/date=YYYY-MM-DD/<batch>.parquet        date of window_start (UTC)
    kpi_results/kpi_code=<code>/date=YYYY-MM-DD/compacted-<uuid>.parquet   merged (compaction.py)
    entity_events/entity_type=<type>/date=YYYY-MM-DD/batch-<batch_id>.parquet

The entity-events key is a pure function of the batch, so a re-sent batch overwrites itself. KPI
results arrive one by one and are grouped into files per flush, so their file names are unique
and duplicates are prevented by the fingerprint ledger instead (see `kpi_results.py`).
"""

from __future__ import annotations

import hashlib
import math
import re
import uuid
from datetime import UTC, date, datetime
from typing import Any, Final
from urllib.parse import quote

import orjson

from analytics_engine.core.channels import KEY_PREFIX

KPI_RESULTS_PREFIX: Final = "kpi_results"
ENTITY_EVENTS_PREFIX: Final = "entity_events"
FINGERPRINT_BYTES: Final = 16

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_SAFE_SEGMENT: Final = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")


def _segment(value: str) -> str:
    """A path segment value; anything outside a conservative alphabet is percent-encoded (Hive
    style), so no value can add `/` or `=` to a key."""
    if _SAFE_SEGMENT.match(value):
        return value
    return quote(value, safe="")


def partition_date(moment: datetime) -> str:
    """`YYYY-MM-DD` of a moment in UTC."""
    return moment.astimezone(UTC).date().isoformat()


def kpi_partition(kpi_code: str, day: str) -> str:
    return f"{KPI_RESULTS_PREFIX}/kpi_code={_segment(kpi_code)}/date={day}"


def new_batch_name(now: datetime | None = None) -> str:
    """Unique, time-sortable name of one flush: `20240101T000000Z-<32 hex>`."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{moment.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex}"


def kpi_object_key(kpi_code: str, day: str, batch: str) -> str:
    return f"{kpi_partition(kpi_code, day)}/{batch}.parquet"


def entity_events_object_key(entity_type: str, day: date | str, batch_id: str) -> str:
    """Deterministic: the same batch always maps to the same object."""
    day_text = day.isoformat() if isinstance(day, date) else day
    return (
        f"{ENTITY_EVENTS_PREFIX}/entity_type={_segment(entity_type)}/date={day_text}/"
        f"batch-{_segment(batch_id)}.parquet"
    )


def dims_key(dimensions: dict[str, Any] | None) -> str:
    """Canonical JSON of a dimensions object (sorted keys, no spaces): equal dimensions give
    byte-equal text, so it serves as a join and dedup key (in the lake and in `verify`)."""
    return orjson.dumps(dimensions or {}, option=orjson.OPT_SORT_KEYS).decode()


def epoch_us(moment: datetime) -> int:
    """Microseconds since the epoch (exact integer arithmetic, no float rounding)."""
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def result_fingerprint(
    *,
    kpi_code: str,
    window_start_us: int,
    window_end_us: int,
    dims: str,
    value: float,
    sample_count: int,
    definition_version: int,
) -> bytes:
    """16-byte identity of one archived KPI result: its key `(kpi_code, window, dimensions)` plus
    what it says (value, sample count, definition version). A redelivered copy has the same
    fingerprint and is dropped; a recomputed result with another value is a new fact and kept."""
    value_text = "nan" if math.isnan(value) else repr(float(value))
    text = "\x1f".join(
        (
            kpi_code,
            str(window_start_us),
            str(window_end_us),
            dims,
            value_text,
            str(sample_count),
            str(definition_version),
        )
    )
    return hashlib.blake2b(text.encode(), digest_size=FINGERPRINT_BYTES).digest()


# -- Redis keys (all under the bus's `ae:` prefix) ---------------------------------------------
def seen_key(kpi_code: str, day: str) -> str:
    """Hash of the fingerprints archived in one partition (field = fingerprint)."""
    return f"{KEY_PREFIX}archival:seen:{kpi_code}:{day}"


def intents_key() -> str:
    """Hash of write-ahead intents: batch name -> JSON {owner, created_at, objects}."""
    return f"{KEY_PREFIX}archival:intents"


def compactions_key() -> str:
    """Hash of compaction intents: name -> JSON {new_key, old_keys, owner, created_at}."""
    return f"{KEY_PREFIX}archival:compactions"


def compaction_lock_key() -> str:
    """One compaction pass at a time over all replicas: SET NX PX, value = the holder's token."""
    return f"{KEY_PREFIX}archival:compaction:lock"
