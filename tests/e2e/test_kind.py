"""End to end on kind: install the chart, define a KPI as a KPIDefinition, see it flow.

The gateway routes and the API-key header below are the gateway's interface; keep them in step
with services/analytics_engine/gateway.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from kind_cluster import NAMESPACE, RELEASE, ROOT, Cluster, port_forward, secret_value

pytestmark = pytest.mark.e2e

SAMPLE = ROOT / "k8s" / "samples" / "orders-count.yaml"
GATEWAY = f"{RELEASE}-gateway"
API_KEY_HEADER = "X-API-Key"
DEFINITION_PATH = "/api/v1/kpi-definitions/{code}"
RESULTS_PATH = "/api/v1/kpis/{code}/results"
T = TypeVar("T")


def eventually(check: Callable[[], T | None], *, timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # transient: pods restarting, port-forward reconnecting
            last = exc
        time.sleep(3)
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for {what} (last error: {last!r})"
    )


def get_json(url: str, api_key: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={API_KEY_HEADER: api_key})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None


def sample() -> dict[str, Any]:
    return yaml.safe_load(SAMPLE.read_text())


@pytest.fixture(scope="module")
def api_key(cluster: Cluster, release: str) -> str:
    keys = secret_value(cluster, GATEWAY, "gateway-api-keys")
    return keys.split(",")[0].split(":")[0]


@pytest.fixture(scope="module")
def kpi(cluster: Cluster, release: str) -> str:
    cluster.kubectl("-n", NAMESPACE, "apply", "-f", str(SAMPLE))
    return str(sample()["spec"]["code"])


def test_operator_marks_the_definition_synced(cluster: Cluster, kpi: str) -> None:
    name = sample()["metadata"]["name"]

    def synced() -> bool:
        out = cluster.kubectl(
            "-n",
            NAMESPACE,
            "get",
            "kpidefinition",
            name,
            "-o",
            'jsonpath={.status.conditions[?(@.type=="Synced")].status}',
        ).stdout
        return out == "True"

    eventually(synced, timeout=180, what="Synced=True on the KPIDefinition")


def test_kpi_values_reach_the_gateway(cluster: Cluster, kpi: str, api_key: str) -> None:
    with port_forward(cluster, GATEWAY, 8080) as base:
        eventually(
            lambda: get_json(base + "/readyz", api_key)[0] == 200, timeout=120, what="gateway ready"
        )
        eventually(
            lambda: (
                (r := get_json(base + DEFINITION_PATH.format(code=kpi), api_key))[0] == 200 and r
            ),
            timeout=120,
            what="the definition through the gateway",
        )

        def results() -> Any:
            status, body = get_json(base + RESULTS_PATH.format(code=kpi), api_key)
            items = body.get("items") if isinstance(body, dict) else body
            return status == 200 and items

        eventually(results, timeout=300, what=f"KPI values of {kpi} through the gateway")


def test_parquet_objects_reach_minio(cluster: Cluster, kpi: str) -> None:
    boto3 = pytest.importorskip("boto3")
    secret = f"{RELEASE}-minio"
    with port_forward(cluster, f"{RELEASE}-minio", 9000) as endpoint:
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=secret_value(cluster, secret, "access-key-id"),
            aws_secret_access_key=secret_value(cluster, secret, "secret-access-key"),
        )

        def parquet_keys() -> list[str]:
            listing = s3.list_objects_v2(Bucket="analytics-lakehouse")
            return [o["Key"] for o in listing.get("Contents", []) if o["Key"].endswith(".parquet")]

        eventually(parquet_keys, timeout=600, what="Parquet objects in the lakehouse bucket")


def test_deleting_the_definition_removes_the_kpi(cluster: Cluster, kpi: str, api_key: str) -> None:
    cluster.kubectl(
        "-n", NAMESPACE, "delete", "-f", str(SAMPLE), "--wait=true", "--timeout=120s", timeout=180
    )
    with port_forward(cluster, GATEWAY, 8080) as base:
        eventually(
            lambda: get_json(base + DEFINITION_PATH.format(code=kpi), api_key)[0] == 404,
            timeout=120,
            what="the KPI to disappear from the gateway",
        )


def test_zz_uninstall_leaves_nothing_behind(cluster: Cluster, release: str) -> None:
    """Runs last (pytest keeps the file order): uninstall, then nothing of the release remains
    except the CRD, which Helm deliberately never deletes."""
    cluster.helm(
        "uninstall", release, "--namespace", NAMESPACE, "--wait", "--timeout", "5m", timeout=400
    )
    selector = f"app.kubernetes.io/instance={release}"
    kinds = (
        "all,configmaps,secrets,pvc,networkpolicies,poddisruptionbudgets,roles,rolebindings,"
        "serviceaccounts,jobs,ingresses,horizontalpodautoscalers"
    )

    def leftovers() -> list[str] | None:
        namespaced = cluster.kubectl(
            "-n", NAMESPACE, "get", kinds, "-l", selector, "-o", "name"
        ).stdout.split()
        clustered = cluster.kubectl(
            "get", "clusterroles,clusterrolebindings", "-l", selector, "-o", "name"
        ).stdout.split()
        # Secrets Helm itself keeps for release history are gone too after uninstall.
        left = namespaced + clustered
        return None if left else ["clean"]

    try:
        eventually(leftovers, timeout=180, what="the release's objects to be deleted")
    except AssertionError:
        left = cluster.kubectl("-n", NAMESPACE, "get", kinds, "-l", selector, "-o", "name").stdout
        raise AssertionError(f"left behind after helm uninstall:\n{left}") from None
    assert Path(ROOT / "k8s" / "crds").is_dir()
