{{/*
Named helpers. Names are cut to 63 characters (the DNS label limit) and never end in a dash.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "hogwild.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The full name of the release's objects: fullnameOverride, or <release>-<name> (just <release> when it already holds the name). */}}
{{- define "hogwild.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "hogwild.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A name derived from the full name with a suffix, still within 63 characters. Call with (list . "suffix"). */}}
{{- define "hogwild.componentName" -}}
{{- $root := index . 0 -}}
{{- $suffix := index . 1 -}}
{{- printf "%s-%s" (include "hogwild.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix -}}
{{- end -}}

{{/* chart label value: <name>-<version>. */}}
{{- define "hogwild.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object of the release. */}}
{{- define "hogwild.labels" -}}
helm.sh/chart: {{ include "hogwild.chart" . }}
app.kubernetes.io/name: {{ include "hogwild.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: hogwild
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Selector labels of the operator pods. The component label keeps them apart from session pods, which also
carry app.kubernetes.io/name=hogwild (with the session's name as instance).
*/}}
{{- define "hogwild.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hogwild.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Labels of the operator's objects: common labels plus the component. */}}
{{- define "hogwild.operator.labels" -}}
{{ include "hogwild.labels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "hogwild.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "hogwild.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
An image reference from {repository, tag, digest}: repository@digest when a digest is set, else
repository:tag. Call with (list <image values> "<values path for messages>").
*/}}
{{- define "hogwild.image" -}}
{{- $image := index . 0 -}}
{{- $path := index . 1 -}}
{{- $repository := required (printf "%s.repository is required" $path) $image.repository -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repository (required (printf "%s.tag or %s.digest is required" $path $path) $image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The namespaces the operator serves when watch.scope is namespaces (the release namespace if none), as JSON. */}}
{{- define "hogwild.watchNamespaces" -}}
{{- if .Values.watch.namespaces -}}
{{- .Values.watch.namespaces | uniq | toJson -}}
{{- else -}}
{{- list .Release.Namespace | toJson -}}
{{- end -}}
{{- end -}}

{{/* True (non-empty) when the operator watches the whole cluster. */}}
{{- define "hogwild.clusterScoped" -}}
{{- if eq .Values.watch.scope "cluster" -}}true{{- end -}}
{{- end -}}

{{/* The namespace of the dashboard ConfigMaps. */}}
{{- define "hogwild.dashboardsNamespace" -}}
{{- default .Release.Namespace .Values.dashboards.namespace -}}
{{- end -}}
