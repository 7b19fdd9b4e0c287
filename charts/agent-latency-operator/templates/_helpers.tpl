{{/*
Names. The ServiceAccounts follow a fixed pattern ({{ .Release.Name }}-controller, -agent, -uninstall) so
RBAC subjects and the API-level test harness can name them without rendering helpers.
*/}}
{{- define "agentlat.name" -}}agent-latency-operator{{- end -}}

{{- define "agentlat.controllerName" -}}{{ printf "%s-controller" .Release.Name }}{{- end -}}
{{- define "agentlat.agentName" -}}{{ printf "%s-agent" .Release.Name }}{{- end -}}
{{- define "agentlat.uninstallName" -}}{{ printf "%s-uninstall" .Release.Name }}{{- end -}}

{{/* Service names are DNS-1035 labels: at most 63 characters. */}}
{{- define "agentlat.controllerMetricsName" -}}
{{- printf "%s-controller-metrics" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- define "agentlat.agentMetricsName" -}}
{{- printf "%s-agent-metrics" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "agentlat.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "agentlat.selectorLabels" -}}
app.kubernetes.io/name: {{ include "agentlat.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "agentlat.labels" -}}
{{ include "agentlat.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: agent-latency-operator
helm.sh/chart: {{ include "agentlat.chart" . }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels for one component: include "agentlat.componentLabels" (dict "ctx" $ "component" "controller") */}}
{{- define "agentlat.componentLabels" -}}
{{ include "agentlat.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "agentlat.componentSelector" -}}
{{ include "agentlat.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The image: repository@digest when a digest is given, else repository:tag (tag defaults to appVersion). */}}
{{- define "agentlat.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{/* Pod and container security for the controller and the uninstall hook: an unprivileged process. */}}
{{- define "agentlat.restrictedPodSecurity" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "agentlat.restrictedContainerSecurity" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
