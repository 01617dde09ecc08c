"""NUL detection on decoded JSON values."""

from __future__ import annotations

import orjson

from analytics_engine.core.jsontext import contains_nul


def test_nul_in_any_string_key_or_nesting() -> None:
    assert contains_nul("a\x00")
    assert contains_nul({"k": ["x", {"y": "\x00"}]})
    assert contains_nul({"k\x00": 1})
    assert not contains_nul({"k": [1, 2.5, None, True, "x"]})


def test_an_escaped_backslash_before_u0000_is_not_nul() -> None:
    """`"\\\\u0000"` in JSON is a backslash then `u0000`: the raw bytes hold `\\u0000`."""
    raw = b'{"description": "C:\\\\u0000"}'
    assert b"\\u0000" in raw
    assert orjson.loads(raw)["description"] == "C:\\u0000"
    assert not contains_nul(orjson.loads(raw))
    assert contains_nul(orjson.loads(b'{"description": "\\u0000"}'))


def test_deep_nesting_does_not_recurse() -> None:
    value: object = "\x00"
    for _ in range(5000):
        value = [value]
    assert contains_nul(value)
