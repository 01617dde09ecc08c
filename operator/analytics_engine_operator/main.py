"""Module for `kopf run -m analytics_engine_operator.main --all-namespaces --standalone`.

`kopf run` only discovers handlers on kopf's default registry at import time, so this module
(and only this one) registers them there as an import side effect. The handlers and settings are
the same as with `analytics-engine run operator` (`app.run_operator`); prefer that entry point,
which also applies OPERATOR_NAMESPACES and the liveness endpoint without CLI flags
(with `kopf run`, pass `--liveness=http://0.0.0.0:8087/healthz` yourself).
"""

from __future__ import annotations

import kopf

from analytics_engine_operator.handlers import build_registry
from analytics_engine_operator.settings import KpiOperatorSettings

registry = build_registry(KpiOperatorSettings(), registry=kopf.get_default_registry())
