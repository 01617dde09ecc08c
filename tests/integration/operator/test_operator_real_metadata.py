"""The KPIDefinition operator against the REAL metadata service.

kopf (KopfRunner, its own thread) <-> kmock (Kubernetes API) as in test_operator_kopf.py, but the
metadata side is `analytics-engine run metadata` composed in-process (`running` fixture) on real
PostgreSQL and Redis, on a pinned port (`METADATA_PORT`) so it can be stopped and started again
on the same URL. What the operator wrote is checked through the service's own interfaces: HTTP
GET, `metadata.lookup get_kpi_definition` over the bus, and the `metadata.changed` stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import aiohttp
import asyncpg
import pytest
from metadata_standin import MetadataStandIn, free_port
from operator_harness import (
    create,
    delete,
    eventually,
    fetch,
    load_sample,
    operator_settings,
    patch_spec,
    running_operator,
    synced_condition,
)
from redis.asyncio import Redis

from analytics_engine.core.channels import METADATA_CHANGED, METADATA_LOOKUP, stream_key
from analytics_engine.core.envelopes import Event
from analytics_engine.core.errors import RemoteError
from analytics_engine.core.request_reply import RequestReplyClient
from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.metadata.service import Settings
from analytics_engine.metadata.service import create as create_metadata
from analytics_engine.metadata.validation import canonical, parse_kpi
from analytics_engine_operator.kpidefinition import FINALIZER
from analytics_engine_operator.settings import KpiOperatorSettings

pytestmark = pytest.mark.timeout(60)

KPIS = "/api/v1/kpi-definitions"
REVENUE = "orders-revenue-by-region"
REVENUE_CODE = "orders_revenue_by_region"
SENSOR = "sensor-avg-temperature"
SENSOR_CODE = "sensor_avg_temperature"

Start = Callable[[ServiceRuntime], Awaitable[ServiceRuntime]]


class RealMetadata:
    """The metadata service on one fixed port; `stop()`/`start()` simulate an outage.

    `url` is the same across restarts, which is what the operator is configured with.
    """

    def __init__(self, settings: Settings, running: Start, http: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.port = settings.port
        self.url = f"http://127.0.0.1:{self.port}"
        self._running = running
        self._http = http
        self.runtime: ServiceRuntime | None = None

    async def start(self) -> None:
        self.runtime = await self._running(create_metadata(self.settings))
        assert self.runtime.bound_port == self.port

    async def stop(self) -> None:
        """Stop the runtime and wait until its port refuses connections (fully shut down:
        runner cleanup is the runtime's last step before closing Redis)."""
        assert self.runtime is not None
        self.runtime.stop()
        self.runtime = None

        async def refused() -> bool:
            try:
                async with self._http.get(f"{self.url}/healthz"):
                    return False
            except aiohttp.ClientConnectorError:
                return True
            except aiohttp.ClientError:
                return False

        await eventually(refused, timeout=20, what="the metadata service to stop")

    async def get(self, code: str) -> tuple[int, dict[str, Any], str | None]:
        """(status, body, ETag) of GET /api/v1/kpi-definitions/{code}."""
        async with self._http.get(f"{self.url}{KPIS}/{code}") as response:
            body: dict[str, Any] = await response.json()
            return response.status, body, response.headers.get("ETag")

    async def put(self, code: str, spec: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        async with self._http.put(f"{self.url}{KPIS}/{code}", json=spec) as response:
            body: dict[str, Any] = await response.json()
            return response.status, body

    async def stored(self, code: str) -> dict[str, Any] | None:
        status, body, _ = await self.get(code)
        assert status in (200, 404), (status, body)
        return body if status == 200 else None


@pytest.fixture
async def real_metadata(
    redis_url: str, database_url: str, running: Start, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[RealMetadata]:
    """Started; the servers are requested before `running` so they outlive the runtimes."""
    port = free_port()
    monkeypatch.setenv("METADATA_PORT", str(port))
    settings = Settings(
        redis_url=redis_url,
        database_url=database_url,
        instance_id="metadata-test",
        outbox_poll_interval_s=0.2,
        heartbeat_interval_s=60.0,
    )
    assert settings.port == port
    # force_close: no keep-alive connection outlives a stop, so "refused" means "stopped".
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        metadata = RealMetadata(settings, running, http)
        await metadata.start()
        yield metadata


@pytest.fixture
async def lookup(redis: Redis) -> AsyncIterator[RequestReplyClient]:
    client = RequestReplyClient(redis, service="operator_test", instance="it")
    yield client
    await client.close()


def settings_for(metadata: RealMetadata, **overrides: Any) -> KpiOperatorSettings:
    """The harness's fast operator settings; `operator_settings` only reads `metadata.url`."""
    return operator_settings(cast("MetadataStandIn", metadata), **overrides)


# --- assertion helpers ---------------------------------------------------------------------


def stored_form(spec: dict[str, Any], version: int) -> dict[str, Any]:
    """What the metadata service stores for `spec` (its canonical form) plus `version`."""
    return {**canonical(parse_kpi(spec)), "version": version}


async def synced_version(k8s: Any, name: str) -> int | None:
    obj = await fetch(k8s, name)
    if synced_condition(obj).get("status") != "True" or obj is None:
        return None
    version: int | None = obj["status"].get("syncedVersion")
    return version


async def is_synced(k8s: Any, name: str) -> bool:
    return await synced_version(k8s, name) is not None


async def reason_of(k8s: Any, name: str) -> str | None:
    reason: str | None = synced_condition(await fetch(k8s, name)).get("reason")
    return reason


async def changed_events(redis: Redis) -> list[Event]:
    entries = cast(
        "list[tuple[bytes, dict[bytes, bytes]]]", await redis.xrange(stream_key(METADATA_CHANGED))
    )
    return [Event.model_validate_json(fields[b"m"]) for _, fields in entries]


async def kpi_changes(redis: Redis, code: str) -> list[dict[str, Any]]:
    return [
        e.payload
        for e in await changed_events(redis)
        if e.payload.get("kind") == "kpi_definition" and e.payload.get("code") == code
    ]


# --- tests ----------------------------------------------------------------------------------


async def test_create_update_delete_round_trip(
    k8s: Any, real_metadata: RealMetadata, lookup: RequestReplyClient, redis: Redis
) -> None:
    sample = load_sample(REVENUE)
    async with running_operator(settings_for(real_metadata)):
        # create -> stored as version 1, status says so
        await create(k8s, sample)
        await eventually(lambda: is_synced(k8s, REVENUE), what="Synced=True")

        status, body, etag = await real_metadata.get(REVENUE_CODE)
        assert status == 200
        assert body == stored_form(sample["spec"], 1)
        assert etag == '"1"'
        assert await synced_version(k8s, REVENUE) == body["version"]
        reply = await lookup.request(
            METADATA_LOOKUP, "get_kpi_definition", {"code": REVENUE_CODE}, timeout=5
        )
        assert reply == body

        created = {"kind": "kpi_definition", "code": REVENUE_CODE, "action": "upserted"}

        async def announced(version: int) -> bool:
            return {**created, "version": version} in await kpi_changes(redis, REVENUE_CODE)

        await eventually(lambda: announced(1), what="metadata.changed for the create")
        event = next(
            e for e in await changed_events(redis) if e.payload == {**created, "version": 1}
        )
        assert event.event_type == METADATA_CHANGED
        assert event.source == "metadata_service"

        # update -> version 2 in metadata and in the status
        new_filter = "status == 'completed' && amount > 0"
        await patch_spec(k8s, REVENUE, {"filter": new_filter}, generation=2)

        async def at_version_2() -> bool:
            return await synced_version(k8s, REVENUE) == 2

        await eventually(at_version_2, what="Synced=True at version 2")
        stored = await real_metadata.stored(REVENUE_CODE)
        assert stored == stored_form({**sample["spec"], "filter": new_filter}, 2)
        reply = await lookup.request(
            METADATA_LOOKUP, "get_kpi_definition", {"code": REVENUE_CODE}, timeout=5
        )
        assert reply["version"] == 2
        assert reply["filter"] == new_filter
        obj = await fetch(k8s, REVENUE)
        assert obj is not None
        assert obj["status"]["observedGeneration"] == 2
        assert FINALIZER in obj["metadata"]["finalizers"]
        await eventually(lambda: announced(2), what="metadata.changed for the update")

        # delete -> 404 in metadata, finalizer released (the CR disappears)
        await delete(k8s, REVENUE)

        async def gone() -> bool:
            return await fetch(k8s, REVENUE) is None

        await eventually(gone, what="the finalizer to be released and the CR gone")
        status, body, _ = await real_metadata.get(REVENUE_CODE)
        assert status == 404
        assert body["error"]["code"] == "not_found"
        with pytest.raises(RemoteError) as raised:
            await lookup.request(
                METADATA_LOOKUP, "get_kpi_definition", {"code": REVENUE_CODE}, timeout=5
            )
        assert raised.value.code == "not_found"
        deleted = {"kind": "kpi_definition", "code": REVENUE_CODE, "action": "deleted"}

        async def deletion_announced() -> bool:
            return {**deleted, "version": 3} in await kpi_changes(redis, REVENUE_CODE)

        await eventually(deletion_announced, what="metadata.changed for the delete")


INVALID_SPECS = [
    pytest.param({"field": "region"}, "field", id="sum-over-a-string"),
    pytest.param({"filter": "status != 'cancelled' &&"}, "filter", id="filter-does-not-compile"),
]


@pytest.mark.parametrize(("change", "field"), INVALID_SPECS)
async def test_invalid_spec_carries_the_services_field_message(
    k8s: Any, real_metadata: RealMetadata, change: dict[str, Any], field: str
) -> None:
    sample = load_sample(REVENUE)
    invalid_spec = {**sample["spec"], **change}
    # What the metadata service itself answers for this spec (and stores nothing).
    status, answer = await real_metadata.put(REVENUE_CODE, invalid_spec)
    assert status == 422, answer
    error = answer["error"]
    assert error["code"] == "validation_error"
    assert [d["field"] for d in error["details"]] == [field]
    expected = f"{error['message']}: " + "; ".join(
        f"{d['field']}: {d['message']}" for d in error["details"]
    )

    async with running_operator(settings_for(real_metadata)):
        await create(k8s, {**sample, "spec": invalid_spec})

        async def invalid() -> bool:
            return await reason_of(k8s, REVENUE) == "Invalid"

        await eventually(invalid, what="Synced=False/Invalid")
        obj = await fetch(k8s, REVENUE)
        assert obj is not None
        condition = synced_condition(obj)
        assert condition["status"] == "False"
        assert condition["message"] == expected
        assert obj["status"]["phase"] == "Invalid"
        assert "syncedVersion" not in obj["status"]
        assert await real_metadata.stored(REVENUE_CODE) is None

        # Fixing the spec syncs it.
        await patch_spec(k8s, REVENUE, sample["spec"], generation=2)
        await eventually(lambda: is_synced(k8s, REVENUE), what="Synced=True after the fix")
        assert await synced_version(k8s, REVENUE) == 1
        assert await real_metadata.stored(REVENUE_CODE) == stored_form(sample["spec"], 1)


async def test_a_spec_past_the_services_body_limit_is_invalid_not_unavailable(
    k8s: Any, real_metadata: RealMetadata
) -> None:
    """The CRD bounds `query.params` to 64 items of any size, so a CR the API server accepts can
    exceed METADATA_MAX_BODY_BYTES (256 KiB): the service answers 413. Only a smaller spec can
    help, so it is Invalid (no retry), not Unavailable (retried forever, service blamed)."""
    sample = load_sample(REVENUE)
    spec = {
        "code": REVENUE_CODE,
        "entity_type": "order",
        "query": {
            "sql": "SELECT " + ", ".join(f"${i}::text" for i in range(1, 41)),
            "params": ["x" * 8192] * 40,
            "schedule": "1m",
        },
    }
    async with running_operator(settings_for(real_metadata)):
        await create(k8s, {**sample, "spec": spec})

        async def invalid() -> bool:
            return await reason_of(k8s, REVENUE) == "Invalid"

        await eventually(invalid, what="Synced=False/Invalid")
        obj = await fetch(k8s, REVENUE)
        assert obj is not None and obj["status"]["phase"] == "Invalid"
        assert "request body size" in synced_condition(obj)["message"]
        assert await real_metadata.stored(REVENUE_CODE) is None


async def test_metadata_down_is_unavailable_then_recovers_on_the_same_port(
    k8s: Any, real_metadata: RealMetadata
) -> None:
    sample = load_sample(REVENUE)
    async with running_operator(settings_for(real_metadata)):
        await create(k8s, sample)
        await eventually(lambda: is_synced(k8s, REVENUE), what="Synced=True")

        await real_metadata.stop()
        await patch_spec(k8s, REVENUE, {"unit": "USD"}, generation=2)

        async def unavailable() -> bool:
            return await reason_of(k8s, REVENUE) == "Unavailable"

        await eventually(unavailable, what="Synced=False/Unavailable")
        obj = await fetch(k8s, REVENUE)
        assert obj is not None
        condition = synced_condition(obj)
        assert condition["status"] == "False"
        assert real_metadata.url in condition["message"]
        assert obj["status"]["phase"] == "Unavailable"
        assert obj["status"]["syncedVersion"] == 1  # the last version known to be stored

        await real_metadata.start()

        async def at_version_2() -> bool:
            return await synced_version(k8s, REVENUE) == 2

        await eventually(at_version_2, what="recovery to Synced=True at version 2")
        stored = await real_metadata.stored(REVENUE_CODE)
        assert stored == stored_form({**sample["spec"], "unit": "USD"}, 2)

        # A delete while metadata is down keeps the finalizer until the DELETE went through.
        await real_metadata.stop()
        await delete(k8s, REVENUE)

        async def delete_pending() -> bool:
            obj = await fetch(k8s, REVENUE)
            message = synced_condition(obj).get("message", "")
            return obj is not None and message.startswith(f"cannot delete KPI {REVENUE_CODE}")

        await eventually(delete_pending, what="Unavailable while deleting")
        obj = await fetch(k8s, REVENUE)
        assert obj is not None
        assert FINALIZER in obj["metadata"]["finalizers"]
        assert obj["status"]["phase"] == "Unavailable"

        await real_metadata.start()

        async def gone() -> bool:
            return await fetch(k8s, REVENUE) is None

        await eventually(gone, what="the CR gone once metadata is back")
        assert await real_metadata.stored(REVENUE_CODE) is None


async def test_resync_restores_a_wiped_metadata_database(
    k8s: Any, real_metadata: RealMetadata, database_url: str
) -> None:
    """The database loses every KPI (as after restoring an empty backup: current rows and
    history); the periodic re-assert puts them back and the status follows the new version."""
    revenue, sensor = load_sample(REVENUE), load_sample(SENSOR)
    settings = settings_for(real_metadata, resync_interval_s=0.5)
    async with running_operator(settings):
        await create(k8s, revenue)
        await create(k8s, sensor)
        await eventually(lambda: is_synced(k8s, REVENUE), what="revenue synced")
        await patch_spec(k8s, REVENUE, {"unit": "USD"}, generation=2)

        async def both_synced() -> bool:
            return (
                await synced_version(k8s, REVENUE) == 2 and await synced_version(k8s, SENSOR) == 1
            )

        await eventually(both_synced, what="both synced (revenue at version 2)")

        connection = await asyncpg.connect(database_url)
        try:
            await connection.execute("TRUNCATE kpi_definitions, kpi_definition_history")
        finally:
            await connection.close()
        assert await real_metadata.stored(REVENUE_CODE) is None

        async def restored() -> bool:
            return (
                await real_metadata.stored(REVENUE_CODE) is not None
                and await real_metadata.stored(SENSOR_CODE) is not None
            )

        await eventually(restored, what="re-assertion after the wipe")
        # Versions restart with the wiped history; the status reports the new one.
        assert await real_metadata.stored(REVENUE_CODE) == stored_form(
            {**revenue["spec"], "unit": "USD"}, 1
        )
        assert await real_metadata.stored(SENSOR_CODE) == stored_form(sensor["spec"], 1)

        async def status_follows() -> bool:
            return await synced_version(k8s, REVENUE) == 1

        await eventually(status_follows, what="status with the re-asserted version")


async def test_resync_after_only_the_current_rows_are_dropped(
    k8s: Any, real_metadata: RealMetadata, database_url: str
) -> None:
    """Only the current `kpi_definitions` rows are lost, the history survives (a partial
    restore, or a manual `DELETE`): the re-assert should still put the KPI back."""
    revenue = load_sample(REVENUE)
    settings = settings_for(real_metadata, resync_interval_s=0.5)
    async with running_operator(settings):
        await create(k8s, revenue)
        await eventually(lambda: is_synced(k8s, REVENUE), what="Synced=True")

        connection = await asyncpg.connect(database_url)
        try:
            await connection.execute("DELETE FROM kpi_definitions")
        finally:
            await connection.close()

        async def restored() -> bool:
            return await real_metadata.stored(REVENUE_CODE) is not None

        await eventually(restored, timeout=3, what="re-assertion after the drop")
        stored = await real_metadata.stored(REVENUE_CODE)
        assert stored is not None
        version: int = stored["version"]
        assert version > 1  # history says version 1 was already used

        async def status_follows() -> bool:
            return await synced_version(k8s, REVENUE) == version

        await eventually(status_follows, what="status with the re-asserted version")
