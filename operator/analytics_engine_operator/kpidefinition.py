"""The KPIDefinition custom resource: its coordinates and how a CR maps to a KPI definition.

The CR's `spec` *is* the KPI definition model of docs/architecture.md, field for field
(snake_case, as the metadata service expects), so the operator sends it unchanged.
`spec.code` is required (the CRD enforces it): Kubernetes names are DNS-1123 (`orders-revenue`)
while KPI codes are `^[a-z][a-z0-9_]{0,62}$` (`orders_revenue`), and an explicit code keeps the
mapping obvious and lets the same YAML feed the local stack. The CRD makes `code` immutable, so
one CR owns one code for its whole life.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

GROUP = "analyticsengine.io"
VERSION = "v1alpha1"
PLURAL = "kpidefinitions"
KIND = "KPIDefinition"
RESOURCE = f"{PLURAL}.{GROUP}"

FINALIZER = f"{GROUP}/kpi-operator"
ANNOTATIONS_PREFIX = GROUP

CODE_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


class SpecError(ValueError):
    """The CR's spec cannot be sent at all (normally prevented by the CRD schema)."""


def code_of(spec: Mapping[str, Any]) -> str:
    code = spec.get("code")
    if not isinstance(code, str) or not code:
        raise SpecError("spec.code is required")
    if not CODE_PATTERN.match(code):
        raise SpecError(f"spec.code {code!r} must match {CODE_PATTERN.pattern}")
    return code


def definition_from_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A plain, JSON-safe deep copy of the spec (kopf hands out read-only views)."""
    copied: dict[str, Any] = json.loads(json.dumps(dict(spec)))
    return copied
