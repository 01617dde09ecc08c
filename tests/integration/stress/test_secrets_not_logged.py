"""No secret reaches a log: run `analytics-engine up` (every service, per-service Redis ACL users,
a generated gateway API key, PostgreSQL and S3 passwords), exercise it through the gateway with
the key and with wrong keys while the simulator produces events, stop it, then search `up`'s
output and every log for every configured secret, raw and URL-encoded."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pytest

from analytics_engine.localstack.ports import free_port

STARTUP_TIMEOUT = 120.0


def read_env(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def url_password(url: str) -> str | None:
    password = urlsplit(url).password
    return unquote(password) if password else None


def configured_secrets(data_dir: Path) -> dict[str, str]:
    """Every secret the stack was configured with, by a name for the failure message."""
    found: dict[str, str] = {}
    for line in (data_dir / "redis-users.acl").read_text().splitlines():
        match = re.match(r"user (\S+) .*?>(\S+)", line)
        if match:
            found[f"redis password of {match.group(1)}"] = match.group(2)
    env = read_env(data_dir / "stack.env")
    for variable in ("REDIS_URL", "DATABASE_URL", "DATABASE_READONLY_URL"):
        password = url_password(env.get(variable, ""))
        if password:
            found[f"password in {variable}"] = password
    found["AWS_SECRET_ACCESS_KEY"] = env["AWS_SECRET_ACCESS_KEY"]
    found["GATEWAY_API_KEY"] = env["GATEWAY_API_KEY"]
    found["postgres superuser password"] = (
        (data_dir / "postgres" / "superuser.password").read_text().strip()
    )
    return found


def call(
    base: str, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    request = urllib.request.Request(base + path, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen[bytes]) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"`analytics-engine up` exited early while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


@pytest.fixture
def up_stack(tmp_path: Path):  # type: ignore[no-untyped-def]
    """`analytics-engine up` in a subprocess; yields (data dir, output file, gateway URL, proc)."""
    data_dir = tmp_path / "run"
    output = tmp_path / "up.out"
    gateway_port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_API_KEYS"}
    env["PYTHONUNBUFFERED"] = "1"
    with output.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "analytics_engine.cli",
                "up",
                "--data-dir",
                str(data_dir),
                "--gateway-port",
                str(gateway_port),
                "--rate",
                "300",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        wait_for(lambda: b"Press Ctrl-C" in output.read_bytes(), STARTUP_TIMEOUT, "the stack", proc)
        yield data_dir, output, f"http://127.0.0.1:{gateway_port}", proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_no_secret_in_any_log_or_in_up_output(up_stack) -> None:  # type: ignore[no-untyped-def]
    data_dir, output, gateway, proc = up_stack
    assert b"NOT READY" not in output.read_bytes(), output.read_text()
    secrets = configured_secrets(data_dir)
    # the default user, admin and one user per service (7 services + cli), DB, S3, API key
    assert len(secrets) >= 12, sorted(secrets)
    key = secrets["GATEWAY_API_KEY"]
    wrong_keys = [key[:-3] + "xyz", "not-a-key-" + key[:12], key + "0"]
    for index, wrong in enumerate(wrong_keys):
        secrets[f"wrong API key #{index}"] = wrong

    bearer = {"Authorization": f"Bearer {key}"}
    assert call(gateway, "GET", "/api/v1/me", bearer)[0] == 200
    assert call(gateway, "GET", "/api/v1/kpis", {"X-API-Key": key})[0] == 200
    assert call(gateway, "GET", "/api/v1/kpi-definitions", bearer)[0] == 200
    assert call(gateway, "GET", "/api/v1/status", bearer)[0] == 200
    for wrong in wrong_keys:
        assert call(gateway, "GET", "/api/v1/me", {"X-API-Key": wrong})[0] == 401
        assert call(gateway, "GET", "/api/v1/kpis", {"Authorization": f"Bearer {wrong}"})[0] == 401
    assert call(gateway, "GET", "/api/v1/me")[0] == 401

    def emitted() -> int:
        status, body = call(gateway, "GET", "/api/v1/simulator", bearer)
        return int(json.loads(body).get("events_emitted", 0)) if status == 200 else 0

    wait_for(lambda: emitted() > 500, 60, "simulated events", proc)
    assert call(gateway, "POST", "/api/v1/simulator/stop", bearer)[0] == 200
    assert call(gateway, "POST", "/api/v1/simulator/start", bearer)[0] == 200
    time.sleep(3)  # results flow: database, calculation and archival log their work

    proc.send_signal(signal.SIGINT)
    assert proc.wait(90) == 0
    logs = sorted((data_dir / "logs").glob("*.log"))
    logs += [data_dir / name / f"{name}.log" for name in ("redis", "postgres", "s3")]
    files = [output, *logs]
    names = {p.stem for p in (data_dir / "logs").glob("*.log")}
    assert {"gateway", "simulator", "database", "calculation", "archival"} <= names
    assert all(p.stat().st_size > 0 for p in files), [str(p) for p in files]
    leaks = []
    for path in files:
        text = path.read_text(errors="replace")
        for name, secret in secrets.items():
            for form in {secret, quote(secret, safe=""), quote(secret)}:
                if form in text:
                    leaks.append(f"{name} in {path.relative_to(path.parents[1])}")
    assert not leaks, leaks
