"""`python -m analytics_engine_operator.release` (the chart's pre-delete hook) against kmock.

With the operator running, the selected KPIDefinitions are deleted and the operator releases
them (their KPIs leave the metadata service); without it, the command removes the operator's
finalizer after its timeout. KPIDefinitions outside the selector or the namespace are never
touched. The command logs in through KUBECONFIG (the `k8s` fixture), as outside a cluster.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from metadata_standin import MetadataStandIn, free_port
from operator_harness import (
    NAMESPACE,
    create,
    eventually,
    fetch,
    load_sample,
    operator_settings,
    running_operator,
)
from pydantic import ValidationError

from analytics_engine_operator.kpidefinition import FINALIZER, GROUP, PLURAL, VERSION
from analytics_engine_operator.kube_api import KubeApi, connection_info
from analytics_engine_operator.release import ReleaseOutcome, main, release_kpis, run
from analytics_engine_operator.settings import ReleaseSettings

pytestmark = pytest.mark.timeout(90)

# What the chart puts on its samples (templates/samples/kpidefinitions.yaml) and selects by.
SAMPLE_LABELS = {
    "app.kubernetes.io/name": "analytics-engine",
    "app.kubernetes.io/instance": "ae",
    "app.kubernetes.io/component": "samples",
}
SELECTOR = ",".join(f"{key}={value}" for key, value in SAMPLE_LABELS.items())
OTHER_NAMESPACE = "team-b"
OTHER_FINALIZER = "example.com/keep"


def release_settings(timeout_s: float, **overrides: Any) -> ReleaseSettings:
    values: dict[str, Any] = {
        "namespace": NAMESPACE,
        "label_selector": SELECTOR,
        "timeout_s": timeout_s,
        "poll_interval_s": 0.1,
        "request_timeout_s": 5.0,
        **overrides,
    }
    return ReleaseSettings(**values)


def kpi(
    sample: str,
    *,
    labels: dict[str, str] | None = None,
    finalizers: list[str] | None = None,
) -> dict[str, Any]:
    body = load_sample(sample)
    meta = body["metadata"]
    meta["labels"] = {**(meta.get("labels") or {}), **(labels or {})}
    if finalizers is not None:
        meta["finalizers"] = finalizers
    return body


async def release(timeout_s: float) -> ReleaseOutcome:
    async with KubeApi(connection_info(), 5.0) as api:
        return await release_kpis(api, release_settings(timeout_s))


def has_finalizer(obj: dict[str, Any] | None) -> bool:
    return obj is not None and FINALIZER in obj["metadata"].get("finalizers", [])


async def test_the_operator_deletes_the_kpis_and_releases_the_selected_crs(
    k8s: Any, metadata: MetadataStandIn
) -> None:
    selected = ["orders-count", "orders-revenue-by-region"]
    async with running_operator(operator_settings(metadata)):
        for name in selected:
            await create(k8s, kpi(name, labels=SAMPLE_LABELS))
        # Same namespace, not a sample of the release: another component's label.
        await create(
            k8s,
            kpi(
                "orders-distinct-customers",
                labels={**SAMPLE_LABELS, "app.kubernetes.io/component": "team"},
            ),
        )
        # The release's labels, another namespace.
        await create(k8s, kpi("sensor-avg-temperature", labels=SAMPLE_LABELS), OTHER_NAMESPACE)
        await eventually(lambda: len(metadata.codes()) == 4, what="all four PUT")

        async def all_finalized() -> bool:
            objs = [await fetch(k8s, n) for n in [*selected, "orders-distinct-customers"]]
            objs.append(await fetch(k8s, "sensor-avg-temperature", OTHER_NAMESPACE))
            return all(has_finalizer(obj) for obj in objs)

        await eventually(all_finalized, what="the operator's finalizers")

        outcome = await release(timeout_s=30.0)

        assert outcome == ReleaseOutcome(released=tuple(selected))
        for name in selected:
            assert await fetch(k8s, name) is None
        assert metadata.codes() == {"orders_distinct_customers", "sensor_avg_temperature"}
        assert metadata.count("DELETE", "orders_count") == 1
        assert metadata.count("DELETE", "orders_revenue_by_region") == 1
        untouched = [
            await fetch(k8s, "orders-distinct-customers"),
            await fetch(k8s, "sensor-avg-temperature", OTHER_NAMESPACE),
        ]
        for obj in untouched:
            assert has_finalizer(obj) and "deletionTimestamp" not in obj["metadata"]  # type: ignore[index]


async def test_without_an_operator_only_its_finalizer_is_removed_after_the_timeout(
    k8s: Any, caplog: pytest.LogCaptureFixture
) -> None:
    await create(k8s, kpi("orders-count", labels=SAMPLE_LABELS, finalizers=[FINALIZER]))
    await create(
        k8s,
        kpi(
            "orders-revenue-by-region",
            labels=SAMPLE_LABELS,
            finalizers=[OTHER_FINALIZER, FINALIZER],
        ),
    )
    await create(k8s, kpi("orders-distinct-customers", finalizers=[FINALIZER]))  # not selected
    await create(
        k8s,
        kpi("sensor-avg-temperature", labels=SAMPLE_LABELS, finalizers=[FINALIZER]),
        OTHER_NAMESPACE,
    )

    caplog.set_level(logging.INFO, logger="analytics_engine_operator.release")
    started = time.monotonic()
    outcome = await release(timeout_s=1.0)

    assert time.monotonic() - started >= 1.0  # the operator was given its time
    assert outcome == ReleaseOutcome(
        forced=("orders-count", "orders-revenue-by-region"), left=("orders-revenue-by-region",)
    )
    assert await fetch(k8s, "orders-count") is None
    held = await fetch(k8s, "orders-revenue-by-region")
    assert held is not None and held["metadata"]["deletionTimestamp"]
    assert held["metadata"]["finalizers"] == [OTHER_FINALIZER]  # only ours was removed
    for obj in (
        await fetch(k8s, "orders-distinct-customers"),
        await fetch(k8s, "sensor-avg-temperature", OTHER_NAMESPACE),
    ):
        assert obj is not None and obj["metadata"]["finalizers"] == [FINALIZER]
        assert "deletionTimestamp" not in obj["metadata"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'orders_count' may remain in the metadata database" in m for m in warnings)
    assert any("'orders_revenue_by_region' may remain" in m for m in warnings)


async def test_crs_without_finalizers_go_at_once(k8s: Any) -> None:
    await create(k8s, kpi("orders-count", labels=SAMPLE_LABELS))
    started = time.monotonic()
    outcome = await release(timeout_s=30.0)
    assert outcome == ReleaseOutcome(released=("orders-count",))
    assert time.monotonic() - started < 10.0
    assert await fetch(k8s, "orders-count") is None


async def test_nothing_to_release(k8s: Any) -> None:
    await create(k8s, kpi("orders-count"))  # no labels of the release
    assert await release(timeout_s=30.0) == ReleaseOutcome()
    assert await fetch(k8s, "orders-count") is not None


async def test_no_crd_means_nothing_to_release(k8s: Any) -> None:
    del k8s.resources[f"{GROUP}/{VERSION}/{PLURAL}"]
    assert await release(timeout_s=30.0) == ReleaseOutcome()


def test_an_empty_selector_is_refused() -> None:
    """It would select every KPIDefinition of the namespace, other releases' too."""
    for selector in ("", " "):
        with pytest.raises(ValidationError):
            release_settings(1.0, label_selector=selector)


