"""The image build (infra/docker/): build.sh run against a fake `docker` on PATH (it refuses a base image
that is still a tag, `--pin` turns tags into digests, a build passes the digests on), the base-image
lock says what it holds, torch and its CUDA wheels are hash-locked for the GPU image, and the GPU image
carries EFA's libfabric and the aws-ofi-nccl plugin at a fixed installer version."""

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from tests.infra.test_manifests import lock_pins, requirement_names

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "infra" / "docker"
BUILD = DOCKER / "build.sh"
DIGEST = "sha256:" + "ab" * 32

FAKE_DOCKER = r"""#!/usr/bin/env bash
# A stand-in for docker: logs every call; `buildx imagetools inspect` answers one digest.
echo "$*" >> "$FAKE_DOCKER_LOG"
if [[ $1 == buildx && $2 == imagetools && $3 == inspect ]]; then echo "\"$FAKE_DIGEST\""; fi
"""


def lock_lines(text: str) -> dict[str, str]:
    return dict(line.split() for line in text.splitlines() if line.strip() and not line.startswith("#"))


@pytest.fixture
def fake_docker(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text(FAKE_DOCKER)
    docker.chmod(docker.stat().st_mode | stat.S_IEXEC)
    lock = tmp_path / "base-images.lock"
    lock.write_text((DOCKER / "base-images.lock").read_text())
    log = tmp_path / "docker.log"

    def run(*args: str, digest: str = DIGEST):
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DOCKER_LOG": str(log),
               "FAKE_DIGEST": digest, "BASE_IMAGES_LOCK": str(lock)}
        result = subprocess.run(["bash", str(BUILD), *args], capture_output=True, text=True, env=env, timeout=60)
        calls = log.read_text().splitlines() if log.exists() else []
        return result, lock, calls

    return run


def test_base_image_lock_holds_tags_or_digests_and_says_which():
    text = (DOCKER / "base-images.lock").read_text()
    images = lock_lines(text)
    assert set(images) == {"gpu", "cpu", "mlflow"}
    for name, image in images.items():
        assert re.fullmatch(r"[\w./-]+:[\w.-]+(@sha256:[0-9a-f]{64})?", image), (name, image)
    header = " ".join(line for line in text.splitlines() if line.startswith("#"))
    if not all("@sha256:" in image for image in images.values()):
        # Tags are not pins: the file must not call them that while any line lacks its digest.
        assert "still tags" in header and not re.search(r"\bpinned\b", header)


def test_build_refuses_a_base_image_without_a_digest(fake_docker):
    result, _, calls = fake_docker("123456789012.dkr.ecr.us-west-2.amazonaws.com")
    assert result.returncode != 0 and "not pinned by digest; run build.sh --pin" in result.stderr
    assert not [c for c in calls if c.startswith("build ")]


def test_pin_resolves_every_tag_to_its_digest(fake_docker):
    before = lock_lines((DOCKER / "base-images.lock").read_text())
    result, lock, calls = fake_docker("--pin")
    assert result.returncode == 0, result.stderr
    after = lock_lines(lock.read_text())
    assert after == {name: f"{image.split('@')[0]}@{DIGEST}" for name, image in before.items()}
    assert sorted(c.split()[3] for c in calls) == sorted(image.split("@")[0] for image in before.values())
    # ... and a build then hands the digests to docker build.
    result, _, calls = fake_docker("123456789012.dkr.ecr.us-west-2.amazonaws.com")
    assert result.returncode == 0, result.stderr
    builds = [c for c in calls if c.startswith("build ")]
    assert len(builds) == 3 and all(f"BASE_IMAGE=" in b and f"@{DIGEST}" in b for b in builds)


def test_pin_refuses_an_answer_that_is_not_a_digest(fake_docker):
    result, lock, _ = fake_docker("--pin", digest="")
    assert result.returncode != 0 and "no digest" in result.stderr
    assert lock.read_text() == (DOCKER / "base-images.lock").read_text()


def test_torch_and_its_cuda_wheels_are_hash_locked_for_the_gpu_image():
    gpu_torch = lock_pins(DOCKER / "torch-gpu-requirements.lock")
    base = lock_pins(DOCKER / "requirements.lock")
    assert gpu_torch["torch"] == torch.__version__.split("+")[0]
    assert any(n.startswith("nvidia-cudnn") for n in gpu_torch) and any(n.startswith("nvidia-nccl") for n in gpu_torch)
    assert "triton" in gpu_torch
    assert not set(gpu_torch) & set(base)  # on top of requirements.lock: one version of everything
    dockerfile = (DOCKER / "project.Dockerfile").read_text()
    assert "--require-hashes -r /tmp/torch-gpu-requirements.lock" in dockerfile
    assert not re.search(r'pip install[^\n]*"torch==\$\{TORCH_VERSION\}"', dockerfile)  # no unhashed GPU torch
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(gpu_torch['torch'])}$", dockerfile, re.M)


def test_the_cpu_torch_lock_is_written_down_but_not_yet_made():
    """PyTorch's CPU builds live on its own index, unreachable where the locks were made: the input and
    the command exist, the Dockerfile and lock.py say the CPU torch is pinned by version only."""
    source = (DOCKER / "torch-cpu-requirements.in").read_text()
    assert f"torch=={torch.__version__.split('+')[0]}+cpu" in source and "download.pytorch.org/whl/cpu" in source
    assert "torch-cpu-requirements.lock --on-top-of requirements.lock" in (DOCKER / "lock.py").read_text()
    if not (DOCKER / "torch-cpu-requirements.lock").exists():
        assert "pinned by version only" in (DOCKER / "project.Dockerfile").read_text()


def test_added_locks_cover_their_inputs():
    for lock, source in (("cpu-requirements.lock", "cpu-requirements.in"),
                         ("torch-gpu-requirements.lock", "torch-gpu-requirements.in")):
        pinned = {name.replace("_", "-") for name in lock_pins(DOCKER / lock)}
        wanted = requirement_names(line for line in (DOCKER / source).read_text().splitlines()
                                   if not line.startswith("--"))
        assert wanted <= pinned, (lock, wanted - pinned)
        assert f"lock.py {lock} --on-top-of requirements.lock -r {source}" in (DOCKER / lock).read_text()
    dockerfile = (DOCKER / "project.Dockerfile").read_text()
    assert "--require-hashes -r /tmp/cpu-requirements.lock" in dockerfile


def test_gpu_image_has_efa_and_the_nccl_plugin():
    dockerfile = (DOCKER / "project.Dockerfile").read_text()
    version = re.search(r"^ARG EFA_INSTALLER_VERSION=(\S+)$", dockerfile, re.M).group(1)
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)  # a fixed release, never "latest"
    efa_step = dockerfile[dockerfile.index("efa_installer.sh") - 1200:dockerfile.index("efa_installer.sh") + 300]
    assert 'if [ "$FLAVOUR" = gpu ]' in efa_step  # the CPU image stays without it
    assert "gpg --batch --verify aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz.sig" in efa_step
    assert "--skip-kmod" in efa_step and "ls /opt/amazon/ofi-nccl/lib/x86_64-linux-gnu/libnccl-net" in efa_step
    assert re.search(r"^ENV LD_LIBRARY_PATH=/opt/amazon/ofi-nccl/lib/x86_64-linux-gnu:/opt/amazon/efa/lib:",
                     dockerfile, re.M)
    # Every lock the Dockerfile copies is in the build context (.dockerignore lets infra/docker/*.lock in).
    for lock in re.findall(r"infra/docker/([\w-]+\.lock)", dockerfile):
        assert (DOCKER / lock).exists(), lock
