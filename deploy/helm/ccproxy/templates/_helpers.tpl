{{/*
Names. fullname is the release name (or fullnameOverride), so the Compressor's Service is
"<release>-compressor"; the components append their own suffix.
*/}}
{{- define "ccproxy.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "ccproxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object; "ccproxy.labels" (dict "root" $ "component" "gateway"). */}}
{{- define "ccproxy.labels" -}}
helm.sh/chart: {{ include "ccproxy.chart" .root }}
{{ include "ccproxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: ccproxy
{{- end -}}

{{- define "ccproxy.selectorLabels" -}}
app.kubernetes.io/name: ccproxy
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{- define "ccproxy.secretName" -}}
{{- include "ccproxy.fullname" . -}}
{{- end -}}

{{- define "ccproxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ccproxy.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The image of a component: "ccproxy.image" (dict "root" $ "tag" .Values.gateway.image.tag). */}}
{{- define "ccproxy.image" -}}
{{- printf "%s:%s" .root.Values.image.repository .tag -}}
{{- end -}}

{{/*
One secret setting: the value given in values.yaml, or a key of an existing Secret.
"ccproxy.secretSource" (dict "spec" .Values.database "field" "url") returns "existing", "chart"
or "" (not set).
*/}}
{{- define "ccproxy.secretSource" -}}
{{- if .spec.existingSecret -}}
existing
{{- else if (get .spec .field) -}}
chart
{{- end -}}
{{- end -}}

{{/*
The env entries of secret settings, each from the existing Secret or the chart's; the unset ones
are left out. "ccproxy.secretEnv" (dict "root" $ "items" (list (dict "env" "CCPROXY_DATABASE_URL"
"spec" .Values.database "field" "url") …))
*/}}
{{- define "ccproxy.secretEnv" -}}
{{- $root := .root -}}
{{- range .items -}}
{{- $source := include "ccproxy.secretSource" . -}}
{{- if $source }}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      {{- if eq $source "existing" }}
      name: {{ .spec.existingSecret }}
      key: {{ .spec.existingSecretKey }}
      {{- else }}
      name: {{ include "ccproxy.secretName" $root }}
      key: {{ .env }}
      {{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Where the metrics token is: a dict name/key (the ServiceMonitors read it). */}}
{{- define "ccproxy.metricsTokenRef" -}}
{{- if .Values.metricsToken.existingSecret -}}
name: {{ .Values.metricsToken.existingSecret }}
key: {{ .Values.metricsToken.existingSecretKey }}
{{- else -}}
name: {{ include "ccproxy.secretName" . }}
key: CCPROXY_METRICS_TOKEN
{{- end -}}
{{- end -}}

{{/* The Redis URL's source, including the bundled Redis: "existing", "chart" or "". */}}
{{- define "ccproxy.redisSource" -}}
{{- if .Values.redis.existingSecret -}}
existing
{{- else if or .Values.redis.url .Values.redis.enabled -}}
chart
{{- end -}}
{{- end -}}

{{- define "ccproxy.redisUrl" -}}
{{- if .Values.redis.url -}}
{{- .Values.redis.url -}}
{{- else -}}
{{- printf "redis://%s-redis:6379/0" (include "ccproxy.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The values the chart refuses to render without. */}}
{{- define "ccproxy.validate" -}}
{{- if not (include "ccproxy.secretSource" (dict "spec" .Values.database "field" "url")) -}}
{{- fail "database: set database.url (postgresql://…) or database.existingSecret: without it every Gateway replica keeps its own SQLite accounts" -}}
{{- end -}}
{{- if not (include "ccproxy.secretSource" (dict "spec" .Values.metricsToken "field" "value")) -}}
{{- fail "metricsToken: set metricsToken.value (e.g. openssl rand -hex 32) or metricsToken.existingSecret: production refuses an open /metrics" -}}
{{- end -}}
{{- if not (include "ccproxy.secretSource" (dict "spec" .Values.compressorToken "field" "value")) -}}
{{- fail "compressorToken: set compressorToken.value (e.g. openssl rand -hex 32) or compressorToken.existingSecret: production refuses a Compressor without it" -}}
{{- end -}}
{{- if and .Values.billing.enabled (not (include "ccproxy.secretSource" (dict "spec" .Values.billing "field" "stripeApiKey"))) -}}
{{- fail "billing.enabled: set billing.stripeApiKey or billing.existingSecret" -}}
{{- end -}}
{{- end -}}

{{/*
Writable places under the read-only root filesystem: /tmp (BENTOML_HOME lives there, BentoML's
sockets and Prometheus multiprocess files) and ~/.cache (models, tokenizers).
*/}}
{{- define "ccproxy.runtimeEnv" -}}
- name: BENTOML_HOME
  value: /tmp/bentoml
- name: BENTOML_DO_NOT_TRACK
  value: "true"
- name: TRITON_CACHE_DIR
  value: /home/bentoml/.cache/triton
- name: CCPROXY_ENVIRONMENT
  value: production
{{- end -}}
