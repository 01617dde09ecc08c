"""`python -m analytics_engine_operator.release`: delete a release's KPIDefinitions, and see
that none is left hanging in `Terminating`.

The Helm chart runs it as a pre-delete hook (templates/samples/cleanup-job.yaml), while the
operator and the metadata service still run: `helm uninstall` would otherwise remove the
operator together with the release's KPIDefinitions, whose finalizer
(`analyticsengine.io/kpi-operator`) then has nobody left to release it.

1. Delete every KPIDefinition matching `KPI_RELEASE_SELECTOR` in `KPI_RELEASE_NAMESPACE`.
2. Wait up to `KPI_RELEASE_TIMEOUT` until they are gone: the operator deletes each KPI from the
   metadata service, then releases its finalizer.
3. Still there after that (operator disabled, not running, metadata service down): remove the
   operator's finalizer, and only it, and log that their KPIs may remain in the metadata
   database.

Exit status: 0 when the work is done, including by step 3, since a failing pre-delete hook
aborts `helm uninstall`, which is worse than a leftover KPI; 1 only when the Kubernetes API
cannot be used at all (no credentials, unreachable for the whole timeout, or the listing is
refused); 2 for invalid settings.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from analytics_engine_operator.kpidefinition import FINALIZER
from analytics_engine_operator.kube_api import (
    KubeApi,
    KubeApiError,
    KubeApiUnavailable,
    KubeObject,
    connection_info,
)
from analytics_engine_operator.settings import ReleaseSettings

logger = logging.getLogger("analytics_engine_operator.release")


@dataclass(frozen=True)
class ReleaseOutcome:
    """Names of the KPIDefinitions handled, by how they went."""

    released: tuple[str, ...] = ()  # gone in time: the operator released them (or none held them)
    forced: tuple[str, ...] = ()  # the operator's finalizer was removed without the operator
    left: tuple[str, ...] = ()  # still there at the end (other finalizers, API errors)


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


def _code(obj: Mapping[str, Any]) -> str:
    spec = obj.get("spec")
    return str(spec.get("code", "?")) if isinstance(spec, Mapping) else "?"


def _deleting(obj: Mapping[str, Any]) -> bool:
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def _finalizers(obj: Mapping[str, Any]) -> list[str]:
    return list((obj.get("metadata") or {}).get("finalizers") or [])


class _Release:
    """One run: the API, the settings and a deadline on the event loop's clock."""

    def __init__(self, api: KubeApi, settings: ReleaseSettings) -> None:
        self.api = api
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + settings.timeout_s

    def remaining_s(self) -> float:
        return max(0.0, self.deadline - self.loop.time())

    async def pause(self) -> None:
        await asyncio.sleep(min(self.settings.poll_interval_s, self.remaining_s()))

    async def listing(self) -> list[KubeObject] | None:
        return await self.api.list_kpis(self.settings.namespace, self.settings.label_selector)

    async def first_listing(self) -> list[KubeObject] | None:
        """The first listing, retried while the API is unavailable and time is left."""
        while True:
            try:
                return await self.listing()
            except KubeApiUnavailable as exc:
                if self.remaining_s() <= 0:
                    raise
                logger.warning("Kubernetes API unavailable, retrying: %s", exc)
            await self.pause()

    async def delete(self, objs: Iterable[KubeObject]) -> None:
        """Ask for the deletion of those not being deleted yet; failures are retried later."""
        for obj in objs:
            if _deleting(obj):
                continue
            try:
                await self.api.delete_kpi(self.settings.namespace, _name(obj))
            except KubeApiError as exc:
                logger.warning("Cannot delete KPIDefinition %s yet: %s", _name(obj), exc)

    async def wait_for_operator(self, objs: list[KubeObject]) -> list[KubeObject]:
        """Delete and wait until none is left or time is up; what is left at the end."""
        while True:
            await self.delete(objs)
            if self.remaining_s() <= 0:
                return objs
            await self.pause()
            try:
                objs = await self.listing() or []
            except KubeApiError as exc:
                logger.warning("Cannot list KPIDefinitions, retrying: %s", exc)
                continue
            if not objs:
                return []

    async def force(self, objs: list[KubeObject]) -> tuple[str, ...]:
        """Remove the operator's finalizer from each; the names it was removed from."""
        forced = []
        for obj in objs:
            name = _name(obj)
            try:
                removed = await self.api.remove_finalizer(self.settings.namespace, name, FINALIZER)
            except KubeApiError as exc:
                logger.error("Cannot remove the finalizer of KPIDefinition %s: %s", name, exc)
                continue
            if removed:
                forced.append(name)
                logger.warning(
                    "Removed finalizer %s from KPIDefinition %s/%s without the operator: KPI %r "
                    "may remain in the metadata database (delete it through the API: "
                    "DELETE /api/v1/kpi-definitions/%s)",
                    FINALIZER,
                    self.settings.namespace,
                    name,
                    _code(obj),
                    _code(obj),
                )
        return tuple(forced)


