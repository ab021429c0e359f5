"""GPU-only checks, run by `make gpu-check` (pipeline/bench/gpu.py), never by `make test`: their
files are named gpu_*.py, which pytest does not collect by default. On a machine without CUDA
gpu-check says so and runs nothing; running these files there by hand fails here."""

import pytest
import torch


@pytest.fixture(autouse=True)
def cuda_device():
    assert torch.cuda.is_available(), "tests/gpu needs a CUDA device: run `make gpu-check`, which checks first"
