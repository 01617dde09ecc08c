"""kind end-to-end fixtures: a kind cluster, the image built and loaded, the chart installed.

How to run and the environment knobs: see kind_cluster.py.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from kind_cluster import (
    CHART,
    CLUSTER,
    IMAGE,
    NAMESPACE,
    RELEASE,
    ROOT,
    Cluster,
    find_tool,
    missing_prerequisite,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    e2e_items = [i for i in items if here in Path(str(i.fspath)).parents]
    if not e2e_items:
        return
    reason = missing_prerequisite()
    for item in e2e_items:
        item.add_marker(pytest.mark.e2e)
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"e2e needs kind: {reason}"))


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    kind = find_tool("kind") or "kind"
    kubeconfig = tmp_path_factory.mktemp("kube") / "config"
    existing = subprocess.run(
        [kind, "get", "clusters"], capture_output=True, text=True, check=False
    ).stdout.split()
    created = CLUSTER not in existing
    if created:
        subprocess.run(
            [
                kind,
                "create",
                "cluster",
                "--name",
                CLUSTER,
                "--wait",
                "180s",
                "--kubeconfig",
                str(kubeconfig),
            ],
            check=True,
            timeout=600,
        )
    else:
        kubeconfig.write_text(
            subprocess.run(
                [kind, "get", "kubeconfig", "--name", CLUSTER],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
    try:
        yield Cluster(kubeconfig, f"kind-{CLUSTER}")
    finally:
        if created and os.environ.get("AE_E2E_KEEP") != "1":
            subprocess.run([kind, "delete", "cluster", "--name", CLUSTER], timeout=300, check=False)


@pytest.fixture(scope="session")
def image(cluster: Cluster) -> str:
    if "AE_E2E_IMAGE" not in os.environ:
        subprocess.run(
            [find_tool("docker") or "docker", "build", "-f", "images/Dockerfile", "-t", IMAGE, "."],
            cwd=ROOT,
            check=True,
            timeout=1800,
        )
    subprocess.run(
        [find_tool("kind") or "kind", "load", "docker-image", IMAGE, "--name", CLUSTER],
        check=True,
        timeout=600,
    )
    return IMAGE


@pytest.fixture(scope="session")
def release(cluster: Cluster, image: str) -> Iterator[str]:
    """The chart installed and rolled out; uninstalled (and checked clean) by test_uninstall."""
    repository, tag = image.rsplit(":", 1)
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    cluster.helm(
        "upgrade",
        "--install",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--wait",
        "--timeout",
        "15m",
        "--set",
        "image.registry=",
        "--set",
        f"image.repository={repository}",
        "--set",
        f"image.tag={tag}",
        "--set",
        "image.pullPolicy=Never",
        "--set",
        "simulator.rate=50",
        *[
            arg
            for c in ("redis", "timescaledb", "minio")
            for arg in (
                "--set",
                f"{c}.persistence.size=1Gi",
                "--set",
                f"{c}.persistence.whenDeleted=Delete",
            )
        ],
        timeout=1200,
    )
    for kind in ("deployment", "statefulset"):
        cluster.kubectl(
            "-n",
            NAMESPACE,
            "rollout",
            "status",
            kind,
            "-l",
            f"app.kubernetes.io/instance={RELEASE}",
            "--timeout",
            "600s",
            timeout=700,
        )
    yield RELEASE
    cluster.helm("uninstall", RELEASE, "--namespace", NAMESPACE, "--wait", check=False)
