{{/* vim: set filetype=mustache: */}}

{{/* The chart name, overridable with nameOverride. */}}
{{- define "analytics-engine.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The resource name prefix: fullnameOverride, or <release>-<chart> unless the release name already contains the chart name. */}}
{{- define "analytics-engine.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The name of one component's resources: <fullname>-<component>. Call with (dict "component" "gateway" "context" $). */}}
{{- define "analytics-engine.componentName" -}}
{{- printf "%s-%s" (include "analytics-engine.fullname" .context) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "analytics-engine.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Standard labels of a component's resources. Call with (dict "component" "gateway" "context" $). */}}
{{- define "analytics-engine.labels" -}}
{{ include "analytics-engine.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .context.Release.Service }}
app.kubernetes.io/version: {{ .context.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: analytics-engine
helm.sh/chart: {{ include "analytics-engine.chart" .context }}
{{- with .context.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels (immutable): name, instance and component only. */}}
{{- define "analytics-engine.selectorLabels" -}}
app.kubernetes.io/name: {{ include "analytics-engine.name" .context }}
app.kubernetes.io/instance: {{ .context.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{/* Annotations common to every resource (commonAnnotations), as a metadata block or nothing. */}}
{{- define "analytics-engine.annotations" -}}
{{- with .Values.commonAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
Annotations of a Secret holding credentials that a retained data volume was initialised with
(the database's roles, MinIO's root and users): with `persistence.whenDeleted: Retain` the
Secret outlives `helm uninstall` too (`helm.sh/resource-policy: keep`), so a reinstall finds
it (lookup) and keeps the passwords the data was made with, instead of new ones it rejects.
Call with (dict "persistence" .Values.timescaledb.persistence "context" $).
*/}}
{{- define "analytics-engine.credentialsAnnotations" -}}
{{- $annotations := deepCopy (.context.Values.commonAnnotations | default dict) -}}
{{- if and .persistence.enabled (eq .persistence.whenDeleted "Retain") -}}
{{- $_ := set $annotations "helm.sh/resource-policy" "keep" -}}
{{- end -}}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* An image reference from an image block; global.imageRegistry overrides the registry. Call with (dict "image" .Values.redis.image "default" "" "context" $). */}}
{{- define "analytics-engine.imageRef" -}}
{{- $registry := .image.registry -}}
{{- with .context.Values.global.imageRegistry }}{{ $registry = . }}{{ end -}}
{{- $tag := .image.tag | default .default | toString -}}
{{- $repo := ternary (printf "%s/%s" $registry .image.repository) .image.repository (ne $registry "") -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $repo .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}
{{- end -}}

{{/* The application image (tag defaults to the chart appVersion). */}}
{{- define "analytics-engine.image" -}}
{{- include "analytics-engine.imageRef" (dict "image" .Values.image "default" .Chart.AppVersion "context" .) -}}
{{- end -}}

{{/* imagePullSecrets of every pod, from global.imagePullSecrets. */}}
{{- define "analytics-engine.imagePullSecrets" -}}
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The restricted container security context used by the infrastructure containers, with their own UID/GID. Call with (dict "uid" 999 "gid" 1000). */}}
{{- define "analytics-engine.restrictedContainerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .gid }}
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The restricted pod security context of the infrastructure pods. Call with (dict "uid" 999 "gid" 1000). */}}
{{- define "analytics-engine.restrictedPodSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .gid }}
fsGroup: {{ .gid }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
A Secret value that survives upgrades: the given value, else the value already stored in the
live Secret (lookup; empty under `helm template`), else .generated, else a random
alphanumeric string (URL-safe, so it can be embedded in REDIS_URL / DATABASE_URL). Call with (dict "value" .Values.redis.auth.password "secret" "name" "key" "redis-password" "context" $).
*/}}
{{- define "analytics-engine.secretValue" -}}
{{- if .value -}}
{{- .value -}}
{{- else -}}
{{- $live := lookup "v1" "Secret" .context.Release.Namespace .secret -}}
{{- if and $live $live.data (hasKey $live.data .key) -}}
{{- index $live.data .key | b64dec -}}
{{- else -}}
{{- .generated | default (randAlphaNum 32) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------- Redis */}}

{{/* Host of Redis (in-chart Service or externalRedis.host). */}}
{{- define "analytics-engine.redis.host" -}}
{{- if .Values.redis.enabled -}}
{{- include "analytics-engine.componentName" (dict "component" "redis" "context" .) -}}
{{- else -}}
{{- .Values.externalRedis.host -}}
{{- end -}}
{{- end -}}

{{/* Port of Redis. */}}
{{- define "analytics-engine.redis.port" -}}
{{- ternary 6379 .Values.externalRedis.port .Values.redis.enabled -}}
{{- end -}}

{{/*
The Redis ACL user of an application component: the service's bus `source` name
(analytics_engine.cli.SERVICES), which is also its user in analytics_engine.core.acl.
*/}}
{{- define "analytics-engine.redis.user" -}}
{{- $users := dict "gateway" "api_gateway" "simulator" "data_simulator" "calculation" "calculation_engine" "metadata" "metadata_service" "database" "database_service" "archival" "archival_service" "observability" "observability_service" -}}
{{- required (printf "component %s has no Redis ACL user" .) (get $users .) -}}
{{- end -}}

{{/*
The service users' ACL rules from files/redis-acl-rules.txt (generated from
analytics_engine.core.acl by scripts/render_redis_acl.py), as YAML: a list of {user, rules}.
*/}}
{{- define "analytics-engine.redis.aclRules" -}}
{{- $entries := list -}}
{{- range $line := splitList "\n" (.Files.Get "files/redis-acl-rules.txt") -}}
{{- $line = trim $line -}}
{{- if and $line (not (hasPrefix "#" $line)) -}}
{{- $parts := splitn " " 2 $line -}}
{{- $entries = append $entries (dict "user" $parts._0 "rules" $parts._1) -}}
{{- end -}}
{{- end -}}
{{- if not $entries -}}
{{- fail "files/redis-acl-rules.txt is empty: run scripts/render_redis_acl.py" -}}
{{- end -}}
{{- toYaml $entries -}}
{{- end -}}

{{/* Every user of the in-chart Redis that has a password: admin, healthcheck, then the services. */}}
{{- define "analytics-engine.redis.passwordUsers" -}}
{{- $users := list "admin" "healthcheck" -}}
{{- range (include "analytics-engine.redis.aclRules" . | fromYamlArray) -}}
{{- $users = append $users .user -}}
{{- end -}}
{{- toYaml $users -}}
{{- end -}}

{{/*
The Secret key of one Redis user's password. Call with (dict "user" "api_gateway" "context" $):
the admin password lives under existingSecretPasswordKey (`redis-password`, the chart's key
from before the ACL users), every other user under <userPasswordKeyPrefix><user>.
*/}}
{{- define "analytics-engine.redis.passwordKey" -}}
{{- $auth := ternary .context.Values.redis.auth .context.Values.externalRedis .context.Values.redis.enabled -}}
{{- if eq .user "admin" -}}
{{- $auth.existingSecretPasswordKey -}}
{{- else -}}
{{- printf "%s%s" $auth.userPasswordKeyPrefix .user -}}
{{- end -}}
{{- end -}}

{{/*
The ACL file of the in-chart Redis, from a dict user -> password. Call with
(dict "passwords" $passwords "context" $). The same lines as analytics_engine.core.acl.acl_file
plus `healthcheck`, which may only PING (the probes' user).
*/}}
{{- define "analytics-engine.redis.aclFile" -}}
user default off ~* &* +@all
user admin on >{{ get .passwords "admin" }} ~* &* +@all
user healthcheck on >{{ get .passwords "healthcheck" }} {{ include "analytics-engine.redis.healthcheckRules" . }}
{{- range (include "analytics-engine.redis.aclRules" .context | fromYamlArray) }}
user {{ .user }} on >{{ get $.passwords .user }} {{ .rules }}
{{- end }}
{{ end -}}

{{/* The ACL rules of the probes' user. */}}
{{- define "analytics-engine.redis.healthcheckRules" -}}
resetkeys resetchannels -@all +ping
{{- end -}}

{{/*
Secret holding the Redis passwords; empty when Redis has no authentication (external Redis
without ACL users and without a password).
*/}}
{{- define "analytics-engine.redis.secretName" -}}
{{- if .Values.redis.enabled -}}
{{- .Values.redis.auth.existingSecret | default (include "analytics-engine.componentName" (dict "component" "redis" "context" .)) -}}
{{- else if .Values.externalRedis.existingSecret -}}
{{- .Values.externalRedis.existingSecret -}}
{{- else if .Values.externalRedis.password -}}
{{- include "analytics-engine.componentName" (dict "component" "external-redis" "context" .) -}}
{{- end -}}
{{- end -}}

{{/* Whether each service connects as its own ACL user (always with the in-chart Redis). */}}
{{- define "analytics-engine.redis.aclUsers" -}}
{{- if or .Values.redis.enabled .Values.externalRedis.aclUsers -}}true{{- end -}}
{{- end -}}

{{/*
env entries REDIS_PASSWORD and REDIS_URL of one application component. With ACL users the
component connects as its own user with its own password (the one Secret key it is given);
the password is expanded in the pod, never rendered. Call with (dict "component" "gateway" "context" $).
*/}}
{{- define "analytics-engine.redis.env" -}}
{{- $ctx := .context -}}
{{- $scheme := ternary "rediss" "redis" (and (not $ctx.Values.redis.enabled) $ctx.Values.externalRedis.tls) -}}
{{- $db := ternary 0 $ctx.Values.externalRedis.db $ctx.Values.redis.enabled -}}
{{- $endpoint := printf "%s:%v/%v" (include "analytics-engine.redis.host" $ctx) (include "analytics-engine.redis.port" $ctx) $db -}}
{{- with include "analytics-engine.redis.caFile" $ctx -}}
{{- $endpoint = printf "%s?ssl_ca_certs=%s" $endpoint . -}}
{{- end -}}
{{- $secret := include "analytics-engine.redis.secretName" $ctx -}}
{{- if include "analytics-engine.redis.aclUsers" $ctx }}
{{- $user := include "analytics-engine.redis.user" .component }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ include "analytics-engine.redis.passwordKey" (dict "user" $user "context" $ctx) }}
- name: REDIS_URL
  value: {{ printf "%s://%s:$(REDIS_PASSWORD)@%s" $scheme $user $endpoint | quote }}
{{- else if $secret }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $ctx.Values.externalRedis.existingSecretPasswordKey }}
- name: REDIS_URL
  value: {{ printf "%s://:$(REDIS_PASSWORD)@%s" $scheme $endpoint | quote }}
{{- else }}
- name: REDIS_URL
  value: {{ printf "%s://%s" $scheme $endpoint | quote }}
{{- end }}
{{- end -}}

{{/* ------------------------------------------------------- CAs of external servers */}}

{{- define "analytics-engine.caDir" -}}/etc/analytics-engine/ca{{- end -}}

{{/* Path of the external Redis's CA certificate in the pods, if one is given. */}}
{{- define "analytics-engine.redis.caFile" -}}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.tls .Values.externalRedis.caSecret -}}
{{- printf "%s/redis/%s" (include "analytics-engine.caDir" .) .Values.externalRedis.caSecretKey -}}
{{- end -}}
{{- end -}}

{{/* Path of the external database's CA certificate in the pods, if one is given. */}}
{{- define "analytics-engine.database.caFile" -}}
{{- if and (not .Values.timescaledb.enabled) .Values.externalDatabase.caSecret -}}
{{- printf "%s/database/%s" (include "analytics-engine.caDir" .) .Values.externalDatabase.caSecretKey -}}
{{- end -}}
{{- end -}}

{{/*
volumeMounts (with "mounts" true) or volumes of the CA certificates one component reads: the
external Redis's (every component but the operator) and the external database's (the services
that connect to it). Call with (dict "component" "database" "mounts" true "context" $).
*/}}
{{- define "analytics-engine.caVolumes" -}}
{{- $v := .context.Values -}}
{{- $cas := list -}}
{{- if and (ne .component "operator") (include "analytics-engine.redis.caFile" .context) -}}
{{- $cas = append $cas (list "redis" $v.externalRedis.caSecret $v.externalRedis.caSecretKey) -}}
{{- end -}}
{{- if and (has .component (list "database" "metadata")) (include "analytics-engine.database.caFile" .context) -}}
{{- $cas = append $cas (list "database" $v.externalDatabase.caSecret $v.externalDatabase.caSecretKey) -}}
{{- end -}}
{{- range $cas }}
{{- if $.mounts }}
- name: {{ index . 0 }}-ca
  mountPath: {{ include "analytics-engine.caDir" $.context }}/{{ index . 0 }}
  readOnly: true
{{- else }}
- name: {{ index . 0 }}-ca
  secret:
    secretName: {{ index . 1 }}
    items:
      - key: {{ index . 2 }}
        path: {{ index . 2 }}
{{- end }}
{{- end }}
{{- end -}}

{{/* ---------------------------------------------------------------- Database */}}

{{/* Host of the database (in-chart TimescaleDB Service or externalDatabase.host). */}}
{{- define "analytics-engine.database.host" -}}
{{- if .Values.timescaledb.enabled -}}
{{- include "analytics-engine.componentName" (dict "component" "timescaledb" "context" .) -}}
{{- else -}}
{{- .Values.externalDatabase.host -}}
{{- end -}}
{{- end -}}

{{/* Port of the database. */}}
{{- define "analytics-engine.database.port" -}}
{{- ternary 5432 .Values.externalDatabase.port .Values.timescaledb.enabled -}}
{{- end -}}

{{/* Secret holding the database passwords. */}}
{{- define "analytics-engine.database.secretName" -}}
{{- if .Values.timescaledb.enabled -}}
{{- .Values.timescaledb.auth.existingSecret | default (include "analytics-engine.componentName" (dict "component" "timescaledb" "context" .)) -}}
{{- else -}}
{{- .Values.externalDatabase.existingSecret | default (include "analytics-engine.componentName" (dict "component" "external-database" "context" .)) -}}
{{- end -}}
{{- end -}}

{{/* env entries DATABASE_PASSWORD and DATABASE_URL; with (dict "readonly" true ...) also DATABASE_READONLY_PASSWORD and DATABASE_READONLY_URL. Call with (dict "readonly" bool "context" $). */}}
{{- define "analytics-engine.database.env" -}}
{{- $v := .context.Values -}}
{{- $host := include "analytics-engine.database.host" .context -}}
{{- $port := include "analytics-engine.database.port" .context -}}
{{- $secret := include "analytics-engine.database.secretName" .context -}}
{{- $db := ternary $v.timescaledb.auth.database $v.externalDatabase.database $v.timescaledb.enabled -}}
{{- $user := ternary $v.timescaledb.auth.username $v.externalDatabase.username $v.timescaledb.enabled -}}
{{- $roUser := ternary $v.timescaledb.auth.readonlyUsername $v.externalDatabase.readonlyUsername $v.timescaledb.enabled -}}
{{- $pwKey := ternary $v.timescaledb.auth.secretKeys.passwordKey $v.externalDatabase.existingSecretPasswordKey $v.timescaledb.enabled -}}
{{- $roKey := ternary $v.timescaledb.auth.secretKeys.readonlyPasswordKey $v.externalDatabase.existingSecretReadonlyPasswordKey $v.timescaledb.enabled -}}
{{- $query := "" -}}
{{- $params := list -}}
{{- if and (not $v.timescaledb.enabled) $v.externalDatabase.sslmode -}}
{{- $params = append $params (printf "sslmode=%s" $v.externalDatabase.sslmode) -}}
{{- end -}}
{{- with include "analytics-engine.database.caFile" .context -}}
{{- $params = append $params (printf "sslrootcert=%s" .) -}}
{{- end -}}
{{- if $params -}}
{{- $query = printf "?%s" (join "&" $params) -}}
{{- end }}
- name: DATABASE_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $pwKey }}
- name: DATABASE_URL
  value: {{ printf "postgresql://%s:$(DATABASE_PASSWORD)@%s:%v/%s%s" $user $host $port $db $query | quote }}
{{- if and .readonly $roUser }}
- name: DATABASE_READONLY_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $roKey }}
- name: DATABASE_READONLY_URL
  value: {{ printf "postgresql://%s:$(DATABASE_READONLY_PASSWORD)@%s:%v/%s%s" $roUser $host $port $db $query | quote }}
{{- end }}
{{- end -}}

{{/* ---------------------------------------------------------------- S3 */}}

{{/* S3_ENDPOINT_URL: the in-chart MinIO Service or externalS3.endpoint. */}}
{{- define "analytics-engine.s3.endpoint" -}}
{{- if .Values.minio.enabled -}}
{{- printf "http://%s:9000" (include "analytics-engine.componentName" (dict "component" "minio" "context" .)) -}}
{{- else -}}
{{- .Values.externalS3.endpoint -}}
{{- end -}}
{{- end -}}

{{/* Secret holding the S3 credentials of the application. */}}
{{- define "analytics-engine.s3.secretName" -}}
{{- if .Values.minio.enabled -}}
{{- .Values.minio.auth.existingSecret | default (include "analytics-engine.componentName" (dict "component" "minio" "context" .)) -}}
{{- else -}}
{{- .Values.externalS3.existingSecret | default (include "analytics-engine.componentName" (dict "component" "external-s3" "context" .)) -}}
{{- end -}}
{{- end -}}

{{/* env entries AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (boto3's names). */}}
{{- define "analytics-engine.s3.env" -}}
{{- $secret := include "analytics-engine.s3.secretName" . -}}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ ternary "access-key-id" .Values.externalS3.existingSecretAccessKeyIdKey .Values.minio.enabled }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ ternary "secret-access-key" .Values.externalS3.existingSecretSecretAccessKeyKey .Values.minio.enabled }}
{{- end -}}

