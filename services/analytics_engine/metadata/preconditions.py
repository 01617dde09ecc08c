"""HTTP conditional-request headers mapped onto definition versions (`ETag: "<version>"`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Precondition:
    """What a write requires of the stored definition.

    `match`: None (no `If-Match`), the versions it may have, or `ANY` (`If-Match: *`, it must
    exist). `absent`: `If-None-Match: *`, it must not exist (create only).
    """

    match: frozenset[int] | None = None
    any_version: bool = False
    absent: bool = False

    def failure(self, current: int | None) -> str | None:
        """Why the precondition fails for the stored version `current` (None: absent)."""
        if self.absent and current is not None:
            return f"already exists at version {current} (If-None-Match: *)"
        if self.any_version and current is None:
            return "does not exist (If-Match: *)"
        if self.match is not None:
            if current is None:
                return "does not exist (If-Match)"
            if current not in self.match:
                wanted = ", ".join(str(v) for v in sorted(self.match)) or "none"
                return f"version is {current}, If-Match expected {wanted}"
        return None


NONE: Final = Precondition()
_MAX_VERSION_DIGITS: Final = 18


def etag(version: int) -> str:
    return f'"{version}"'


def parse_if_match(header: str | None) -> Precondition:
    """Parse `If-Match`: `*`, or a list of entity tags (`"3"`, `W/"3"`, bare `3` tolerated).

    Tags that are not versions can never match, so they count as an empty set (-> 412).
    """
    if header is None or not header.strip():
        return NONE
    if header.strip() == "*":
        return Precondition(any_version=True)
    return Precondition(match=_versions_in(header))


def _versions_in(header: str) -> frozenset[int]:
    """The versions a list of entity tags names (weak comparison: `W/"3"` is version 3)."""
    versions: set[int] = set()
    for part in header.split(","):
        tag = part.strip().removeprefix("W/").strip('"').strip()
        # ASCII only: str.isdigit() accepts "²", which int() refuses. No version has more
        # than 18 digits, and int() refuses thousands of them.
        if tag.isascii() and tag.isdigit() and len(tag) <= _MAX_VERSION_DIGITS:
            versions.add(int(tag))
    return frozenset(versions)


def not_modified(if_none_match: str | None, version: int) -> bool:
    """Whether a GET's `If-None-Match` already holds the stored `version` (RFC 9110 13.1.2:
    weak comparison; `*` matches any stored version): answer 304 without the body."""
    if if_none_match is None or not if_none_match.strip():
        return False
    return if_none_match.strip() == "*" or version in _versions_in(if_none_match)


def parse_conditions(if_match: str | None, if_none_match: str | None) -> Precondition:
    base = parse_if_match(if_match)
    if if_none_match is not None and if_none_match.strip() == "*":
        return Precondition(match=base.match, any_version=base.any_version, absent=True)
    return base
