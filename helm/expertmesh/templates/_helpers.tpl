{{/*
Names. KubeRay derives longer names (RayCluster NAME-xxxxx, NAME-head-svc, NAME-serve-svc, pod
names) from the RayService's, so the prefix stays within 40 characters.
*/}}
{{- define "expertmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "expertmesh.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels of every resource the chart renders. */}}
{{- define "expertmesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "expertmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: expertmesh
{{- end }}

{{/*
Labels of the Ray pods, which the PodMonitor and the gRPC Service select. Not app.kubernetes.io/name:
KubeRay labels its pods app.kubernetes.io/name=kuberay, and a pod label would override it.
*/}}
{{- define "expertmesh.podSelectorLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: expertmesh
{{- end }}

{{- define "expertmesh.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The custom Ray resource only router pods offer, so router replicas land on them. */}}
{{- define "expertmesh.routerResource" -}}expertmesh_router{{- end }}

{{/*
Router replicas: [min, initial, max]. With autoscaling_config, Serve's own defaults apply to what
is not set (min_replicas 1, max_replicas 1, initial_replicas = min_replicas).
*/}}
{{- define "expertmesh.routerReplicas" -}}
{{- $router := .Values.config.router }}
{{- if $router.autoscaling_config }}
{{- $a := $router.autoscaling_config }}
{{- $min := int (hasKey $a "min_replicas" | ternary $a.min_replicas 1) }}
{{- $max := int (hasKey $a "max_replicas" | ternary $a.max_replicas 1) }}
{{- $initial := $min }}
{{- if not (kindIs "invalid" $a.initial_replicas) }}{{ $initial = int $a.initial_replicas }}{{ end }}
{{- list $min $initial $max | toJson }}
{{- else }}
{{- $n := int (default 1 $router.num_replicas) }}
{{- list $n $n $n | toJson }}
{{- end }}
{{- end }}

{{/* Expert groups per router replica that need a GPU pod of their own (none for transport local). */}}
{{- define "expertmesh.expertGroupsPerRouter" -}}
{{- if eq .Values.config.experts.transport "local" }}0{{ else }}{{ int .Values.config.experts.groups }}{{ end }}
{{- end }}

{{/* Expert pods for N router replicas: ceil(N * groups / gpusPerPod). */}}
{{- define "expertmesh.expertPods" -}}
{{- $groups := int (include "expertmesh.expertGroupsPerRouter" .root) }}
{{- $gpus := int .root.Values.expertWorkers.gpusPerPod }}
{{- div (add (mul .routers $groups) (sub $gpus 1)) $gpus }}
{{- end }}

{{/* Checks the schema cannot express; each names the values to change. */}}
{{- define "expertmesh.validate" -}}
{{- $c := .Values.config }}
{{- if and (eq $c.experts.transport "local") (ne (int $c.experts.groups) 1) }}
{{- fail (printf "config.experts.transport 'local' keeps every expert in the router's process: set config.experts.groups to 1 (it is %d), or use transport 'collective' or 'grpc'" (int $c.experts.groups)) }}
{{- end }}
{{- if and (eq $c.experts.assignment "balanced") (not $c.experts.routing_counts) }}
{{- fail "config.experts.assignment 'balanced' needs config.experts.routing_counts: a JSON file of measured routing counts that the pods can read" }}
{{- end }}
{{- $source := $c.model.source }}
{{- $mount := trimSuffix "/" .Values.modelStorage.mountPath }}
{{- if and (ne $source "smollm2-moe") (not (hasPrefix (printf "%s/" $mount) $source)) }}
{{- fail (printf "config.model.source %q is not on the model volume: use a directory below modelStorage.mountPath (%s/...), or smollm2-moe" $source $mount) }}
{{- end }}
{{- $a := $c.router.autoscaling_config }}
{{- if and $a (hasKey $a "min_replicas") (hasKey $a "max_replicas") }}
{{- if gt (int $a.min_replicas) (int $a.max_replicas) }}
{{- fail (printf "config.router.autoscaling_config: min_replicas (%d) is above max_replicas (%d)" (int $a.min_replicas) (int $a.max_replicas)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The Secret names the pods read, or "" when none is configured. */}}
{{- define "expertmesh.apiKeysSecret" -}}
{{- if .Values.apiKeys.existingSecret }}{{ .Values.apiKeys.existingSecret }}{{ else if .Values.apiKeys.keys }}{{ include "expertmesh.fullname" . }}-api-keys{{ end }}
{{- end }}

{{- define "expertmesh.sessionStoreSecret" -}}
{{- if .Values.sessionStore.existingSecret }}{{ .Values.sessionStore.existingSecret }}{{ else if .Values.sessionStore.url }}{{ include "expertmesh.fullname" . }}-session-store{{ end }}
{{- end }}

{{- define "expertmesh.modelClaim" -}}
{{- default (printf "%s-models" (include "expertmesh.fullname" .)) .Values.modelStorage.existingClaim }}
{{- end }}

{{/*
One Ray pod template. Arguments: root (the chart context), group (head | router | experts),
spec (that group's values), gpus (nvidia.com/gpu of the container, 0 for none).
*/}}
{{- define "expertmesh.podTemplate" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $apiKeys := include "expertmesh.apiKeysSecret" $root }}
{{- $session := include "expertmesh.sessionStoreSecret" $root }}
metadata:
  labels:
    {{- include "expertmesh.podSelectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .group }}
    {{- with .spec.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .spec.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $v.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .spec.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .spec.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .spec.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: ray-{{ .group }}
      image: {{ include "expertmesh.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      {{- with $v.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      ports:
        {{- if eq .group "head" }}
        - {name: gcs-server, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
        {{- end }}
        - {name: serve, containerPort: {{ int $v.config.http.port }}}
        {{- if $v.config.grpc.enabled }}
        - {name: grpc, containerPort: {{ int $v.config.grpc.port }}}
        {{- end }}
        - {name: metrics, containerPort: {{ int $v.metrics.port }}}
      {{- $env := list }}
      {{- if $apiKeys }}
      {{- $env = append $env (dict "name" "EXPERTMESH_API_KEYS_DIR" "value" $v.apiKeys.mountPath) }}
      {{- end }}
      {{- if $session }}
      {{- $env = append $env (dict "name" "EXPERTMESH_SESSION_STORE_URL" "valueFrom" (dict "secretKeyRef" (dict "name" $session "key" $v.sessionStore.secretKey))) }}
      {{- end }}
      {{- $env = concat $env $v.env .spec.env }}
      {{- with $env }}
      env:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        {{- $resources := deepCopy (default (dict) .spec.resources) }}
        {{- if gt (int .gpus) 0 }}
        {{- $_ := set $resources "requests" (merge (dict "nvidia.com/gpu" (int .gpus)) (default (dict) $resources.requests)) }}
        {{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" (int .gpus)) (default (dict) $resources.limits)) }}
        {{- end }}
        {{- toYaml $resources | nindent 8 }}
      volumeMounts:
        - {name: models, mountPath: {{ $v.modelStorage.mountPath }}, readOnly: true}
        - {name: dshm, mountPath: /dev/shm}
        {{- if $apiKeys }}
        - {name: api-keys, mountPath: {{ $v.apiKeys.mountPath }}, readOnly: true}
        {{- end }}
  volumes:
    - name: models
      persistentVolumeClaim: {claimName: {{ include "expertmesh.modelClaim" $root }}, readOnly: true}
    - name: dshm
      emptyDir: {medium: Memory, sizeLimit: {{ .spec.shmSize }}}
    {{- if $apiKeys }}
    - name: api-keys
      secret: {secretName: {{ $apiKeys }}}
    {{- end }}
{{- end }}
