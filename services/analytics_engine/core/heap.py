"""The garbage collector's view of a long-running service process."""

from __future__ import annotations

import gc


async def freeze_startup_heap() -> None:
    """Exempt everything alive now from the collector's full collections (a startup hook).

    A service's imports and composition leave ~70k container objects (modules, functions,
    pydantic and Lark tables) that live as long as the process. Every full collection walks
    all of them (~15 ms on this kind of machine, in one stall of the event loop), and at tens
    of thousands of events per second full collections come every second or so. Frozen objects
    are still freed by reference counting; only cycles among them would never be collected.
    """
    gc.freeze()
