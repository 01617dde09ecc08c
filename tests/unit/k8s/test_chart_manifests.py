"""Policy tests over the Helm chart's rendered manifests (`helm template`, several value sets).

Each value set is rendered once per session (`rendered` fixture). Needs the `helm` binary:
`python scripts/install_k8s_tools.py` puts it in the virtualenv; without it these tests skip.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import redis as redis_sync
import yaml

from analytics_engine.cli import SERVICES
from analytics_engine.core import channels
from analytics_engine.core.acl import SERVICE_ACCESS, acl_file, acl_rules
from analytics_engine.core.bus import FIELD, LIBRARY_CODE, PUBLISH_FUNCTION
from analytics_engine.database.roles import LARGE_OBJECT_CREATORS
from analytics_engine.gateway.auth import parse_api_keys
from analytics_engine.localstack import RedisServer
from analytics_engine.observability import service as observability
from analytics_engine.simulator import service as simulator_service

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "analytics-engine"
CRD = ROOT / "k8s" / "crds" / "kpidefinitions.analyticsengine.io.yaml"
NAMESPACE = "analytics"
RELEASE = "ae"
# The oldest version the chart supports (Chart.yaml kubeVersion), the kubectl we ship, the newest.
KUBERNETES_VERSIONS = ("1.28.0", "1.33.0", "1.37.0")
APP_COMPONENTS = (
    "gateway",
    "simulator",
    "calculation",
    "metadata",
    "database",
    "archival",
    "observability",
)
# Custom resources the Kubernetes schemas do not know (validated otherwise, below).
CUSTOM_KINDS = {"ServiceMonitor", "KPIDefinition", "KopfPeering", "ClusterKopfPeering"}

EXTERNAL = {
    "redis": {"enabled": False},
    # One password shared by every service: the fallback for a Redis without ACL users.
    "externalRedis": {
        "host": "redis.example.com",
        "tls": True,
        "aclUsers": False,
        "password": "s3cret",
    },
    "timescaledb": {"enabled": False},
    "externalDatabase": {
        "host": "pg.example.com",
        "password": "pw",
        "readonlyUsername": "ro",
        "readonlyPassword": "ropw",
        "sslmode": "require",
    },
    "minio": {"enabled": False},
    "externalS3": {
        "endpoint": "https://s3.eu-west-1.amazonaws.com",
        "accessKeyId": "AKIA",
        "secretAccessKey": "x",
    },
}
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "external": EXTERNAL,
    "external-secrets": {
        "redis": {"enabled": False},
        "externalRedis": {"host": "redis.example.com", "existingSecret": "redis-creds"},
        "timescaledb": {"enabled": False},
        "externalDatabase": {"host": "pg.example.com", "existingSecret": "pg-creds"},
        "minio": {"enabled": False},
        "externalS3": {"endpoint": "https://s3.example.com", "existingSecret": "s3-creds"},
        "gateway": {"auth": {"existingSecret": "gw-keys"}},
    },
    "redis-existing-secret": {"redis": {"auth": {"existingSecret": "redis-users"}}},
    "ingress": {
        "gateway": {"ingress": {"enabled": True, "ingressClassName": "nginx", "tls": True}},
        "networkPolicy": {"allowExternal": False},
    },
    "monitoring": {"monitoring": {"enabled": True}},
    "hpa": {
        "database": {"autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 80}},
    },
    "operator-clusterwide": {
        "operator": {"clusterwide": True, "peering": {"enabled": True}},
        "samples": {"enabled": True},
        "metadata": {"kpiDefinitions": {"count.yaml": {"code": "orders_count"}}},
    },
    "operator-namespaces": {"operator": {"watchNamespaces": ["team-a", "team-b"]}},
    # Samples with the namespaced operator: the samples' pre-delete cleanup hook renders.
    "samples": {"samples": {"enabled": True}},
    "data-not-retained": {
        "timescaledb": {"persistence": {"whenDeleted": "Delete"}},
        "minio": {"persistence": {"enabled": False}},
    },
    "minimal": {
        "simulator": {"enabled": False},
        "operator": {"enabled": False},
        "networkPolicy": {"enabled": False},
        "redis": {"persistence": {"enabled": False}},
    },
}

# What the operator may do (operator/RBAC.md; the calls kopf makes are checked against it in
# tests/integration/operator/test_operator_rbac.py): (apiGroup, resource) -> allowed verbs.
# No `namespaces`: kopf lists them only when it serves listed namespaces, and then falls back
# to the exact names on 403; a cluster-wide kopf never reads them.
RBAC_ALLOWED: dict[tuple[str, str], set[str]] = {
    ("analyticsengine.io", "kpidefinitions"): {"get", "list", "watch", "patch"},
    ("analyticsengine.io", "kpidefinitions/status"): {"patch"},
    ("", "events"): {"create"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    ("kopf.dev", "kopfpeerings"): {"get", "list", "watch", "patch"},
    ("kopf.dev", "clusterkopfpeerings"): {"get", "list", "watch", "patch"},
}

# What the samples' pre-delete cleanup hook may do (operator/RBAC.md), in the release namespace.
CLEANUP_RBAC_ALLOWED: dict[tuple[str, str], set[str]] = {
    ("analyticsengine.io", "kpidefinitions"): {"get", "list", "delete", "patch"},
}
CLEANUP = "samples-cleanup"
# The pods that mount a service account token: the operator and the cleanup hook.
TOKEN_COMPONENTS = {"operator", CLEANUP}

# Every flow between the release's pods that the architecture has, and no other:
# (source component, destination component, destination port).
EXPECTED_FLOWS = {
    *(
        ("gateway", c, p)
        for c, p in (
            ("simulator", 8081),
            ("calculation", 8082),
            ("metadata", 8083),
            ("observability", 8086),
        )
    ),
    *((c, "redis", 6379) for c in APP_COMPONENTS),
    ("database", "timescaledb", 5432),
    ("metadata", "timescaledb", 5432),
    ("archival", "minio", 9000),
    ("minio-setup", "minio", 9000),
    ("operator", "metadata", 8083),
}


def helm() -> str:
    for candidate in (Path(sys.executable).parent / "helm", shutil.which("helm")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.skip("helm is not installed: run `python scripts/install_k8s_tools.py`")


@functools.cache
def _render(name: str) -> list[dict[str, Any]]:
    values = json.dumps(VALUE_SETS[name])
    out = subprocess.run(
        [
            helm(),
            "template",
            RELEASE,
            str(CHART),
            "--namespace",
            NAMESPACE,
            "--include-crds",
            "--values",
            "/dev/stdin",
        ],
        input=values,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="session", params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return _render(request.param)


@pytest.fixture(scope="session")
def default_objects() -> list[dict[str, Any]]:
    return _render("default")


# --------------------------------------------------------------------------- helpers

WORKLOADS = {"Deployment", "StatefulSet", "Job", "DaemonSet", "CronJob"}


def pod_templates(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for obj in objects:
        if obj["kind"] in WORKLOADS:
            spec = obj["spec"]
            if obj["kind"] == "CronJob":
                spec = spec["jobTemplate"]["spec"]
            yield obj, spec["template"]


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        present, value = expr["key"] in labels, labels.get(expr["key"])
        op = expr["operator"]
        if (op == "In" and value not in expr["values"]) or (
            op == "NotIn" and value in expr["values"]
        ):
            return False
        if (op == "Exists" and not present) or (op == "DoesNotExist" and present):
            return False
    return True


def component(template: dict[str, Any]) -> str:
    return template["metadata"]["labels"]["app.kubernetes.io/component"]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def name_of(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


# --------------------------------------------------------------------------- lint and schemas


def test_minio_setup_is_a_job_per_revision_not_a_hook(
    default_objects: list[dict[str, Any]],
) -> None:
    """`helm install --wait` runs post-install hooks only once every Deployment is ready, and
    the archival service is ready only once this Job made its MinIO user: as a hook it never
    ran. A Job per revision reruns on upgrade (a Job's template is immutable)."""
    [job] = by_kind(default_objects, "Job")
    assert name_of(job).endswith("-minio-setup-r1")
    annotations = job["metadata"].get("annotations") or {}
    assert not [a for a in annotations if a.startswith("helm.sh/hook")]
    assert job["spec"]["ttlSecondsAfterFinished"] > 0


def test_the_chart_database_revokes_large_object_creation(
    default_objects: list[dict[str, Any]],
) -> None:
    """The read-only role must not write large objects (PostgreSQL allows it in READ ONLY
    transactions): the chart's init script revokes what `roles.ensure_reader_role` revokes,
    in the application's database."""
    [initdb] = [c for c in by_kind(default_objects, "ConfigMap") if "initdb" in name_of(c)]
    script = "\n".join(initdb["data"].values())
    in_app_db = script.split('\\connect :"app_db"', 1)[1]
    for function in LARGE_OBJECT_CREATORS:
        assert f"REVOKE EXECUTE ON FUNCTION {function} FROM PUBLIC;" in in_app_db


def test_peering_creates_the_kopf_peering_object_the_operator_waits_for() -> None:
    """kopf with a peering name stays paused until its peering object exists."""
    clusterwide = _render("operator-clusterwide")
    [peering] = by_kind(clusterwide, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "analytics-engine"
    assert not by_kind(_render("default"), "ClusterKopfPeering")
    assert not by_kind(_render("default"), "KopfPeering")


def test_credentials_of_retained_data_outlive_an_uninstall() -> None:
    """The database's roles and MinIO's users are made once, on an empty volume: a reinstall
    over a retained volume must find the same passwords (the kept Secret, read by lookup)."""

    def kept(objects: list[dict[str, Any]]) -> set[str]:
        return {
            name_of(o)
            for o in by_kind(objects, "Secret")
            if (o["metadata"].get("annotations") or {}).get("helm.sh/resource-policy") == "keep"
        }

    assert kept(_render("default")) == {
        "Secret/ae-analytics-engine-timescaledb",
        "Secret/ae-analytics-engine-minio",
    }
    assert kept(_render("data-not-retained")) == set()


def test_credentials_changed_through_the_values_roll_their_pods() -> None:
    """The gateway reads its API keys, and Redis its passwords, at start only."""

    def annotations(objects: list[dict[str, Any]], kind: str, suffix: str) -> dict[str, str]:
        [obj] = [o for o in by_kind(objects, kind) if name_of(o).endswith(suffix)]
        return dict(obj["spec"]["template"]["metadata"]["annotations"])

    def render(values: dict[str, Any]) -> list[dict[str, Any]]:
        result = _template_with(values)
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    before, again = render({}), render({})
    rotated = render(
        {
            "gateway": {"auth": {"apiKeys": "rotated-key-0123456789:admin"}},
            "redis": {"auth": {"password": "p1"}},
        }
    )
    gateway = [
        annotations(o, "Deployment", "-gateway")["checksum/api-keys"]
        for o in (before, again, rotated)
    ]
    redis = [
        annotations(o, "StatefulSet", "-redis")["checksum/auth"] for o in (before, again, rotated)
    ]
    for checksums in (gateway, redis):
        assert checksums[0] == checksums[1] != checksums[2]


def _pod_annotations(objects: list[dict[str, Any]], kind: str, suffix: str) -> dict[str, str]:
    [obj] = [o for o in by_kind(objects, kind) if name_of(o).endswith(suffix)]
    return dict(obj["spec"]["template"]["metadata"].get("annotations") or {})


def test_kpi_definitions_changed_through_the_values_roll_the_metadata_service() -> None:
    """The metadata service reads `KPI_DEFINITIONS_DIR` at start only (`seed` in bootstrap):
    an upgrade that edits `metadata.kpiDefinitions` must restart it, or the edit only lands in
    the ConfigMap."""

    def metadata_pod(definition: str) -> dict[str, str]:
        values = {"metadata": {"kpiDefinitions": {"count.yaml": definition}}}
        return _pod_annotations(_render_values(values), "Deployment", "-metadata")

    before, again = metadata_pod("code: orders_count\n"), metadata_pod("code: orders_count\n")
    edited = metadata_pod("code: orders_count\nname: Orders\n")
    assert before == again != edited


def test_s3_credentials_changed_through_the_values_roll_minio_and_the_archival_service() -> None:
    """MinIO reads its root credentials, and the archival service its S3 keys, at start only;
    the bucket Job of the upgrade sets the application user's new secret key at once, so an
    archival pod left running would be refused by S3 from then on (and a MinIO pod left
    running would refuse the Job's new root credentials)."""
    default = _render_values({})
    rotated_root = _render_values({"minio": {"auth": {"rootPassword": "new-root-pw"}}})
    rotated_app = _render_values({"minio": {"auth": {"secretAccessKey": "new-app-key"}}})
    minio = [_pod_annotations(o, "StatefulSet", "-minio") for o in (default, rotated_root)]
    archival = [_pod_annotations(o, "Deployment", "-archival") for o in (default, rotated_app)]
    assert minio[0] != minio[1]
    assert archival[0] != archival[1]
    assert _pod_annotations(_render_values({}), "Deployment", "-archival") == archival[0]
    # external S3: a key rotated through the values rolls the archival service too
    external = {k: EXTERNAL[k] for k in ("minio", "externalS3")}
    rotated = {**external, "externalS3": {**EXTERNAL["externalS3"], "secretAccessKey": "y"}}
    assert _pod_annotations(
        _render_values(external), "Deployment", "-archival"
    ) != _pod_annotations(_render_values(rotated), "Deployment", "-archival")


def test_helm_lint_strict() -> None:
    result = subprocess.run(
        [helm(), "lint", "--strict", str(CHART)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_objects_validate_against_kubernetes_schemas(version: str) -> None:
    """Every distinct object of every value set, in strict mode (unknown fields fail)."""
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate"
    )
    distinct = {
        json.dumps(obj, sort_keys=True): (value_set, obj)
        for value_set in VALUE_SETS
        for obj in _render(value_set)
        if obj["kind"] not in CUSTOM_KINDS
    }
    problems = []
    for value_set, obj in distinct.values():
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except Exception as exc:  # ValidationError / SchemaNotFoundError: report them all
            problems.append(f"[{value_set}] {name_of(obj)}: {exc}")
    assert not problems, "\n".join(problems)


def test_sample_kpidefinitions_match_the_crd_schema(rendered: list[dict[str, Any]]) -> None:
    crd = yaml.safe_load(CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["storage"])
    schema = version["schema"]["openAPIV3Schema"]
    for obj in by_kind(rendered, "KPIDefinition"):
        assert obj["apiVersion"] == f"{crd['spec']['group']}/{version['name']}"
        jsonschema.validate({"spec": obj["spec"]}, {**schema, "required": ["spec"]})


def test_service_monitors_scrape_metrics() -> None:
    monitors = by_kind(_render("monitoring"), "ServiceMonitor")
    assert {m["metadata"]["labels"]["app.kubernetes.io/component"] for m in monitors} == set(
        APP_COMPONENTS
    )
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["spec"]["endpoints"] == [
            {"port": "http", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
        ]


# --------------------------------------------------------------------------- pod policies


def test_every_container_has_requests_and_limits(rendered: list[dict[str, Any]]) -> None:
    for obj, template in pod_templates(rendered):
        for c in containers(template):
            res = c.get("resources") or {}
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind) or {}), (
                    f"{name_of(obj)} container {c['name']} lacks {kind}"
                )


def test_every_long_running_container_has_probes(rendered: list[dict[str, Any]]) -> None:
    for obj, template in pod_templates(rendered):
        if obj["kind"] in {"Job", "CronJob"}:
            continue
        for c in template["spec"]["containers"]:
            assert c.get("livenessProbe") and c.get("readinessProbe"), f"{name_of(obj)}/{c['name']}"


def test_application_probes_use_healthz_and_readyz(default_objects: list[dict[str, Any]]) -> None:
    seen = set()
    for _obj, template in pod_templates(default_objects):
        name = component(template)
        if name not in APP_COMPONENTS:
            continue
        (c,) = template["spec"]["containers"]
        assert c["args"] == ["run", name]
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        seen.add(name)
    assert seen == set(APP_COMPONENTS)


def test_restricted_pod_security_profile(rendered: list[dict[str, Any]]) -> None:
    for obj, template in pod_templates(rendered):
        spec = template["spec"]
        pod_sc = spec.get("securityContext") or {}
        where = name_of(obj)
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
        assert not any("hostPath" in v for v in spec.get("volumes", [])), where
        for c in containers(template):
            sc = c.get("securityContext") or {}
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("privileged", False) is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            seccomp = sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}
            assert seccomp.get("type") == "RuntimeDefault", where


def test_only_the_operator_mounts_a_service_account_token(rendered: list[dict[str, Any]]) -> None:
    for obj, template in pod_templates(rendered):
        expected = component(template) in TOKEN_COMPONENTS
        assert template["spec"].get("automountServiceAccountToken") is expected, name_of(obj)
    for sa in by_kind(rendered, "ServiceAccount"):
        assert sa.get("automountServiceAccountToken") is False


def test_operator_runs_one_replica_with_recreate(rendered: list[dict[str, Any]]) -> None:
    for obj in by_kind(rendered, "Deployment"):
        if component(obj["spec"]["template"]) == "operator":
            assert obj["spec"]["strategy"] == {"type": "Recreate"}
            assert obj["spec"]["replicas"] == 1


def test_no_latest_or_untagged_images(rendered: list[dict[str, Any]]) -> None:
    for _obj, template in pod_templates(rendered):
        for c in containers(template):
            image = c["image"]
            assert "@sha256:" in image or re.search(r":[\w][\w.\-]*$", image.split("/")[-1]), image
            assert not image.endswith(":latest"), image


def test_app_image_tag_defaults_to_app_version(default_objects: list[dict[str, Any]]) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    for _obj, template in pod_templates(default_objects):
        if component(template) in APP_COMPONENTS:
            assert template["spec"]["containers"][0]["image"].endswith(f":{chart['appVersion']}")


def test_no_secret_value_is_rendered_into_env_or_configmaps(rendered: list[dict[str, Any]]) -> None:
    for _obj, template in pod_templates(rendered):
        for c in containers(template):
            for env in c.get("env", []):
                value = env.get("value", "")
                assert "PASSWORD" not in env["name"] or "value" not in env, env
                if "://" in value and "@" in value:
                    assert re.search(r":\$\([A-Z_]+\)@", value), f"credential literal in {env}"
    for cm in by_kind(rendered, "ConfigMap"):
        for key, value in (cm.get("data") or {}).items():
            assert not re.search(r"(?i)(password|secret)\s*[:=]\s*\w", value) or key.endswith(
                ".sh"
            ), key


def _secret_refs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, str, str]]:
    """(workload, Secret name, key) of every secretKeyRef and Secret volume item."""
    for obj, template in pod_templates(objects):
        for c in containers(template):
            for env in c.get("env", []):
                if ref := (env.get("valueFrom") or {}).get("secretKeyRef"):
                    yield name_of(obj), ref["name"], ref["key"]
        for volume in template["spec"].get("volumes", []):
            if secret := volume.get("secret"):
                for item in secret.get("items", []):
                    yield name_of(obj), secret["secretName"], item["key"]


