"""The operator's Kubernetes API calls stay within operator/RBAC.md (and so the chart's RBAC).

kmock records every request; the operator's are those with kopf's User-Agent (the test's own
kubectl-like calls are not). The run goes through create, spec update, an outage (status
patches), and delete (finalizer), with the operator cluster-wide as `kopf run -A` runs it.
"""

from __future__ import annotations

from typing import Any

import kmock
import pytest
from metadata_standin import MetadataStandIn
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

pytestmark = pytest.mark.timeout(90)

NAME = "orders-count"
CODE = "orders_count"

# operator/RBAC.md, "Always": (apiGroup, resource) -> verbs.
DOCUMENTED: dict[tuple[str, str], set[str]] = {
    ("analyticsengine.io", "kpidefinitions"): {"get", "list", "watch", "patch"},
    ("analyticsengine.io", "kpidefinitions/status"): {"patch"},
    ("", "events"): {"create"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
}

_VERBS = {
    kmock.action.LIST: "list",
    kmock.action.WATCH: "watch",
    kmock.action.FETCH: "get",
    kmock.action.CREATE: "create",
    kmock.action.DELETE: "delete",
}


def operator_calls(k8s: Any) -> set[tuple[str, str, str]]:
    """(apiGroup, resource[/subresource], verb) of every resource request kopf made."""
    calls: set[tuple[str, str, str]] = set()
    for request in k8s:
        if not request.headers.get("User-Agent", "").startswith("kopf"):
            continue
        if request.resource is None or not request.resource.plural or request.action is None:
            continue  # discovery (/api, /apis/<group>/<version>, /version): non-resource URLs
        group = request.resource.group or ""
        resource = request.resource.plural
        if request.subresource:
            resource = f"{resource}/{request.subresource}"
        if request.action is kmock.action.UPDATE:
            verb = "update" if request.method == kmock.method.PUT else "patch"
        else:
            verb = _VERBS[request.action]
        calls.add((group, resource, verb))
    return calls


async def test_the_operator_uses_only_what_rbac_md_grants(
    k8s: Any, metadata: MetadataStandIn
) -> None:
    async with running_operator(operator_settings(metadata)):
        await create(k8s, load_sample(NAME))

        async def reason(expected: str) -> bool:
            return synced_condition(await fetch(k8s, NAME)).get("reason") == expected

        await eventually(lambda: reason("Synced"), what="Synced")
        metadata.stop()
        await patch_spec(k8s, NAME, {"unit": "events"}, generation=2)
        await eventually(lambda: reason("Unavailable"), what="Unavailable")
        metadata.start()
        await eventually(lambda: reason("Synced"), what="Synced again")
        await delete(k8s, NAME)

        async def gone() -> bool:
            return await fetch(k8s, NAME) is None

        await eventually(gone, what="the CR to be gone")
    calls = operator_calls(k8s)
    assert ("analyticsengine.io", "kpidefinitions", "patch") in calls  # the finalizer
    assert ("", "events", "create") in calls
    beyond = {
        (group, resource, verb)
        for group, resource, verb in calls
        if verb not in DOCUMENTED.get((group, resource), set())
    }
    assert beyond == set()
