{{/* The rules on KPIDefinitions, their status, and events, for the watched scope (operator/RBAC.md). */}}
{{- define "analytics-engine.operator.rbac.namespacedRules" -}}
# kopf watches KPIDefinitions and patches them (finalizers, progress annotations).
- apiGroups: ["analyticsengine.io"]
  resources: ["kpidefinitions"]
  verbs: ["get", "list", "watch", "patch"]
# The operator reports the Synced condition on the status subresource (patch only).
- apiGroups: ["analyticsengine.io"]
  resources: ["kpidefinitions/status"]
  verbs: ["patch"]
# kopf posts events about handler outcomes on the objects.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if and .Values.operator.peering.enabled (not .Values.operator.clusterwide) }}
# kopf peering (only when peering is enabled; needs kopf's KopfPeering CRD). A clusterwide
# operator peers through clusterkopfpeerings instead (below).
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end -}}

{{/* The cluster-scoped rules: kopf scans CRDs; clusterwide operators also get the namespaced
rules cluster-wide. No `namespaces`: a clusterwide kopf never reads them, and one serving listed
namespaces falls back to the exact names on 403 (operator/RBAC.md). */}}
{{- define "analytics-engine.operator.rbac.clusterRules" -}}
# kopf lists and watches CRDs to notice ours being installed, upgraded or removed.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if .Values.operator.clusterwide }}
{{ include "analytics-engine.operator.rbac.namespacedRules" . }}
{{- if .Values.operator.peering.enabled }}
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end }}
{{- end -}}