def test_every_key_read_from_a_chart_secret_is_in_it(rendered: list[dict[str, Any]]) -> None:
    """A missing key keeps the pod in CreateContainerConfigError."""
    secrets = {s["metadata"]["name"]: set(s.get("data") or {}) for s in by_kind(rendered, "Secret")}
    for where, name, key in _secret_refs(rendered):
        if name in secrets:  # not an existingSecret
            assert key in secrets[name], f"{where} reads {key!r} of Secret {name}"


def test_an_external_read_only_role_needs_its_password() -> None:
    """`externalDatabase.readonlyUsername` makes the database service read the read-only
    password from the Secret: without `readonlyPassword` (or an existingSecret) the chart's
    Secret has no such key and the database pods never start."""
    external = {
        "timescaledb": {"enabled": False},
        "externalDatabase": {"host": "pg.example.com", "password": "pw", "readonlyUsername": "ro"},
    }
    result = _template_with(external)
    assert result.returncode != 0
    assert "externalDatabase.readonlyUsername needs externalDatabase.readonlyPassword" in (
        result.stderr
    )
    external["externalDatabase"]["readonlyPassword"] = "ropw"
    assert _template_with(external).returncode == 0
    external["externalDatabase"] = {"host": "pg.example.com", "existingSecret": "pg-creds"}
    external["externalDatabase"]["readonlyUsername"] = "ro"
    assert _template_with(external).returncode == 0


