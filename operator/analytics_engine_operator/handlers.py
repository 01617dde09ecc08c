"""kopf handlers that keep the metadata service in line with the KPIDefinition CRs.

`build_registry(settings)` registers everything on an explicit `kopf.OperatorRegistry`; the
handlers are closures over one `_Runtime` (settings + the metadata client), so there is no
module-level state and several operators (e.g. tests) can coexist in one process.

* create/update/resume -> PUT the spec (idempotent, so a resume is free when nothing changed).
* delete               -> DELETE the code; 404 means "already gone" and releases the finalizer.
* timer (resync)       -> PUT again every OPERATOR_RESYNC_INTERVAL, healing drift such as a
                          restored metadata database; the status is only patched on change.
* index (by code)      -> which KPIDefinition owns a code that several declare (ownership.py):
                          only the owner writes, and a delete leaves a KPI that another
                          KPIDefinition still declares.

Errors: a rejected spec is a `kopf.PermanentError` (no retry until the spec changes) with
`Synced=False/Invalid`; an unreachable service is a `kopf.TemporaryError` with exponential
backoff and `Synced=False/Unavailable`; a code owned by another KPIDefinition is a
`kopf.TemporaryError` too (it takes over when the owner goes) with `Synced=False/Conflict`.
Status is written through kopf's patch, which kopf applies even when the handler raises, so the
status is truthful in every case.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf

from analytics_engine_operator import kube_api
from analytics_engine_operator import status as status_mod
from analytics_engine_operator.kpidefinition import (
    ANNOTATIONS_PREFIX,
    FINALIZER,
    GROUP,
    PLURAL,
    VERSION,
    SpecError,
    code_of,
    definition_from_spec,
)
from analytics_engine_operator.metadata_client import (
    MetadataClient,
    MetadataInvalid,
    MetadataUnavailable,
)
from analytics_engine_operator.ownership import (
    INDEX_ID,
    CodeConflict,
    Declaration,
    index_entry,
    other_declarations,
    rival_owner,
)
from analytics_engine_operator.settings import KpiOperatorSettings

SYNC_HANDLER_ID = "sync"
DELETE_HANDLER_ID = "remove"
RESYNC_HANDLER_ID = "resync"
TIMER_EXIT_POLL_S = 1.0
LOGIN_RETRY_S = 60.0
"""Delay before kopf asks the login handler again after it found no credentials (kopf's default)."""


def _now() -> datetime:
    return datetime.now(tz=UTC)


@dataclass
class _Runtime:
    """What the handlers share: settings, the metadata client (opened at startup) and one lock
    per KPIDefinition.

    kopf runs a resource's resync timer concurrently with its change handlers. Without the
    lock, a resync PUT of the old spec that the metadata service is slow to apply can land
    after an edit's PUT (the old spec live again, under a status that says the edit is synced)
    or after the delete's DELETE (a KPI left behind). Under the lock every write reads the spec
    when it starts, and kopf's bodies are live, so the last write is the latest spec. The locks
    are weak values: one lives only while a handler holds or awaits it.
    """

    settings: KpiOperatorSettings
    client: MetadataClient | None = field(default=None)
    _locks: weakref.WeakValueDictionary[str, asyncio.Lock] = field(
        default_factory=weakref.WeakValueDictionary
    )

    def lock_for(self, meta: Mapping[str, Any]) -> asyncio.Lock:
        key = str(meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}")
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def metadata(self) -> MetadataClient:
        if self.client is None:
            raise kopf.TemporaryError("metadata client not started yet", delay=1)
        return self.client

    async def start(self) -> None:
        if self.client is None:
            client = MetadataClient(self.settings.metadata_url, self.settings.request_timeout_s)
            self.client = await client.__aenter__()

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None


SyncError = MetadataInvalid | MetadataUnavailable | CodeConflict
CodeIndex = Mapping[str, Iterable[Declaration]]


@dataclass(frozen=True)
class SyncOutcome:
    """Result of pushing one spec: the status to write and the error to raise, if any."""

    status_patch: dict[str, Any]
    error: SyncError | None = None


def configure_kopf(kopf_settings: kopf.OperatorSettings, settings: KpiOperatorSettings) -> None:
    """Apply our settings to kopf's (idempotent; used at startup in every way of running)."""
    kopf_settings.persistence.finalizer = FINALIZER
    # Handler progress goes to `status.kopf` (the CRD preserves unknown fields there) and the
    # last-handled spec to one annotation under our own prefix, not kopf.zalando.org.
    kopf_settings.persistence.progress_storage = kopf.StatusProgressStorage(name="kopf")
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATIONS_PREFIX, key="last-handled-configuration"
    )
    kopf_settings.watching.server_timeout = settings.watch_server_timeout_s
    kopf_settings.watching.client_timeout = settings.watch_server_timeout_s + 30
    kopf_settings.posting.level = logging.INFO
    # A resource deleted while its resync timer runs keeps its finalizer until the timer has
    # exited; kopf looks again after this many seconds (default 60) unless an event comes first.
    kopf_settings.background.cancellation_polling = TIMER_EXIT_POLL_S
    if settings.peering_name:
        kopf_settings.peering.name = settings.peering_name
        kopf_settings.peering.standalone = False
    else:
        kopf_settings.peering.standalone = True


