"""Hypothesis strategies for hostile bus messages, and valid payloads to mutate.

Messages are built as bytes (the bus carries bytes): JSON from the standard library, so lone
surrogates can be escaped (`"\\ud800"`) or written raw (invalid UTF-8), NaN written as the
non-JSON `NaN`, and so on. Whether a message is "bad" is decided by the protocol itself: the
core's envelope parsers and the payload models in `core/payloads.py`.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from analytics_engine.core import channels
from analytics_engine.core.payloads import EVENT_PAYLOADS, REQUEST_PAYLOADS

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
LIVE_KPI_CHANNEL = channels.kpi_channel("hostile_kpi")

# Strings that have broken parsers, databases and terminals before.
NASTY_STRINGS = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\ud800",  # lone high surrogate (escaped in JSON, or raw invalid UTF-8)
    "x\udfffy",  # lone low surrogate
    "\u202eevil\u202c",  # right-to-left override
    "\u05e9\u05dc\u05d5\u05dd",  # Hebrew (RTL)
    "\U0001f4a9\U0001f468\u200d\U0001f469\u200d\U0001f467",  # emoji, ZWJ sequence
    "\ufeffBOM",
    "\u0000\u0001\u001f\u007f",
    "' OR 1=1; DROP TABLE entity_events; --",
    "../../etc/passwd",
    "%s%n%x",
    "${jndi:ldap://x}",
    "reply.hostile.x",
    "simulation.entity.created",
    "9" * 400,
    "y" * 5000,
)


def hostile_text(max_size: int = 60) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(NASTY_STRINGS), st.text(max_size=max_size))


def hostile_scalar() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        hostile_text(),
    )


def hostile_value() -> st.SearchStrategy[Any]:
    return st.recursive(
        hostile_scalar(),
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(hostile_text(12), inner, max_size=4),
        ),
        max_leaves=12,
    )


def encode(value: Any, *, ascii_only: bool) -> bytes:
    """JSON bytes; lone surrogates are escaped (ascii) or written raw (invalid UTF-8)."""
    text = json.dumps(value, ensure_ascii=ascii_only, allow_nan=True)
    return text.encode("utf-8", errors="surrogatepass")


def deep(depth: int) -> str:
    """A JSON array nested `depth` deep (parsers with a recursion limit refuse it)."""
    return "[" * depth + "]" * depth


# -- valid payloads --------------------------------------------------------------------------
def _iso(delta: float = 0.0) -> str:
    return (NOW + timedelta(seconds=delta)).isoformat()


def _kpi_result() -> dict[str, Any]:
    return {
        "kpi_code": "hostile_kpi",
        "value": 1.5,
        "window_start": _iso(0),
        "window_end": _iso(60),
        "dimensions": {"region": "eu"},
        "sample_count": 3,
        "definition_version": 1,
        "computed_at": _iso(61),
    }


def valid_event_payload(channel: str) -> dict[str, Any]:
    """A payload of `channel` that its model accepts (ids fresh on every call)."""
    uid = uuid.uuid4().hex
    if channel in (channels.ENTITY_CREATED, channels.ENTITY_UPDATED):
        return {
            "entity_type": "order",
            "entity_id": f"hostile-{uid}",
            "version": 1,
            "occurred_at": _iso(),
            "attributes": {"amount": 10.5, "status": "new"},
        }
    if channel == channels.ENTITY_DEACTIVATED:
        return {
            "entity_type": "order",
            "entity_id": f"hostile-{uid}",
            "version": 2,
            "occurred_at": _iso(),
            "reason": "cancelled",
        }
    if channel == channels.SIMULATION_TICK:
        return {"tick": 1, "simulated_time": _iso(), "events_emitted": 3, "rate_per_s": 10.0}
    if channel in (channels.KPI_CALCULATED, channels.ARCHIVE_KPI_RESULTS, LIVE_KPI_CHANNEL):
        return _kpi_result()
    if channel == channels.ARCHIVAL_EVENTS:
        return {
            "batch_id": str(uuid.uuid4()),
            "entity_type": "order",
            "date": "2024-06-01",
            "rows": [
                {
                    "event_id": str(uuid.uuid4()),
                    "event_kind": "created",
                    "entity_type": "order",
                    "entity_id": f"hostile-{uid}",
                    "version": 1,
                    "occurred_at": _iso(),
                    "published_at": _iso(1),
                    "attributes": {"amount": 1},
                    "source": "data_simulator",
                }
            ],
        }
    if channel == channels.ARCHIVAL_CONFIRMED:
        return {"batch_id": str(uuid.uuid4()), "object_key": f"x/{uid}.parquet", "row_count": 0}
    if channel == channels.STREAM_SUBSCRIBE:
        return {
            "subscription_id": f"hostile-{uid}",
            "entity_type": "order",
            "since": _iso(-60),
            "until": _iso(-30),
            "channel": f"stream.replay.hostile-{uid}",
        }
    if channel in (channels.STREAM_HEARTBEAT, channels.STREAM_UNSUBSCRIBE):
        return {"subscription_id": f"hostile-{uid}"}
    if channel == channels.METADATA_CHANGED:
        return {
            "kind": "kpi_definition",
            "code": f"hostile_{uid[:8]}",
            "action": "deleted",
            "version": 1,
        }
    if channel == channels.SERVICE_HEARTBEAT:
        return {
            "service": "hostile_probe",
            "instance": uid,
            "version": "0",
            "status": "running",
            "uptime_s": 1.0,
            "consumer_lag": {},
            "sent_at": _iso(),
        }
    raise ValueError(channel)


def event_model(channel: str) -> type[BaseModel]:
    if channel.startswith(channels.KPI_CALCULATED_PREFIX):
        channel = channels.KPI_CALCULATED_PREFIX + "{kpi_code}"
    model: type[BaseModel] = EVENT_PAYLOADS[channel]
    return model


def valid_request_payload(channel: str, request_type: str) -> dict[str, Any]:
    payloads: dict[str, dict[str, Any]] = {
        "execute_query": {"sql": "SELECT 1 AS one", "params": []},
        "kpi_history": {"kpi_code": "hostile_kpi", "start": _iso(-3600), "end": _iso()},
        "latest_kpi_values": {"kpi_code": "hostile_kpi"},
        "get_entity": {"entity_type": "order", "entity_id": "nobody"},
        "list_entities": {"entity_type": "order", "active": True, "after": "a", "limit": 10},
        "purge_kpi_results": {"kpi_code": "hostile_purged"},
        "request_archival": {},
        "record_kpi_version": {
            "kpi_code": "hostile_versioned",
            "definition_version": 1,
            "since": _iso(-3600),
        },
        "get_kpi_definition": {"code": "hostile_missing"},
        "list_kpi_definitions": {},
        "get_entity_definition": {"entity_type": "order"},
        "list_entity_definitions": {},
    }
    assert (channel, request_type) in REQUEST_PAYLOADS
    return payloads[request_type]


def model_rejects(model: type[BaseModel], payload: Any) -> bool:
    try:
        model.model_validate(payload)
    except ValidationError:
        return True
    return False


def request_model(channel: str, request_type: str) -> type[BaseModel]:
    model: type[BaseModel] = REQUEST_PAYLOADS[(channel, request_type)]
    return model


# -- mutations -------------------------------------------------------------------------------
@st.composite
def mutated_payload(draw: st.DrawFn, base: dict[str, Any], model: type[BaseModel]) -> Any:
    """`base` with one to three structural mutations (drop a field, retype it, add one)."""
    payload: dict[str, Any] = dict(base)
    fields = sorted(set(model.model_fields) | set(payload))
    for _ in range(draw(st.integers(1, 3))):
        if not fields:  # nothing to break but the "no fields" rule
            payload[draw(hostile_text(12))] = draw(hostile_value())
            continue
        how = draw(st.sampled_from(["drop", "retype", "retype", "nested", "extra"]))
        name = draw(st.sampled_from(fields))
        if how == "drop":
            payload.pop(name, None)
        elif how == "retype":
            payload[name] = draw(hostile_value())
        elif how == "nested" and isinstance(payload.get(name), dict):
            inner = dict(payload[name])
            inner[draw(hostile_text(12))] = draw(hostile_value())
            payload[name] = inner
        else:
            payload[draw(hostile_text(12))] = draw(hostile_value())
    return payload