def test_service_settings_env(default_objects: list[dict[str, Any]]) -> None:
    env: dict[str, set[str]] = {}
    for _obj, template in pod_templates(default_objects):
        (c, *_) = template["spec"]["containers"]
        env[component(template)] = {e["name"] for e in c.get("env", [])}
    for name in APP_COMPONENTS:
        assert {"REDIS_URL", "SERVICE_INSTANCE_ID"} <= env[name], name
    assert {"DATABASE_URL", "DATABASE_READONLY_URL"} <= env["database"]
    assert "DATABASE_URL" in env["metadata"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env["archival"]
    assert "GATEWAY_API_KEYS" in env["gateway"]
    (config,) = [
        c
        for c in by_kind(default_objects, "ConfigMap")
        if c["metadata"]["name"].endswith("-config")
    ]
    assert {
        "METADATA_URL",
        "SIMULATOR_URL",
        "CALCULATION_URL",
        "OBSERVABILITY_URL",
        "S3_ENDPOINT_URL",
        "S3_BUCKET",
    } <= set(config["data"])


def _config(objects: list[dict[str, Any]]) -> dict[str, str]:
    (config,) = [
        c for c in by_kind(objects, "ConfigMap") if c["metadata"]["name"].endswith("-config")
    ]
    data: dict[str, str] = config["data"]
    return data


def test_stream_retention_does_not_wait_for_a_simulator_that_is_not_deployed() -> None:
    """The simulator reads `metadata.changed`: were it counted while off, that stream would
    never be trimmed and would, once full, stop the metadata service (backpressure)."""
    assert "OBSERVABILITY_ABSENT_READERS" not in _config(_render("default"))
    absent = _config(_render("minimal"))["OBSERVABILITY_ABSENT_READERS"]
    settings = observability.Settings.model_validate({"OBSERVABILITY_ABSENT_READERS": absent})
    assert observability.absent_services(settings.absent_readers) == {"data_simulator"}


_UNITS = {"": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "Mi": 2**20, "Gi": 2**30}


def _bytes(size: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([a-zA-Z]*)", size).groups()  # type: ignore[union-attr]
    return int(number) * _UNITS[unit]


def test_redis_refuses_writes_before_its_limit_and_full_streams_fit(
    default_objects: list[dict[str, Any]],
) -> None:
    """Without `maxmemory` Redis grows until the container is OOM-killed, and then replays an
    AOF too big for the limit on every restart. The default stream length must fit below it:
    the per-event streams (entity events, KPI results, archive forwarding) at ~450 bytes an
    entry, and the capped `archival.events` at up to ~2 MB an entry."""
    (redis,) = _redis_statefulset(default_objects)["spec"]["template"]["spec"]["containers"]
    args = " ".join(redis["args"]).split()
    maxmemory = _bytes(args[args.index("--maxmemory") + 1])
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert maxmemory <= 0.8 * _bytes(redis["resources"]["limits"]["memory"])
    (config,) = [
        c
        for c in by_kind(default_objects, "ConfigMap")
        if c["metadata"]["name"].endswith("-config")
    ]
    maxlen = int(config["data"]["BUS_STREAM_MAXLEN"])
    per_event = [*channels.ENTITY_CHANNELS, channels.KPI_CALCULATED, channels.ARCHIVE_KPI_RESULTS]
    archival_cap = channels.channel_spec(channels.ARCHIVAL_EVENTS).maxlen
    assert archival_cap is not None
    assert len(per_event) * maxlen * 450 + archival_cap * 2 * 10**6 <= 0.9 * maxmemory


def test_external_endpoints_replace_in_chart_infrastructure() -> None:
    objects = _render("external")
    components = {component(t) for _o, t in pod_templates(objects)}
    assert not components & {"redis", "timescaledb", "minio", "minio-setup"}
    env = {
        component(t): {e["name"]: e.get("value") for e in t["spec"]["containers"][0].get("env", [])}
        for _o, t in pod_templates(objects)
    }
    assert env["gateway"]["REDIS_URL"] == "rediss://:$(REDIS_PASSWORD)@redis.example.com:6379/0"
    assert env["database"]["DATABASE_URL"] == (
        "postgresql://analytics:$(DATABASE_PASSWORD)@pg.example.com:5432/analytics?sslmode=require"
    )
    assert env["database"]["DATABASE_READONLY_URL"].startswith(
        "postgresql://ro:$(DATABASE_READONLY_PASSWORD)@"
    )


def test_private_cas_of_external_servers_are_mounted_and_named_in_the_urls() -> None:
    """A managed Redis or database signed by a CA of its own (not in the image's system CAs)
    is verified against the CA certificate of a given Secret: mounted read-only in the pods
    that connect to it, and named in their URLs (`ssl_ca_certs`, `sslrootcert`)."""
    values = json.loads(json.dumps(EXTERNAL))
    values["externalRedis"]["caSecret"] = "redis-ca"
    values["externalDatabase"].update(caSecret="db-ca", caSecretKey="root.pem")
    values["externalDatabase"]["sslmode"] = "verify-full"
    result = _template_with(values)
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    redis_ca = "/etc/analytics-engine/ca/redis/ca.crt"
    database_ca = "/etc/analytics-engine/ca/database/root.pem"
    for _obj, template in pod_templates(objects):
        name = component(template)
        if name not in APP_COMPONENTS:
            continue
        (container,) = containers(template)
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        secrets = {v["name"]: v["secret"] for v in template["spec"]["volumes"] if "secret" in v}
        if name == "operator":  # talks to Kubernetes and the metadata service only
            assert not secrets
            continue
        assert env["REDIS_URL"].endswith(f"/0?ssl_ca_certs={redis_ca}"), name
        assert mounts["/etc/analytics-engine/ca/redis"]["readOnly"] is True
        assert secrets["redis-ca"] == {
            "secretName": "redis-ca",
            "items": [{"key": "ca.crt", "path": "ca.crt"}],
        }
        if name in ("database", "metadata"):
            assert env["DATABASE_URL"].endswith(
                f"?sslmode=verify-full&sslrootcert={database_ca}"
            ), name
            assert secrets["database-ca"]["secretName"] == "db-ca"
            assert mounts["/etc/analytics-engine/ca/database"]["readOnly"] is True
        else:
            assert "database-ca" not in secrets, name
    # without a CA Secret nothing changes (the external value set above)
    plain = _render("external")
    assert not any(
        "ssl_ca_certs" in (e.get("value") or "")
        for _o, t in pod_templates(plain)
        for c in containers(t)
        for e in c.get("env", [])
    )


# --------------------------------------------------------------------------- Redis ACL users

# Value sets whose services connect as their own ACL user (all but the shared-password fallback).
ACL_VALUE_SETS = sorted(set(VALUE_SETS) - {"external"})
REDIS_KEY_PREFIX = "redis-password-"


def _decode(secret: dict[str, Any]) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    return {**data, **(secret.get("stringData") or {})}


def _redis_statefulset(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (sts,) = [
        o for o in by_kind(objects, "StatefulSet") if o["metadata"]["name"].endswith("-redis")
    ]
    return sts


def _core_acl_lines(passwords: dict[str, str], admin_password: str) -> list[str]:
    """The core's ACL file plus the chart's probe user (after `admin`)."""
    lines = acl_file(passwords, admin_password=admin_password).splitlines()
    healthcheck = (
        f"user healthcheck on >{passwords['healthcheck']} resetkeys resetchannels -@all +ping"
    )
    return [*lines[:2], healthcheck, *lines[2:]]


@pytest.mark.parametrize("value_set", ACL_VALUE_SETS)
def test_each_service_gets_only_its_own_redis_user(value_set: str) -> None:
    seen = set()
    for _obj, template in pod_templates(_render(value_set)):
        name = component(template)
        refs = [
            e["valueFrom"]["secretKeyRef"]
            for c in containers(template)
            for e in c.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})
        ]
        redis_keys = {r["key"] for r in refs if r["key"].startswith("redis-password")}
        if name == "operator" or name not in APP_COMPONENTS:
            if name != "redis":  # Redis's own probe user, tested below
                assert not redis_keys, f"{name} has Redis credentials {redis_keys}"
            continue
        user = SERVICES[name].source
        (c,) = template["spec"]["containers"]
        env = {e["name"]: e for e in c["env"]}
        assert redis_keys == {f"{REDIS_KEY_PREFIX}{user}"}, name
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == REDIS_KEY_PREFIX + user
        assert re.fullmatch(
            rf"rediss?://{user}:\$\(REDIS_PASSWORD\)@[\w.\-]+:\d+/\d+", env["REDIS_URL"]["value"]
        ), env["REDIS_URL"]
        assert not template["spec"].get("volumes", []) or not any(
            "secret" in v and "redis" in v["secret"]["secretName"]
            for v in template["spec"]["volumes"]
        ), name
        seen.add(name)
    expected = set(APP_COMPONENTS) - ({"simulator"} if value_set == "minimal" else set())
    assert seen == expected


def test_external_redis_with_acl_users_reads_the_existing_secret() -> None:
    objects = _render("external-secrets")
    assert not [s for s in by_kind(objects, "Secret") if "redis" in s["metadata"]["name"]]
    for _obj, template in pod_templates(objects):
        if component(template) == "gateway":
            env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
            assert (
                env["REDIS_URL"]["value"]
                == "redis://api_gateway:$(REDIS_PASSWORD)@redis.example.com:6379/0"
            )
            assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
                "name": "redis-creds",
                "key": "redis-password-api_gateway",
            }


