"""The KPIDefinition CRD (k8s/crds/) against the samples (k8s/samples/) and known-bad specs.

There is no API server here, so the two halves of Kubernetes' validation are emulated:

* the structural `openAPIV3Schema` with `jsonschema` (x-kubernetes-* keys translated or dropped;
  objects reject unknown fields, like `kubectl apply`'s default strict field validation);
* every `x-kubernetes-validations` CEL rule with `celpy`, with `self` (and `oldSelf` for
  transition rules) typed like Kubernetes does: `number` fields are CEL doubles.

The real API server evaluates the same CRD in the kind e2e suite.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml
from celpy import celtypes

from analytics_engine.kpi.definitions import (
    KPIDefinition,
    QuerySpec,
    Thresholds,
    Window,
    validation_errors,
)
from analytics_engine_operator import kpidefinition
from analytics_engine_operator import status as operator_status

ROOT = Path(__file__).resolve().parents[3]
CRD_PATH = ROOT / "k8s" / "crds" / "kpidefinitions.analyticsengine.io.yaml"
SAMPLES = sorted((ROOT / "k8s" / "samples").glob("*.yaml"))
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def load_crd() -> dict[str, Any]:
    crd: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
    return crd


CRD = load_crd()
VERSION = CRD["spec"]["versions"][0]
SCHEMA: dict[str, Any] = VERSION["schema"]["openAPIV3Schema"]


# --- structural schema -> JSON schema ------------------------------------------------------


def to_jsonschema(node: Mapping[str, Any]) -> dict[str, Any]:
    """Translate a structural schema node into plain JSON schema (what the API server checks)."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {name: to_jsonschema(sub) for name, sub in value.items()}
        elif key == "items":
            out[key] = to_jsonschema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [to_jsonschema(sub) for sub in value]
        elif key == "not" or (key == "additionalProperties" and isinstance(value, Mapping)):
            out[key] = to_jsonschema(value)
        else:
            out[key] = value
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


VALIDATOR = jsonschema.Draft7Validator(to_jsonschema(SCHEMA))


def schema_errors(obj: Mapping[str, Any]) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in VALIDATOR.iter_errors(obj)
    ]


# --- CEL rules ------------------------------------------------------------------------------

CEL_ENV = celpy.Environment()


def to_cel(schema: Mapping[str, Any], value: Any) -> Any:
    """Type a JSON value like Kubernetes does for CEL, guided by its schema."""
    if value is None:
        return None
    if schema.get("x-kubernetes-int-or-string"):
        return celtypes.IntType(value) if isinstance(value, int) else celtypes.StringType(value)
    kind = schema.get("type")
    if kind == "object" and "properties" in schema:
        props = schema["properties"]
        return celtypes.MapType(
            {celtypes.StringType(k): to_cel(props.get(k, {}), v) for k, v in value.items()}
        )
    if kind == "array":
        item_schema = schema.get("items", {})
        return celtypes.ListType([to_cel(item_schema, item) for item in value])
    if kind == "number":
        return celtypes.DoubleType(float(value))
    if kind == "integer":
        return celtypes.IntType(value)
    if kind == "string":
        return celtypes.StringType(value)
    if kind == "boolean":
        return celtypes.BoolType(value)
    return celpy.json_to_cel(value)


