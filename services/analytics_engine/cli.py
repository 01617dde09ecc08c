"""`analytics-engine`: run one service, the whole local stack, the correctness proof, or load
the Redis functions into a Redis of your own."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic_settings import BaseSettings

    from analytics_engine.core.runtime import ServiceRuntime


@dataclass(frozen=True)
class ServiceEntry:
    """Where a service lives: its module exposes `Settings` and `create(settings)`."""

    module: str
    source: str


SERVICES: dict[str, ServiceEntry] = {
    "gateway": ServiceEntry("analytics_engine.gateway.service", "api_gateway"),
    "simulator": ServiceEntry("analytics_engine.simulator.service", "data_simulator"),
    "calculation": ServiceEntry("analytics_engine.calculation.service", "calculation_engine"),
    "metadata": ServiceEntry("analytics_engine.metadata.service", "metadata_service"),
    "database": ServiceEntry("analytics_engine.database.service", "database_service"),
    "archival": ServiceEntry("analytics_engine.archival.service", "archival_service"),
    "observability": ServiceEntry(
        "analytics_engine.observability.service", "observability_service"
    ),
    "operator": ServiceEntry("analytics_engine_operator.app", "kpi_operator"),
}


def load_service(name: str) -> tuple[type[BaseSettings], Callable[[Any], ServiceRuntime]]:
    module = importlib.import_module(SERVICES[name].module)
    return module.Settings, module.create


def run_service(name: str) -> int:
    from analytics_engine.core import eventloop
    from analytics_engine.core.logs import configure_logging
    from analytics_engine.core.settings import load_settings

    module = importlib.import_module(SERVICES[name].module)
    settings = load_settings(module.Settings)
    configure_logging(
        service=SERVICES[name].source,
        instance=getattr(settings, "instance_id", "-"),
        level=getattr(settings, "log_level", "INFO"),
    )
    if hasattr(module, "main"):
        # Services that are not built on ServiceRuntime (the kopf operator) bring their own main.
        eventloop.run(module.main(settings))
        return 0
    runtime = module.create(settings)
    eventloop.run(runtime.run(handle_signals=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="analytics-engine", description="AnalyticsEngine: real-time KPI analytics."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one service in the foreground")
    run.add_argument("service", choices=sorted(SERVICES))

    up = sub.add_parser("up", help="start the whole platform locally (servers + every service)")
    up.add_argument("--data-dir", default=".run", help="where servers keep data (default .run)")
    up.add_argument(
        "--external",
        action="store_true",
        help="use REDIS_URL / DATABASE_URL / S3_* from the environment instead of starting servers",
    )
    up.add_argument("--gateway-port", type=int, default=8080)
    up.add_argument("--kpi-dir", default=None, help="KPI YAML directory (default k8s/samples)")
    up.add_argument("--rate", type=float, default=None, help="simulator events/s")
    up.add_argument("--only", default=None, help="comma-separated services to run (default: all)")

    sub.add_parser(
        "redis-functions",
        help="load the Redis functions services publish through (REDIS_ADMIN_URL: an admin user)",
    )

    verify = sub.add_parser("verify", help="prove the stored KPIs right by recomputing them")
    verify.add_argument(
        "--start",
        default=None,
        help="ISO time (default: each KPI's first stored event or result; never before the end "
        "of a day whose events were archived and deleted from PostgreSQL)",
    )
    verify.add_argument(
        "--end", default=None, help="ISO time (default: each KPI's last stored event or result)"
    )
    verify.add_argument("--kpi", action="append", default=None, help="KPI code (repeatable)")
    verify.add_argument("--skip-lake", action="store_true", help="do not read the Parquet archive")
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    verify.add_argument(
        "--archive-grace",
        type=float,
        default=60.0,
        help="seconds a stored result may take to reach the lake (default 60)",
    )
    verify.add_argument(
        "--idle-close",
        type=float,
        default=30.0,
        help="windows whose close time is this many seconds past count as closed (default 30)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return run_service(args.service)
    if args.command == "up":
        from analytics_engine.localstack.up import run_up

        return run_up(args)
    if args.command == "redis-functions":
        from analytics_engine.redis_functions import run_redis_functions

        return run_redis_functions()
    if args.command == "verify":
        from analytics_engine.verify.cli import run_verify

        return run_verify(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
