"""The event loop every service runs on: uvloop when it is installed (it is a dependency), else
asyncio's own. uvloop's libuv-based loop and transports cut the per-message overhead of the
bus (measured in `bench/bus_bench.py`, which runs on the same loop)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - a dependency; kept optional for odd platforms
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` on the service event loop."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
