"""Pure construction of a KPIDefinition's `status` (no I/O, no kopf) so it is unit-testable.

The status says what is true in the metadata service, not what the operator tried:

* `Synced=True`, reason `Synced`, phase `Synced`, `syncedVersion` = the stored version;
* `Synced=False`, reason `Invalid`: the metadata service rejected this spec (message is its
  message); retried only when the spec changes;
* `Synced=False`, reason `Unavailable`: the metadata service could not be reached; retried with
  backoff. `syncedVersion` keeps the last version known to be stored.
* `Synced=False`, reason `Conflict`: an older KPIDefinition declares the same `spec.code` and
  owns the KPI (ownership.py); nothing is written, retried with backoff.

Conditions follow the `metav1.Condition` shape. `lastTransitionTime` changes only when the
condition's status flips, so a resync that finds everything in order does not churn it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

CONDITION_SYNCED = "Synced"
MAX_MESSAGE_LENGTH = 32768  # metav1.Condition.message maxLength


class Reason(StrEnum):
    SYNCED = "Synced"
    INVALID = "Invalid"
    UNAVAILABLE = "Unavailable"
    CONFLICT = "Conflict"


class Phase(StrEnum):
    SYNCED = "Synced"
    INVALID = "Invalid"
    UNAVAILABLE = "Unavailable"
    CONFLICT = "Conflict"


_PHASE_FOR_REASON = {
    Reason.SYNCED: Phase.SYNCED,
    Reason.INVALID: Phase.INVALID,
    Reason.UNAVAILABLE: Phase.UNAVAILABLE,
    Reason.CONFLICT: Phase.CONFLICT,
}


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_condition(
    previous: Iterable[Mapping[str, Any]] | None,
    *,
    type_: str,
    status: bool,
    reason: str,
    message: str,
    now: datetime,
    observed_generation: int | None = None,
) -> list[dict[str, Any]]:
    """The full new `conditions` list (merge patches replace lists), others kept as they were."""
    status_text = "True" if status else "False"
    conditions: list[dict[str, Any]] = []
    old: Mapping[str, Any] | None = None
    for condition in previous or ():
        if condition.get("type") == type_:
            old = condition
        else:
            conditions.append(dict(condition))
    transition = rfc3339(now)
    if old is not None and old.get("status") == status_text and old.get("lastTransitionTime"):
        transition = str(old["lastTransitionTime"])
    new: dict[str, Any] = {
        "type": type_,
        "status": status_text,
        "reason": reason,
        "message": message[:MAX_MESSAGE_LENGTH],
        "lastTransitionTime": transition,
    }
    if observed_generation is not None:
        new["observedGeneration"] = observed_generation
    conditions.append(new)
    return conditions


def synced_status(
    previous: Mapping[str, Any] | None,
    *,
    version: int | str | None,
    generation: int | None,
    now: datetime,
    code: str,
) -> dict[str, Any]:
    """Status patch after the metadata service confirmed it stores the spec as `version`."""
    message = f"KPI {code} stored in the metadata service"
    if version is not None:
        message += f" as version {version}"
    patch = _status(
        previous,
        reason=Reason.SYNCED,
        message=message,
        generation=generation,
        now=now,
    )
    patch["syncedVersion"] = version
    return patch


def failed_status(
    previous: Mapping[str, Any] | None,
    *,
    reason: Reason,
    message: str,
    generation: int | None,
    now: datetime,
) -> dict[str, Any]:
    """Status patch after a failed sync; `syncedVersion` is left as it was."""
    if reason is Reason.SYNCED:
        raise ValueError("a failure needs the Invalid, Unavailable or Conflict reason")
    return _status(previous, reason=reason, message=message, generation=generation, now=now)


def status_changes(current: Mapping[str, Any] | None, patch: Mapping[str, Any]) -> dict[str, Any]:
    """The part of `patch` that differs from `current` (so a no-op resync writes nothing)."""
    current = current or {}
    return {key: value for key, value in patch.items() if current.get(key) != value}


def _status(
    previous: Mapping[str, Any] | None,
    *,
    reason: Reason,
    message: str,
    generation: int | None,
    now: datetime,
) -> dict[str, Any]:
    previous_conditions = (previous or {}).get("conditions") or ()
    patch: dict[str, Any] = {
        "phase": _PHASE_FOR_REASON[reason].value,
        "conditions": merge_condition(
            previous_conditions,
            type_=CONDITION_SYNCED,
            status=reason is Reason.SYNCED,
            reason=reason.value,
            message=message,
            now=now,
            observed_generation=generation,
        ),
    }
    if generation is not None:
        patch["observedGeneration"] = generation
    return patch


MAX_EVENT_MESSAGE_LENGTH = 1024


def event_for(
    previous: Mapping[str, Any] | None, patch: Mapping[str, Any]
) -> tuple[str, str, str] | None:
    """`(type, reason, message)` of the Kubernetes Event announcing a status change, if any.

    Only transitions are announced (phase or synced version changed), so retries and periodic
    resyncs that change nothing do not flood `kubectl describe`.
    """
    previous = previous or {}
    phase = patch.get("phase", previous.get("phase"))
    version = patch.get("syncedVersion", previous.get("syncedVersion"))
    if phase is None or (
        phase == previous.get("phase") and version == previous.get("syncedVersion")
    ):
        return None
    message = ""
    for condition in patch.get("conditions") or ():
        if condition.get("type") == CONDITION_SYNCED:
            message = str(condition.get("message", ""))
    kind = "Normal" if phase == Phase.SYNCED.value else "Warning"
    return kind, str(phase), message[:MAX_EVENT_MESSAGE_LENGTH]
