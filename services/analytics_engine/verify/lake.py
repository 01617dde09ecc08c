"""The Parquet archive side of verify: archived KPI results and entity-event ids (boto3 +
pyarrow, blocking: call through `asyncio.to_thread`)."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from datetime import date, datetime
from typing import Any
from urllib.parse import unquote

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from analytics_engine.archival.layout import ENTITY_EVENTS_PREFIX, KPI_RESULTS_PREFIX
from analytics_engine.archival.s3 import make_client
from analytics_engine.verify.compare import ResultRow, canonical_dims

_KPI_COLUMNS = (
    "kpi_code",
    "window_start",
    "window_end",
    "dims_key",
    "value",
    "sample_count",
    "definition_version",
)


class Lake:
    def __init__(
        self,
        *,
        endpoint_url: str,
        bucket: str,
        access_key: str | None,
        secret_key: str | None,
        region: str,
    ) -> None:
        self.bucket = bucket
        self.unreadable: list[tuple[str, str]] = []
        """(key, why) of each object that could not be read as a lake file."""
        self._client: Any = make_client(
            endpoint_url=endpoint_url,
            access_key=access_key,
            secret_key=secret_key,
            region=region,
        )

    def check(self) -> None:
        """Raise when the bucket cannot be reached (configuration/connection error)."""
        self._client.head_bucket(Bucket=self.bucket)

    def _keys(self, prefix: str) -> Iterator[str]:
        for page in self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        ):
            for item in page.get("Contents", []):
                yield str(item["Key"])

    def _read(self, key: str, columns: Sequence[str] | None = None) -> Any:
        body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        try:
            return pq.read_table(io.BytesIO(body), columns=list(columns) if columns else None)
        except (pa.ArrowException, OSError, ValueError) as exc:
            # not Parquet, truncated, or without the columns the archival service writes:
            # the rest of the lake can still be checked
            self.unreadable.append((key, f"{type(exc).__name__}: {str(exc)[:200]}"))
            return None

    def kpi_results(
        self, codes: Sequence[str], *, start: datetime, end: datetime
    ) -> list[ResultRow]:
        """Archived results of `codes` with windows inside `[start, end]`, reading only the
        date partitions that can hold them."""
        first, last = start.date(), end.date()
        rows: list[ResultRow] = []
        for code in codes:
            for key in self._keys(f"{KPI_RESULTS_PREFIX}/kpi_code={code}/"):
                day = _partition_date(key)
                if day is not None and not first <= day <= last:
                    continue
                table = self._read(key, _KPI_COLUMNS)
                if table is None:
                    continue
                for r in table.to_pylist():
                    if r["window_start"] < start or r["window_end"] > end:
                        continue
                    rows.append(
                        ResultRow(
                            kpi_code=r["kpi_code"],
                            window_start=r["window_start"],
                            window_end=r["window_end"],
                            dims=canonical_dims(orjson.loads(r["dims_key"])),
                            value=math.nan if r["value"] is None else float(r["value"]),
                            sample_count=int(r["sample_count"]),
                            definition_version=r["definition_version"],
                        )
                    )
        return rows

    def event_ids(self, *, start: date, end: date) -> Iterator[str]:
        """`event_id` of every archived entity event in date partitions `[start, end]`."""
        for key in self._keys(f"{ENTITY_EVENTS_PREFIX}/"):
            day = _partition_date(key)
            if day is not None and not start <= day <= end:
                continue
            table = self._read(key, ["event_id"])
            if table is not None:
                yield from table.column("event_id").to_pylist()


def _partition_date(key: str) -> date | None:
    for part in key.split("/"):
        if part.startswith("date="):
            try:
                return date.fromisoformat(unquote(part[5:]))
            except ValueError:
                return None
    return None