{{/*
Checksum of the S3 credentials given through the values (the archival service reads them at
start only): MinIO's auth block, or the external S3 keys. Generated ones never change (lookup).
*/}}
{{- define "analytics-engine.s3.credentialsChecksum" -}}
{{- if .Values.minio.enabled -}}
{{- toJson .Values.minio.auth | sha256sum -}}
{{- else -}}
{{- toJson (omit .Values.externalS3 "endpoint" "port") | sha256sum -}}
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------- Services */}}

{{/* Port environment variable of each component (docs/architecture.md). */}}
{{- define "analytics-engine.portEnvName" -}}
{{- $names := dict "gateway" "GATEWAY_PORT" "simulator" "SIMULATOR_PORT" "calculation" "CALCULATION_PORT" "metadata" "METADATA_PORT" "database" "DATABASE_SERVICE_PORT" "archival" "ARCHIVAL_PORT" "observability" "OBSERVABILITY_PORT" "operator" "OPERATOR_PORT" -}}
{{- index $names . -}}
{{- end -}}

{{/* Base URL of a business service, e.g. http://<fullname>-metadata:8083. Call with (dict "component" "metadata" "context" $). */}}
{{- define "analytics-engine.serviceURL" -}}
{{- $values := index .context.Values .component -}}
{{- printf "http://%s:%v" (include "analytics-engine.componentName" .) $values.port -}}
{{- end -}}

