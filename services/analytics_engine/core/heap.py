"""Python's cyclic garbage collector, tuned for services that handle events by the thousand.

Every event costs a dozen short-lived containers (the parsed JSON, the envelope, the delivery, a
row), so with the default generation-0 threshold (700 allocations) the collector runs many times
per batch, and each full collection walks every object the process ever built (modules,
pydantic and Lark tables, boto3's S3 model: 70k-130k objects, 10-15 ms a walk). Measured: about
a third of the database service's CPU in a drain, ~2 us per archived KPI result.
Freezing what startup built (never garbage) takes it out of every collection, and a larger
generation-0 threshold makes collections rarer; reference counting still frees almost everything
at once, the collector only finds cycles. The runtime applies it after the startup hooks.
"""

from __future__ import annotations

import gc


def tune_gc(threshold0: int) -> None:
    """Freeze the objects built so far out of collections and collect generation 0 every
    `threshold0` allocations (0: leave the collector as it is)."""
    if threshold0 <= 0:
        return
    gc.collect()
    gc.freeze()
    _, threshold1, threshold2 = gc.get_threshold()
    gc.set_threshold(threshold0, threshold1, threshold2)
