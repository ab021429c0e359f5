#!/usr/bin/env bash
# System packages the integration tests run for real (Debian 12): PostgreSQL, for the MLflow server
# on PostgreSQL (tests/infra/test_mlflow_postgres.py), and Prometheus, which scrapes the local Ray
# head (tests/infra/test_local_stack.py). Run by `make test` (through `make system-deps`); does
# nothing when both are present, runs `apt-get update` only when apt does not know the packages yet.
set -euo pipefail

have_postgres() { compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null; }
have_prometheus() { command -v prometheus > /dev/null; }
if have_postgres && have_prometheus; then
    exit 0
fi
if [[ $(id -u) != 0 ]]; then
    if command -v sudo > /dev/null && sudo -n true 2> /dev/null; then
        exec sudo -n bash "$0"  # a CI user with password-less sudo
    fi
    echo "system-deps.sh: postgresql and prometheus are missing; run as root (apt-get install)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# Installing must not start Debian's own postgresql/prometheus services: the tests start their own.
policy=/usr/sbin/policy-rc.d
created_policy=
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created_policy=1
fi
trap '[[ -n $created_policy ]] && rm -f "$policy"' EXIT
if ! apt-cache show postgresql prometheus > /dev/null 2>&1; then
    apt-get update -qq
fi
apt-get install -y -qq --no-install-recommends postgresql prometheus > /dev/null
echo "system-deps.sh: installed postgresql and prometheus"