{{/* Secret holding GATEWAY_API_KEYS. */}}
{{- define "analytics-engine.gateway.secretName" -}}
{{- .Values.gateway.auth.existingSecret | default (include "analytics-engine.componentName" (dict "component" "gateway" "context" .)) -}}
{{- end -}}

{{/* The operator's ServiceAccount name. */}}
{{- define "analytics-engine.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- .Values.operator.serviceAccount.name | default (include "analytics-engine.componentName" (dict "component" "operator" "context" .)) -}}
{{- else -}}
{{- .Values.operator.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/* Namespaces the operator watches when not clusterwide. */}}
{{- define "analytics-engine.operator.namespaces" -}}
{{- if .Values.operator.watchNamespaces -}}
{{- join "," .Values.operator.watchNamespaces -}}
{{- else -}}
{{- .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/*
Whether the samples' pre-delete cleanup hook is rendered: only the release's own samples are
released by it, and only when the release runs the operator that finalizes them.
*/}}
{{- define "analytics-engine.samples.cleanupEnabled" -}}
{{- if and .Values.samples.enabled .Values.samples.cleanup.enabled .Values.operator.enabled -}}true{{- end -}}
{{- end -}}

{{/* The label selector of the release's samples (their selector labels), as KPI_RELEASE_SELECTOR. */}}
{{- define "analytics-engine.samples.labelSelector" -}}
{{- $terms := list -}}
{{- range $key, $value := include "analytics-engine.selectorLabels" (dict "component" "samples" "context" .) | fromYaml -}}
{{- $terms = append $terms (printf "%s=%s" $key $value) -}}
{{- end -}}
{{- join "," $terms -}}
{{- end -}}

{{/*
The annotations of a pre-delete hook object, commonAnnotations included. Lower weights are
created first; by default the object is deleted once every hook succeeded, and a leftover of a
failed attempt before the next one. Call with (dict "weight" -10 "context" $), optionally
with "deletePolicy".
*/}}
{{- define "analytics-engine.preDeleteHookAnnotations" -}}
annotations:
  {{- with .context.Values.commonAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  helm.sh/hook: pre-delete
  helm.sh/hook-weight: {{ .weight | quote }}
  helm.sh/hook-delete-policy: {{ .deletePolicy | default "before-hook-creation,hook-succeeded" }}
{{- end -}}

{{/* Volumes and the checksum annotation every application pod shares. */}}
{{- define "analytics-engine.configChecksum" -}}
{{- include (print .Template.BasePath "/configmap.yaml") . | sha256sum -}}
{{- end -}}

{{/*
The Deployment of one application component. Call with
(dict "component" "gateway" "env" (include "analytics-engine.gateway.env" $) "volumes" "" "volumeMounts" "" "context" $),
optionally with "checksums" (dict "name" "sha256"): pod annotations `checksum/<name>` that roll
the pods when what the component reads at start only changes.
*/}}
{{- define "analytics-engine.deployment" -}}
{{- $ctx := .context -}}
{{- $values := index $ctx.Values .component -}}
{{- $hpa := false -}}
{{- if hasKey $values "autoscaling" -}}{{- $hpa = $values.autoscaling.enabled -}}{{- end -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "analytics-engine.componentName" . }}
  namespace: {{ $ctx.Release.Namespace | quote }}
  labels:
    {{- include "analytics-engine.labels" . | nindent 4 }}
  {{- include "analytics-engine.annotations" $ctx | nindent 2 }}
spec:
  {{- if not $hpa }}
  replicas: {{ $values.replicaCount | default 1 }}
  {{- end }}
  revisionHistoryLimit: 5
  {{- if or (eq .component "operator") (eq .component "calculation") }}
  # One instance at a time: two kopf instances freeze each other, and two calculation engines
  # would both resume the same checkpoint. Stop the old pod before starting the new one.
  strategy:
    type: Recreate
  {{- else }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 1
      maxUnavailable: 0
  {{- end }}
  selector:
    matchLabels:
      {{- include "analytics-engine.selectorLabels" . | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "analytics-engine.labels" . | nindent 8 }}
      annotations:
        checksum/config: {{ include "analytics-engine.configChecksum" $ctx }}
        {{- if eq .component "gateway" }}
        # the API keys are read at start: rotating them through the values rolls the gateways
        # (generated keys never change: lookup keeps them)
        checksum/api-keys: {{ toJson $ctx.Values.gateway.auth | sha256sum }}
        {{- end }}
        {{- /* what else the component reads at start only (its own files, credentials) */}}
        {{- range $name, $sum := .checksums }}
        checksum/{{ $name }}: {{ $sum }}
        {{- end }}
        {{- with $values.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      {{- include "analytics-engine.imagePullSecrets" $ctx | nindent 6 }}
      {{- if eq .component "operator" }}
      serviceAccountName: {{ include "analytics-engine.operator.serviceAccountName" $ctx }}
      automountServiceAccountToken: true
      {{- else }}
      automountServiceAccountToken: false
      {{- end }}
      enableServiceLinks: false
      securityContext:
        {{- toYaml $ctx.Values.podSecurityContext | nindent 8 }}
      # a stop finishes the batch in hand (consumers: up to 30 s), then lets HTTP requests in
      # flight finish (SERVICE_SHUTDOWN_GRACE, 20 s) before closing what they use
      terminationGracePeriodSeconds: 60
      {{- with $values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if $values.affinity }}
      affinity:
        {{- toYaml $values.affinity | nindent 8 }}
      {{- else if or $hpa (gt (int ($values.replicaCount | default 1)) 1) }}
      # No affinity given: spread the replicas over nodes where possible, so that losing one
      # node leaves one running.
      affinity:
        podAntiAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
            - weight: 100
              podAffinityTerm:
                topologyKey: kubernetes.io/hostname
                labelSelector:
                  matchLabels:
                    {{- include "analytics-engine.selectorLabels" . | nindent 20 }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "analytics-engine.image" $ctx }}
          imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
          args: ["run", {{ .component | quote }}]
          securityContext:
            {{- toYaml $ctx.Values.containerSecurityContext | nindent 12 }}
          ports:
            - name: http
              containerPort: {{ $values.port }}
              protocol: TCP
          envFrom:
            - configMapRef:
                name: {{ include "analytics-engine.componentName" (dict "component" "config" "context" $ctx) }}
          env:
            - name: SERVICE_INSTANCE_ID
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
            - name: {{ include "analytics-engine.portEnvName" .component }}
              value: {{ $values.port | quote }}
            {{- if ne .component "operator" }}
            {{- include "analytics-engine.redis.env" (dict "component" .component "context" $ctx) | nindent 12 }}
            {{- end }}
            {{- with .env }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- range $name, $value := $values.extraEnv }}
            - name: {{ $name }}
              value: {{ $value | toString | quote }}
            {{- end }}
          startupProbe:
            httpGet:
              path: /healthz
              port: http
            {{- toYaml $ctx.Values.probes.startup | nindent 12 }}
          livenessProbe:
            httpGet:
              path: /healthz
              port: http
            {{- toYaml $ctx.Values.probes.liveness | nindent 12 }}
          readinessProbe:
            httpGet:
              # kopf's liveness endpoint (the operator's only HTTP server) serves one path.
              path: {{ ternary "/healthz" "/readyz" (eq .component "operator") }}
              port: http
            {{- toYaml $ctx.Values.probes.readiness | nindent 12 }}
          resources:
            {{- toYaml $values.resources | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- with .volumeMounts }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- include "analytics-engine.caVolumes" (dict "component" .component "mounts" true "context" $ctx) | nindent 12 }}
      volumes:
        # The root filesystem is read-only; /tmp is the only writable path (boto3, pyarrow, kopf).
        - name: tmp
          emptyDir:
            sizeLimit: 256Mi
        {{- with .volumes }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- include "analytics-engine.caVolumes" (dict "component" .component "mounts" false "context" $ctx) | nindent 8 }}
{{- end -}}

{{/* The ClusterIP Service of one application component. Call with (dict "component" "gateway" "context" $). */}}
{{- define "analytics-engine.service" -}}
{{- $ctx := .context -}}
{{- $values := index $ctx.Values .component -}}
{{- $svc := $values.service | default dict -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "analytics-engine.componentName" . }}
  namespace: {{ $ctx.Release.Namespace | quote }}
  labels:
    {{- include "analytics-engine.labels" . | nindent 4 }}
  {{- include "analytics-engine.annotations" $ctx | nindent 2 }}
spec:
  type: {{ $svc.type | default "ClusterIP" }}
  selector:
    {{- include "analytics-engine.selectorLabels" . | nindent 4 }}
  ports:
    - name: http
      port: {{ $values.port }}
      targetPort: http
      protocol: TCP
      {{- if and (has ($svc.type | default "ClusterIP") (list "NodePort" "LoadBalancer")) $svc.nodePort }}
      nodePort: {{ $svc.nodePort }}
      {{- end }}
{{- end -}}

{{/* The PodDisruptionBudget of one application component. */}}
{{- define "analytics-engine.pdb" -}}
{{- $ctx := .context -}}
{{- $values := index $ctx.Values .component -}}
{{- if $values.pdb.create -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "analytics-engine.componentName" . }}
  namespace: {{ $ctx.Release.Namespace | quote }}
  labels:
    {{- include "analytics-engine.labels" . | nindent 4 }}
  {{- include "analytics-engine.annotations" $ctx | nindent 2 }}
spec:
  maxUnavailable: {{ $values.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "analytics-engine.selectorLabels" . | nindent 6 }}
{{- end -}}
{{- end -}}

{{/* The HorizontalPodAutoscaler of one application component. */}}
{{- define "analytics-engine.hpa" -}}
{{- $ctx := .context -}}
{{- $values := index $ctx.Values .component -}}
{{- if $values.autoscaling.enabled -}}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "analytics-engine.componentName" . }}
  namespace: {{ $ctx.Release.Namespace | quote }}
  labels:
    {{- include "analytics-engine.labels" . | nindent 4 }}
  {{- include "analytics-engine.annotations" $ctx | nindent 2 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "analytics-engine.componentName" . }}
  minReplicas: {{ $values.autoscaling.minReplicas }}
  maxReplicas: {{ $values.autoscaling.maxReplicas }}
  metrics:
    {{- with $values.autoscaling.targetCPUUtilizationPercentage }}
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ . }}
    {{- end }}
    {{- with $values.autoscaling.targetMemoryUtilizationPercentage }}
    - type: Resource
      resource:
        name: memory
        target:
          type: Utilization
          averageUtilization: {{ . }}
    {{- end }}
{{- end -}}
{{- end -}}

