"""Fixtures: a kmock Kubernetes API (`k8s`) and a stand-in metadata service (`metadata`).

`k8s` is kmock's emulator with resourceVersion/generateName support (kube_emulator.py).
It serves only declared resources, so `v1/namespaces`, `v1/events`, the CRD resource and ours
are declared (kopf's discovery needs the first three even with scanning off). The operator logs
in through a real kubeconfig (KUBECONFIG) pointing at kmock, i.e. through the same login handler
as in production.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import kmock
import pytest
import yaml
from kube_emulator import KubeEmulator
from metadata_standin import MetadataStandIn

from analytics_engine_operator.kpidefinition import GROUP, KIND, PLURAL, VERSION


@pytest.fixture
def metadata() -> Iterator[MetadataStandIn]:
    with MetadataStandIn() as standin:
        yield standin


@pytest.fixture
async def k8s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[KubeEmulator]:
    async with KubeEmulator() as emulator, kmock.Server(emulator):
        _declare_resources(emulator)
        _write_kubeconfig(str(emulator.url), tmp_path / "kubeconfig", monkeypatch)
        yield emulator


def _declare_resources(emulator: KubeEmulator) -> None:
    emulator.resources["v1/namespaces"] = kmock.ResourceInfo(
        kind="Namespace", singular="namespace", namespaced=False, verbs={"list", "watch", "get"}
    )
    emulator.resources["v1/events"] = kmock.ResourceInfo(
        kind="Event", singular="event", namespaced=True, verbs={"create", "list", "watch"}
    )
    emulator.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
        kind="CustomResourceDefinition",
        singular="customresourcedefinition",
        namespaced=False,
        verbs={"list", "watch", "get"},
    )
    emulator.resources[f"{GROUP}/{VERSION}/{PLURAL}"] = kmock.ResourceInfo(
        kind=KIND,
        singular="kpidefinition",
        namespaced=True,
        shortnames={"kpi"},
        subresources={"status"},
        verbs={"create", "delete", "get", "list", "patch", "update", "watch"},
    )


def _write_kubeconfig(server: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": server.rstrip("/")}}],
        "users": [{"name": "kmock", "user": {}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
        "current-context": "kmock",
    }
    path.write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(path))
