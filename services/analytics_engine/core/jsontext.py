"""Checks on decoded JSON values (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def contains_nul(value: Any) -> bool:
    """True when a NUL character is in any string of a JSON value (object keys included).
    Iterative: JSON nesting may run deeper than Python's recursion limit."""
    pending: list[Any] = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, Mapping):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)
    return False
