"""Helpers for the operator integration tests: run the operator, talk to kmock like kubectl.

kmock (0.8) assigns no `uid`/`generation`/`creationTimestamp`, so `create` and `patch_spec` set
them like the API server would (resourceVersion is handled by kube_emulator.py); it does not
validate against the CRD schema (tests/unit/k8s/test_crd_schema.py covers that).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import kopf
import yaml
from kopf.testing import KopfRunner
from metadata_standin import MetadataStandIn

from analytics_engine_operator.handlers import build_registry
from analytics_engine_operator.kpidefinition import GROUP, PLURAL, VERSION
from analytics_engine_operator.settings import KpiOperatorSettings

NAMESPACE = "default"
SAMPLES = Path(__file__).resolve().parents[3] / "k8s" / "samples"
_uids = itertools.count(1)


def operator_settings(metadata: MetadataStandIn, **overrides: Any) -> KpiOperatorSettings:
    values: dict[str, Any] = {
        "metadata_url": metadata.url,
        "request_timeout_s": 2.0,
        "resync_interval_s": 3600.0,
        "retry_backoff_s": 0.2,
        "retry_backoff_max_s": 0.5,
        "watch_server_timeout_s": 30.0,
        "liveness_host": "127.0.0.1",
    }
    values.update(overrides)
    return KpiOperatorSettings(**values)


def fast_kopf_settings() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.watching.reconnect_backoff = 0.1
    settings.queueing.idle_timeout = 1.0
    settings.queueing.exit_timeout = 0.5
    settings.persistence.consistency_timeout = 0.5
    settings.process.ultimate_exiting_timeout = 10
    return settings


@contextlib.asynccontextmanager
async def running_operator(settings: KpiOperatorSettings) -> AsyncIterator[KopfRunner]:
    """`kopf run --all-namespaces` via KopfRunner in its thread, with our registry.

    kmock lives in this test's event loop, so the blocking KopfRunner exit (thread join) is
    done in a worker thread, never in the loop kmock needs to answer the operator.
    """
    runner = KopfRunner(
        ["run", "--all-namespaces", "--standalone", "--verbose"],
        registry=build_registry(settings),
        settings=fast_kopf_settings(),
        timeout=30,
    )
    runner.__enter__()
    try:
        yield runner
    finally:
        await asyncio.to_thread(runner.__exit__, None, None, None)


# --- Kubernetes API helpers (what kubectl would do) --------------------------------------------


def collection_url(namespace: str = NAMESPACE) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"


def object_url(name: str, namespace: str = NAMESPACE) -> str:
    return f"{collection_url(namespace)}/{name}"


def load_sample(name: str) -> dict[str, Any]:
    sample: dict[str, Any] = yaml.safe_load((SAMPLES / f"{name}.yaml").read_text())
    return sample


async def create(k8s: Any, body: dict[str, Any], namespace: str = NAMESPACE) -> dict[str, Any]:
    body = {**body, "metadata": dict(body["metadata"])}
    name = body["metadata"]["name"]
    body["metadata"].update(
        namespace=namespace,
        uid=f"uid-{name}-{next(_uids)}",
        generation=1,
        creationTimestamp="2024-01-01T00:00:00Z",
    )
    response = await k8s.post(collection_url(namespace), json=body)
    assert response.status in (200, 201), await response.text()
    created: dict[str, Any] = await response.json()
    return created


async def patch_spec(
    k8s: Any, name: str, spec: dict[str, Any], generation: int, namespace: str = NAMESPACE
) -> None:
    body = {
        "metadata": {"generation": generation},
        "spec": spec,
    }
    response = await k8s.patch(
        object_url(name, namespace),
        json=body,
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert response.status == 200, await response.text()


async def delete(k8s: Any, name: str, namespace: str = NAMESPACE) -> None:
    response = await k8s.delete(object_url(name, namespace))
    assert response.status in (200, 202), await response.text()


async def fetch(k8s: Any, name: str, namespace: str = NAMESPACE) -> dict[str, Any] | None:
    response = await k8s.get(object_url(name, namespace))
    if response.status == 404:
        return None
    assert response.status == 200, await response.text()
    obj: dict[str, Any] = await response.json()
    return obj


def synced_condition(obj: dict[str, Any] | None) -> dict[str, Any]:
    for condition in ((obj or {}).get("status") or {}).get("conditions") or ():
        if condition.get("type") == "Synced":
            found: dict[str, Any] = condition
            return found
    return {}


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout: float = 15.0,
    what: str = "condition",
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def events(k8s: Any, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """Kubernetes Events posted so far (kopf posts them with generateName)."""
    response = await k8s.get(f"/api/v1/namespaces/{namespace}/events")
    assert response.status == 200, await response.text()
    items: list[dict[str, Any]] = (await response.json())["items"]
    return items
