"""How the gateway answers a failed bus request (pure: the error objects only)."""

from __future__ import annotations

import pytest

from analytics_engine.core.errors import NoResponder, RemoteError, RequestError, RequestTimeout
from analytics_engine.gateway.api import _bus_error


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (RequestTimeout("no reply"), 504, "upstream_timeout"),
        (NoResponder("nobody"), 503, "upstream_unavailable"),
        (RemoteError("entity_type: bad", code="invalid_request"), 400, "bad_request"),
        (RemoteError("postgres down", code="unavailable"), 503, "upstream_unavailable"),
        # the database's statement timeout: it is slow, not broken
        (RemoteError("canceling statement", code="query_timeout"), 504, "upstream_timeout"),
        (RemoteError("boom", code="internal"), 502, "bad_gateway"),
    ],
)
def test_bus_errors_map_to_the_status_that_says_whose_fault(
    error: RequestError, status: int, code: str
) -> None:
    answer = _bus_error(error, "database")
    assert (answer.status, answer.code) == (status, code)