async def push_spec(
    client: MetadataClient,
    spec: Mapping[str, Any],
    *,
    generation: int | None,
    current_status: Mapping[str, Any] | None,
    now: datetime,
    owners: CodeIndex | None = None,
    meta: Mapping[str, Any] | None = None,
) -> SyncOutcome:
    """PUT the spec into the metadata service and describe the outcome as a status patch.

    With `owners` (the kopf index of declarations by code) and the resource's `meta`, nothing
    is written when another KPIDefinition owns the code: the outcome is a `CodeConflict`.
    """
    try:
        code = code_of(spec)
    except SpecError as exc:
        error = MetadataInvalid(str(exc))
        return SyncOutcome(_failed(current_status, error, generation, now), error)
    owner = rival_owner(owners, code, meta) if owners is not None and meta is not None else None
    if owner is not None:
        conflict = CodeConflict(code, owner)
        return SyncOutcome(_failed(current_status, conflict, generation, now), conflict)
    try:
        stored = await client.put_definition(code, definition_from_spec(spec))
    except (MetadataInvalid, MetadataUnavailable) as exc:
        return SyncOutcome(_failed(current_status, exc, generation, now), exc)
    patch = status_mod.synced_status(
        current_status, version=stored.version, generation=generation, now=now, code=code
    )
    return SyncOutcome(patch)


def _failed(
    current_status: Mapping[str, Any] | None,
    error: SyncError,
    generation: int | None,
    now: datetime,
) -> dict[str, Any]:
    if isinstance(error, MetadataInvalid):
        reason, message = status_mod.Reason.INVALID, error.describe()
    elif isinstance(error, CodeConflict):
        reason, message = status_mod.Reason.CONFLICT, str(error)
    else:
        reason, message = status_mod.Reason.UNAVAILABLE, str(error)
    return status_mod.failed_status(
        current_status, reason=reason, message=message, generation=generation, now=now
    )


async def _push(
    runtime: _Runtime,
    spec: Mapping[str, Any],
    meta: Mapping[str, Any],
    status: Mapping[str, Any] | None,
    owners: CodeIndex,
) -> SyncOutcome:
    """`push_spec` of a KPIDefinition as the handlers call it (under its lock, see `_Runtime`)."""
    return await push_spec(
        runtime.metadata(),
        spec,
        generation=_generation(meta),
        current_status=status,
        now=_now(),
        owners=owners,
        meta=meta,
    )


def _raise_for(outcome: SyncOutcome, settings: KpiOperatorSettings, retry: int) -> None:
    if isinstance(outcome.error, MetadataInvalid):
        raise kopf.PermanentError(outcome.error.describe())
    if isinstance(outcome.error, MetadataUnavailable | CodeConflict):
        raise kopf.TemporaryError(str(outcome.error), delay=settings.backoff_for(retry))


def _announce(body: kopf.Body, previous: Mapping[str, Any], patch: Mapping[str, Any]) -> None:
    """Post a Kubernetes Event (`kubectl describe kpi ...`) when the sync state changes."""
    event = status_mod.event_for(previous, patch)
    if event is not None:
        kind, reason, message = event
        kopf.event(body, type=kind, reason=reason, message=message)


def _generation(meta: Mapping[str, Any]) -> int | None:
    generation = meta.get("generation")
    return generation if isinstance(generation, int) else None


