"""Run the operator in-process: `await run_operator(KpiOperatorSettings())`.

`analytics-engine run operator` loads this module by the CLI's service convention: it builds
`Settings` from the environment, configures logging and awaits `main(settings)`.
`kopf run -m analytics_engine_operator.main` runs the very same registry (see `main.py`); every
path ends in `kopf.operator`.
"""

from __future__ import annotations

import asyncio
import threading

import kopf

from analytics_engine_operator.handlers import build_registry, configure_kopf
from analytics_engine_operator.settings import KpiOperatorSettings

Settings = KpiOperatorSettings  # the CLI's service convention (`module.Settings`)

Flag = asyncio.Event | asyncio.Future[object] | threading.Event


def liveness_endpoint(settings: KpiOperatorSettings) -> str:
    return f"http://{settings.liveness_host}:{settings.port}/healthz"


async def run_operator(
    settings: KpiOperatorSettings,
    *,
    stop_flag: Flag | None = None,
    ready_flag: Flag | None = None,
) -> None:
    """Run until cancelled, SIGINT/SIGTERM (kopf installs the handlers) or `stop_flag` is set.

    Serves `GET http://{OPERATOR_LIVENESS_HOST}:{OPERATOR_PORT}/healthz` for the liveness probe.
    Cluster-wide unless `OPERATOR_NAMESPACES` lists namespaces.
    """
    kopf_settings = kopf.OperatorSettings()
    configure_kopf(kopf_settings, settings)
    await kopf.operator(
        registry=build_registry(settings),
        settings=kopf_settings,
        clusterwide=settings.clusterwide,
        namespaces=list(settings.namespaces),
        standalone=settings.peering_name is None,
        peering_name=settings.peering_name,
        liveness_endpoint=liveness_endpoint(settings),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


async def main(settings: KpiOperatorSettings) -> None:
    """The CLI's service convention (`await module.main(settings)`)."""
    await run_operator(settings)
