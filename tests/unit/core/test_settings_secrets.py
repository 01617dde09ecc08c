"""Settings never show a password in their repr or str (a log line, a debugger, an error
report printing the settings must not leak the connection credentials)."""

from __future__ import annotations

import importlib

import pytest
from pydantic_settings import BaseSettings

from analytics_engine.cli import SERVICES

SECRET = "Sup3rSecretPassw0rd"
ENV = {
    "REDIS_URL": f"redis://svc:{SECRET}@redis:6379/0",
    "DATABASE_URL": f"postgresql://app:{SECRET}@db:5432/analytics",
    "DATABASE_READONLY_URL": f"postgresql://reader:{SECRET}@db:5432/analytics",
    "S3_ENDPOINT_URL": "http://s3:9000",
    "AWS_ACCESS_KEY_ID": "access",
    "AWS_SECRET_ACCESS_KEY": SECRET,
    "GATEWAY_API_KEYS": f"{SECRET}-api-key:admin",
}


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_no_secret_in_the_settings_repr(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    settings_cls: type[BaseSettings] = importlib.import_module(SERVICES[service].module).Settings
    settings = settings_cls()
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)


def test_no_secret_in_the_verify_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    from analytics_engine.verify.cli import VerifySettings

    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    assert SECRET not in repr(VerifySettings())