def build_registry(
    settings: KpiOperatorSettings, registry: kopf.OperatorRegistry | None = None
) -> kopf.OperatorRegistry:
    """Register the operator's handlers on `registry` (a new one by default) and return it."""
    registry = registry if registry is not None else kopf.OperatorRegistry()
    runtime = _Runtime(settings)
    resource = (GROUP, VERSION, PLURAL)
    backoff = settings.retry_backoff_s

    @kopf.on.login(registry=registry, id="login")
    def login(**kwargs: Any) -> kopf.ConnectionInfo:
        """In-cluster service account first, then KUBECONFIG / ~/.kube/config.

        Without either (`run_operator` refuses to start then; this is for credentials lost
        while running, and for `kopf run`), kopf retries in a minute and logs the reason in
        one line, no traceback. A permanent error would not stop kopf: it would wait for
        credentials forever, with no more attempts."""
        try:
            return kube_api.login(**kwargs)
        except kube_api.NoCredentials as exc:
            raise kopf.TemporaryError(str(exc), delay=LOGIN_RETRY_S) from None

    @kopf.on.startup(registry=registry, id="startup")
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_kopf(settings, runtime.settings)
        await runtime.start()

    @kopf.on.cleanup(registry=registry, id="cleanup")
    async def cleanup(**_: Any) -> None:
        await runtime.stop()

    @kopf.index(*resource, registry=registry, id=INDEX_ID)
    def declarations(*, spec: kopf.Spec, meta: kopf.Meta, **_: Any) -> dict[str, Declaration]:
        """KPI code -> the KPIDefinitions declaring it (injected as the kwarg `INDEX_ID`)."""
        return index_entry(spec, meta)

    @kopf.on.resume(*resource, registry=registry, id=SYNC_HANDLER_ID, backoff=backoff)
    @kopf.on.create(*resource, registry=registry, id=SYNC_HANDLER_ID, backoff=backoff)
    @kopf.on.update(*resource, registry=registry, id=SYNC_HANDLER_ID, backoff=backoff, field="spec")
    async def sync(
        *,
        body: kopf.Body,
        spec: kopf.Spec,
        meta: kopf.Meta,
        status: kopf.Status,
        patch: kopf.Patch,
        retry: int,
        old: Any,
        logger: kopf.Logger,
        **kwargs: Any,
    ) -> None:
        async with runtime.lock_for(meta):
            outcome = await _push(runtime, spec, meta, status, kwargs[INDEX_ID])
        patch.status.update(outcome.status_patch)
        _announce(body, status, outcome.status_patch)
        _raise_for(outcome, runtime.settings, retry)
        await _forget_renamed_code(runtime.metadata(), spec, old, logger)
        logger.info("KPI %s synced: %s", spec.get("code"), outcome.status_patch.get("phase"))

    @kopf.on.delete(*resource, registry=registry, id=DELETE_HANDLER_ID, backoff=backoff)
    async def remove(
        *,
        spec: kopf.Spec,
        meta: kopf.Meta,
        status: kopf.Status,
        patch: kopf.Patch,
        retry: int,
        logger: kopf.Logger,
        **kwargs: Any,
    ) -> None:
        try:
            code = code_of(spec)
        except SpecError:
            logger.info("No valid spec.code: nothing can be stored, releasing the finalizer")
            return
        others = other_declarations(kwargs[INDEX_ID], code, meta)
        if others:
            # Not ours to delete: the KPI stays for the next owner, whose sync (retrying in
            # Conflict) or resync writes its own spec.
            names = ", ".join(other.describe() for other in others)
            logger.info("KPI %s kept in the metadata service: still declared by %s", code, names)
            return
        try:
            async with runtime.lock_for(meta):
                existed = await runtime.metadata().delete_definition(code)
        except MetadataUnavailable as exc:
            patch.status.update(
                status_mod.failed_status(
                    status,
                    reason=status_mod.Reason.UNAVAILABLE,
                    message=f"cannot delete KPI {code}: {exc}",
                    generation=_generation(meta),
                    now=_now(),
                )
            )
            raise kopf.TemporaryError(str(exc), delay=runtime.settings.backoff_for(retry)) from exc
        if existed:
            logger.info("KPI %s deleted from the metadata service", code)
        else:
            logger.info("KPI %s was already absent from the metadata service", code)

    @kopf.timer(
        *resource,
        registry=registry,
        id=RESYNC_HANDLER_ID,
        interval=settings.resync_interval_s,
        initial_delay=settings.resync_interval_s,
    )
    async def resync(
        *,
        body: kopf.Body,
        spec: kopf.Spec,
        meta: kopf.Meta,
        status: kopf.Status,
        patch: kopf.Patch,
        logger: kopf.Logger,
        **kwargs: Any,
    ) -> None:
        """Re-assert the spec; errors are only reported (the next tick retries)."""
        async with runtime.lock_for(meta):
            if kwargs["stopped"]:  # being deleted: the delete handler decides what remains
                return
            outcome = await _push(runtime, spec, meta, status, kwargs[INDEX_ID])
        changes = status_mod.status_changes(status, outcome.status_patch)
        if changes:
            patch.status.update(changes)
            _announce(body, status, changes)
        if outcome.error is not None:
            logger.warning("Resync of KPI %s failed: %s", spec.get("code"), outcome.error)

    return registry


async def _forget_renamed_code(
    client: MetadataClient, spec: Mapping[str, Any], old: Any, logger: kopf.Logger
) -> None:
    """Delete the previous code if `spec.code` changed (the CRD forbids it; be safe anyway)."""
    old_spec = old.get("spec") if isinstance(old, Mapping) else None
    if not isinstance(old_spec, Mapping):
        old_spec = old if isinstance(old, Mapping) else None
    if old_spec is None:
        return
    try:
        old_code, new_code = code_of(old_spec), code_of(spec)
    except SpecError:
        return
    if old_code != new_code:
        try:
            await client.delete_definition(old_code)
        except MetadataUnavailable as exc:
            raise kopf.TemporaryError(f"cannot delete renamed KPI {old_code}: {exc}") from exc
        logger.info("KPI code changed %s -> %s: deleted %s", old_code, new_code, old_code)
