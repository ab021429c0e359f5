#!/usr/bin/env bash
# Build (and push) the three images from the repo root's context:
#   infra/docker/build.sh REGISTRY          e.g. 123456789012.dkr.ecr.us-west-2.amazonaws.com; tags:
#       REGISTRY/uniformer-ray:ray2.60.0-py311-gpu, REGISTRY/uniformer-ray:ray2.60.0-py311-cpu,
#       REGISTRY/uniformer-mlflow:3.17.2
#   infra/docker/build.sh --pin             resolve base-images.lock's tags to digests (once; commit it)
#   PUSH=1 infra/docker/build.sh REGISTRY   build and push
# A build refuses a base image that has no digest yet. BASE_IMAGES_LOCK names another lock file (tests).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
LOCK=${BASE_IMAGES_LOCK:-$HERE/base-images.lock}

if [[ ${1:-} == --pin ]]; then
    tmp=$(mktemp)
    while IFS= read -r line; do
        if [[ -z $line || $line == \#* ]]; then echo "$line"; continue; fi
        read -r name image <<< "$line"
        tag=${image%@*}
        digest=$(docker buildx imagetools inspect "$tag" --format '{{json .Manifest.Digest}}' | tr -d '"')
        [[ $digest =~ ^sha256:[0-9a-f]{64}$ ]] || { echo "build.sh: no digest for $tag: '$digest'" >&2; exit 1; }
        printf '%-6s %s@%s\n' "$name" "$tag" "$digest"
    done < "$LOCK" > "$tmp"
    mv "$tmp" "$LOCK"
    echo "pinned: $(grep -c '@sha256:' "$LOCK") base images in $LOCK"
    exit 0
fi
REGISTRY=${1:?usage: build.sh REGISTRY | build.sh --pin}

base() {  # base NAME: the pinned image of that line, or an error
    local image
    image=$(awk -v n="$1" '$1 == n { print $2 }' "$LOCK")
    [[ $image == *@sha256:* ]] || { echo "build.sh: $1 base image is not pinned by digest; run build.sh --pin" >&2; exit 1; }
    echo "$image"
}

build() {  # build TAG DOCKERFILE BUILD-ARGS...
    local tag=$1 file=$2; shift 2
    docker build -f "$HERE/$file" -t "$tag" "$@" "$ROOT"
    if [[ ${PUSH:-} == 1 ]]; then docker push "$tag"; fi
}

# All three first: `exit` inside "$(base ...)" as a build argument would leave only that subshell.
gpu_base=$(base gpu)
cpu_base=$(base cpu)
mlflow_base=$(base mlflow)
build "$REGISTRY/uniformer-ray:ray2.60.0-py311-gpu" project.Dockerfile --build-arg BASE_IMAGE="$gpu_base" --build-arg FLAVOUR=gpu
build "$REGISTRY/uniformer-ray:ray2.60.0-py311-cpu" project.Dockerfile --build-arg BASE_IMAGE="$cpu_base" --build-arg FLAVOUR=cpu
build "$REGISTRY/uniformer-mlflow:3.17.2" mlflow.Dockerfile --build-arg BASE_IMAGE="$mlflow_base"
