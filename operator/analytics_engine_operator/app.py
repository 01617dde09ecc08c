"""Run the operator in-process: `await run_operator(KpiOperatorSettings())`.

`analytics-engine run operator` loads this module by the CLI's service convention: it builds
`Settings` from the environment, configures logging and awaits `main(settings)`.
`kopf run -m analytics_engine_operator.main` runs the very same registry (see `main.py`); every
path ends in `kopf.operator`.

Without Kubernetes credentials (no kubeconfig, not in a pod) `main` prints one line naming
what is missing and exits 2, as for any other configuration error, before kopf starts: under
kopf the login handler can only be retried, so the process would wait for credentials forever.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Final

import kopf

from analytics_engine_operator import kube_api
from analytics_engine_operator.handlers import build_registry, configure_kopf
from analytics_engine_operator.settings import KpiOperatorSettings

Settings = KpiOperatorSettings  # the CLI's service convention (`module.Settings`)

Flag = asyncio.Event | asyncio.Future[object] | threading.Event

NO_CREDENTIALS_EXIT: Final = 2
"""Exit status without Kubernetes credentials: a configuration error, like invalid settings."""


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
    Cluster-wide unless `OPERATOR_NAMESPACES` lists namespaces. Raises
    `kube_api.NoCredentials` before starting anything when the login handler would find none.
    """
    kopf_settings = kopf.OperatorSettings()
    configure_kopf(kopf_settings, settings)
    kube_api.login(settings=kopf_settings)
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
    """The CLI's service convention (`await module.main(settings)`); exits
    `NO_CREDENTIALS_EXIT` with one line on stderr when there are no credentials."""
    try:
        await run_operator(settings)
    except kube_api.NoCredentials as exc:
        print(f"analytics-engine-operator: {exc}", file=sys.stderr)
        raise SystemExit(NO_CREDENTIALS_EXIT) from None
