"""kopf operator that keeps KPIDefinition custom resources in sync with the metadata service.

Entry points: `analytics_engine_operator.app.run_operator(settings)` (used by
`analytics-engine run operator`), `kopf run -m analytics_engine_operator.main` and
`python -m analytics_engine_operator`. `python -m analytics_engine_operator.release` deletes a
Helm release's KPIDefinitions before the operator goes (the chart's pre-delete hook). The CRD
is `k8s/crds/kpidefinitions.analyticsengine.io.yaml`; the RBAC it needs is in
`operator/RBAC.md`.
"""