{{/* The ServiceMonitor of one application component (monitoring.enabled). */}}
{{- define "analytics-engine.serviceMonitor" -}}
{{- $ctx := .context -}}
{{- if $ctx.Values.monitoring.enabled -}}
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ include "analytics-engine.componentName" . }}
  namespace: {{ $ctx.Values.monitoring.serviceMonitor.namespace | default $ctx.Release.Namespace | quote }}
  labels:
    {{- include "analytics-engine.labels" . | nindent 4 }}
    {{- with $ctx.Values.monitoring.serviceMonitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- include "analytics-engine.annotations" $ctx | nindent 2 }}
spec:
  namespaceSelector:
    matchNames:
      - {{ $ctx.Release.Namespace }}
  selector:
    matchLabels:
      {{- include "analytics-engine.selectorLabels" . | nindent 6 }}
  endpoints:
    - port: http
      path: /metrics
      interval: {{ $ctx.Values.monitoring.serviceMonitor.interval }}
      scrapeTimeout: {{ $ctx.Values.monitoring.serviceMonitor.scrapeTimeout }}
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------- NetworkPolicy rules */}}

{{/* Egress to the cluster DNS (every pod). */}}
{{- define "analytics-engine.networkPolicy.dnsEgress" -}}
- to:
    - namespaceSelector:
        {{- toYaml .Values.networkPolicy.dns.namespaceSelector | nindent 8 }}
      podSelector:
        {{- toYaml .Values.networkPolicy.dns.podSelector | nindent 8 }}
  ports:
    - {protocol: UDP, port: 53}
    - {protocol: TCP, port: 53}
{{- end -}}

