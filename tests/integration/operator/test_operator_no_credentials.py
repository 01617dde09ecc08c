"""The operator started where there are no Kubernetes credentials (no kubeconfig, not in a pod):
one line on stderr saying so and exit 2, not a traceback, nor kopf retrying forever.

Each entry point runs as a subprocess, as a user would start it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from metadata_standin import free_port

SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
ENTRY_POINTS = {
    "python -m analytics_engine_operator": ["-m", "analytics_engine_operator"],
    "analytics-engine run operator": ["-m", "analytics_engine.cli", "run", "operator"],
}

pytestmark = pytest.mark.skipif(
    SERVICE_ACCOUNT_TOKEN.exists(), reason="in a pod: the service account logs in"
)


def run_operator(
    kubeconfig: str | None, home: Path, entry_point: str
) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")
    }
    env.update(HOME=str(home), OPERATOR_PORT=str(free_port()))
    if kubeconfig is not None:
        env["KUBECONFIG"] = kubeconfig
    home.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, *ENTRY_POINTS[entry_point]],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_one_line(result: subprocess.CompletedProcess[str], reason: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("analytics-engine-operator: no Kubernetes credentials: ")
    assert reason in lines[0]


@pytest.mark.parametrize("entry_point", sorted(ENTRY_POINTS))
def test_no_kubeconfig_at_all(tmp_path: Path, entry_point: str) -> None:
    result = run_operator(None, tmp_path / "home", entry_point)
    assert_one_line(result, "set KUBECONFIG")


@pytest.mark.parametrize("entry_point", sorted(ENTRY_POINTS))
def test_kubeconfig_names_a_missing_file(tmp_path: Path, entry_point: str) -> None:
    missing = str(tmp_path / "nonexistent")
    result = run_operator(missing, tmp_path / "home", entry_point)
    assert_one_line(result, f"cannot read the kubeconfig ({missing})")


def test_kubeconfig_is_not_yaml(tmp_path: Path) -> None:
    broken = tmp_path / "kubeconfig"
    broken.write_text("clusters: [\n  - {name: c\n")
    result = run_operator(str(broken), tmp_path / "home", "python -m analytics_engine_operator")
    assert_one_line(result, "cannot read the kubeconfig")
