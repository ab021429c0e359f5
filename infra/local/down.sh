#!/usr/bin/env bash
# Stop the local stack that infra/local/up.sh started (same LOCAL_* settings, see env.sh).
#
# Each service was started in a session of its own; this sends SIGTERM to the processes of
# exactly those sessions (found by session id, nothing matched by name), waits
# LOCAL_STACK_STOP_GRACE seconds, then SIGKILLs what is left. Ray workers and job supervisors
# stay in the head's session; job drivers fate-share with their supervisor. The services
# stop in parallel. State (MLflow's SQLite file, logs) stays in the state folder until the next
# up.sh.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=infra/local/env.sh
source "$HERE/env.sh"

session_pids() {  # session_pids SID: our live processes in that session (zombies are gone already)
    ps -o pid=,sid=,stat= -u "$(id -u)" | awk -v s="$1" '$2 == s && $3 !~ /^Z/ { print $1 }'
}

stop_session() {  # stop_session NAME
    local name=$1 sid_file=$LOCAL_PID_DIR/$1.sid sid pids waited=0
    if [[ ! -f $sid_file ]]; then
        echo "$name: not started"
        return 0
    fi
    sid=$(<"$sid_file")
    pids=$(session_pids "$sid")
    if [[ -z $pids ]]; then
        echo "$name: not running"
        rm -f "$sid_file"
        return 0
    fi
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null
    while [[ -n $(session_pids "$sid") ]] && (( waited < LOCAL_STACK_STOP_GRACE * 5 )); do
        sleep 0.2
        waited=$((waited + 1))
    done
    pids=$(session_pids "$sid")
    if [[ -n $pids ]]; then
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null
        for _ in $(seq 50); do
            [[ -z $(session_pids "$sid") ]] && break
            sleep 0.1
        done
    fi
    if [[ -n $(session_pids "$sid") ]]; then
        echo "$name: processes of session $sid are still alive: $(session_pids "$sid" | xargs)" >&2
        return 1
    fi
    echo "$name: stopped"
    rm -f "$sid_file"
}

# All at once (each may wait out its grace period); Ray's jobs losing MLflow or S3 a moment
# before they die themselves does not matter.
status=0
pids=()
for name in prometheus ray mlflow s3; do
    stop_session "$name" &
    pids+=($!)
done
for pid in "${pids[@]}"; do
    wait "$pid" || status=1
done
rm -f "$LOCAL_RAY_TOKEN_FILE"
# A Ray temp dir that up.sh made under /tmp (the state folder's path was too long for Ray's
# sockets) goes too; one inside the state folder stays for its logs until the next up.sh.
if [[ $status == 0 && -f $LOCAL_STACK_DIR/ray_temp_dir ]]; then
    ray_temp_dir=$(<"$LOCAL_STACK_DIR/ray_temp_dir")
    if [[ $(basename "$ray_temp_dir") == uniformer-ray.* ]]; then
        rm -rf "$ray_temp_dir" "$LOCAL_STACK_DIR/ray_temp_dir"
    fi
fi
exit $status
