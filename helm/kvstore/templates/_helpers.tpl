{{/* Names, labels and the pieces shared by the templates. */}}

{{- define "kvstore.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kvstore.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kvstore.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kvstore.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvstore.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kvstore.labels" -}}
helm.sh/chart: {{ include "kvstore.chart" . }}
{{ include "kvstore.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kvstore.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kvstore.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kvstore.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret with tokens.yaml, or "" without auth. */}}
{{- define "kvstore.authSecret" -}}
{{- if .Values.auth.enabled }}
{{- default (printf "%s-auth" (include "kvstore.fullname" .)) .Values.auth.existingSecret }}
{{- end }}
{{- end }}

{{/* The name probes expect in the daemon's certificate. */}}
{{- define "kvstore.serverName" -}}
{{- default (printf "%s.%s.svc" (include "kvstore.fullname" .) .Release.Namespace) .Values.tls.serverName }}
{{- end }}

{{/* Local for a DaemonSet (each engine on its own node's daemon), Cluster otherwise. */}}
{{- define "kvstore.trafficPolicy" -}}
{{- .Values.service.internalTrafficPolicy | default (ternary "Local" "Cluster" (eq .Values.kind "DaemonSet")) }}
{{- end }}

{{- define "kvstore.redisName" -}}
{{- printf "%s-valkey" (include "kvstore.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The remote tier's URL when it is not a Secret's. */}}
{{- define "kvstore.redisURL" -}}
{{- if .Values.redis.bundled.enabled }}
{{- printf "redis://%s.%s.svc:6379/0" (include "kvstore.redisName" .) .Release.Namespace }}
{{- else }}
{{- .Values.redis.external.url }}
{{- end }}
{{- end }}

{{/* Settings that only make sense together; fail early with a message. */}}
{{- define "kvstore.validate" -}}
{{- $vol := .Values.tiers.disk.volume.type }}
{{- if and .Values.tiers.disk.enabled (eq $vol "persistentVolumeClaim") (ne .Values.kind "StatefulSet") }}
{{- fail "tiers.disk.volume.type=persistentVolumeClaim needs kind=StatefulSet (a DaemonSet has no volume claim templates): use hostPath" }}
{{- end }}
{{- if .Values.tiers.remote.enabled }}
{{- if and .Values.redis.bundled.enabled (or .Values.redis.external.url .Values.redis.external.existingSecret) }}
{{- fail "redis.bundled.enabled and redis.external are exclusive: pick one for the remote tier" }}
{{- end }}
{{- if not (or .Values.redis.bundled.enabled .Values.redis.external.url .Values.redis.external.existingSecret) }}
{{- fail "tiers.remote.enabled needs redis.bundled.enabled=true, redis.external.url or redis.external.existingSecret" }}
{{- end }}
{{- end }}
{{- if and .Values.auth.enabled (not .Values.auth.existingSecret) (not .Values.auth.tokens) }}
{{- fail "auth.enabled needs auth.existingSecret or auth.tokens" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) }}
{{- fail "tls.enabled needs tls.existingSecret (a kubernetes.io/tls Secret, e.g. from cert-manager)" }}
{{- end }}
{{- if and .Values.hostPort.enabled (ne .Values.kind "DaemonSet") }}
{{- fail "hostPort.enabled is for kind=DaemonSet" }}
{{- end }}
{{- if and .Values.server.http2GetPort (or (eq (int .Values.server.http2GetPort) (int .Values.server.port)) (and .Values.metrics.enabled (eq (int .Values.server.http2GetPort) (int .Values.metrics.port)))) }}
{{- fail "server.http2GetPort must differ from server.port and metrics.port (0 turns the Get listener off)" }}
{{- end }}
{{- end }}
