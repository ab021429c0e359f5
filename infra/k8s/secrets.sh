#!/usr/bin/env bash
# Create the Secrets that the manifests in this folder reference (a test checks that every
# secretKeyRef and secret volume names one created here). Run once per namespace; an existing
# Secret is left as it is, so rerunning never rotates a token under a running cluster.
#
#   NAMESPACE=uniformer PG_URI='postgresql+psycopg://mlflow:PASSWORD@HOST:5432' infra/k8s/secrets.sh
#
# PG_URI: the MLflow PostgreSQL server without a database name (databases mlflow and mlflow_auth
# must exist). The MLflow training user's password is generated; create that user in MLflow with
# the admin password (infra/README.md, "MLflow").
set -euo pipefail
NAMESPACE=${NAMESPACE:-uniformer}
: "${PG_URI:?set PG_URI=postgresql+psycopg://USER:PASSWORD@HOST:5432 (no database name)}"

rand() { openssl rand -hex "$1"; }
exists() { kubectl -n "$NAMESPACE" get secret "$1" > /dev/null 2>&1; }
create() {  # create NAME ARGS...: kubectl create secret generic NAME ARGS, unless it exists
    local name=$1; shift
    if exists "$name"; then echo "secret $name: exists, kept"; return; fi
    kubectl -n "$NAMESPACE" create secret generic "$name" "$@" > /dev/null
    echo "secret $name: created"
}

# Ray's token (KubeRay authOptions.secretName; key auth_token is what KubeRay reads).
create uniformer-ray-auth --from-literal=auth_token="$(rand 32)"
# Redis for GCS fault tolerance.
create uniformer-redis --from-literal=password="$(rand 24)"
# MLflow server: tracking store, and the basic-auth app's own database and settings.
create uniformer-mlflow-db --from-literal=MLFLOW_BACKEND_STORE_URI="$PG_URI/mlflow"
ini=$(mktemp); trap 'rm -f "$ini"' EXIT
cat > "$ini" <<INI
[mlflow]
default_permission = READ
database_uri = $PG_URI/mlflow_auth
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
create uniformer-mlflow-auth --from-file=basic_auth.ini="$ini" \
    --from-literal=MLFLOW_AUTH_ADMIN_PASSWORD="$(rand 16)" \
    --from-literal=MLFLOW_FLASK_SERVER_SECRET_KEY="$(rand 32)"
# The MLflow user that training pods log as (create it in MLflow with this password).
create uniformer-mlflow-client --from-literal=MLFLOW_TRACKING_USERNAME=trainer \
    --from-literal=MLFLOW_TRACKING_PASSWORD="$(rand 16)"
