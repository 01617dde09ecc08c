from __future__ import annotations

from datetime import UTC, datetime, timedelta

from analytics_engine.observability.registry import RateMeter, Registry


def beat(service: str, instance: str, **extra: object) -> dict[str, object]:
    return {
        "service": service,
        "instance": instance,
        "version": "1",
        "status": "running",
        "uptime_s": 1.0,
        "consumer_lag": {"simulation.entity.created": 3},
        **extra,
    }


def test_instances_go_missing_after_silence_and_come_back() -> None:
    registry = Registry(missing_after_s=5)
    registry.heartbeat(beat("database_service", "a"), now=100.0)
    assert registry.services(now=104.0)[0]["status"] == "up"
    assert registry.services(now=106.0)[0]["status"] == "missing"
    registry.heartbeat(beat("database_service", "a"), now=107.0)
    [entry] = registry.services(now=107.5)
    assert entry["status"] == "up"
    assert entry["consumer_lag"] == {"simulation.entity.created": 3}


def test_an_expected_service_never_heard_from_goes_missing_once_we_listened_long_enough() -> None:
    """A service that died before the observability service (re)started sends no heartbeat to
    be missed: it is reported from the list of deployed services instead."""
    registry = Registry(
        missing_after_s=5, expected={"database_service", "archival_service"}, started=100.0
    )
    registry.heartbeat(beat("archival_service", "a"), now=101.0)
    registry.heartbeat(beat("hostile_probe", "x"), now=101.0)  # heard, not expected: listed
    assert [e["service"] for e in registry.services(now=104.0)] == [
        "archival_service",
        "hostile_probe",
    ]
    entries = {e["service"]: e for e in registry.services(now=105.0)}
    assert list(entries) == ["archival_service", "database_service", "hostile_probe"]
    assert entries["database_service"] == {
        "service": "database_service",
        "status": "missing",
        "instances": [],
        "consumer_lag": {},
    }
    assert entries["archival_service"]["status"] == "up"
    registry.heartbeat(beat("database_service", "d"), now=105.5)
    assert {e["service"]: e["status"] for e in registry.services(now=106.0)} == {
        "archival_service": "up",
        "database_service": "up",
        "hostile_probe": "up",
    }


def test_nothing_is_reported_missing_unheard_before_the_registry_listens() -> None:
    """The clock for services never heard from starts when heartbeats can reach the registry
    (`started`), not when it is built: a slow start must not report live services missing."""
    registry = Registry(missing_after_s=5, expected={"database_service"})
    assert registry.services(now=1000.0) == []
    registry.started = 1000.0
    assert registry.services(now=1004.0) == []
    assert [e["status"] for e in registry.services(now=1005.0)] == ["missing"]


def test_a_service_is_up_while_any_replica_is_up() -> None:
    registry = Registry(missing_after_s=5)
    registry.heartbeat(beat("database_service", "a"), now=100.0)
    registry.heartbeat(beat("database_service", "b"), now=104.0)
    [entry] = registry.services(now=106.0)
    assert entry["status"] == "up"
    assert [i["status"] for i in entry["instances"]] == ["missing", "up"]


def test_kpi_freshness_tracks_the_newest_window() -> None:
    registry = Registry(missing_after_s=5)
    end = datetime(2024, 1, 1, tzinfo=UTC)
    registry.kpi_result(
        "revenue", value=1.0, window_end=end, received=end + timedelta(milliseconds=40), now=1.0
    )
    registry.kpi_result(
        "revenue",
        value=0.5,
        window_end=end - timedelta(minutes=1),
        received=end + timedelta(seconds=1),
        now=2.0,
    )
    [state] = registry.kpi_freshness(now=3.0)
    assert state["last_value"] == 1.0
    assert state["freshness_s"] == 0.04
    assert state["results"] == 2


def test_rate_meter_counts_the_last_interval_only() -> None:
    meter = RateMeter(interval_s=10)
    meter.add(100.2, 50)
    meter.add(105.0, 50)
    assert meter.rate(105.5) == 10.0
    assert meter.rate(110.5) == 5.0
    assert meter.rate(200.0) == 0.0


def test_instances_long_gone_are_forgotten() -> None:
    """Every pod restart is a new instance: those silent for an hour leave the registry
    (bounded memory, a status that does not list every pod that ever ran), and a service nobody
    runs any more stops being reported missing (degrading the status for good); a deployed one
    still is, from the list of expected services."""
    registry = Registry(missing_after_s=5, expected={"calculation_engine"}, started=0.0)
    for i in range(1000):  # a restart a minute
        registry.heartbeat(beat("calculation_engine", f"pod-{i}"), now=60.0 * i)
    registry.heartbeat(beat("one_off_job", "x"), now=59_000.0)
    assert len(registry.instances) <= 62
    [calc] = [e for e in registry.services(now=59_941.0) if e["service"] == "calculation_engine"]
    assert calc["status"] == "up" and len(calc["instances"]) <= 61
    entries = {e["service"]: e for e in registry.services(now=70_000.0)}
    assert set(entries) == {"calculation_engine"}
    assert entries["calculation_engine"]["status"] == "missing"
    assert registry.instances == {}


def test_message_rates_of_channels_long_quiet_are_forgotten() -> None:
    """Every backfill replays into a channel of its own: a channel without a message for an
    hour leaves the rates (bounded memory); one still in use keeps its rate."""
    registry = Registry(missing_after_s=5)
    for i in range(100):
        registry.count(f"stream.replay.calculation_engine.job-{i}", now=60.0 * i, n=10)
    registry.count("simulation.entity.created", now=5_995.0, n=20)
    rates = registry.message_rates(now=6_000.0)
    assert len(rates) <= 62
    assert rates["simulation.entity.created"] == 2.0
    assert "stream.replay.calculation_engine.job-0" not in rates
    assert "stream.replay.calculation_engine.job-99" in rates