{{/* Egress to an in-chart component's port, or to networkPolicy.externalCIDRs when it is external. Call with (dict "component" "redis" "inChart" bool "port" 6379 "context" $). */}}
{{- define "analytics-engine.networkPolicy.egressTo" -}}
- to:
    {{- if .inChart }}
    - podSelector:
        matchLabels:
          {{- include "analytics-engine.selectorLabels" . | nindent 10 }}
    {{- else }}
    {{- range .context.Values.networkPolicy.externalCIDRs }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
    {{- end }}
  ports:
    - {protocol: TCP, port: {{ .port }}}
{{- end -}}

{{/* Egress to Redis (every application pod). */}}
{{- define "analytics-engine.networkPolicy.redisEgress" -}}
{{- include "analytics-engine.networkPolicy.egressTo" (dict "component" "redis" "inChart" .Values.redis.enabled "port" (include "analytics-engine.redis.port" . | int) "context" .) -}}
{{- end -}}

{{/* Egress to the database (database and metadata services). */}}
{{- define "analytics-engine.networkPolicy.databaseEgress" -}}
{{- include "analytics-engine.networkPolicy.egressTo" (dict "component" "timescaledb" "inChart" .Values.timescaledb.enabled "port" (include "analytics-engine.database.port" . | int) "context" .) -}}
{{- end -}}

{{/* Egress to S3 (archival service). */}}
{{- define "analytics-engine.networkPolicy.s3Egress" -}}
{{- include "analytics-engine.networkPolicy.egressTo" (dict "component" "minio" "inChart" .Values.minio.enabled "port" (ternary 9000 (.Values.externalS3.port | int) .Values.minio.enabled) "context" .) -}}
{{- end -}}

{{/* Egress to the Kubernetes API server (the operator, the samples' cleanup hook). */}}
{{- define "analytics-engine.networkPolicy.kubeAPIServerEgress" -}}
- to:
    {{- range .Values.networkPolicy.kubeAPIServer.cidrs }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
  ports:
    {{- range .Values.networkPolicy.kubeAPIServer.ports }}
    - {protocol: TCP, port: {{ . }}}
    {{- end }}
{{- end -}}

{{/* Ingress from Prometheus to the http port, when monitoring is enabled. */}}
{{- define "analytics-engine.networkPolicy.metricsIngress" -}}
{{- if .Values.monitoring.enabled }}
- from:
    - namespaceSelector:
        {{- toYaml .Values.monitoring.prometheusSelector.namespaceSelector | nindent 8 }}
      podSelector:
        {{- toYaml .Values.monitoring.prometheusSelector.podSelector | nindent 8 }}
  ports:
    - {protocol: TCP, port: http}
{{- end }}
{{- end -}}

{{/* Ingress to a pod from the given application components. Call with (dict "from" (list "gateway") "port" "http" "context" $). */}}
{{- define "analytics-engine.networkPolicy.ingressFrom" -}}
- from:
    - podSelector:
        matchExpressions:
          - {key: app.kubernetes.io/name, operator: In, values: [{{ include "analytics-engine.name" .context }}]}
          - {key: app.kubernetes.io/instance, operator: In, values: [{{ .context.Release.Name | quote }}]}
          - {key: app.kubernetes.io/component, operator: In, values: [{{ join ", " .from }}]}
  ports:
    - {protocol: TCP, port: {{ .port }}}
{{- end -}}

{{/*
A component's NetworkPolicy: ingress and egress rules are given as YAML lists (strings); an
empty string means "deny all" in that direction. Call with
(dict "component" "gateway" "ingress" "..." "egress" "..." "context" $).
*/}}
{{- define "analytics-engine.networkPolicy" -}}
{{- $ctx := .context -}}
{{- if $ctx.Values.networkPolicy.enabled -}}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "analytics-engine.componentName" . }}
  namespace: {{ $ctx.Release.Namespace | quote }}
  labels:
    {{- include "analytics-engine.labels" . | nindent 4 }}
  {{- include "analytics-engine.annotations" $ctx | nindent 2 }}
