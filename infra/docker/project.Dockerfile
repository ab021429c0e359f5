# The cluster images: Ray's own image (same Ray and Python as the project's pin) plus this project's
# dependencies, installed from a hash-checked lock file, and its code. Two flavours, built by
# infra/docker/build.sh from the digests in infra/docker/base-images.lock:
#   gpu: rayproject/ray:2.60.0-py311-gpu + requirements.lock + gpu-requirements.lock (nvidia-ml-py)
#        + torch 2.13.0 (PyPI's CUDA build)
#        -> GPU workers
#   cpu: rayproject/ray:2.60.0-py311 + requirements.lock + torch 2.13.0+cpu (PyTorch's CPU index)
#        -> head, decode workers, the RayJob submitter (no CUDA libraries: a much smaller image)
# torch is pinned by version, not by hash: its CUDA wheels' dependencies could not be resolved
# where the lock was made (infra/docker/lock.py). PyPI's torch 2.13.0 is built for CUDA 13, which
# needs an NVIDIA driver >= 580 on the GPU nodes (infra/README.md, "AMI").
# infra/k8s/*.yaml reference the tags build.sh writes; tests/infra checks the Ray version.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
ARG FLAVOUR
ARG TORCH_VERSION=2.13.0

WORKDIR /home/ray/uniformer
# Dependencies first (a layer that survives code changes), exactly as locked; --no-deps: the lock
# is the whole set.
# The GPU image adds gpu-requirements.lock (nvidia-ml-py: GPU utilisation and memory in the
# training's system metrics).
COPY --chown=ray:users infra/docker/requirements.lock infra/docker/gpu-requirements.lock /tmp/
RUN pip install --no-cache-dir --no-deps --require-hashes -r /tmp/requirements.lock \
    && if [ "$FLAVOUR" = cpu ]; then \
         pip install --no-cache-dir --no-deps "torch==${TORCH_VERSION}+cpu" \
             --index-url https://download.pytorch.org/whl/cpu; \
       else \
         pip install --no-cache-dir --no-deps --require-hashes -r /tmp/gpu-requirements.lock \
         && python -c "import pynvml" \
         && pip install --no-cache-dir "torch==${TORCH_VERSION}"; \
       fi \
    && python -c "import ray, torch; assert ray.__version__ == '2.60.0', ray.__version__"
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users model/ model/
COPY --chown=ray:users pipeline/ pipeline/
COPY --chown=ray:users jobs/ jobs/
COPY --chown=ray:users infra/configs/ infra/configs/
RUN pip install --no-cache-dir --no-deps -e .
# `python -m jobs.<name>` works from here, which is where RayJob entrypoints run.
ENV PYTHONPATH=/home/ray/uniformer