def iter_rules(node: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    for rule in node.get("x-kubernetes-validations", ()):
        yield path, rule
    for name, sub in node.get("properties", {}).items():
        yield from iter_rules(sub, f"{path}.{name}")
    if "items" in node:
        yield from iter_rules(node["items"], f"{path}[]")


def evaluate_rule(rule: str, self_value: Any, old_value: Any = None) -> bool:
    program = CEL_ENV.program(CEL_ENV.compile(rule))
    activation: dict[str, Any] = {"self": self_value}
    if old_value is not None:
        activation["oldSelf"] = old_value
    result = program.evaluate(activation)
    if isinstance(result, Exception):
        raise result
    return bool(result)


def cel_errors(node: Mapping[str, Any], value: Any, old: Any = None, path: str = "") -> list[str]:
    """Messages of every failing rule, walking the schema like the API server."""
    if value is None:
        return []
    errors: list[str] = []
    for rule in node.get("x-kubernetes-validations", ()):
        is_transition = "oldSelf" in rule["rule"]
        if is_transition and old is None:
            continue  # transition rules only run on updates
        ok = evaluate_rule(
            rule["rule"], to_cel(node, value), to_cel(node, old) if is_transition else None
        )
        if not ok:
            errors.append(f"{path}{rule.get('fieldPath', '')}: {rule['message']}")
    if isinstance(value, Mapping):
        for name, sub in node.get("properties", {}).items():
            old_sub = old.get(name) if isinstance(old, Mapping) else None
            errors.extend(cel_errors(sub, value.get(name), old_sub, f"{path}.{name}"))
    if isinstance(value, list) and "items" in node:
        for index, item in enumerate(value):
            errors.extend(cel_errors(node["items"], item, None, f"{path}[{index}]"))
    return errors


def all_errors(obj: Mapping[str, Any], old: Mapping[str, Any] | None = None) -> list[str]:
    return schema_errors(obj) + cel_errors(SCHEMA, obj, old)


# --- fixtures -------------------------------------------------------------------------------


def load_sample(path: Path) -> dict[str, Any]:
    sample: dict[str, Any] = yaml.safe_load(path.read_text())
    return sample


def base() -> dict[str, Any]:
    return load_sample(ROOT / "k8s" / "samples" / "orders-revenue-by-region.yaml")


def with_spec(**changes: Any) -> dict[str, Any]:
    """The revenue sample with spec keys replaced (None deletes the key)."""
    obj = base()
    for key, value in changes.items():
        if value is None:
            obj["spec"].pop(key, None)
        else:
            obj["spec"][key] = value
    return obj


# --- the CRD itself -------------------------------------------------------------------------


def test_crd_identity_matches_the_operator() -> None:
    assert CRD["apiVersion"] == "apiextensions.k8s.io/v1"
    assert CRD["metadata"]["name"] == kpidefinition.RESOURCE
    spec = CRD["spec"]
    assert spec["group"] == kpidefinition.GROUP
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == kpidefinition.KIND
    assert spec["names"]["plural"] == kpidefinition.PLURAL
    assert "kpi" in spec["names"]["shortNames"]
    assert [v["name"] for v in spec["versions"]] == [kpidefinition.VERSION]
    assert VERSION["served"] and VERSION["storage"]
    assert VERSION["subresources"] == {"status": {}}


def test_printer_columns() -> None:
    columns = {c["name"]: c for c in VERSION["additionalPrinterColumns"]}
    assert list(columns)[:5] == ["Code", "Aggregation", "Window", "Synced", "Age"]
    assert columns["Synced"]["jsonPath"] == '.status.conditions[?(@.type=="Synced")].status'
    assert columns["Age"]["type"] == "date"


def test_status_schema_has_what_the_operator_writes() -> None:
    status = SCHEMA["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True  # kopf's own state
    assert {"phase", "observedGeneration", "syncedVersion", "conditions"} <= set(
        status["properties"]
    )
    condition = status["properties"]["conditions"]["items"]["properties"]
    assert {"type", "status", "reason", "message", "lastTransitionTime"} <= set(condition)
    # A status patch with a phase outside the enum is refused by the API server.
    assert set(status["properties"]["phase"]["enum"]) == {p.value for p in operator_status.Phase}


def test_spec_covers_every_field_of_the_kpi_model() -> None:
    model_fields = {
        "code", "display_name", "description", "entity_type", "aggregation", "field", "filter",
        "group_by", "window", "unit", "thresholds", "enabled", "query",
    }  # fmt: skip
    spec = SCHEMA["properties"]["spec"]["properties"]
    assert set(spec) == model_fields
    assert set(spec["window"]["properties"]) == {"type", "size", "slide", "allowed_lateness"}
    assert set(spec["thresholds"]["properties"]) == {"warning", "critical", "direction"}
    assert set(spec["query"]["properties"]) == {
        "sql", "params", "schedule", "bind_window", "delay",
    }  # fmt: skip
    assert spec["aggregation"]["enum"] == ["count", "sum", "avg", "min", "max", "count_distinct"]


def _walk(node: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")


def test_schema_is_structural() -> None:
    """Every node has a type, except int-or-string and preserve-unknown-fields nodes, whose
    anyOf must be exactly the int-or-string form (what the API server accepts)."""
    for path, node in _walk(SCHEMA):
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node, path
            assert node.get("anyOf", [{"type": "integer"}, {"type": "string"}]) == [
                {"type": "integer"},
                {"type": "string"},
            ], path
        elif not node.get("x-kubernetes-preserve-unknown-fields"):
            assert "type" in node, path
            assert "anyOf" not in node, path


def test_every_cel_rule_compiles_and_has_a_message() -> None:
    rules = list(iter_rules(SCHEMA))
    assert len(rules) >= 7
    for path, rule in rules:
        CEL_ENV.compile(rule["rule"])
        assert rule.get("message"), path


# --- samples --------------------------------------------------------------------------------


def test_there_are_samples_over_both_entity_types() -> None:
    assert len(SAMPLES) >= 3
    entity_types = {load_sample(p)["spec"]["entity_type"] for p in SAMPLES}
    assert entity_types == {"order", "sensor"}


@pytest.mark.parametrize("path", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_sample_is_valid(path: Path) -> None:
    sample = load_sample(path)
    assert sample["apiVersion"] == f"{kpidefinition.GROUP}/{kpidefinition.VERSION}"
    assert sample["kind"] == kpidefinition.KIND
    name = sample["metadata"]["name"]
    assert DNS1123.match(name) and len(name) <= 63
    assert name == sample["spec"]["code"].replace("_", "-"), "convention: name = code with -"
    assert path.stem == name
    assert all_errors(sample) == []
    assert kpidefinition.code_of(sample["spec"]) == sample["spec"]["code"]


def test_sample_codes_are_unique() -> None:
    codes = [load_sample(p)["spec"]["code"] for p in SAMPLES]
    assert len(codes) == len(set(codes))


def test_updating_a_sample_with_the_same_code_is_allowed() -> None:
    old = base()
    new = copy.deepcopy(old)
    new["spec"]["field"] = "items"
    assert all_errors(new, old) == []


# --- rejected by the structural schema --------------------------------------------------------

SCHEMA_REJECTS: dict[str, tuple[dict[str, Any], str]] = {
    "missing-code": (with_spec(code=None), "'code' is a required property"),
    "missing-entity-type": (with_spec(entity_type=None), "'entity_type' is a required property"),
    "missing-display-name": (with_spec(display_name=None), "'display_name' is a required"),
    "too-many-group-by": (with_spec(group_by=list("abcdef")), "is too long"),
    "code-not-snake-case": (with_spec(code="Orders-Revenue"), "does not match"),
    "code-too-long": (with_spec(code="a" * 64), "is too long"),
    "unknown-aggregation": (with_spec(aggregation="median"), "'median' is not one of"),
    "unknown-field-typo": (with_spec(windw={"type": "tumbling"}), "'windw' was unexpected"),
    "bad-duration": (
        with_spec(window={"type": "tumbling", "size": "1 minute"}),
        "'1 minute' does not match",
    ),
    "zero-size": (with_spec(window={"type": "tumbling", "size": 0}), "less than the minimum"),
    "window-type": (with_spec(window={"type": "hopping", "size": "1m"}), "'hopping' is not one"),
    "window-without-size": (with_spec(window={"type": "tumbling"}), "'size' is a required"),
    "duplicate-group-by": (with_spec(group_by=["region", "region"]), "non-unique elements"),
    "thresholds-direction": (
        with_spec(thresholds={"warning": 1, "direction": "sideways"}),
        "'sideways' is not one of",
    ),
    "threshold-not-a-number": (
        with_spec(thresholds={"warning": "high", "direction": "above"}),
        "'high' is not of type 'number'",
    ),
    "enabled-not-bool": (with_spec(enabled="yes"), "'yes' is not of type 'boolean'"),
    "negative-query-delay": (
        with_spec(
            aggregation=None,
            field=None,
            window=None,
            group_by=None,
            filter=None,
            query={"sql": "SELECT 1", "delay": -1},
        ),
        "less than the minimum",
    ),
    "missing-spec": (
        {
            "apiVersion": "analyticsengine.io/v1alpha1",
            "kind": "KPIDefinition",
            "metadata": {"name": "x"},
        },
        "'spec' is a required property",
    ),
}


@pytest.mark.parametrize("case", list(SCHEMA_REJECTS))
def test_schema_rejects(case: str) -> None:
    obj, expected = SCHEMA_REJECTS[case]
    errors = schema_errors(obj)
    assert any(expected in e for e in errors), errors


# --- rejected by CEL rules --------------------------------------------------------------------

CEL_REJECTS: dict[str, tuple[dict[str, Any], str]] = {
    "sum-without-field": (
        with_spec(field=None),
        ".spec.field: field is required unless aggregation is count",
    ),
    "tumbling-with-slide": (
        with_spec(window={"type": "tumbling", "size": "1m", "slide": "30s"}),
        ".spec.window.slide: slide is only allowed for sliding windows",
    ),
    "sliding-without-slide": (
        with_spec(window={"type": "sliding", "size": "5m"}),
        ".spec.window.slide: a sliding window requires slide",
    ),
    "no-aggregation-no-query": (
        with_spec(aggregation=None, field=None),
        ".spec: a streaming KPI requires aggregation and window",
    ),
    "no-window": (
        with_spec(window=None),
        ".spec: a streaming KPI requires aggregation and window",
    ),
    "query-and-aggregation": (
        with_spec(query={"sql": "SELECT 1", "schedule": "60s"}),
        ".spec.query: a query KPI must not set aggregation, field, filter, window or group_by",
    ),
    "query-with-filter": (
        with_spec(
            aggregation=None, field=None, window=None, group_by=None, query={"sql": "SELECT 1"}
        ),
        ".spec.query: a query KPI must not set aggregation, field, filter, window or group_by",
    ),
    "reserved-field": (
        with_spec(field="version"),
        ".spec.field: event, entity_id and version are reserved",
    ),
    "reserved-group-by": (
        with_spec(group_by=["region", "entity_id"]),
        ".spec.group_by[1]: event, entity_id and version are reserved",
    ),
    "thresholds-below-inverted": (
        with_spec(thresholds={"warning": 500, "critical": 1000, "direction": "below"}),
        ".spec.thresholds.critical: critical must be beyond warning",
    ),
    "thresholds-above-inverted": (
        with_spec(thresholds={"warning": 40, "critical": 30.5, "direction": "above"}),
        ".spec.thresholds.critical: critical must be beyond warning",
    ),
}


@pytest.mark.parametrize("case", list(CEL_REJECTS))
def test_cel_rejects(case: str) -> None:
    obj, expected = CEL_REJECTS[case]
    assert schema_errors(obj) == [], "only the CEL rule should reject this"
    errors = cel_errors(SCHEMA, obj)
    assert any(e.startswith(expected) for e in errors), errors


def test_code_is_immutable() -> None:
    old = base()
    new = with_spec(code="orders_revenue_v2")
    assert schema_errors(new) == []
    assert cel_errors(SCHEMA, new) == []  # fine on create
    assert cel_errors(SCHEMA, new, old) == [
        ".spec.code: code is immutable; create a new KPIDefinition instead"
    ]


# 40 placeholders for 40 params of 8 KiB: valid, and past the metadata service's body limit.
LARGE_QUERY_SQL = "SELECT " + ", ".join(f"${i}::text" for i in range(1, 41))


@pytest.mark.parametrize(
    "spec_changes",
    [
        {"aggregation": "count", "field": None},
        {"window": {"type": "sliding", "size": 300, "slide": 60, "allowed_lateness": 0}},
        {"thresholds": {"critical": 1, "direction": "above"}},
        {"thresholds": {"warning": 2.5, "critical": 2.5, "direction": "below"}},
        {"thresholds": {"warning": 1, "critical": 2}},  # direction defaults to above
        {
            "aggregation": None,
            "field": None,
            "window": None,
            "group_by": None,
            "filter": None,
            "query": {
                "sql": "SELECT count(*) FROM orders WHERE n > $1 AND s = $2",
                "params": [1, "x"],
                "schedule": 60,
            },
        },
        {
            "aggregation": None,
            "field": None,
            "window": None,
            "group_by": None,
            "filter": None,
            "query": {
                "sql": "SELECT count(*) FROM t WHERE s = $1 AND at >= $2 AND at < $3",
                "params": ["x"],
                "schedule": "1m",
                "bind_window": True,
                "delay": "2s",
            },
        },
        {
            # Past the metadata service's 256 KiB body limit (it answers 413, which the
            # operator reports as Invalid): the CRD does not bound a param's size.
            "aggregation": None,
            "field": None,
            "window": None,
            "group_by": None,
            "filter": None,
            "query": {"sql": LARGE_QUERY_SQL, "params": ["x" * 8192] * 40, "schedule": 60},
        },
    ],
    ids=[
        "count-without-field",
        "integer-durations",
        "only-critical",
        "equal-thresholds",
        "default-direction",
        "query",
        "query-bind-window",
        "query-past-the-metadata-body-limit",
    ],
)
def test_other_valid_specs(spec_changes: dict[str, Any]) -> None:
    obj = with_spec(**spec_changes)
    assert all_errors(obj) == []
    assert validation_errors(obj["spec"]) == [], "the KPI model must accept it too"


# --- agreement with the KPI definition model (what the metadata service enforces) ------------


def test_spec_fields_are_the_model_fields() -> None:
    spec = SCHEMA["properties"]["spec"]
    assert set(spec["properties"]) == set(KPIDefinition.model_fields)
    assert set(spec["properties"]["window"]["properties"]) == set(Window.model_fields)
    assert set(spec["properties"]["thresholds"]["properties"]) == set(Thresholds.model_fields)
    assert set(spec["properties"]["query"]["properties"]) == set(QuerySpec.model_fields)
    required = {name for name, f in KPIDefinition.model_fields.items() if f.is_required()}
    assert set(spec["required"]) == required


@pytest.mark.parametrize("path", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_sample_spec_is_a_valid_kpi_definition(path: Path) -> None:
    assert validation_errors(load_sample(path)["spec"]) == []


@pytest.mark.parametrize("case", list(CEL_REJECTS))
def test_the_model_rejects_what_cel_rejects(case: str) -> None:
    obj, _ = CEL_REJECTS[case]
    assert validation_errors(obj["spec"]) != []
