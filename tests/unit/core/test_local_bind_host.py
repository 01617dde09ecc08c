"""The business services' HTTP APIs have no authentication of their own (the gateway is the
only door; in Kubernetes, NetworkPolicies keep everyone else out). So the local stack, which
has no NetworkPolicies, must not put them on the network: they listen on loopback only."""

from __future__ import annotations

from pathlib import Path

import pytest

from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.core.settings import BaseServiceSettings
from analytics_engine.localstack.up import LOCAL_SERVICES, service_env, service_ports


def test_the_runtime_listens_where_its_settings_say(monkeypatch: pytest.MonkeyPatch) -> None:
    assert BaseServiceSettings().http_host == "0.0.0.0"  # a pod: reachable from its Service
    monkeypatch.setenv("SERVICE_HOST", "127.0.0.1")
    settings = BaseServiceSettings()
    assert settings.http_host == "127.0.0.1"
    runtime = ServiceRuntime(service="probe", settings=settings, port=0)
    assert runtime.host == "127.0.0.1"


def test_the_local_stack_keeps_the_backends_on_loopback() -> None:
    ports = service_ports(LOCAL_SERVICES, gateway_port=0)
    envs = service_env({}, ports, kpi_dir=Path("."), rate=None)
    for name in LOCAL_SERVICES:
        if name != "gateway":
            assert envs[name]["SERVICE_HOST"] == "127.0.0.1", name
    # the gateway authenticates every request: the one service meant to be reachable
    assert "SERVICE_HOST" not in envs["gateway"]
