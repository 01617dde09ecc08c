"""Helpers of the kind end-to-end suite (fixtures in conftest.py).

Run on a machine with a Docker engine, `kind`, `helm` and `kubectl`
(`python scripts/install_k8s_tools.py` provides helm and kubectl on linux/amd64):

    .venv/bin/pytest tests/e2e -m e2e -v

Every test skips, naming what is missing, when a tool is absent or the Docker engine does not
answer. Environment knobs:
  AE_E2E_CLUSTER       kind cluster name (default `ae-e2e`); an existing cluster is reused
  AE_E2E_KEEP=1        keep the cluster (and a cluster we created) after the run
  AE_E2E_IMAGE         image to test (default: build `images/Dockerfile` as analytics-engine:e2e)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "analytics-engine"
CLUSTER = os.environ.get("AE_E2E_CLUSTER", "ae-e2e")
NAMESPACE = "ae-e2e"
RELEASE = "analytics-engine"
IMAGE = os.environ.get("AE_E2E_IMAGE", "analytics-engine:e2e")


def find_tool(name: str) -> str | None:
    venv_bin = Path(sys.executable).parent / name
    return str(venv_bin) if venv_bin.is_file() else shutil.which(name)


def missing_prerequisite() -> str | None:
    """Why the e2e suite cannot run here, or None."""
    hints = {
        "docker": "install Docker (the engine must run)",
        "kind": "install kind: https://kind.sigs.k8s.io/docs/user/quick-start/#installation",
        "helm": "run `python scripts/install_k8s_tools.py`",
        "kubectl": "run `python scripts/install_k8s_tools.py`",
    }
    for tool, hint in hints.items():
        if find_tool(tool) is None:
            return f"`{tool}` is not installed: {hint}"
    try:
        info = subprocess.run(
            [find_tool("docker") or "docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            check=False,
            timeout=20,
        )
    except subprocess.TimeoutExpired:
        return "the Docker engine does not answer (`docker info` timed out)"
    if info.returncode != 0:
        return f"the Docker engine does not answer: {info.stderr.strip()[:200]}"
    return None


@dataclass(frozen=True)
class Cluster:
    kubeconfig: Path
    context: str

    def run(
        self, *args: str, check: bool = True, timeout: float = 600, **kw: object
    ) -> subprocess.CompletedProcess[str]:
        tool, *rest = args
        cmd = [find_tool(tool) or tool, *rest]
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        return subprocess.run(
            cmd, check=check, capture_output=True, text=True, timeout=timeout, env=env, **kw
        )  # type: ignore[call-overload]

    def kubectl(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run("kubectl", "--context", self.context, *args, **kw)

    def helm(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run("helm", "--kube-context", self.context, *args, **kw)


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def port_forward(cluster: Cluster, service: str, port: int) -> Iterator[str]:
    local = free_port()
    proc = subprocess.Popen(
        [
            find_tool("kubectl") or "kubectl",
            "--context",
            cluster.context,
            "-n",
            NAMESPACE,
            "port-forward",
            f"svc/{service}",
            f"{local}:{port}",
        ],
        env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", local), timeout=1),
            ):
                break
            time.sleep(0.5)
        yield f"http://127.0.0.1:{local}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def secret_value(cluster: Cluster, name: str, key: str) -> str:
    import base64

    data = cluster.kubectl(
        "-n", NAMESPACE, "get", "secret", name, "-o", f"jsonpath={{.data.{key}}}"
    ).stdout
    return base64.b64decode(data).decode()
