"""Turning request bodies into validated definitions (pure: no I/O).

The rules themselves live in `analytics_engine.kpi.definitions`; this module adds what belongs to
the write path: the URL's key must agree with the body's, and the read-only `version` a client
copied from a GET is ignored rather than rejected (GET -> edit -> PUT must work).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final, TypeVar

from pydantic import BaseModel, ValidationError

from analytics_engine.kpi.definitions import (
    EntityTypeDefinition,
    FieldError,
    KPIDefinition,
    check_against_entity,
    validation_errors,
)
from analytics_engine.metadata.errors import Invalid

NUL_REFUSED: Final = "NUL characters (\\u0000) are not accepted: PostgreSQL text cannot hold them"
INVALID_KPI: Final = "invalid KPI definition"
INVALID_ENTITY_TYPE: Final = "invalid entity type"
READ_ONLY_KEYS: Final = frozenset({"version"})

M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], body: Any, key_field: str, key: str | None, message: str) -> M:
    if not isinstance(body, Mapping):
        raise Invalid(message, [FieldError("", "the body must be a JSON object")])
    data = {k: v for k, v in body.items() if k not in READ_ONLY_KEYS}
    if key is not None:
        given = data.get(key_field)
        if given is None:
            data[key_field] = key
        elif given != key:
            raise Invalid(
                message,
                [
                    FieldError(
                        key_field, f"must equal the {key_field} in the URL ({key!r}), got {given!r}"
                    )
                ],
            )
    try:
        return model.model_validate(data)
    except ValidationError:
        # Validate again only on failure, for the kpi package's field-level error messages.
        raise Invalid(message, validation_errors(data, model)) from None


def parse_kpi(body: Any, code: str | None = None) -> KPIDefinition:
    """Validate a KPI definition body on its own (schema, filter syntax, windows, read-only SQL).

    `code` is the key from the URL: filled in when the body has none, must match otherwise.
    """
    return _parse(KPIDefinition, body, "code", code, INVALID_KPI)


def parse_entity_type(body: Any, entity_type: str | None = None) -> EntityTypeDefinition:
    return _parse(EntityTypeDefinition, body, "entity_type", entity_type, INVALID_ENTITY_TYPE)


def check_kpi_entity(
    kpi: KPIDefinition, entity: EntityTypeDefinition | None, known: Iterable[str] = ()
) -> list[FieldError]:
    """The KPI's references against its entity type (None: the type does not exist)."""
    if entity is None:
        names = ", ".join(sorted(known)) or "none"
        return [
            FieldError("entity_type", f"unknown entity type {kpi.entity_type!r} (known: {names})")
        ]
    return check_against_entity(kpi, entity)


def broken_kpis(entity: EntityTypeDefinition, kpis: Iterable[KPIDefinition]) -> list[FieldError]:
    """Errors the KPIs built on `entity` would have under the new entity definition, each
    prefixed with the KPI's code (`kpi:<code>.field`)."""
    errors: list[FieldError] = []
    for kpi in kpis:
        errors.extend(
            FieldError(f"kpi:{kpi.code}.{e.field}" if e.field else f"kpi:{kpi.code}", e.message)
            for e in check_against_entity(kpi, entity)
        )
    return errors


def canonical(model: BaseModel) -> dict[str, Any]:
    """The stored form of a definition: every field, JSON types, durations in canonical text.

    Two bodies meaning the same definition (`60s` vs `1m`, defaults omitted or spelled out) have
    one canonical form, which is what makes PUT idempotent.
    """
    return model.model_dump(mode="json")


def with_version(spec: Mapping[str, Any], version: int) -> dict[str, Any]:
    return {**spec, "version": version}
