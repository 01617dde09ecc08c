"""`OBSERVABILITY_ABSENT_READERS`: which services retention does not wait for, and the status
does not expect."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from analytics_engine.core.acl import running_services
from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.observability.service import Observability, Settings, absent_services


def settings(value: str) -> Settings:
    return Settings.model_validate({"OBSERVABILITY_ABSENT_READERS": value})


def test_services_not_deployed_are_named_by_their_bus_names() -> None:
    assert absent_services(settings(" data_simulator ,").absent_readers) == {"data_simulator"}
    assert absent_services(settings("").absent_readers) == frozenset()


def test_unknown_names_and_streams_left_without_any_reader_are_refused() -> None:
    with pytest.raises(ValidationError, match="unknown services"):
        settings("simulator")
    # metadata.changed is read by the simulator and the engine only: it would never be trimmed
    with pytest.raises(ValidationError, match=r"no reader of metadata\.changed"):
        settings("data_simulator,calculation_engine")


def test_the_status_expects_every_running_service_but_the_absent_ones() -> None:
    settings = Settings.model_validate({"OBSERVABILITY_ABSENT_READERS": "data_simulator"})
    runtime = ServiceRuntime(service="observability_service", settings=settings, port=0)
    registry = Observability(runtime, settings).registry
    assert registry.expected == set(running_services()) - {"data_simulator"}
    assert "cli" not in registry.expected
    assert {"api_gateway", "observability_service", "database_service"} <= registry.expected
