"""`python -m analytics_engine_operator`: run the operator with settings from the environment."""

from __future__ import annotations

import asyncio
import logging

from analytics_engine_operator import app
from analytics_engine_operator.settings import KpiOperatorSettings


def main() -> None:
    settings = KpiOperatorSettings()
    logging.basicConfig(level=settings.log_level)
    asyncio.run(app.main(settings))


if __name__ == "__main__":
    main()
