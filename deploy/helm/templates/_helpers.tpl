{{/* Labels on everything the chart creates. */}}
{{- define "kip.labels" -}}
app.kubernetes.io/name: kip
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kip.selector" -}}
app.kubernetes.io/name: kip
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kip.image" -}}
{{ printf "%s:%v" .Values.image.repository .Values.image.tag }}
{{- end -}}

{{/* The coordinator's Service (and gRPC address for agents). */}}
{{- define "kip.coordinatorService" -}}
{{ .Values.deploymentName }}
{{- end -}}

{{/* configMap.imagePullSecrets (`a;b`) as a list of names. */}}
{{- define "kip.pullSecrets" -}}
{{- $names := list -}}
{{- range (splitList ";" (toString .Values.configMap.imagePullSecrets)) -}}
{{- $n := trim . -}}
{{- if $n }}{{ $names = append $names $n }}{{ end -}}
{{- end -}}
{{ toJson $names }}
{{- end -}}

{{/* KIP's values file has `priorityClassName: {}`: only a non-empty string counts. */}}
{{- define "kip.priorityClassName" -}}
{{- if and (kindIs "string" .) (ne . "") }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{/* The toleration of the startup gate taint `KEY[=VALUE]:EFFECT` (the argument). */}}
{{/*
Tolerations of the coordinator and the uninstall Job: the startup gate's taint (on a pool where
every node is gated, the coordinator is what opens the gates, so it must be able to run there)
and the chart user's coordinator.tolerations.
*/}}
{{- define "kip.coordinatorTolerations" -}}
{{- if or .Values.coordinator.tolerations .Values.gate.taint }}
tolerations:
  {{- with .Values.coordinator.tolerations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  {{- with .Values.gate.taint }}
  {{- include "kip.gateToleration" . | nindent 2 }}
  {{- end }}
{{- end }}
{{- end }}

{{- define "kip.gateToleration" -}}
{{- $parts := splitList ":" . -}}
- key: {{ first (splitList "=" (first $parts)) | quote }}
  operator: Exists
  effect: {{ last $parts | quote }}
{{- end }}

{{/*
The Secret into which the coordinator copies the image sets' pull secrets (empty when they are
off). The chart creates it empty, so an uninstall removes it; the coordinator owns its data.
*/}}
{{- define "kip.setPullSecrets" -}}
{{- if and .Values.imageSets.enabled .Values.imageSets.pullSecrets -}}
{{- printf "%s-set-pull-secrets" .Values.deploymentName | trunc 253 -}}
{{- end -}}
{{- end }}

{{/*
"true" when image sets get fallback DaemonSets of their own (empty otherwise).
*/}}
{{- define "kip.setFallbacks" -}}
{{- if and .Values.imageSets.enabled .Values.imageSets.fallback (ne .Values.mode "cri") -}}
true
{{- end -}}
{{- end }}
