"""API keys, scopes and stream tokens (pure)."""

from __future__ import annotations

import pytest

from analytics_engine.gateway.auth import (
    KeyRing,
    Principal,
    StreamTokens,
    allows,
    key_id,
    parse_api_keys,
    presented_key,
)

ADMIN = "admin-key-0123456789abcdef"
READ = "read-key-0123456789abcdef"


def test_parse_keys_and_scopes() -> None:
    keys = parse_api_keys(f" {ADMIN}:admin , {READ}:read ,")
    assert [(k.key, k.scope) for k in keys] == [(ADMIN, "admin"), (READ, "read")]
    assert ADMIN not in repr(keys[0])
    assert parse_api_keys("") == []
    # a key may itself contain ':' (the scope is after the last one)
    assert parse_api_keys("abc:def:0123456789abcdef:read")[0].key == "abc:def:0123456789abcdef"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("justakey0123456789abc", "key:scope"),
        (f"{ADMIN}:root", "scope must be"),
        ("short:admin", "at least 16"),
        (f"{ADMIN}:admin,{ADMIN}:read", "duplicate"),
    ],
)
def test_parse_errors_never_echo_the_key(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as info:
        parse_api_keys(text)
    assert ADMIN not in str(info.value)


def test_keyring_authenticates_and_scopes_order() -> None:
    ring = KeyRing(parse_api_keys(f"{ADMIN}:admin,{READ}:read"))
    assert ring.authenticate(ADMIN) == Principal(key_id(ADMIN), "admin")
    assert ring.authenticate(READ) == Principal(key_id(READ), "read")
    assert ring.authenticate(ADMIN + "x") is None
    assert ring.authenticate("") is None


def test_keyring_refuses_a_key_that_is_not_utf8() -> None:
    """aiohttp decodes header bytes that are not UTF-8 as lone surrogates ("\\udcff"): such a
    key is unknown (a 401), not a UnicodeEncodeError (a 500)."""
    ring = KeyRing(parse_api_keys(f"{ADMIN}:admin"))
    assert ring.authenticate("\udcff\udcfe" + ADMIN) is None
    assert ring.authenticate(ADMIN.encode().decode("utf-8", "surrogateescape")) is not None
    assert allows("admin", "read") and allows("admin", "admin") and allows("read", "read")
    assert not allows("read", "admin")
    assert len(key_id(ADMIN)) == 12 and key_id(ADMIN) != key_id(READ)


def test_presented_key_from_either_header() -> None:
    assert presented_key([("Authorization", f"Bearer {READ}")]) == READ
    assert presented_key([("authorization", f"bearer  {READ} ")]) == READ
    assert presented_key([("X-API-Key", READ)]) == READ
    assert presented_key([("Authorization", "Basic abc")]) is None
    assert presented_key([("Authorization", "Bearer ")]) is None
    assert presented_key([]) is None


def test_stream_tokens_expire_and_resist_tampering() -> None:
    ring = KeyRing(parse_api_keys(f"{ADMIN}:admin"))
    tokens = StreamTokens(ring.token_secret(), ttl_s=60)
    token, expires = tokens.issue(Principal(key_id(ADMIN), "admin"), now=1000.0)
    assert expires == 1060
    assert ADMIN not in token
    who = tokens.verify(token, now=1059.0)
    assert who == Principal(key_id(ADMIN), "read", via_token=True)  # read-only, whatever the key
    assert tokens.verify(token, now=1061.0) is None
    body, _, signature = token.partition(".")
    assert tokens.verify(f"{body}.{signature[::-1]}", now=1000.0) is None
    assert tokens.verify("garbage", now=1000.0) is None
    assert tokens.verify("a.b.c", now=1000.0) is None
    # replicas with the same keys accept each other's tokens; other keys do not
    same = StreamTokens(KeyRing(parse_api_keys(f"{ADMIN}:admin")).token_secret(), ttl_s=60)
    assert same.verify(token, now=1000.0) is not None
    other = StreamTokens(KeyRing(parse_api_keys(f"{READ}:read")).token_secret(), ttl_s=60)
    assert other.verify(token, now=1000.0) is None
