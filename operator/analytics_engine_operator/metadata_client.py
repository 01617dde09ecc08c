"""HTTP client of the metadata service's KPI-definition API (docs/architecture.md).

The operator only needs to tell three outcomes apart, so every failure maps to one of two
typed errors:

* `MetadataInvalid` - the service understood the request and rejected the definition
  (400/422 with `{error: {code, message, details: [{field, message}]}}`, or 413 for a body past
  its METADATA_MAX_BODY_BYTES, which a spec the CRD accepts can reach through large query
  params). Retrying cannot help; only a spec change can.
* `MetadataUnavailable` - anything else that went wrong: connection refused/reset, DNS,
  timeouts, 5xx, and unexpected statuses (e.g. 401/404 from a misrouted URL). Retrying with a
  backoff is the safe reaction to all of them.

A 404 on DELETE is success: the definition is already gone, which is what was asked for.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import aiohttp
import yarl

KPI_DEFINITIONS_PATH = "api/v1/kpi-definitions"
_BODY_SNIPPET = 300
_REJECTED = frozenset({400, 413, 422})  # the request itself is refused: retrying cannot help

Version = int | str


class MetadataError(Exception):
    """Base of the metadata client's errors."""


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str


class MetadataInvalid(MetadataError):
    """The metadata service rejected the definition (HTTP 400/413/422)."""

    def __init__(self, message: str, details: tuple[FieldError, ...] = ()) -> None:
        self.message = message
        self.details = details
        super().__init__(self.describe())

    def describe(self) -> str:
        """One line for a status condition: the message followed by the field errors."""
        if not self.details:
            return self.message
        fields = "; ".join(
            f"{d.field}: {d.message}" if d.field else d.message for d in self.details
        )
        return f"{self.message}: {fields}"


class MetadataUnavailable(MetadataError):
    """The metadata service could not be reached or failed (retry later)."""


@dataclass(frozen=True)
class StoredDefinition:
    """The outcome of a PUT: the version the metadata service stored."""

    version: Version | None
    created: bool
    body: Mapping[str, Any] = field(default_factory=dict)


class MetadataClient:
    """Async client; use as `async with MetadataClient(url, timeout) as client:`.

    It owns one `aiohttp.ClientSession` (connection pooling) for its lifetime, which is the
    operator's lifetime; the session must be created inside the running event loop.
    """

    def __init__(self, base_url: str, timeout_s: float) -> None:
        self._base = yarl.URL(base_url)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(timeout=self._timeout, raise_for_status=False)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url_for(self, code: str) -> yarl.URL:
        return self._base.joinpath(KPI_DEFINITIONS_PATH, code)

    async def put_definition(self, code: str, definition: Mapping[str, Any]) -> StoredDefinition:
        """Create or replace (idempotently) the definition `code`."""
        status, headers, body = await self._request("PUT", self.url_for(code), json_body=definition)
        if status in (200, 201):
            data = body if isinstance(body, dict) else {}
            return StoredDefinition(
                version=_version_of(data, headers), created=status == 201, body=data
            )
        raise _error_for(status, body, f"PUT {code}")

    async def get_definition(self, code: str) -> dict[str, Any] | None:
        """The stored definition (with `version`), or None when absent."""
        status, headers, body = await self._request("GET", self.url_for(code))
        if status == 200 and isinstance(body, dict):
            if "version" not in body:
                version = _version_of(body, headers)
                if version is not None:
                    body = {**body, "version": version}
            return body
        if status == 404:
            return None
        raise _error_for(status, body, f"GET {code}")

    async def delete_definition(self, code: str) -> bool:
        """Delete `code`; True if it existed, False if it was already absent (not an error)."""
        status, _, body = await self._request("DELETE", self.url_for(code))
        if status in (200, 202, 204):
            return True
        if status == 404:
            return False
        raise _error_for(status, body, f"DELETE {code}")

    async def _request(
        self, method: str, url: yarl.URL, json_body: Mapping[str, Any] | None = None
    ) -> tuple[int, Mapping[str, str], Any]:
        if self._session is None:
            raise RuntimeError("MetadataClient used outside `async with`")
        try:
            async with self._session.request(method, url, json=json_body) as response:
                text = await response.text()
                return response.status, dict(response.headers), _parse_body(text)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            raise MetadataUnavailable(f"metadata service unreachable at {url}: {reason}") from exc


def _parse_body(text: str) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _version_of(body: Mapping[str, Any], headers: Mapping[str, str]) -> Version | None:
    version = body.get("version")
    if isinstance(version, int | str) and not isinstance(version, bool):
        return version
    etag = headers.get("ETag") or headers.get("Etag")
    if etag:
        raw = etag.removeprefix("W/").strip('"')
        return int(raw) if raw.isdigit() else raw
    return None


def _error_for(status: int, body: Any, what: str) -> MetadataError:
    if status in _REJECTED:
        return _invalid_from(body, status)
    snippet = body if isinstance(body, str) else json.dumps(body)
    return MetadataUnavailable(
        f"metadata service answered {what} with HTTP {status}: {snippet[:_BODY_SNIPPET]}"
    )


def _invalid_from(body: Any, status: int) -> MetadataInvalid:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        text = body if isinstance(body, str) else json.dumps(body)
        return MetadataInvalid(f"rejected with HTTP {status}: {text[:_BODY_SNIPPET]}")
    message = str(error.get("message") or error.get("code") or f"rejected with HTTP {status}")
    details: list[FieldError] = []
    raw_details = error.get("details")
    if isinstance(raw_details, list):
        for item in raw_details:
            if isinstance(item, dict):
                details.append(
                    FieldError(
                        field=str(item.get("field", "")), message=str(item.get("message", ""))
                    )
                )
    return MetadataInvalid(message, tuple(details))
