"""Child process for the crash test: run the archival service (settings from the environment)
and SIGKILL itself at a chosen point of its first KPI-results flush, like a node dying."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Sequence

from analytics_engine.archival.kpi_results import ArchivalHooks
from analytics_engine.archival.service import Settings, create


async def die(keys: Sequence[str]) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    moment = sys.argv[1]  # "before_put" or "after_put"
    runtime = create(Settings(), hooks=ArchivalHooks(**{moment: die}))
    asyncio.run(runtime.run())


if __name__ == "__main__":
    main()
