"""API keys and scopes, and the short-lived tokens that let a browser's `EventSource` (which
cannot send headers) open a live stream. Pure: no I/O, time is passed in.

Keys never leave this module in clear: everything else sees a `Principal` whose `key_id` is a
short hash, safe to log and to use as a rate-limit bucket.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import orjson

Scope = Literal["read", "admin"]
SCOPES: Final[tuple[Scope, ...]] = ("read", "admin")
_RANK: Final = {"read": 1, "admin": 2}
MIN_KEY_LENGTH: Final = 16
ANONYMOUS_ID: Final = "anonymous"


def key_id(key: str) -> str:
    """A short, stable, non-reversible name for a key (logs, metrics, rate-limit buckets)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def allows(granted: Scope, required: Scope) -> bool:
    """`admin` can do everything `read` can."""
    return _RANK[granted] >= _RANK[required]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key's id and scope; `via_token` for a stream token."""

    key_id: str
    scope: Scope
    via_token: bool = False


@dataclass(frozen=True, slots=True)
class ApiKey:
    key: str
    scope: Scope

    def __repr__(self) -> str:  # never print the secret
        return f"ApiKey(id={key_id(self.key)}, scope={self.scope})"


def parse_api_keys(text: str) -> list[ApiKey]:
    """Parse `GATEWAY_API_KEYS`: comma-separated `key:scope` pairs.

    Raises `ValueError` naming the pair by position only (the value is a secret).
    """
    keys: list[ApiKey] = []
    seen: set[str] = set()
    for position, raw in enumerate((p.strip() for p in text.split(",")), start=1):
        if not raw:
            continue
        key, sep, scope = raw.rpartition(":")
        if not sep or not key:
            raise ValueError(f"pair {position} is not of the form key:scope")
        if scope not in _RANK:
            raise ValueError(f"pair {position}: scope must be one of {', '.join(SCOPES)}")
        if len(key) < MIN_KEY_LENGTH:
            raise ValueError(f"pair {position}: keys need at least {MIN_KEY_LENGTH} characters")
        if any(c.isspace() for c in key):
            raise ValueError(f"pair {position}: keys may not contain whitespace")
        if key in seen:
            raise ValueError(f"pair {position}: duplicate key")
        seen.add(key)
        keys.append(ApiKey(key, scope))  # type: ignore[arg-type]
    return keys


def generate_key() -> str:
    """A fresh random key (the local stack prints one for the admin)."""
    return secrets.token_urlsafe(24)


class KeyRing:
    """Checks presented keys against the configured ones in constant time per key."""

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self._keys = [(k.key.encode(), Principal(key_id(k.key), k.scope)) for k in keys]

    def __len__(self) -> int:
        return len(self._keys)

    def authenticate(self, presented: str) -> Principal | None:
        # Header bytes that are not UTF-8 reach us as lone surrogates: encode them back to the
        # bytes sent (an unknown key) rather than fail with UnicodeEncodeError (a 500).
        candidate = presented.encode("utf-8", "surrogateescape")
        found: Principal | None = None
        for secret, principal in self._keys:  # no early exit: timing does not reveal position
            if hmac.compare_digest(secret, candidate):
                found = principal
        return found

    def token_secret(self) -> bytes:
        """Signing secret for stream tokens, derived from the keys so every gateway replica
        configured with the same keys accepts the others' tokens, and changing the keys revokes
        every outstanding token. Random (per process) when no key is configured."""
        if not self._keys:
            return secrets.token_bytes(32)
        material = b"\x00".join(sorted(secret for secret, _ in self._keys))
        return hmac.new(b"analytics-engine-sse-token", material, hashlib.sha256).digest()


def presented_key(headers: Iterable[tuple[str, str]]) -> str | None:
    """The key from `Authorization: Bearer <key>` or `X-API-Key: <key>` (first one wins)."""
    for name, value in headers:
        lname = name.lower()
        if lname == "authorization":
            scheme, _, credentials = value.strip().partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
        elif lname == "x-api-key" and value.strip():
            return value.strip()
    return None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class StreamTokens:
    """Signed, expiring, read-only tokens for the SSE routes (`?token=`).

    Why not `?api_key=`: a URL ends up in browser history, proxy and server logs; a token that
    expires in minutes and only opens streams leaks far less than the key itself.
    """

    def __init__(self, secret: bytes, *, ttl_s: float) -> None:
        self._secret = secret
        self.ttl_s = ttl_s

    def issue(self, principal: Principal, *, now: float) -> tuple[str, float]:
        expires = int(now + self.ttl_s)
        body = orjson.dumps({"kid": principal.key_id, "exp": expires, "scope": "read"})
        signature = hmac.new(self._secret, body, hashlib.sha256).digest()
        return f"{_b64(body)}.{_b64(signature)}", float(expires)

    def verify(self, token: str, *, now: float) -> Principal | None:
        body_part, sep, signature_part = token.partition(".")
        if not sep or len(token) > 1000:
            return None
        try:
            body = _unb64(body_part)
            signature = _unb64(signature_part)
        except (ValueError, TypeError):
            return None
        expected = hmac.new(self._secret, body, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, signature):
            return None
        try:
            claims = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(claims, dict):
            return None
        expires = claims.get("exp")
        kid = claims.get("kid")
        if not isinstance(expires, int) or not isinstance(kid, str) or expires < now:
            return None
        return Principal(kid, "read", via_token=True)
