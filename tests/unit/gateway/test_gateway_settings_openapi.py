"""Settings rules and the OpenAPI document built from the route table (no servers)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from analytics_engine.gateway.middleware import parse_origins, valid_request_id
from analytics_engine.gateway.service import Settings, build

KEYS = "admin-key-0123456789abcdef:admin"


def test_refuses_to_start_without_keys_unless_anonymous_is_allowed() -> None:
    with pytest.raises(ValidationError, match="GATEWAY_ALLOW_ANONYMOUS"):
        Settings.model_validate({})
    assert Settings.model_validate({"GATEWAY_ALLOW_ANONYMOUS": "true"}).api_keys == ""
    settings = Settings.model_validate({"GATEWAY_API_KEYS": KEYS, "GATEWAY_PORT": "9090"})
    assert settings.gateway_port == 9090
    assert "admin-key" not in repr(settings)
    with pytest.raises(ValidationError) as info:
        Settings.model_validate({"GATEWAY_API_KEYS": "admin-key-0123456789abcdef:root"})
    assert "admin-key-0123456789abcdef" not in str(info.value.errors()[0]["msg"])


def test_document_covers_every_route_with_security_and_schemas() -> None:
    gateway = build(Settings.model_validate({"GATEWAY_API_KEYS": KEYS}))
    document = gateway.document
    paths = document["paths"]
    assert isinstance(paths, dict)
    assert {(s.method.lower(), s.path) for s in gateway.specs} == {
        (m, p) for p, item in paths.items() for m in item
    }
    assert paths["/healthz"]["get"]["security"] == []
    assert paths["/api/v1/stream"]["get"]["security"][-1] == {"streamToken": []}
    code = paths["/api/v1/kpis/{code}/latest"]["get"]["parameters"][0]
    assert code["schema"]["pattern"] == "^[a-z][a-z0-9_]{0,62}$"
    ids = [op["operationId"] for item in paths.values() for op in item.values()]
    assert len(ids) == len(set(ids))
    history = {
        p["name"]: p["description"]
        for p in paths["/api/v1/kpis/{code}/history"]["get"]["parameters"]
        if p["in"] == "query"
    }
    assert history["start"].startswith("Window start, inclusive")
    assert history["end"].startswith("Window end, exclusive")  # was "Window start, exclusive"


def test_cors_origins_and_request_ids() -> None:
    cors = parse_origins("https://a.example, https://b.example/ ,")
    assert cors.allowed("https://b.example") and not cors.allowed("https://c.example")
    assert not cors.allowed(None)
    assert parse_origins("*").allowed("https://any.example")
    assert not parse_origins("").allowed("https://a.example")
    assert valid_request_id("abc-123_x.y:z") == "abc-123_x.y:z"
    assert valid_request_id("a" * 129) is None
    assert valid_request_id("bad id") is None
