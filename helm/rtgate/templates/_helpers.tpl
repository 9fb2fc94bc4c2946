{{/* Names and labels shared by every template. */}}

{{- define "rtgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rtgate.fullname" -}}
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

{{- define "rtgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "rtgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rtgate
{{- end -}}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "gateway"). */}}
{{- define "rtgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rtgate.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "rtgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "rtgate.secretName" -}}
{{- default (printf "%s-secrets" (include "rtgate.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* The SQLite store allows one broker only (the store lease refuses a second). */}}
{{- define "rtgate.brokerUsesPostgres" -}}
{{- if eq .Values.store.backend "postgres" -}}true{{- end -}}
{{- end -}}

{{/*
One value as an environment string the services parse by the key's type
(docs/operations.md): lists comma-joined, whole numbers without exponent (YAML
numbers reach templates as float64, and 1073741824 would print as 1.073741824e+09).
*/}}
{{- define "rtgate.envValue" -}}
{{- $v := . -}}
{{- $kind := kindOf $v -}}
{{- if or (eq $kind "slice") -}}
{{- $items := list -}}
{{- range $v }}{{ $items = append $items (include "rtgate.envValue" .) }}{{ end -}}
{{- join "," $items -}}
{{- else if and (eq $kind "float64") (eq (floor $v) $v) -}}
{{- int64 $v -}}
{{- else -}}
{{- toString $v -}}
{{- end -}}
{{- end -}}

{{/*
ConfigMap data from a {section: {key: value}} map: RTGATE_<SECTION>__<KEY>.
The services read every config key this way, so no TOML file is needed.
*/}}
{{- define "rtgate.envData" -}}
{{- range $section, $keys := . }}
{{- if not (kindIs "map" $keys) }}
{{- fail (printf "config.%s must be a map of keys (config.<section>.<key>), got %v" $section $keys) }}
{{- end }}
{{- range $key, $value := $keys }}
{{ printf "RTGATE_%s__%s" (upper $section) (upper $key) }}: {{ include "rtgate.envValue" $value | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Seconds a gateway pod may take to stop: preStop sleep + drain window + close timeout + margin. */}}
{{- define "rtgate.gatewayGraceSeconds" -}}
{{- $g := .Values.gateway -}}
{{- add (int $g.preStopSleepSeconds) (int (ceil $g.drainSeconds)) (int (ceil $g.closeTimeoutSeconds)) (int $g.terminationGraceMarginSeconds) -}}
{{- end -}}

{{- define "rtgate.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext -}}
{{- end -}}

{{- define "rtgate.containerSecurityContext" -}}
{{- toYaml .Values.securityContext -}}
{{- end -}}
