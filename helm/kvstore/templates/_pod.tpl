{{/* The daemon's pod template, shared by the DaemonSet and the StatefulSet. */}}
{{- define "kvstore.probe" -}}
{{- if .root.Values.tls.enabled -}}
exec:
  command: [python, /etc/kvstore/config/probe.py]
{{- else -}}
grpc:
  port: {{ .root.Values.server.port }}
{{- end }}
{{ toYaml .probe }}
{{- end }}

{{- define "kvstore.podTemplate" -}}
{{- $disk := .Values.tiers.disk -}}
metadata:
  labels:
    {{- include "kvstore.selectorLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
    {{- if and .Values.auth.enabled (not .Values.auth.existingSecret) }}
    checksum/auth: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
    {{- end }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "kvstore.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.serviceAccount.automountToken }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if and $disk.enabled (eq $disk.volume.type "hostPath") $disk.volume.chown }}
  initContainers:
    # The node's directory is created root-owned; hand it to the daemon's user.
    - name: chown-data
      image: {{ include "kvstore.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command: [chown, "{{ .Values.podSecurityContext.runAsUser }}:{{ .Values.podSecurityContext.runAsGroup }}", /var/lib/kvstore]
      securityContext:
        runAsNonRoot: false
        runAsUser: 0
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities:
          drop: [ALL]
          add: [CHOWN]
      resources:
        requests: {cpu: 10m, memory: 16Mi}
        limits: {memory: 64Mi}
      volumeMounts:
        - {name: data, mountPath: /var/lib/kvstore}
  {{- end }}
  containers:
    - name: kvstore
      image: {{ include "kvstore.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args: [serve, --config, /etc/kvstore/config/kvstore.yaml]
      env:
        - name: HOST_IP
          valueFrom: {fieldRef: {fieldPath: status.hostIP}}
        - name: TMPDIR
          value: /tmp
        {{- if and .Values.tiers.remote.enabled .Values.redis.external.existingSecret }}
        - name: KVSTORE_TIERS__{{ .Values.tiers.remote.name | upper }}__URL
          valueFrom:
            secretKeyRef: {name: {{ .Values.redis.external.existingSecret }}, key: {{ .Values.redis.external.urlKey }}}
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: grpc
          containerPort: {{ .Values.server.port }}
          protocol: TCP
          {{- if .Values.hostPort.enabled }}
          hostPort: {{ .Values.server.port }}
          {{- end }}
        {{- if .Values.server.http2GetPort }}
        - name: grpc-get
          containerPort: {{ .Values.server.http2GetPort }}
          protocol: TCP
          {{- if .Values.hostPort.enabled }}
          hostPort: {{ .Values.server.http2GetPort }}
          {{- end }}
        {{- end }}
        {{- if .Values.metrics.enabled }}
        - name: metrics
          containerPort: {{ .Values.metrics.port }}
          protocol: TCP
        {{- end }}
      startupProbe:
        {{- include "kvstore.probe" (dict "root" . "probe" .Values.probes.startup) | nindent 8 }}
      readinessProbe:
        {{- include "kvstore.probe" (dict "root" . "probe" .Values.probes.readiness) | nindent 8 }}
      livenessProbe:
        {{- include "kvstore.probe" (dict "root" . "probe" .Values.probes.liveness) | nindent 8 }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - {name: config, mountPath: /etc/kvstore/config, readOnly: true}
        - {name: tmp, mountPath: /tmp}
        {{- if $disk.enabled }}
        - {name: data, mountPath: /var/lib/kvstore}
        {{- end }}
        {{- if .Values.auth.enabled }}
        - {name: auth, mountPath: /etc/kvstore/auth, readOnly: true}
        {{- end }}
        {{- if .Values.tls.enabled }}
        - {name: tls, mountPath: /etc/kvstore/tls, readOnly: true}
        {{- end }}
        {{- if and .Values.tiers.remote.enabled .Values.redis.external.tls.existingSecret }}
        - {name: redis-tls, mountPath: /etc/kvstore/redis-tls, readOnly: true}
        {{- end }}
        {{- if .Values.sharedMemory.hostPath }}
        - {name: dshm, mountPath: /dev/shm}
        {{- end }}
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap: {name: {{ include "kvstore.fullname" . }}}
    - name: tmp
      emptyDir: {sizeLimit: 1Gi}
    {{- if $disk.enabled }}
    {{- if eq $disk.volume.type "hostPath" }}
    - name: data
      hostPath: {path: {{ $disk.volume.hostPath }}, type: DirectoryOrCreate}
    {{- else if eq $disk.volume.type "emptyDir" }}
    - name: data
      emptyDir:
        sizeLimit: {{ $disk.volume.size }}
        {{- with $disk.volume.medium }}
        medium: {{ . }}
        {{- end }}
    {{- end }}
    {{- end }}
    {{- if .Values.auth.enabled }}
    - name: auth
      secret: {secretName: {{ include "kvstore.authSecret" . }}, defaultMode: 0440}
    {{- end }}
    {{- if .Values.tls.enabled }}
    - name: tls
      secret: {secretName: {{ .Values.tls.existingSecret }}, defaultMode: 0440}
    {{- end }}
    {{- if and .Values.tiers.remote.enabled .Values.redis.external.tls.existingSecret }}
    - name: redis-tls
      secret: {secretName: {{ .Values.redis.external.tls.existingSecret }}, defaultMode: 0440}
    {{- end }}
    {{- if .Values.sharedMemory.hostPath }}
    - name: dshm
      hostPath: {path: /dev/shm, type: Directory}
    {{- end }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
