#!/usr/bin/env bash
# Start the local stack on loopback: an S3 server (moto), an MLflow server whose artifacts land
# in that S3, a Ray head with the dashboard and Jobs API, and Prometheus scraping Ray's metrics
# (the dashboard's metrics tab reads it). Stop it with infra/local/down.sh.
#
#   infra/local/up.sh            # ports and folders: see infra/local/env.sh (LOCAL_* variables)
#   source work/local-stack/env  # then: uniformer submit train ..., ray job list, mlflow ui ...
#
# The Ray head runs with token authentication on (RAY_AUTH_MODE=token): up.sh writes a fresh
# token to <state>/ray_auth_token (mode 600) and starts the head with RAY_AUTH_TOKEN_PATH
# pointing at it. Anyone who submits jobs needs RAY_AUTH_MODE=token plus that file
# (RAY_AUTH_TOKEN_PATH) or its content (RAY_AUTH_TOKEN); the env file exports the path.
# Without them Ray's Jobs API answers "Missing authentication token".
#
# Each service runs in a session of its own (setsid); down.sh stops exactly those sessions.
# Deliberately no `ray stop`: it kills every Ray process of every user on the machine.
# Instead every start gets a fresh Ray --temp-dir, so state of an earlier failed start cannot
# leak into this one.
set -euo pipefail
# shellcheck source=infra/local/env.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/env.sh"

die() { echo "up.sh: $*" >&2; exit 1; }

for name in $LOCAL_STACK_SERVICES; do
    [[ $name == s3 || $name == mlflow || $name == ray || $name == prometheus ]] \
        || die "LOCAL_STACK_SERVICES: unknown service '$name' (known: s3 mlflow ray prometheus)"
done
if [[ " $LOCAL_STACK_SERVICES " == *" mlflow "* && " $LOCAL_STACK_SERVICES " != *" s3 "* ]]; then
    die "LOCAL_STACK_SERVICES: mlflow keeps its artifacts in the stack's S3; add s3"
fi
if [[ " $LOCAL_STACK_SERVICES " == *" prometheus "* ]]; then
    [[ " $LOCAL_STACK_SERVICES " == *" ray "* ]] || die "LOCAL_STACK_SERVICES: prometheus scrapes the Ray head; add ray"
    command -v prometheus > /dev/null \
        || die "prometheus is not installed: run infra/local/system-deps.sh, or leave it out of LOCAL_STACK_SERVICES"
fi

is_running() {  # is_running NAME: does the session recorded for NAME still have processes?
    local sid_file=$LOCAL_PID_DIR/$1.sid sid
    [[ -f $sid_file ]] || return 1
    sid=$(<"$sid_file")
    [[ -n $(ps -eo sid= | awk -v s="$sid" '$1 == s') ]]
}

for name in s3 mlflow ray prometheus; do
    if is_running "$name"; then
        die "the local stack in $LOCAL_STACK_DIR is already running ($name); stop it with infra/local/down.sh"
    fi
done

want() { [[ " $LOCAL_STACK_SERVICES " == *" $1 "* ]]; }

# Ports: fail early, naming the variable that moves the busy one.
ports=()
if want s3; then ports+=("$LOCAL_S3_PORT:LOCAL_S3_PORT"); fi
if want mlflow; then ports+=("$LOCAL_MLFLOW_PORT:LOCAL_MLFLOW_PORT"); fi
if want ray; then
    ports+=("$LOCAL_RAY_PORT:LOCAL_RAY_PORT" "$LOCAL_RAY_DASHBOARD_PORT:LOCAL_RAY_DASHBOARD_PORT"
            "$LOCAL_RAY_CLIENT_PORT:LOCAL_RAY_CLIENT_PORT")
fi
if want prometheus; then ports+=("$LOCAL_PROMETHEUS_PORT:LOCAL_PROMETHEUS_PORT"); fi
"$PYTHON" - "${ports[@]}" <<'EOF' || exit 1
import socket, sys
for arg in sys.argv[1:]:
    port, var = arg.split(":")
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", int(port)))
        except OSError as err:
            sys.exit(f"up.sh: port {port} is busy ({err.strerror}); set {var} to a free port")
