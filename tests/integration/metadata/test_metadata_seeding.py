"""Seeding at start: built-in entity types and `KPI_DEFINITIONS_DIR` (plain YAML and the
Kubernetes `KPIDefinition` samples), idempotent across restarts."""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from metadata_helpers import MetadataHarness, changed_events
from redis.asyncio import Redis

from analytics_engine.metadata.service import Settings

pytestmark = pytest.mark.asyncio

SAMPLES = Path(__file__).resolve().parents[3] / "k8s" / "samples"

PLAIN = """\
code: sensor_max_temperature
display_name: Max temperature
entity_type: sensor
aggregation: max
field: temperature
group_by: [site]
window: {type: sliding, size: 5m, slide: 1m}
---
- code: sensor_readings
  display_name: Readings
  entity_type: sensor
  aggregation: count
  window: {type: tumbling, size: 30s}
"""

BROKEN = """\
code: broken_kpi
display_name: Broken
entity_type: order
aggregation: sum
field: status
window: {type: tumbling, size: 1m}
"""


async def test_seeds_kpis_from_a_directory_idempotently(
    tmp_path: Path,
    metadata_settings: Callable[..., Settings],
    start_metadata: Callable[[Settings], Awaitable[MetadataHarness]],
    redis: Redis,
) -> None:
    for sample in SAMPLES.glob("*.yaml"):
        shutil.copy(sample, tmp_path / sample.name)
    (tmp_path / "plain.yml").write_text(PLAIN)
    (tmp_path / "zz-broken.yaml").write_text(BROKEN)  # sum over a string: skipped, not fatal
    (tmp_path / "notes.txt").write_text("not a definition")
    sample_codes = {
        "orders_revenue_by_region",
        "orders_count",
        "orders_distinct_customers",
        "sensor_avg_temperature",
    }

    first = await start_metadata(metadata_settings(kpi_definitions_dir=tmp_path))
    status, listing, _ = await first.call("GET", "/api/v1/kpi-definitions")
    assert status == 200
    versions = {item["code"]: item["version"] for item in listing["items"]}
    assert set(versions) >= sample_codes
    assert set(versions) == sample_codes | {"sensor_max_temperature", "sensor_readings"}
    assert set(versions.values()) == {1}
    _, revenue, _ = await first.call("GET", "/api/v1/kpi-definitions/orders_revenue_by_region")
    assert revenue["field"] == "amount"
    assert revenue["group_by"] == ["region"]
    events_before = len(await changed_events(redis, 2 + len(versions)))
    assert events_before == 2 + len(versions)
    first.runtime.stop()

    # A restart (or a second replica) with the same files changes nothing.
    second = await start_metadata(
        metadata_settings(kpi_definitions_dir=tmp_path, instance_id="metadata-test-2")
    )
    _, listing, _ = await second.call("GET", "/api/v1/kpi-definitions")
    assert {i["code"]: i["version"] for i in listing["items"]} == versions
    _, entities, _ = await second.call("GET", "/api/v1/entity-types")
    assert [(e["entity_type"], e["version"]) for e in entities["items"]] == [
        ("order", 1),
        ("sensor", 1),
    ]
    assert await second.service.relay.drain() == 0
    assert len(await changed_events(redis, events_before + 1, timeout=0.5)) == events_before

    # An edited file is picked up on the next start as a new version.
    (tmp_path / "plain.yml").write_text(PLAIN.replace("Max temperature", "Hottest reading"))
    second.runtime.stop()
    third = await start_metadata(
        metadata_settings(kpi_definitions_dir=tmp_path, instance_id="metadata-test-3")
    )
    _, kpi, _ = await third.call("GET", "/api/v1/kpi-definitions/sensor_max_temperature")
    assert (kpi["display_name"], kpi["version"]) == ("Hottest reading", 2)


async def test_builtin_entity_type_edits_survive_a_restart(
    metadata_settings: Callable[..., Settings],
    start_metadata: Callable[[Settings], Awaitable[MetadataHarness]],
) -> None:
    first = await start_metadata(metadata_settings())
    status, _, _ = await first.call(
        "PUT",
        "/api/v1/entity-types/order",
        {"attributes": {"amount": "number", "region": "string", "priority": "integer"}},
    )
    assert status == 200
    first.runtime.stop()
    second = await start_metadata(metadata_settings(instance_id="metadata-test-2"))
    _, order, _ = await second.call("GET", "/api/v1/entity-types/order")
    assert order["version"] == 2
    assert "priority" in order["attributes"]


async def test_api_edits_and_deletions_of_directory_kpis_survive_restarts(
    tmp_path: Path,
    metadata_settings: Callable[..., Settings],
    start_metadata: Callable[[Settings], Awaitable[MetadataHarness]],
) -> None:
    """The directory seeds; it does not overrule the API at every start. A KPI edited through
    the API keeps the edit, and one deleted stays deleted, across restarts with the same
    files; a file changed since is applied again (a new version)."""
    (tmp_path / "plain.yml").write_text(PLAIN)
    starts = iter(range(1, 10))

    async def restart(previous: MetadataHarness | None = None) -> MetadataHarness:
        if previous is not None:
            previous.runtime.stop()
        n = next(starts)
        return await start_metadata(
            metadata_settings(kpi_definitions_dir=tmp_path, instance_id=f"metadata-seed-{n}")
        )

    harness = await restart()
    _, kpi, _ = await harness.call("GET", "/api/v1/kpi-definitions/sensor_max_temperature")
    edited = {k: v for k, v in kpi.items() if k != "version"}
    edited["display_name"] = "Edited in the API"
    status, _, _ = await harness.call(
        "PUT", "/api/v1/kpi-definitions/sensor_max_temperature", edited
    )
    assert status == 200
    status, _, _ = await harness.call("DELETE", "/api/v1/kpi-definitions/sensor_readings")
    assert status == 204

    harness = await restart(harness)
    _, kpi, _ = await harness.call("GET", "/api/v1/kpi-definitions/sensor_max_temperature")
    assert (kpi["display_name"], kpi["version"]) == ("Edited in the API", 2)
    status, _, _ = await harness.call("GET", "/api/v1/kpi-definitions/sensor_readings")
    assert status == 404

    # the file changes: what it now says is applied over the API's edit
    (tmp_path / "plain.yml").write_text(PLAIN.replace("Max temperature", "Hottest reading"))
    harness = await restart(harness)
    _, kpi, _ = await harness.call("GET", "/api/v1/kpi-definitions/sensor_max_temperature")
    assert (kpi["display_name"], kpi["version"]) == ("Hottest reading", 3)
    status, _, _ = await harness.call("GET", "/api/v1/kpi-definitions/sensor_readings")
    assert status == 404  # its part of the file did not change
