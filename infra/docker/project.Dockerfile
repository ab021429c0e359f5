# The cluster images: Ray's own image (same Ray and Python as the project's) plus this project's
# dependencies, installed from hash-checked lock files, and its code. Two flavours, built by
# infra/docker/build.sh from the base images in infra/docker/base-images.lock (it refuses one without
# a digest):
#   gpu: rayproject/ray:2.60.0-py311-gpu + requirements.lock + gpu-requirements.lock (nvidia-ml-py)
#        + torch-gpu-requirements.lock (torch 2.13.0 from PyPI, CUDA 13, and its CUDA wheels)
#        + the EFA installer (libfabric and the aws-ofi-nccl plugin: NCCL over EFA between nodes)
#        -> GPU workers
#   cpu: rayproject/ray:2.60.0-py311 + requirements.lock + cpu-requirements.lock (psycopg, for the
#        launcher head's MLflow server) + torch 2.13.0+cpu (PyTorch's CPU index)
#        -> head, decode workers, the RayJob submitter (no CUDA libraries: a much smaller image)
# Every Python package is hash-locked except the CPU image's torch, pinned by version only: its index
# was not reachable where the locks were made (infra/docker/lock.py, torch-cpu-requirements.in).
# PyPI's torch 2.13.0 is built for CUDA 13, which needs an NVIDIA driver >= 580 on the GPU nodes.
# infra/k8s/*.yaml reference the tags build.sh writes; tests/infra checks the versions.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
ARG FLAVOUR
ARG TORCH_VERSION=2.13.0
# A version, not a hash: the installer's digest is not recorded here (its host was not reachable where
# this was written); the build checks AWS's GPG signature on it instead.
ARG EFA_INSTALLER_VERSION=1.50.0

WORKDIR /home/ray/uniformer
# Dependencies first (a layer that survives code changes), exactly as locked; --no-deps: the locks
# are the whole set.
COPY --chown=ray:users infra/docker/requirements.lock infra/docker/gpu-requirements.lock \
     infra/docker/torch-gpu-requirements.lock infra/docker/cpu-requirements.lock /tmp/
RUN pip install --no-cache-dir --no-deps --require-hashes -r /tmp/requirements.lock \
    && if [ "$FLAVOUR" = cpu ]; then \
         pip install --no-cache-dir --no-deps --require-hashes -r /tmp/cpu-requirements.lock \
         && pip install --no-cache-dir --no-deps "torch==${TORCH_VERSION}+cpu" \
             --index-url https://download.pytorch.org/whl/cpu; \
       else \
         pip install --no-cache-dir --no-deps --require-hashes -r /tmp/gpu-requirements.lock \
         && pip install --no-cache-dir --no-deps --require-hashes -r /tmp/torch-gpu-requirements.lock \
         && python -c "import pynvml"; \
       fi \
    && python -c "import ray, torch; assert ray.__version__ == '2.60.0', ray.__version__; \
assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__"

# GPU image: EFA's user space (libfabric with the efa provider) and the aws-ofi-nccl plugin, which the
# installer bundles, so NCCL reaches other nodes over EFA (the pods set FI_PROVIDER=efa and get the
# devices from the EFA device plugin). No kernel module (--skip-kmod: the node has it), no device check
# (--no-verify: there is no EFA device at build time). Without EFA devices NCCL falls back to TCP.
USER root
RUN if [ "$FLAVOUR" = gpu ]; then \
      cd /tmp \
      && for f in aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz.sig \
                  aws-efa-installer.key; do wget -q "https://efa-installer.amazonaws.com/$f"; done \
      && gpg --batch --import aws-efa-installer.key \
      && gpg --batch --verify aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz.sig aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz \
      && tar -xzf aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz \
      && apt-get update \
      && (cd aws-efa-installer && ./efa_installer.sh -y --skip-kmod --skip-limit-conf --no-verify) \
      && ls /opt/amazon/ofi-nccl/lib/x86_64-linux-gnu/libnccl-net*.so \
      && rm -rf /tmp/aws-efa-installer* /var/lib/apt/lists/*; \
    fi
USER ray
# Where NCCL finds the plugin and the plugin finds libfabric (absent, and so unused, in the CPU image).
ENV LD_LIBRARY_PATH=/opt/amazon/ofi-nccl/lib/x86_64-linux-gnu:/opt/amazon/efa/lib:${LD_LIBRARY_PATH}

COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users model/ model/
COPY --chown=ray:users pipeline/ pipeline/
COPY --chown=ray:users jobs/ jobs/
COPY --chown=ray:users infra/configs/ infra/configs/
RUN pip install --no-cache-dir --no-deps -e .
# `python -m jobs.<name>` works from here, which is where RayJob entrypoints run.
ENV PYTHONPATH=/home/ray/uniformer
