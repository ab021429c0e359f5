"""Training on a real GPU: fp16 with the grad scaler through the loop's own step functions, which must
lower the loss on a fixed batch; and, through the CLI and Ray Train, a bf16 run with fused AdamW and an
EMA that loses its worker after the first checkpoint and must resume on the GPU (the optimizer's and
EMA's state back on the device)."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training.test_train import kill_one_worker_after_first_checkpoint, prepared_motion_set

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "infra" / "configs" / "demo.yaml"
GPU_RUN = ("train.num_workers=1", "train.use_gpu=true", "train.cpus_per_worker=1", "train.batch_size=8",
           "train.max_steps_per_epoch=6", "optim.warmup_epochs=0", "train.val_every_epochs=1")


@pytest.fixture(scope="module")
def motion_set(tmp_path_factory):
    return prepared_motion_set(tmp_path_factory.mktemp("motion"), videos_per_class=12)


def run_train(tmp_path: Path, *overrides: str) -> tuple[dict, str]:
    cmd = [sys.executable, "-m", "jobs.train", "--config", str(DEMO), *GPU_RUN,
           f"train.storage_path={tmp_path / 'ray_results'}",
           f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr


def fixed_batch_losses(device: torch.device, precision: str, steps: int) -> tuple[list[float], torch.amp.GradScaler]:
    """The loss of each of `steps` training steps of the loop's code (autocast, the grad scaler,
    gradient clipping, AdamW at the demo's learning rate) on one fixed batch of 8 noise clips with
    random labels, which the model can learn by heart; and the grad scaler."""
    from pipeline.config import load_config
    from pipeline.training.loop import build_training_state, forward_backward, optimizer_step

    cfg = load_config(DEMO, [f"train.precision={precision}", "train.num_workers=1", "train.batch_size=8"])
    rng = np.random.default_rng(0)
    d = cfg.data
    batch = {"clip": torch.from_numpy(rng.integers(0, 256, (8, d.num_frames, d.crop_size, d.crop_size, 3),
                                                   dtype=np.uint8)),
             "label": torch.from_numpy(rng.integers(0, cfg.model.num_classes, 8)),
             "valid": torch.ones(8, dtype=torch.bool)}
    ts = build_training_state(cfg, device, lambda net: net.to(device))
    losses = []
    for _ in range(steps):
        sums = forward_backward(ts, batch, cfg, device, world=1, mix_rng=np.random.default_rng(1),
                                erase_rng=np.random.default_rng(2), sync=True)
        optimizer_step(ts, cfg)
        losses.append((sums[0] / sums[2]).item())  # mean loss of the usable clips
    return losses, ts.scaler


def test_fp16_with_the_grad_scaler_lowers_the_loss_on_a_fixed_batch():
    losses, scaler = fixed_batch_losses(torch.device("cuda"), "fp16", steps=30)
    assert scaler.is_enabled() and 0 < scaler.get_scale() < float("inf")
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < 0.5 * losses[0], losses


def test_bf16_fused_adamw_ema_run_recovers_from_a_killed_worker_on_the_gpu(tmp_path, motion_set):
    killed: list[int] = []
    killer = threading.Thread(target=kill_one_worker_after_first_checkpoint,
                              args=(tmp_path / "ray_results" / "gpu_recover", killed), daemon=True)
    killer.start()
    summary, log = run_train(tmp_path, f"data.manifest={motion_set}", "train.run_name=gpu_recover",
                             "train.precision=bf16", "optim.ema_decay=0.99", "optim.epochs=3", "train.max_failures=2")
    killer.join(timeout=1)
    assert killed, "no RayTrainWorker process was found to kill"
    assert "resumed from checkpoint at epoch" in log
    assert summary["epochs"] == 3 and summary["steps"] == 18
