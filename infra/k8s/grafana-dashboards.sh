#!/usr/bin/env bash
# Load the Grafana dashboards that Ray writes for its own version into kube-prometheus-stack's
# Grafana: copied from a running head's /tmp/ray/session_latest/metrics/grafana/dashboards/ into a
# ConfigMap labelled grafana_dashboard=1, which the chart's dashboard sidecar picks up. Rerun after
# a Ray upgrade. The Ray dashboard's metrics tab then embeds them (RAY_GRAFANA_HOST on the head).
#
#   NAMESPACE=uniformer CLUSTER=uniformer infra/k8s/grafana-dashboards.sh
set -euo pipefail
NAMESPACE=${NAMESPACE:-uniformer}
CLUSTER=${CLUSTER:-uniformer}                 # a RayJob's cluster: kubectl get raycluster -n $NAMESPACE
GRAFANA_NAMESPACE=${GRAFANA_NAMESPACE:-prometheus-system}

head=$(kubectl -n "$NAMESPACE" get pod -l "ray.io/cluster=$CLUSTER,ray.io/node-type=head" -o name | head -1)
[[ -n $head ]] || { echo "no head pod of Ray cluster $CLUSTER in namespace $NAMESPACE" >&2; exit 1; }
dir=$(mktemp -d); trap 'rm -rf "$dir"' EXIT
kubectl -n "$NAMESPACE" cp -c ray-head "${head#pod/}:/tmp/ray/session_latest/metrics/grafana/dashboards" "$dir"
kubectl -n "$GRAFANA_NAMESPACE" create configmap ray-grafana-dashboards --from-file="$dir" \
    --dry-run=client -o yaml | kubectl label --local -f - grafana_dashboard=1 -o yaml | kubectl apply -f -
echo "loaded $(ls "$dir" | wc -l) Ray dashboards into Grafana (configmap ray-grafana-dashboards)"