# --------------------------------------------------------------------------- the command


async def run_command(env: dict[str, str]) -> tuple[int, str]:
    """`python -m analytics_engine_operator.release` with `env` over this process's env."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "analytics_engine_operator.release",
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, output.decode()


COMMAND_ENV = {
    "KPI_RELEASE_NAMESPACE": NAMESPACE,
    "KPI_RELEASE_SELECTOR": SELECTOR,
    "KPI_RELEASE_TIMEOUT": "0.5",
    "KPI_RELEASE_POLL_INTERVAL": "0.1",
}


async def test_command_exits_0_after_removing_the_finalizer(k8s: Any) -> None:
    """A failing pre-delete hook aborts `helm uninstall`: a forced release is still success."""
    await create(k8s, kpi("orders-count", labels=SAMPLE_LABELS, finalizers=[FINALIZER]))
    code, output = await run_command(COMMAND_ENV)
    assert code == 0, output
    assert "KPI 'orders_count' may remain in the metadata database" in output
    assert await fetch(k8s, "orders-count") is None


async def test_unreachable_api_is_exit_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{free_port()}"}}],
        "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(path))
    assert await run(release_settings(0.3)) == 1


async def test_no_credentials_is_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config either
    assert await run(release_settings(0.3)) == 1
    assert "no Kubernetes credentials" in caplog.text


def test_invalid_settings_are_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in {**COMMAND_ENV, "KPI_RELEASE_SELECTOR": ""}.items():
        monkeypatch.setenv(name, value)
    assert main() == 2
    assert "KPI_RELEASE_SELECTOR" in capsys.readouterr().err