async def release_kpis(api: KubeApi, settings: ReleaseSettings) -> ReleaseOutcome:
    """Steps 1-3 of the module docstring; raises `KubeApiError` if the first listing fails."""
    run = _Release(api, settings)
    where = f"namespace {settings.namespace!r}, selector {settings.label_selector!r}"
    initial = await run.first_listing()
    if initial is None:
        logger.info("The KPIDefinition CRD is not installed: nothing to release (%s)", where)
        return ReleaseOutcome()
    if not initial:
        logger.info("No KPIDefinition to release (%s)", where)
        return ReleaseOutcome()
    names = sorted(_name(obj) for obj in initial)
    logger.info(
        "Deleting %d KPIDefinition(s) (%s): %s; the operator has %.0fs to delete their KPIs "
        "from the metadata service and release them",
        len(names),
        where,
        ", ".join(names),
        settings.timeout_s,
    )
    stuck = await run.wait_for_operator(initial)
    if not stuck:
        logger.info("All %d KPIDefinition(s) were released by the operator", len(names))
        return ReleaseOutcome(released=tuple(names))

    logger.warning(
        "%d KPIDefinition(s) still there after %.0fs (operator disabled, not running or "
        "failing, or the metadata service unavailable): %s. Removing finalizer %s from them; "
        "their KPIs may remain in the metadata database",
        len(stuck),
        settings.timeout_s,
        ", ".join(sorted(_name(obj) for obj in stuck)),
        FINALIZER,
    )
    forced = await run.force(stuck)
    left = await _still_there(run, {_name(obj) for obj in stuck})
    released = tuple(sorted(set(names) - {_name(obj) for obj in stuck}))
    return ReleaseOutcome(released=released, forced=forced, left=left)


async def _still_there(run: _Release, names: set[str]) -> tuple[str, ...]:
    """Which of `names` still exist (held by finalizers of others, or by API errors)."""
    try:
        objs = await run.listing() or []
    except KubeApiError as exc:
        logger.error("Cannot check what is left: %s", exc)
        return tuple(sorted(names))
    left = [obj for obj in objs if _name(obj) in names]
    for obj in left:
        logger.error(
            "KPIDefinition %s is still there, held by finalizer(s) %s: release them by hand",
            _name(obj),
            ", ".join(_finalizers(obj)) or "(none: it should go shortly)",
        )
    return tuple(sorted(_name(obj) for obj in left))


async def run(settings: ReleaseSettings) -> int:
    """The command: 0 when done (see the module docstring), 1 when the API is unusable."""
    try:
        async with KubeApi(connection_info(), settings.request_timeout_s) as api:
            await release_kpis(api, settings)
    except KubeApiError as exc:
        logger.error("Cannot use the Kubernetes API, nothing was released: %s", exc)
        return 1
    return 0


def main() -> int:
    try:
        settings = ReleaseSettings()  # from the environment
    except ValidationError as exc:
        print(f"invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(run(settings))


if __name__ == "__main__":
    sys.exit(main())
