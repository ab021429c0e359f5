# Settings of the local stack, sourced by up.sh and down.sh. Every value can be set from the
# environment first (the integration tests do that to run a stack on free ports):
#
#   LOCAL_STACK_DIR            state: logs, PID files, MLflow's SQLite file, the Ray token
#                              (default: <repo>/work/local-stack, gitignored)
#   LOCAL_S3_PORT              moto's S3 server                         (default 9000)
#   LOCAL_MLFLOW_PORT          MLflow tracking server                   (default 5000)
#   LOCAL_RAY_PORT             Ray GCS, what `ray.init()` attaches to   (default 6379)
#   LOCAL_RAY_DASHBOARD_PORT   Ray dashboard and Jobs API               (default 8265)
#   LOCAL_RAY_CLIENT_PORT      Ray client server (ray://)               (default 10001)
#   LOCAL_PROMETHEUS_PORT      Prometheus scraping the Ray head         (default 9090)
#   LOCAL_RAY_NUM_CPUS         CPUs the Ray head offers                 (default: all)
#   LOCAL_S3_BUCKET            bucket for data and Ray results          (default uniformer)
#   LOCAL_MLFLOW_BUCKET        bucket for MLflow artifacts              (default mlflow-artifacts)
#   LOCAL_RAY_TEMP_DIR         Ray's --temp-dir, recreated on every up  (default <state>/ray, or a
#                              short folder under /tmp when that path is too long for Ray's sockets)
#   LOCAL_STACK_STOP_GRACE     seconds between SIGTERM and SIGKILL in down.sh (default 10)
#   LOCAL_STACK_SERVICES       which services up.sh starts (default "s3 mlflow ray prometheus";
#                              mlflow needs s3, prometheus needs ray and the `prometheus` binary)
#   PYTHON                     interpreter with the project installed   (default <repo>/.venv/bin/python)

LOCAL_REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
LOCAL_STACK_DIR=${LOCAL_STACK_DIR:-$LOCAL_REPO_ROOT/work/local-stack}
LOCAL_S3_PORT=${LOCAL_S3_PORT:-9000}
LOCAL_MLFLOW_PORT=${LOCAL_MLFLOW_PORT:-5000}
LOCAL_RAY_PORT=${LOCAL_RAY_PORT:-6379}
LOCAL_RAY_DASHBOARD_PORT=${LOCAL_RAY_DASHBOARD_PORT:-8265}
LOCAL_RAY_CLIENT_PORT=${LOCAL_RAY_CLIENT_PORT:-10001}
LOCAL_PROMETHEUS_PORT=${LOCAL_PROMETHEUS_PORT:-9090}
LOCAL_RAY_NUM_CPUS=${LOCAL_RAY_NUM_CPUS:-}
LOCAL_S3_BUCKET=${LOCAL_S3_BUCKET:-uniformer}
LOCAL_MLFLOW_BUCKET=${LOCAL_MLFLOW_BUCKET:-mlflow-artifacts}
LOCAL_STACK_STOP_GRACE=${LOCAL_STACK_STOP_GRACE:-10}
LOCAL_STACK_SERVICES=${LOCAL_STACK_SERVICES:-s3 mlflow ray prometheus}

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$LOCAL_REPO_ROOT/.venv/bin/python" ]]; then
        PYTHON=$LOCAL_REPO_ROOT/.venv/bin/python
    else
        PYTHON=$(command -v python3)
    fi
fi
# `ray` and `mlflow` console scripts of the same environment as $PYTHON.
LOCAL_BIN=$(dirname "$PYTHON")

# moto accepts any credentials; these are fixed so that every client of the stack agrees.
LOCAL_AWS_ACCESS_KEY_ID=local-stack
LOCAL_AWS_SECRET_ACCESS_KEY=local-stack-secret
LOCAL_AWS_REGION=us-east-1

LOCAL_S3_URL=http://127.0.0.1:$LOCAL_S3_PORT
LOCAL_MLFLOW_URL=http://127.0.0.1:$LOCAL_MLFLOW_PORT
LOCAL_RAY_DASHBOARD_URL=http://127.0.0.1:$LOCAL_RAY_DASHBOARD_PORT
LOCAL_PROMETHEUS_URL=http://127.0.0.1:$LOCAL_PROMETHEUS_PORT
LOCAL_PID_DIR=$LOCAL_STACK_DIR/pids
LOCAL_LOG_DIR=$LOCAL_STACK_DIR/logs
LOCAL_RAY_TOKEN_FILE=$LOCAL_STACK_DIR/ray_auth_token