EOF
# Ray's other ports (agents, node manager, metrics) on free ports so two stacks never clash.
read -r AGENT_HTTP_PORT AGENT_GRPC_PORT METRICS_PORT RUNTIME_ENV_PORT NODE_MANAGER_PORT OBJECT_MANAGER_PORT \
    < <("$PYTHON" -c '
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')

# Fresh state (the SQLite file and the buckets' content live only as long as the stack).
mkdir -p "$LOCAL_STACK_DIR"
rm -rf "$LOCAL_PID_DIR" "$LOCAL_LOG_DIR" "$LOCAL_STACK_DIR/mlflow" "$LOCAL_RAY_TOKEN_FILE" "$LOCAL_STACK_DIR/prometheus"
mkdir -p "$LOCAL_PID_DIR" "$LOCAL_LOG_DIR" "$LOCAL_STACK_DIR/mlflow"
if [[ -z "${LOCAL_RAY_TEMP_DIR:-}" ]]; then
    LOCAL_RAY_TEMP_DIR=$LOCAL_STACK_DIR/ray
    # Ray's sockets live at <temp>/session_<date>_<pid>/sockets/plasma_store; AF_UNIX paths
    # are limited to 107 bytes.
    if (( ${#LOCAL_RAY_TEMP_DIR} > 40 )); then
        LOCAL_RAY_TEMP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/uniformer-ray.XXXXXX")
    fi
fi
rm -rf "$LOCAL_RAY_TEMP_DIR"
mkdir -p "$LOCAL_RAY_TEMP_DIR"
echo "$LOCAL_RAY_TEMP_DIR" > "$LOCAL_STACK_DIR/ray_temp_dir"

# From here on a failure stops whatever did start.
trap 'status=$?; if (( status != 0 )); then
        echo "up.sh: failed; logs in $LOCAL_LOG_DIR; stopping what started" >&2
        "$HERE/down.sh" >&2 || true
      fi' EXIT

start_session() {  # start_session NAME CMD...: run CMD in a new session, in the background
    local name=$1; shift
    setsid --wait bash -c 'echo $$ > "$0"; exec "$@"' "$LOCAL_PID_DIR/$name.sid" "$@" \
        > "$LOG_FILE" 2>&1 < /dev/null &
}

wait_http() {  # wait_http NAME URL TIMEOUT_S [TOKEN_FILE]: until URL answers at all
    "$PYTHON" - "$@" <<'EOF'
import sys, time, urllib.error, urllib.request
name, url, timeout_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
headers = {}
if len(sys.argv) > 4:
    headers["Authorization"] = "Bearer " + open(sys.argv[4]).read().strip()
deadline = time.monotonic() + timeout_s
while True:
    try:
        urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2)
        break
    except urllib.error.HTTPError:
        break  # it answers, if only with an error status
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(f"up.sh: {name} did not answer at {url} within {timeout_s:.0f} s")
        time.sleep(0.3)
EOF
}

log_tail() { echo "--- last lines of $1" >&2; tail -n 20 "$1" >&2 || true; }

export AWS_ACCESS_KEY_ID=$LOCAL_AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$LOCAL_AWS_SECRET_ACCESS_KEY
export AWS_DEFAULT_REGION=$LOCAL_AWS_REGION
unset AWS_SESSION_TOKEN AWS_PROFILE

# S3, MLflow and Ray start at once (each takes seconds, MLflow and Ray tens of seconds on a busy machine);
# then each is waited for. MLflow needs S3 only when the first artifact arrives.
if want s3; then
    echo "starting S3 (moto) on $LOCAL_S3_URL"
    LOG_FILE=$LOCAL_LOG_DIR/s3.log start_session s3 "$PYTHON" -m moto.server -H 127.0.0.1 -p "$LOCAL_S3_PORT"
fi
if want ray; then
    echo "starting Ray head (GCS 127.0.0.1:$LOCAL_RAY_PORT, dashboard $LOCAL_RAY_DASHBOARD_URL, token auth on)"
    "$PYTHON" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$LOCAL_RAY_TOKEN_FILE"
    chmod 600 "$LOCAL_RAY_TOKEN_FILE"
    ray_args=(start --head --port "$LOCAL_RAY_PORT" --node-ip-address 127.0.0.1
              --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$LOCAL_RAY_DASHBOARD_PORT"
              --ray-client-server-port "$LOCAL_RAY_CLIENT_PORT"
              --dashboard-agent-listen-port "$AGENT_HTTP_PORT" --dashboard-agent-grpc-port "$AGENT_GRPC_PORT"
              --metrics-export-port "$METRICS_PORT" --runtime-env-agent-port "$RUNTIME_ENV_PORT"
              --node-manager-port "$NODE_MANAGER_PORT" --object-manager-port "$OBJECT_MANAGER_PORT"
              --temp-dir "$LOCAL_RAY_TEMP_DIR" --disable-usage-stats)
    if [[ -n $LOCAL_RAY_NUM_CPUS ]]; then ray_args+=(--num-cpus "$LOCAL_RAY_NUM_CPUS"); fi
    # The head, its workers and its jobs inherit these: token mode with our token and nothing else,
    # and $PYTHON's environment first on PATH (a job's entrypoint `python -m jobs.X` is a shell
    # command: without this it would find whatever `python` the caller's PATH has). Like a real
    # cluster's pods, the head also gives its jobs the stack's S3 endpoint and MLflow server, so
    # `uniformer submit` forwards nothing by default; and the dashboard finds Prometheus.
    ray_env=(RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$LOCAL_RAY_TOKEN_FILE" PATH="$LOCAL_BIN:$PATH")
    if want s3; then ray_env+=(AWS_ENDPOINT_URL="$LOCAL_S3_URL" MLFLOW_S3_ENDPOINT_URL="$LOCAL_S3_URL"); fi
    if want mlflow; then ray_env+=(MLFLOW_TRACKING_URI="$LOCAL_MLFLOW_URL"); fi
    if want prometheus; then ray_env+=(RAY_PROMETHEUS_HOST="$LOCAL_PROMETHEUS_URL"); fi
    # `ray start` returns once the head runs; its processes stay in the session.
    LOG_FILE=$LOCAL_LOG_DIR/ray.log start_session ray env -u RAY_AUTH_TOKEN -u RAY_ADDRESS \
        -u RAY_API_SERVER_ADDRESS "${ray_env[@]}" "$LOCAL_BIN/ray" "${ray_args[@]}"
    ray_start_pid=$!
fi
if want mlflow; then
    echo "starting MLflow on $LOCAL_MLFLOW_URL (artifacts: s3://$LOCAL_MLFLOW_BUCKET/ through the server)"
    # No MLflow server jobs (GenAI features): their runner is one more process importing mlflow.
    LOG_FILE=$LOCAL_LOG_DIR/mlflow.log start_session mlflow env MLFLOW_S3_ENDPOINT_URL="$LOCAL_S3_URL" \
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
        "$PYTHON" -m mlflow server --host 127.0.0.1 --port "$LOCAL_MLFLOW_PORT" --workers 1 \
        --backend-store-uri "sqlite:///$LOCAL_STACK_DIR/mlflow/mlflow.db" \
        --artifacts-destination "s3://$LOCAL_MLFLOW_BUCKET/"
fi

if want s3; then
    wait_http S3 "$LOCAL_S3_URL" 120 || { log_tail "$LOCAL_LOG_DIR/s3.log"; exit 1; }
    "$PYTHON" - "$LOCAL_S3_URL" "$LOCAL_S3_BUCKET" "$LOCAL_MLFLOW_BUCKET" <<'EOF'
import sys
import boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1])
for bucket in sys.argv[2:]:
    s3.create_bucket(Bucket=bucket)
EOF
fi
if want mlflow; then
    wait_http MLflow "$LOCAL_MLFLOW_URL/health" 300 || { log_tail "$LOCAL_LOG_DIR/mlflow.log"; exit 1; }
fi
if want ray; then
    wait "$ray_start_pid" || { log_tail "$LOCAL_LOG_DIR/ray.log"; die "ray start failed"; }
    wait_http "Ray dashboard" "$LOCAL_RAY_DASHBOARD_URL/api/version" 120 "$LOCAL_RAY_TOKEN_FILE" \
        || { log_tail "$LOCAL_LOG_DIR/ray.log"; exit 1; }
fi
if want prometheus; then
    # Ray's dashboard writes a Prometheus config for this session: scrape every Ray node listed in
    # the service-discovery file it keeps up to date (under this --temp-dir, not /tmp/ray).
    prom_config=$LOCAL_RAY_TEMP_DIR/session_latest/metrics/prometheus/prometheus.yml
    for _ in $(seq 300); do [[ -f $prom_config ]] && break; sleep 0.2; done
    [[ -f $prom_config ]] || die "Ray wrote no Prometheus config at $prom_config"
    echo "starting Prometheus on $LOCAL_PROMETHEUS_URL (config: $prom_config)"
    mkdir -p "$LOCAL_STACK_DIR/prometheus"
    LOG_FILE=$LOCAL_LOG_DIR/prometheus.log start_session prometheus prometheus --config.file="$prom_config" \
        --web.listen-address="127.0.0.1:$LOCAL_PROMETHEUS_PORT" \
        --storage.tsdb.path="$LOCAL_STACK_DIR/prometheus" --storage.tsdb.retention.time=1d
    wait_http Prometheus "$LOCAL_PROMETHEUS_URL/-/ready" 120 || { log_tail "$LOCAL_LOG_DIR/prometheus.log"; exit 1; }
fi

{
    echo "# The local stack's clients: source this file (written by infra/local/up.sh)."
    if want mlflow; then
        echo "export MLFLOW_TRACKING_URI=$LOCAL_MLFLOW_URL"
    fi
    if want s3; then
        echo "export AWS_ENDPOINT_URL=$LOCAL_S3_URL"
        echo "export MLFLOW_S3_ENDPOINT_URL=$LOCAL_S3_URL"
        echo "export AWS_ACCESS_KEY_ID=$LOCAL_AWS_ACCESS_KEY_ID"
        echo "export AWS_SECRET_ACCESS_KEY=$LOCAL_AWS_SECRET_ACCESS_KEY"
        echo "export AWS_DEFAULT_REGION=$LOCAL_AWS_REGION"
    fi
    if want ray; then
        echo "# ray.init() in a driver attaches to the GCS; \`ray job\` and \`uniformer submit\` use the API server."
        echo "export RAY_ADDRESS=127.0.0.1:$LOCAL_RAY_PORT"
        echo "export RAY_API_SERVER_ADDRESS=$LOCAL_RAY_DASHBOARD_URL"
        echo "export RAY_AUTH_MODE=token"
        echo "export RAY_AUTH_TOKEN_PATH=$LOCAL_RAY_TOKEN_FILE"
    fi
    if want prometheus; then
        echo "export LOCAL_PROMETHEUS_URL=$LOCAL_PROMETHEUS_URL"
    fi
} > "$LOCAL_STACK_DIR/env"

echo
echo "local stack is up (state in $LOCAL_STACK_DIR, logs in $LOCAL_LOG_DIR)"
if want s3; then echo "  S3 (moto)       $LOCAL_S3_URL   buckets: s3://$LOCAL_S3_BUCKET, s3://$LOCAL_MLFLOW_BUCKET"; fi
if want mlflow; then echo "  MLflow UI/API   $LOCAL_MLFLOW_URL"; fi
if want ray; then
    echo "  Ray dashboard   $LOCAL_RAY_DASHBOARD_URL   (Jobs API; token in $LOCAL_RAY_TOKEN_FILE)"
    echo "  Ray GCS         127.0.0.1:$LOCAL_RAY_PORT"
fi
if want prometheus; then
    echo "  Prometheus      $LOCAL_PROMETHEUS_URL   (Ray's metrics; Grafana dashboards Ray generated:"
    echo "                  $LOCAL_RAY_TEMP_DIR/session_latest/metrics/grafana/dashboards)"
fi
echo
echo "use it from a shell (the env file holds these exports):"
echo "  source $LOCAL_STACK_DIR/env"
sed -n 's/^export /  export /p' "$LOCAL_STACK_DIR/env"
echo "  uniformer submit train --config infra/configs/demo.yaml data.manifest=s3://$LOCAL_S3_BUCKET/demo/prepared"
echo "stop it: infra/local/down.sh"
