"""The writer's staging table gives back exactly the timestamps it was sent.

Timestamps cross the COPY as integer microseconds since the epoch and are rebuilt by generated
columns in SQL; this pins that round trip to the `datetime` values over their whole range, in any
time zone, whatever the session's own time zone.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analytics_engine.core.storable import EntityEventRow
from analytics_engine.database.writer import (
    _STAGE_COLUMNS,
    EVENT_STAGE,
    STAGING_SETUP,
    epoch_microseconds,
    stage_records,
)

# Python's whole range, less a day at each end (so every offset stays representable).
_MOMENTS = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.builds(
        timezone, st.timedeltas(min_value=timedelta(hours=-23), max_value=timedelta(hours=23))
    ),
)
_NEAR_EPOCH = st.builds(
    lambda us: datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us),
    st.integers(min_value=-(10**12), max_value=10**12),
)


def _row(occurred_at: datetime, published_at: datetime) -> EntityEventRow:
    return EntityEventRow(
        str(uuid.uuid4()),
        "updated",
        "order",
        "o-1",
        1,
        occurred_at,
        published_at,
        "{}",
        None,
        "data_simulator",
    )


def test_epoch_microseconds_counts_from_the_unix_epoch() -> None:
    assert epoch_microseconds(datetime(1970, 1, 1, tzinfo=UTC)) == 0
    assert epoch_microseconds(datetime(1970, 1, 1, 1, tzinfo=timezone(timedelta(hours=1)))) == 0
    assert epoch_microseconds(datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)) == -1
    assert epoch_microseconds(datetime(2024, 6, 1, 12, 0, 0, 7, tzinfo=UTC)) == (
        1_717_243_200_000_007
    )


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    moments=st.lists(st.tuples(_MOMENTS | _NEAR_EPOCH, _MOMENTS), min_size=1, max_size=20),
    session_zone=st.sampled_from(["UTC", "Europe/Berlin", "America/St_Johns", "Asia/Kathmandu"]),
)
async def test_staged_timestamps_are_the_sent_ones(
    pg: asyncpg.Connection, moments: list[tuple[datetime, datetime]], session_zone: str
) -> None:
    rows = [_row(occurred, published) for occurred, published in moments]
    await pg.execute(STAGING_SETUP)
    await pg.execute(f"SET TIME ZONE '{session_zone}'")
    async with pg.transaction():
        records, _ = stage_records(rows)
        await pg.copy_records_to_table(EVENT_STAGE, records=records, columns=_STAGE_COLUMNS)
        staged = await pg.fetch(f"SELECT event_id, occurred_at, published_at FROM {EVENT_STAGE}")
    got = {str(s["event_id"]): (s["occurred_at"], s["published_at"]) for s in staged}
    assert got == {r.event_id: (r.occurred_at, r.published_at) for r in rows}