spec:
  podSelector:
    matchLabels:
      {{- include "analytics-engine.selectorLabels" . | nindent 6 }}
  policyTypes: [Ingress, Egress]
  {{- if trim .ingress }}
  ingress:
    {{- .ingress | nindent 4 }}
  {{- else }}
  ingress: []
  {{- end }}
  egress:
    {{- include "analytics-engine.networkPolicy.dnsEgress" $ctx | nindent 4 }}
    {{- with trim .egress }}
    {{- . | nindent 4 }}
    {{- end }}
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------- Validation */}}

{{/* Gather every configuration problem and fail once, listing them all. */}}
{{- define "analytics-engine.validateValues" -}}
{{- $errors := list -}}
{{- $v := .Values -}}
{{- if ne (int $v.calculation.replicaCount) 1 -}}
{{- $errors = append $errors "calculation.replicaCount must be 1: the engine runs as one active replica" -}}
{{- end -}}
{{- if and (not $v.redis.enabled) (not $v.externalRedis.host) -}}
{{- $errors = append $errors "redis.enabled=false needs externalRedis.host" -}}
{{- end -}}
{{- if and (not $v.redis.enabled) $v.externalRedis.aclUsers (not $v.externalRedis.existingSecret) -}}
{{- $errors = append $errors (printf "externalRedis.aclUsers needs externalRedis.existingSecret with one password per service user (keys %s<user>, see the chart README), or externalRedis.aclUsers=false for one shared password" $v.externalRedis.userPasswordKeyPrefix) -}}
{{- end -}}
{{- if and (not $v.redis.enabled) $v.externalRedis.aclUsers $v.externalRedis.password -}}
{{- $errors = append $errors "externalRedis.password is the shared password of externalRedis.aclUsers=false; with ACL users put the services' passwords in externalRedis.existingSecret" -}}
{{- end -}}
{{- if and (not $v.timescaledb.enabled) (not $v.externalDatabase.host) -}}
{{- $errors = append $errors "timescaledb.enabled=false needs externalDatabase.host" -}}
{{- end -}}
{{- if and (not $v.timescaledb.enabled) (not $v.externalDatabase.existingSecret) (not $v.externalDatabase.password) -}}
{{- $errors = append $errors "timescaledb.enabled=false needs externalDatabase.existingSecret or externalDatabase.password" -}}
{{- end -}}
{{- if and (not $v.timescaledb.enabled) $v.externalDatabase.readonlyUsername (not $v.externalDatabase.existingSecret) (not $v.externalDatabase.readonlyPassword) -}}
{{- $errors = append $errors "externalDatabase.readonlyUsername needs externalDatabase.readonlyPassword (or externalDatabase.existingSecret holding it): the database service reads that key" -}}
{{- end -}}
{{- if and (not $v.minio.enabled) (not $v.externalS3.endpoint) -}}
{{- $errors = append $errors "minio.enabled=false needs externalS3.endpoint" -}}
{{- end -}}
{{- if and (not $v.minio.enabled) (not $v.externalS3.existingSecret) (not (and $v.externalS3.accessKeyId $v.externalS3.secretAccessKey)) -}}
{{- $errors = append $errors "minio.enabled=false needs externalS3.existingSecret or externalS3.accessKeyId and externalS3.secretAccessKey" -}}
{{- end -}}
{{- if eq (toString $v.image.tag) "latest" -}}
{{- $errors = append $errors "image.tag must not be 'latest': pin a version (or leave it empty for the chart appVersion)" -}}
{{- end -}}
{{- range $name := list "redis" "timescaledb" "minio" -}}
{{- if eq (toString (index $v $name).image.tag) "latest" -}}
{{- $errors = append $errors (printf "%s.image.tag must not be 'latest'" $name) -}}
{{- end -}}
{{- end -}}
{{- /* Passwords are put into REDIS_URL / DATABASE_URL as they are (Kubernetes' $(VAR)
expansion cannot percent-encode them): only URL-safe ones can be parsed back. */ -}}
{{- range $path := list "redis.auth.password" "externalRedis.password" "timescaledb.auth.password" "timescaledb.auth.readonlyPassword" "externalDatabase.password" "externalDatabase.readonlyPassword" -}}
{{- $value := $v -}}
{{- range $key := splitList "." $path -}}{{- $value = index $value $key -}}{{- end -}}
{{- if and $value (not (regexMatch "^[A-Za-z0-9._~-]+$" (toString $value))) -}}
{{- $errors = append $errors (printf "%s must be URL-safe (letters, digits, . _ ~ -): it is embedded in a connection URL" $path) -}}
{{- end -}}
{{- end -}}
{{- /* GATEWAY_API_KEYS as the gateway parses it (analytics_engine.gateway.auth.parse_api_keys),
or it stops at start; pairs are named by position only (the keys are secrets). */ -}}
{{- $seenKeys := dict -}}
{{- range $i, $pair := splitList "," (toString $v.gateway.auth.apiKeys) -}}
{{- $pair = trim $pair -}}
{{- if and $pair (not (regexMatch "^\\S{16,}:(read|admin)$" $pair)) -}}
{{- $errors = append $errors (printf "gateway.auth.apiKeys: pair %d is not key:scope with a key of 16 characters at least (no whitespace) and scope read or admin" (add1 $i)) -}}
{{- else if $pair -}}
{{- $key := regexReplaceAll ":(read|admin)$" $pair "" | sha256sum -}}
{{- if hasKey $seenKeys $key -}}
{{- $errors = append $errors (printf "gateway.auth.apiKeys: pair %d repeats a key" (add1 $i)) -}}
{{- end -}}
{{- $_ := set $seenKeys $key true -}}
{{- end -}}
{{- end -}}
{{- if and $v.operator.clusterwide $v.operator.watchNamespaces -}}
{{- $errors = append $errors "operator.clusterwide and operator.watchNamespaces are exclusive" -}}
{{- end -}}
{{- if lt (int $v.samples.cleanup.activeDeadlineSeconds) (add (int $v.samples.cleanup.timeoutSeconds) 30) -}}
{{- $errors = append $errors "samples.cleanup.activeDeadlineSeconds must exceed samples.cleanup.timeoutSeconds by 30 s at least: the hook Job needs time to start and, after the timeout, to remove the finalizers" -}}
{{- end -}}
{{- if and $v.gateway.ingress.enabled (not $v.gateway.ingress.hostname) -}}
{{- $errors = append $errors "gateway.ingress.enabled needs gateway.ingress.hostname" -}}
{{- end -}}
{{- range $name := list "database" -}}
{{- $c := index $v $name -}}
{{- if and $c.autoscaling.enabled (not (or $c.autoscaling.targetCPUUtilizationPercentage $c.autoscaling.targetMemoryUtilizationPercentage)) -}}
{{- $errors = append $errors (printf "%s.autoscaling.enabled needs a CPU or memory target" $name) -}}
{{- end -}}
{{- end -}}
{{- if $errors -}}
{{- fail (printf "\nVALUES VALIDATION:\n  - %s" (join "\n  - " $errors)) -}}
{{- end -}}
{{- end -}}