def test_chart_redis_acl_rules_match_the_core() -> None:
    """Drift: files/redis-acl-rules.txt is what analytics_engine.core.acl defines today
    (fix with `python scripts/render_redis_acl.py`)."""
    lines = [
        line
        for line in (CHART / "files" / "redis-acl-rules.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    expected = [f"{u} {' '.join(acl_rules(u, a))}" for u, a in SERVICE_ACCESS.items()]
    assert lines == expected, "run: python scripts/render_redis_acl.py"


def test_redis_loads_the_rendered_acl_file_from_its_secret(
    default_objects: list[dict[str, Any]],
) -> None:
    sts = _redis_statefulset(default_objects)
    spec = sts["spec"]["template"]["spec"]
    (redis,) = spec["containers"]
    assert "--aclfile /etc/redis/acl/users.acl" in redis["args"][0]
    assert "requirepass" not in redis["args"][0]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["acl"]["secret"]["secretName"] == f"{RELEASE}-analytics-engine-redis"
    assert volumes["acl"]["secret"]["items"] == [{"key": "users.acl", "path": "users.acl"}]
    assert {"name": "acl", "mountPath": "/etc/redis/acl", "readOnly": True} in redis["volumeMounts"]
    assert "checksum/acl-rules" in sts["spec"]["template"]["metadata"]["annotations"]
    # The probes authenticate as `healthcheck`, which may only PING.
    for probe in ("livenessProbe", "readinessProbe"):
        assert "redis-cli --user healthcheck " in redis[probe]["exec"]["command"][-1]
    (auth,) = [e for e in redis["env"] if e["name"] == "REDISCLI_AUTH"]
    assert auth["valueFrom"]["secretKeyRef"]["key"] == f"{REDIS_KEY_PREFIX}healthcheck"
    assert not [e for e in redis["env"] if "PASSWORD" in e["name"]]


def test_rendered_acl_file_is_the_cores_with_one_password_per_user(
    default_objects: list[dict[str, Any]],
) -> None:
    (secret,) = [
        s
        for s in by_kind(default_objects, "Secret")
        if s["metadata"]["name"] == f"{RELEASE}-analytics-engine-redis"
    ]
    data = _decode(secret)
    acl = data.pop("users.acl")
    assert acl.splitlines()[0] == "user default off ~* &* +@all"
    admin = data.pop("redis-password")
    passwords = {k.removeprefix(REDIS_KEY_PREFIX): v for k, v in data.items()}
    assert set(passwords) == {"healthcheck", *SERVICE_ACCESS}
    assert len({admin, *passwords.values()}) == len(passwords) + 1, "passwords must differ"
    assert acl.splitlines() == _core_acl_lines(passwords, admin)


def test_existing_secret_acl_file_is_assembled_in_the_pod(tmp_path: Path) -> None:
    """With redis.auth.existingSecret the init container writes the ACL file; run its script
    against the rendered rules and compare with the core's file."""
    objects = _render("redis-existing-secret")
    assert not [s for s in by_kind(objects, "Secret") if "redis" in s["metadata"]["name"]]
    spec = _redis_statefulset(objects)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes["acl"] and volumes["acl"]["emptyDir"]["medium"] == "Memory"
    assert volumes["acl-passwords"]["secret"]["secretName"] == "redis-users"
    items = {i["path"]: i["key"] for i in volumes["acl-passwords"]["secret"]["items"]}
    assert items == {
        "admin": "redis-password",
        **{u: REDIS_KEY_PREFIX + u for u in ("healthcheck", *SERVICE_ACCESS)},
    }
    (cm,) = [
        c
        for c in by_kind(objects, "ConfigMap")
        if c["metadata"]["name"] == volumes["acl-rules"]["configMap"]["name"]
    ]
    (init,) = spec["initContainers"]
    sh = shutil.which("sh")
    if not sh:
        pytest.skip("no sh to run the init container's script")
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "rules.txt").write_text(cm["data"]["rules.txt"])
    (tmp_path / "pw").mkdir()
    passwords = {u: f"pw-{u}" for u in items}
    for user, password in passwords.items():
        (tmp_path / "pw" / user).write_text(password + "\n")  # as `--from-file` leaves it
    (tmp_path / "acl").mkdir()
    script = init["args"][0]
    for mount in init["volumeMounts"]:
        local = {"acl": "acl", "acl-rules": "rules", "acl-passwords": "pw"}[mount["name"]]
        script = script.replace(mount["mountPath"], str(tmp_path / local))
    subprocess.run([sh, "-c", script], check=True)
    written = (tmp_path / "acl" / "users.acl").read_text().splitlines()
    admin = passwords.pop("admin")
    assert written == _core_acl_lines(passwords, admin)
    assert written[0] == "user default off ~* &* +@all"
    # A missing password fails the pod instead of writing a user without one.
    (tmp_path / "pw" / "cli").write_text("")
    assert subprocess.run([sh, "-c", script], capture_output=True, check=False).returncode != 0


def _redis_functions(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """The Redis container, and the function library of the ConfigMap it mounts."""
    spec = _redis_statefulset(objects)["spec"]["template"]["spec"]
    (redis,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    (cm,) = [
        c
        for c in by_kind(objects, "ConfigMap")
        if c["metadata"]["name"] == volumes["functions"]["configMap"]["name"]
    ]
    return redis, cm["data"]["library.lua"]


@pytest.mark.parametrize("value_set", ["default", "redis-existing-secret"])
def test_redis_loads_the_publish_functions_as_admin_and_rolls_when_they_change(
    value_set: str,
) -> None:
    objects = _render(value_set)
    sts = _redis_statefulset(objects)
    redis, library = _redis_functions(objects)
    assert library == LIBRARY_CODE, "run: python scripts/render_redis_acl.py"
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    digest = hashlib.sha256((CHART / "files" / "redis-functions.lua").read_bytes()).hexdigest()
    assert annotations["checksum/functions"] == digest
    spec = sts["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["admin-password"]["secret"]["items"] == [
        {"key": "redis-password", "path": "password"}
    ]
    mounts = {m["mountPath"]: m["name"] for m in redis["volumeMounts"]}
    assert mounts["/etc/redis/functions"] == "functions"
    assert mounts["/run/redis-admin"] == "admin-password"
    hook = redis["lifecycle"]["postStart"]["exec"]["command"][-1]
    assert "--user admin" in hook and "FUNCTION LOAD REPLACE" in hook


def test_the_redis_post_start_hook_waits_for_redis_then_loads_the_library(
    default_objects: list[dict[str, Any]], tmp_path: Path
) -> None:
    """Run the hook against a real Redis with the platform's ACL users, started after the
    hook (it must wait), then call the function as a service; a wrong admin password fails."""
    sh, cli = shutil.which("sh"), shutil.which("redis-cli")
    if not sh or not cli:
        pytest.skip("no sh or redis-cli to run the hook")
    redis, library = _redis_functions(default_objects)
    (tmp_path / "functions").mkdir()
    (tmp_path / "functions" / "library.lua").write_text(library)
    (tmp_path / "admin").mkdir()
    (tmp_path / "admin" / "password").write_text("admin-pw\n")
    users = tmp_path / "users.acl"
    users.write_text(acl_file({s: f"pw-{s}" for s in SERVICE_ACCESS}, admin_password="admin-pw"))
    server = RedisServer(tmp_path / "redis", acl_file=users)  # loads nothing itself
    hook = redis["lifecycle"]["postStart"]["exec"]["command"][-1]
    hook = hook.replace("/etc/redis/functions", str(tmp_path / "functions"))
    hook = hook.replace("/run/redis-admin", str(tmp_path / "admin"))
    hook = hook.replace("-h 127.0.0.1", f"-h 127.0.0.1 -p {server.port}")
    waiting = subprocess.Popen([sh, "-c", hook], stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        assert waiting.poll() is None, waiting.stderr.read() if waiting.stderr else ""
        with server:
            assert waiting.wait(timeout=30) == 0
            simulator = f"redis://data_simulator:pw-data_simulator@127.0.0.1:{server.port}/0"
            with redis_sync.Redis.from_url(simulator) as client:
                assert client.fcall(PUBLISH_FUNCTION, 0, FIELD) == []
            (tmp_path / "admin" / "password").write_text("wrong\n")
            failed = subprocess.run(
                [sh, "-c", hook], check=False, capture_output=True, text=True, timeout=30
            )
            assert failed.returncode != 0 and "WRONGPASS" in failed.stderr
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()


# --------------------------------------------------------------------------- selectors


def test_selectors_match_pod_labels(rendered: list[dict[str, Any]]) -> None:
    templates = [t["metadata"]["labels"] for _o, t in pod_templates(rendered)]
    for obj, template in pod_templates(rendered):
        if obj["kind"] in {"Deployment", "StatefulSet"}:
            assert selector_matches(obj["spec"]["selector"], template["metadata"]["labels"]), (
                name_of(obj)
            )
            assert set(obj["spec"]["selector"]["matchLabels"]) == {
                "app.kubernetes.io/name",
                "app.kubernetes.io/instance",
                "app.kubernetes.io/component",
            }
    for svc in by_kind(rendered, "Service"):
        assert any(
            selector_matches({"matchLabels": svc["spec"]["selector"]}, t) for t in templates
        ), name_of(svc)
    for pdb in by_kind(rendered, "PodDisruptionBudget"):
        assert any(selector_matches(pdb["spec"]["selector"], t) for t in templates), name_of(pdb)
    workloads = {o["metadata"]["name"] for o in by_kind(rendered, "Deployment")}
    for hpa in by_kind(rendered, "HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] in workloads
    for np in by_kind(rendered, "NetworkPolicy"):
        assert any(selector_matches(np["spec"]["podSelector"], t) for t in templates), name_of(np)


def test_hpa_replaces_replicas() -> None:
    objects = _render("hpa")
    scaled = {
        h["spec"]["scaleTargetRef"]["name"] for h in by_kind(objects, "HorizontalPodAutoscaler")
    }
    assert scaled == {f"{RELEASE}-analytics-engine-database"}
    for dep in by_kind(objects, "Deployment"):
        assert ("replicas" in dep["spec"]) is (dep["metadata"]["name"] not in scaled)
        if dep["metadata"]["name"] in scaled:  # possibly several replicas: spread over nodes
            assert "podAntiAffinity" in dep["spec"]["template"]["spec"]["affinity"]


def test_retention_outlives_one_pod_or_node() -> None:
    """The observability service trims the streams, and a full stream holds its publishers back:
    it runs two replicas, spread over nodes, and a disruption takes at most one."""
    objects = _render("default")
    [dep] = [
        d
        for d in by_kind(objects, "Deployment")
        if d["metadata"]["name"].endswith("-observability")
    ]
    assert dep["spec"]["replicas"] == 2
    [term] = dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selector_matches(term["podAffinityTerm"]["labelSelector"], labels)
    [pdb] = [
        p
        for p in by_kind(objects, "PodDisruptionBudget")
        if p["metadata"]["name"].endswith("-observability")
    ]
    assert pdb["spec"]["maxUnavailable"] == 1
    # a single replica gets no anti-affinity
    for dep in by_kind(objects, "Deployment"):
        if dep["spec"].get("replicas") == 1:
            assert "affinity" not in dep["spec"]["template"]["spec"], name_of(dep)


def test_the_calculation_engine_runs_as_exactly_one_replica() -> None:
    """Its window state lives in one process (checkpointed to Redis): never two at once."""
    [dep] = [
        d
        for d in by_kind(_render("default"), "Deployment")
        if d["metadata"]["name"].endswith("-calculation")
    ]
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    result = subprocess.run(
        [helm(), "template", "x", str(CHART), "--set", "calculation.replicaCount=2"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "calculation.replicaCount must be 1" in result.stderr


# --------------------------------------------------------------------------- network policies


def _policies_for(
    labels: dict[str, str], policies: list[dict[str, Any]], kind: str
) -> list[dict[str, Any]]:
    return [
        p
        for p in policies
        if kind in p["spec"].get("policyTypes", [])
        and selector_matches(p["spec"]["podSelector"], labels)
    ]


def _port_allowed(rule: dict[str, Any], port: int, port_name: str) -> bool:
    ports = rule.get("ports")
    return not ports or any(p.get("port") in (port, port_name) for p in ports)


def _peer_allowed(rule: dict[str, Any], key: str, labels: dict[str, str]) -> bool:
    peers = rule.get(key)
    if peers is None:
        return True  # no `to`/`from`: everything
    return any(
        "podSelector" in peer
        and "namespaceSelector" not in peer
        and selector_matches(peer["podSelector"], labels)
        for peer in peers
    )


def allowed_flows(objects: list[dict[str, Any]]) -> set[tuple[str, str, int]]:
    policies = by_kind(objects, "NetworkPolicy")
    pods = [t for _o, t in pod_templates(objects)]
    flows = set()
    for src in pods:
        src_labels = src["metadata"]["labels"]
        for dst in pods:
            dst_labels = dst["metadata"]["labels"]
            for c in dst["spec"]["containers"]:
                for port in c.get("ports", []):
                    number, pname = port["containerPort"], port.get("name", "")
                    egress = any(
                        _port_allowed(r, number, pname) and _peer_allowed(r, "to", dst_labels)
                        for p in _policies_for(src_labels, policies, "Egress")
                        for r in p["spec"].get("egress", [])
                    )
                    ingress = any(
                        _port_allowed(r, number, pname) and _peer_allowed(r, "from", src_labels)
                        for p in _policies_for(dst_labels, policies, "Ingress")
                        for r in p["spec"].get("ingress", [])
                    )
                    if egress and ingress:
                        flows.add((component(src), component(dst), number))
    return flows


def test_network_policies_allow_exactly_the_architecture_flows(
    default_objects: list[dict[str, Any]],
) -> None:
    assert allowed_flows(default_objects) == EXPECTED_FLOWS


def test_every_pod_is_covered_by_network_policies(rendered: list[dict[str, Any]]) -> None:
    policies = by_kind(rendered, "NetworkPolicy")
    if not policies:
        assert (
            not any(o["kind"] == "NetworkPolicy" for o in rendered)
            and _render("minimal") is rendered
        )  # only the set that disables them
        return
    deny = [p for p in policies if p["metadata"]["name"].endswith("-default-deny")]
    assert len(deny) == 1 and "ingress" not in deny[0]["spec"] and "egress" not in deny[0]["spec"]
    for obj, template in pod_templates(rendered):
        labels = template["metadata"]["labels"]
        assert selector_matches(deny[0]["spec"]["podSelector"], labels), name_of(obj)
        own = [
            p
            for p in policies
            if p is not deny[0] and selector_matches(p["spec"]["podSelector"], labels)
        ]
        assert own, f"{name_of(obj)} has no NetworkPolicy of its own"
        for p in own:
            assert set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
            # DNS is the only egress every pod gets beyond its flows.
            assert p["spec"]["egress"][0]["ports"] == [
                {"protocol": "UDP", "port": 53},
                {"protocol": "TCP", "port": 53},
            ]


def test_gateway_ingress_restricted_to_ingress_controller() -> None:
    (policy,) = [
        p
        for p in by_kind(_render("ingress"), "NetworkPolicy")
        if p["metadata"]["name"].endswith("-gateway")
    ]
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
            "podSelector": {},
        }
    ]


def test_gateway_ingress_from_anywhere_includes_pods_of_the_cluster() -> None:
    """`networkPolicy.allowExternal` means any source. Whether an `ipBlock` matches the IP of a
    pod is up to the network plugin (Kubernetes leaves it undefined; Cilium never matches pods
    by CIDR): an in-cluster ingress controller must be let in by a selector, or the chart's own
    Ingress answers 503 on such clusters."""
    (policy,) = [
        p
        for p in by_kind(_render("default"), "NetworkPolicy")
        if p["metadata"]["name"].endswith("-gateway")
    ]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": "http"}]
    assert {"namespaceSelector": {}} in rule["from"]  # every pod of every namespace
    assert {"ipBlock": {"cidr": "0.0.0.0/0"}} in rule["from"]
    assert {"ipBlock": {"cidr": "::/0"}} in rule["from"]


def test_prometheus_may_scrape_every_service_when_monitoring() -> None:
    objects = _render("monitoring")
    for p in by_kind(objects, "NetworkPolicy"):
        name = p["metadata"]["labels"]["app.kubernetes.io/component"]
        if name in APP_COMPONENTS:
            assert any(
                r["from"][0].get("namespaceSelector", {}).get("matchLabels")
                == {"kubernetes.io/metadata.name": "monitoring"}
                for r in p["spec"]["ingress"]
            ), name


# --------------------------------------------------------------------------- RBAC


def test_rbac_grants_nothing_beyond_the_operator_list(rendered: list[dict[str, Any]]) -> None:
    """The operator's list, and the cleanup hook's, each to its own ServiceAccount."""
    for role in [*by_kind(rendered, "Role"), *by_kind(rendered, "ClusterRole")]:
        owner = role["metadata"]["labels"]["app.kubernetes.io/component"]
        assert owner in TOKEN_COMPONENTS, name_of(role)
        allowed_rules = CLEANUP_RBAC_ALLOWED if owner == CLEANUP else RBAC_ALLOWED
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], name_of(role)
            assert not rule.get("resourceNames") and not rule.get("nonResourceURLs")
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    allowed = allowed_rules.get((group, resource))
                    assert allowed is not None, f"{name_of(role)}: {group}/{resource}"
                    assert set(rule["verbs"]) <= allowed, f"{name_of(role)}: {group}/{resource}"
    bindings = [*by_kind(rendered, "RoleBinding"), *by_kind(rendered, "ClusterRoleBinding")]
    for binding in bindings:
        owner = binding["metadata"]["labels"]["app.kubernetes.io/component"]
        assert owner in TOKEN_COMPONENTS, name_of(binding)
        assert [s["kind"] for s in binding["subjects"]] == ["ServiceAccount"]
        assert binding["subjects"][0]["name"] == f"{RELEASE}-analytics-engine-{owner}"


def test_rbac_scopes() -> None:
    default = _render("default")
    (cluster_role,) = by_kind(default, "ClusterRole")
    assert [r["resources"] for r in cluster_role["rules"]] == [["customresourcedefinitions"]]
    assert [r["metadata"]["namespace"] for r in by_kind(default, "Role")] == [NAMESPACE]
    namespaces = _render("operator-namespaces")
    assert sorted(r["metadata"]["namespace"] for r in by_kind(namespaces, "RoleBinding")) == [
        "team-a",
        "team-b",
    ]
    clusterwide = _render("operator-clusterwide")
    assert [name_of(r) for r in by_kind(clusterwide, "Role")] == [
        f"Role/{RELEASE}-analytics-engine-{CLEANUP}"  # samples are on: the hook's own
    ]
    (cluster_role,) = by_kind(clusterwide, "ClusterRole")
    resources = {res for r in cluster_role["rules"] for res in r["resources"]}
    assert {"kpidefinitions", "clusterkopfpeerings"} <= resources
    assert not {"kopfpeerings", "namespaces"} & resources  # a clusterwide kopf never uses them
    (operator,) = [
        d for d in by_kind(clusterwide, "Deployment") if d["metadata"]["name"].endswith("-operator")
    ]
    env = {
        e["name"]: e.get("value")
        for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert "OPERATOR_NAMESPACES" not in env and env["OPERATOR_PEERING_NAME"] == "analytics-engine"


# --------------------------------------------------------------------------- samples' cleanup hook

HOOK_KINDS = ["ServiceAccount", "Role", "RoleBinding", "Job"]


def _render_values(values: dict[str, Any]) -> list[dict[str, Any]]:
    result = subprocess.run(
        [helm(), "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", "/dev/stdin"],
        input=json.dumps(values),
        capture_output=True,
        text=True,
        check=True,
    )
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def cleanup_objects(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The cleanup hook's objects by kind (one each)."""
    found = [
        o for o in objects if o["metadata"]["labels"].get("app.kubernetes.io/component") == CLEANUP
    ]
    by = {o["kind"]: o for o in found}
    assert len(by) == len(found), [name_of(o) for o in found]
    return by


def test_samples_cleanup_hook_renders_only_for_the_release_samples_and_operator() -> None:
    """The hook releases the release's own samples, which only its operator finalizes."""
    expected = {*HOOK_KINDS, "NetworkPolicy"}
    assert set(cleanup_objects(_render("samples"))) == expected
    assert set(cleanup_objects(_render("operator-clusterwide"))) == expected
    for value_set in ("default", "operator-namespaces", "minimal"):
        assert not cleanup_objects(_render(value_set)), value_set
    samples = {"enabled": True}
    for values in (
        {"samples": samples, "operator": {"enabled": False}},
        {"samples": {**samples, "cleanup": {"enabled": False}}},
    ):
        assert not cleanup_objects(_render_values(values)), values
    # Without NetworkPolicies the hook needs none of its own.
    unfenced = _render_values({"samples": samples, "networkPolicy": {"enabled": False}})
    assert set(cleanup_objects(unfenced)) == set(HOOK_KINDS)


def test_samples_cleanup_hook_runs_before_delete_after_its_rbac() -> None:
    hook = cleanup_objects(_render("samples"))
    annotations = {kind: hook[kind]["metadata"]["annotations"] for kind in HOOK_KINDS}
    for kind in HOOK_KINDS:
        assert annotations[kind]["helm.sh/hook"] == "pre-delete", kind
    for kind in ("ServiceAccount", "Role", "RoleBinding"):
        # Created before the Job; gone once the hook succeeded (and before a retry).
        assert int(annotations[kind]["helm.sh/hook-weight"]) < int(
            annotations["Job"]["helm.sh/hook-weight"]
        )
        assert annotations[kind]["helm.sh/hook-delete-policy"] == (
            "before-hook-creation,hook-succeeded"
        )
    # The Job's log is the record of KPIs left behind: it stays until its TTL, a failed one
    # until the next attempt replaces it.
    assert annotations["Job"]["helm.sh/hook-delete-policy"] == "before-hook-creation"
    assert 0 < hook["Job"]["spec"]["ttlSecondsAfterFinished"] <= 86400
    # The NetworkPolicy is a release object: in place before any hook runs.
    assert "helm.sh/hook" not in (hook["NetworkPolicy"]["metadata"].get("annotations") or {})


def test_samples_cleanup_role_is_least_privilege() -> None:
    hook = cleanup_objects(_render("samples"))
    role, binding, account = hook["Role"], hook["RoleBinding"], hook["ServiceAccount"]
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [
        {
            "apiGroups": ["analyticsengine.io"],
            "resources": ["kpidefinitions"],
            "verbs": ["list", "get", "delete", "patch"],
        }
    ]
    assert binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    ]
    assert account["automountServiceAccountToken"] is False
    # Nothing cluster-scoped for the hook, whatever the operator's scope.
    for value_set in ("samples", "operator-clusterwide"):
        objects = _render(value_set)
        for kind in ("ClusterRole", "ClusterRoleBinding"):
            assert all(
                o["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
                for o in by_kind(objects, kind)
            )


def test_samples_cleanup_job_releases_exactly_the_samples() -> None:
    objects = _render("samples")
    hook = cleanup_objects(objects)
    job, template = hook["Job"], hook["Job"]["spec"]["template"]
    spec = template["spec"]
    (container,) = spec["containers"]
    assert container["command"] == ["python", "-m", "analytics_engine_operator.release"]
    assert spec["serviceAccountName"] == hook["ServiceAccount"]["metadata"]["name"]
    assert spec["automountServiceAccountToken"] is True
    assert spec["restartPolicy"] == "Never"
    assert 0 <= job["spec"]["backoffLimit"] <= 5
    env = {e["name"]: e["value"] for e in container["env"]}
    timeout = int(env["KPI_RELEASE_TIMEOUT"])
    # Bounded, and long enough for the operator's time plus the finalizer removal.
    assert timeout + 30 <= job["spec"]["activeDeadlineSeconds"] < 300  # helm's default --timeout
    assert env["KPI_RELEASE_NAMESPACE"] == NAMESPACE
    # The selector picks every sample of the release, and nothing else the chart renders.
    terms = dict(term.split("=", 1) for term in env["KPI_RELEASE_SELECTOR"].split(","))
    assert terms == {
        "app.kubernetes.io/name": "analytics-engine",
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": "samples",
    }
    samples = by_kind(objects, "KPIDefinition")
    assert len(samples) == 4
    for obj in objects:
        labels = obj["metadata"].get("labels") or {}
        selected = all(labels.get(k) == v for k, v in terms.items())
        assert selected == (obj["kind"] == "KPIDefinition"), name_of(obj)
    # The application pods' restricted contexts and image.
    [operator] = [d for d in by_kind(objects, "Deployment") if name_of(d).endswith("-operator")]
    op_spec = operator["spec"]["template"]["spec"]
    assert spec["securityContext"] == op_spec["securityContext"]
    assert container["securityContext"] == op_spec["containers"][0]["securityContext"]
    assert container["image"] == op_spec["containers"][0]["image"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_samples_cleanup_timeouts_come_from_the_values() -> None:
    values = {
        "samples": {
            "enabled": True,
            "cleanup": {"timeoutSeconds": 600, "activeDeadlineSeconds": 900, "backoffLimit": 0},
        },
        "operator": {"tolerations": [{"key": "dedicated", "operator": "Exists"}]},
    }
    job = cleanup_objects(_render_values(values))["Job"]
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KPI_RELEASE_TIMEOUT"] == "600"
    assert job["spec"]["activeDeadlineSeconds"] == 900
    assert job["spec"]["backoffLimit"] == 0
    # It runs where the operator may run.
    assert job["spec"]["template"]["spec"]["tolerations"] == values["operator"]["tolerations"]
    result = _template_with(
        {
            "samples": {
                "enabled": True,
                "cleanup": {"timeoutSeconds": 300, "activeDeadlineSeconds": 310},
            }
        }
    )
    assert result.returncode != 0
    assert "samples.cleanup.activeDeadlineSeconds must exceed" in result.stderr


def test_samples_cleanup_may_reach_only_the_api_server() -> None:
    objects = _render("samples")
    hook = cleanup_objects(objects)
    policy = hook["NetworkPolicy"]["spec"]
    assert policy["ingress"] == []
    [operator_policy] = [
        p for p in by_kind(objects, "NetworkPolicy") if name_of(p).endswith("-operator")
    ]
    api_server = operator_policy["spec"]["egress"][-1]  # the operator's rule, reused
    assert {"ipBlock": {"cidr": "0.0.0.0/0"}} in api_server["to"]
    assert policy["egress"][1:] == [api_server]  # after DNS, which every pod gets
    assert not [flow for flow in allowed_flows(objects) if CLEANUP in flow[:2]]
    assert allowed_flows(objects) == EXPECTED_FLOWS


# --------------------------------------------------------------------------- values


def _template_with(values: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """`helm template` with `values`, not checked (for values the chart must refuse)."""
    return subprocess.run(
        [helm(), "template", RELEASE, str(CHART), "--values", "/dev/stdin"],
        input=json.dumps(values),
        capture_output=True,
        text=True,
        check=False,
    )


def test_validate_values_reports_every_problem_at_once() -> None:
    values = {"redis": {"enabled": False}, "minio": {"enabled": False}, "image": {"tag": "latest"}}
    result = _template_with(values)
    assert result.returncode != 0
    for needle in (
        "externalRedis.host",
        "externalRedis.aclUsers needs externalRedis.existingSecret",
        "externalS3.endpoint",
        "image.tag must not be 'latest'",
    ):
        assert needle in result.stderr


def test_passwords_that_a_connection_url_cannot_carry_are_refused() -> None:
    """Passwords go into REDIS_URL / DATABASE_URL unencoded: `p@ss/word` would be read as
    password `p`, host `ss`."""
    values = {"timescaledb": {"auth": {"password": "p@ss/word", "readonlyPassword": "ok-1_x.y~z"}}}
    result = _template_with(values)
    assert result.returncode != 0
    assert "timescaledb.auth.password must be URL-safe" in result.stderr
    assert "readonlyPassword" not in result.stderr


@pytest.mark.parametrize(
    "api_keys",
    [
        "k1:admin",  # too short a key
        "0123456789abcdef",  # no scope
        "0123456789abcdef:write",  # no such scope
        "0123456789 abcdef:read",  # whitespace in the key
        "0123456789abcdef:admin, :read",  # no key
        "0123456789abcdef:admin, fedcba9876543210:read",
        "0123456789abcdef:admin,0123456789abcdef:read",  # a key twice
        "a:b:0123456789abcdef:read,",  # the scope follows the last colon; empty pairs skipped
    ],
)
def test_gateway_api_keys_the_gateway_refuses_are_refused(api_keys: str) -> None:
    """A `GATEWAY_API_KEYS` the gateway cannot parse crash-loops it (configuration error at
    start): `helm install` refuses it instead, without echoing the secret."""
    try:
        parse_api_keys(api_keys)
        valid = True
    except ValueError:
        valid = False
    result = _template_with({"gateway": {"auth": {"apiKeys": api_keys}}})
    assert (result.returncode == 0) is valid, result.stderr
    if not valid:
        assert "gateway.auth.apiKeys" in result.stderr
        assert api_keys.split(":", maxsplit=1)[0] not in result.stderr


@pytest.mark.parametrize(
    ("size", "valid"),
    [
        # redis.conf: "1k => 1000 bytes, 1kb => 1024 bytes, 1m, 1mb, 1g, 1gb ... units are
        # case insensitive so 1GB 1Gb 1gB are all the same"
        *((s, True) for s in ("1073741824", "900m", "2G", "1GB", "1Gb", "512MB", "64k", "2b")),
        *((s, False) for s in ("1GiB", "1.5gb", "2 gb", "gb", "1t")),
    ],
)
def test_redis_sizes_are_checked_as_redis_reads_them(size: str, valid: bool) -> None:
    result = _template_with({"redis": {"maxmemory": size, "aofRewriteMinSize": size}})
    assert (result.returncode == 0) is valid, result.stderr


def test_schema_rejects_unknown_values() -> None:
    result = subprocess.run(
        [helm(), "template", RELEASE, str(CHART), "--set", "gateway.replicas=2"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0 and "replicas" in result.stderr


def test_schema_accepts_what_the_services_and_kubernetes_accept() -> None:
    """`SIMULATOR_RATE` is a float (events per second, e.g. 0.5) and a PodDisruptionBudget's
    maxUnavailable may be a percentage: the schema must not refuse either."""
    values: dict[str, Any] = {
        c: {"pdb": {"maxUnavailable": "50%"}} for c in (*APP_COMPONENTS, "operator")
    }
    values["simulator"]["rate"] = 0.5
    result = _template_with(values)
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    [simulator] = [t for _o, t in pod_templates(objects) if component(t) == "simulator"]
    env = {e["name"]: e["value"] for e in containers(simulator)[0]["env"] if "value" in e}
    settings = simulator_service.Settings.model_validate({"SIMULATOR_RATE": env["SIMULATOR_RATE"]})
    assert settings.rate == 0.5
    pdbs = by_kind(objects, "PodDisruptionBudget")
    assert len(pdbs) == len(APP_COMPONENTS) + 1
    assert {p["spec"]["maxUnavailable"] for p in pdbs} == {"50%"}
    # ... and still refuses what Kubernetes would
    result = _template_with({"gateway": {"pdb": {"maxUnavailable": "half"}}})
    assert result.returncode != 0 and "maxUnavailable" in result.stderr


def test_schema_refuses_a_stream_length_the_services_refuse() -> None:
    """Every service refuses `BUS_STREAM_MAXLEN` below 1000 (a configuration error at start,
    crash-looping every pod): `helm install` must refuse it instead."""
    minimum = simulator_service.Settings.model_fields["stream_maxlen"].metadata[0].ge
    assert _template_with({"config": {"streamMaxlen": minimum}}).returncode == 0
    result = _template_with({"config": {"streamMaxlen": minimum - 1}})
    assert result.returncode != 0 and "streamMaxlen" in result.stderr


# --------------------------------------------------------------------------- drift


def _run_script(name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )


def test_chart_crds_and_samples_match_k8s() -> None:
    result = _run_script("sync_crds.py")
    assert result.returncode == 0, result.stdout + result.stderr


def test_k8s_base_schema_and_readme_match_the_chart() -> None:
    helm()
    result = _run_script("render_k8s.py")
    assert result.returncode == 0, result.stdout + result.stderr
