"""JSON Schemas of the envelopes and payloads, generated from the pydantic models."""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel

from analytics_engine.core import envelopes, payloads


def _file_name(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower().replace("k_p_i", "kpi") + ".schema.json"


def all_schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema, for every envelope and payload model."""
    models: list[type[BaseModel]] = [envelopes.Event, envelopes.Request, envelopes.Response]
    models += list(payloads.EVENT_PAYLOADS.values()) + list(payloads.REQUEST_PAYLOADS.values())
    models += [payloads.QueryResult]
    out: dict[str, dict[str, Any]] = {}
    for model in models:
        out[_file_name(model.__name__)] = model.model_json_schema(mode="serialization")
    return out


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"
