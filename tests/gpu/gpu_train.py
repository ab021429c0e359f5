"""Training on a real GPU through the CLI and Ray Train: a bf16 run with fused AdamW and an EMA that
loses its worker after the first checkpoint and must resume on the GPU (the optimizer's and EMA's
state back on the device), and an fp16 run with the grad scaler."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

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


def test_fp16_with_the_grad_scaler(tmp_path, motion_set):
    summary, _ = run_train(tmp_path, f"data.manifest={motion_set}", "train.run_name=gpu_fp16",
                           "train.precision=fp16", "optim.epochs=2")
    assert summary["epochs"] == 2 and summary["val_loss"] == summary["val_loss"]  # not NaN
