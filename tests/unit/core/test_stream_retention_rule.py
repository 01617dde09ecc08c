"""Which stream entries retention may remove (pure rule; the integration test runs it on Redis)."""

from __future__ import annotations

from analytics_engine.core import channels
from analytics_engine.core.acl import SERVICE_ACCESS
from analytics_engine.core.retention import GroupPosition, readers_of, trim_floor, trimmed_channels

DB, CALC = "database_service", "calculation_engine"


def test_readers_come_from_the_acl_table_with_the_rewinding_ones_marked() -> None:
    assert readers_of(channels.ENTITY_CREATED) == {DB: False, CALC: True}
    assert readers_of(channels.ENTITY_DEACTIVATED) == {DB: False}
    assert readers_of(channels.SERVICE_HEARTBEAT) == {}  # live only, no stream
    assert channels.ARCHIVE_KPI_RESULTS in trimmed_channels()
    assert not any("*" in c for c in trimmed_channels())


def test_the_floor_is_the_oldest_entry_any_reader_still_needs() -> None:
    readers = {DB: False, CALC: True}
    groups = {
        DB: GroupPosition(last_delivered="90-0", oldest_pending="40-3"),
        CALC: GroupPosition(last_delivered="95-0"),  # NOACK: ahead of its checkpoint
    }
    assert trim_floor(readers, groups, {CALC: "60-0"}) == "40-3"
    assert trim_floor(readers, groups, {CALC: "7-0"}) == "7-0"
    caught_up = {**groups, DB: GroupPosition(last_delivered="90-0")}
    assert trim_floor(readers, caught_up, {CALC: "100-0"}) == "90-0"
    # ids compare as numbers, not text
    assert trim_floor({DB: False}, {DB: GroupPosition("100-0", "99-10")}, {}) == "99-10"


def test_nothing_goes_while_a_reader_has_not_joined_or_a_rewinding_one_holds_nothing() -> None:
    readers = {DB: False, CALC: True}
    assert trim_floor(readers, {CALC: GroupPosition("9-0")}, {CALC: "9-0"}) is None
    assert trim_floor(readers, {DB: GroupPosition("9-0"), CALC: GroupPosition("9-0")}, {}) is None
    assert trim_floor({}, {}, {}) is None


def test_only_the_declared_readers_that_are_deployed_hold_entries() -> None:
    """An ad hoc group, or one a removed service left, would stop the publishers for good once
    the stream is full (backpressure): it holds nothing."""
    groups = {DB: GroupPosition("90-0"), "ad-hoc": GroupPosition("3-0")}
    assert trim_floor({DB: False}, groups, {}) == "90-0"
    # the simulator reads definition changes; with it not deployed, its group holds nothing
    assert readers_of(channels.METADATA_CHANGED) == {"data_simulator": False, CALC: False}
    assert readers_of(channels.METADATA_CHANGED, absent={"data_simulator"}) == {CALC: False}


def test_every_stream_that_applies_backpressure_has_readers_that_retention_trims() -> None:
    """A publisher waits on a full backpressure stream until retention trims what its readers
    consumed: a published stream nobody reads would fill once and stop its publisher for good."""
    published = {
        c
        for access in SERVICE_ACCESS.values()
        for c in access.publishes
        if "*" not in c and channels.channel_spec(c).durable
    }
    waiting = {c for c in published if channels.channel_spec(c).backpressure}
    assert channels.ENTITY_CREATED in waiting and channels.KPI_CALCULATED in waiting
    assert waiting <= set(trimmed_channels())
    # the two that trim at their length instead: the producer re-sends, or paces itself
    assert not channels.channel_spec(channels.ARCHIVAL_EVENTS).backpressure
    assert not channels.channel_spec(f"{channels.REPLAY_PREFIX}calculation_engine.x").backpressure
    assert published - waiting == {channels.ARCHIVAL_EVENTS}
