"""The JSON Schemas in docs/schemas are generated from the models and must not drift."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from analytics_engine.core.schemas import all_schemas, render
from analytics_engine.core.storable import MAX_NAME

SCHEMAS = Path(__file__).resolve().parents[3] / "docs" / "schemas"


def test_committed_schemas_match_the_models() -> None:
    expected = {name: render(schema) for name, schema in all_schemas().items()}
    actual = {p.name: p.read_text() for p in SCHEMAS.glob("*.schema.json")}
    assert sorted(actual) == sorted(expected), "run: python scripts/gen_schemas.py"
    for name, text in expected.items():
        assert actual[name] == text, f"{name} drifted from the model: run scripts/gen_schemas.py"


@pytest.mark.parametrize(
    ("schema", "document", "valid"),
    [
        (
            "event.schema.json",
            {
                "event_id": "e1",
                "event_type": "simulation.entity.created",
                "source": "data_simulator",
                "timestamp": "2024-01-01T00:00:00Z",
                "payload": {},
            },
            True,
        ),
        ("event.schema.json", {"event_id": "e1", "payload": {}}, False),
        (
            "request.schema.json",
            {
                "correlation_id": "uuid",
                "reply_to": "reply.calculation_engine.1",
                "request_type": "execute_query",
                "source": "calculation_engine",
                "timestamp": "2024-01-01T00:00:00Z",
                "payload": {"sql": "SELECT 1"},
            },
            True,
        ),
        ("execute_query.schema.json", {"sql": "SELECT 1", "params": [1]}, True),
        ("execute_query.schema.json", {"params": []}, False),
    ],
)
def test_schemas_accept_spec_documents_and_reject_broken_ones(
    schema: str, document: dict[str, object], valid: bool
) -> None:
    validator = jsonschema.Draft202012Validator(json.loads((SCHEMAS / schema).read_text()))
    assert validator.is_valid(document) is valid


def test_entity_event_payloads_require_the_fields_the_issue_lists() -> None:
    """`simulation.entity.created|updated`: `{entity_type, entity_id, version, occurred_at,
    attributes{...}}` (no field optional). An event without `attributes` is dead-lettered by
    the database service, so the schema must not call it optional."""
    schema = json.loads((SCHEMAS / "entity_event.schema.json").read_text())
    assert set(schema["required"]) == {
        "entity_type",
        "entity_id",
        "version",
        "occurred_at",
        "attributes",
    }


@pytest.mark.parametrize("name", ["entity_event.schema.json", "entity_deactivated.schema.json"])
def test_entity_names_have_the_length_the_database_stores(name: str) -> None:
    """The published schema allows exactly the names `core.storable` accepts (and stores)."""
    properties = json.loads((SCHEMAS / name).read_text())["properties"]
    for field in ("entity_type", "entity_id"):
        assert properties[field]["maxLength"] == MAX_NAME, field
