"""Which KPIDefinition owns a KPI code when several declare it (the CRD: one code, one owner).

The metadata service keys KPIs by code alone. Without this, two KPIDefinitions with the same
`spec.code` would overwrite each other on every sync and resync (a new definition version, and
a recomputation, each time), both would report `Synced=True`, and deleting either would delete
the KPI that the other still declares.

So the operator keeps a kopf index of the KPIDefinitions it serves by code, and only the owner
writes: the oldest one not being deleted (`creationTimestamp`, then namespace and name, so the
choice is stable and every operator instance makes the same one). The others report
`Synced=False` with reason `Conflict` and retry with backoff, so the next one takes over when
the owner is deleted. Only the KPIDefinitions the operator watches can be seen
(`OPERATOR_NAMESPACES`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from analytics_engine_operator.kpidefinition import KIND, SpecError, code_of

INDEX_ID = "kpi_code_declarations"


@dataclass(frozen=True, order=True)
class Declaration:
    """One KPIDefinition declaring a code; ordered oldest first."""

    created: str  # RFC 3339 in UTC, as the API server writes it: sorts chronologically
    namespace: str
    name: str
    uid: str = field(compare=False)
    deleting: bool = field(compare=False, default=False)

    def describe(self) -> str:
        return f"{KIND} {self.namespace}/{self.name}"


class CodeConflict(Exception):
    """Another KPIDefinition owns this code; this one is not applied."""

    def __init__(self, code: str, owner: Declaration) -> None:
        self.code = code
        self.owner = owner
        super().__init__(
            f"KPI code {code} is already declared by {owner.describe()}, which owns it: only "
            f"the oldest {KIND} of a code is applied; this one is applied once that one is "
            f"deleted"
        )


def declaration_of(meta: Mapping[str, Any]) -> Declaration:
    return Declaration(
        created=str(meta.get("creationTimestamp") or ""),
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        uid=str(meta.get("uid") or ""),
        deleting=bool(meta.get("deletionTimestamp")),
    )


def index_entry(spec: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Declaration]:
    """What the kopf index holds for one KPIDefinition: `{code: its declaration}`."""
    try:
        code = code_of(spec)
    except SpecError:
        return {}
    return {code: declaration_of(meta)}


def _declarations(index: Mapping[str, Iterable[Declaration]], code: str) -> list[Declaration]:
    return list(index[code]) if code in index else []


def rival_owner(
    index: Mapping[str, Iterable[Declaration]], code: str, meta: Mapping[str, Any]
) -> Declaration | None:
    """The KPIDefinition that owns `code` if it is not the one of `meta` (None: it may write)."""
    own = declaration_of(meta)
    live = [d for d in _declarations(index, code) if not d.deleting and d.uid != own.uid]
    if own.deleting or not live:
        return None
    owner = min([*live, own])
    return None if owner.uid == own.uid else owner


def other_declarations(
    index: Mapping[str, Iterable[Declaration]], code: str, meta: Mapping[str, Any]
) -> list[Declaration]:
    """The other KPIDefinitions, not being deleted, that still declare `code`."""
    uid = declaration_of(meta).uid
    return sorted(d for d in _declarations(index, code) if not d.deleting and d.uid != uid)
