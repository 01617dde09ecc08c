{{/* The rules on KPIDefinitions, their status, and events, for the watched scope (operator/RBAC.md). */}}
{{- define "analytics-engine.operator.rbac.namespacedRules" -}}
# kopf watches KPIDefinitions and patches them (finalizers, progress annotations).
- apiGroups: ["analyticsengine.io"]
  resources: ["kpidefinitions"]
  verbs: ["get", "list", "watch", "patch"]
# The operator reports Synced/Ready conditions on the status subresource.
- apiGroups: ["analyticsengine.io"]
  resources: ["kpidefinitions/status"]
  verbs: ["get", "patch"]
# kopf posts events about handler outcomes on the objects.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if .Values.operator.peering.enabled }}
# kopf peering (only when peering is enabled; needs kopf's KopfPeering CRD).
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end -}}

{{/* The cluster-scoped rules: kopf scans CRDs; clusterwide operators also list namespaces. */}}
{{- define "analytics-engine.operator.rbac.clusterRules" -}}
# kopf checks that the CRD exists and reads its versions.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
{{- if .Values.operator.clusterwide }}
# A clusterwide kopf watches namespaces to follow new ones.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{ include "analytics-engine.operator.rbac.namespacedRules" . }}
{{- if .Values.operator.peering.enabled }}
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end }}
{{- end -}}
