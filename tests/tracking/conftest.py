"""Fixtures for the MLflow side: a real `mlflow server` (SQLite backend, artifacts in S3 on the moto
server), the embedded default, tiny configs, a hand-made "trained" model and a few tiny videos."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import free_port, wait_for_http

ROOT = Path(__file__).resolve().parents[2]
LABELS = ["right", "left", "down"]  # pipeline.data.synth.class_names(3)


@pytest.fixture(scope="session")
def mlflow_server(s3_bucket, tmp_path_factory):
    """`mlflow server` on a free loopback port: SQLite backend in a temp folder, artifacts proxied to
    s3://<bucket>/mlflow on the moto server. MLFLOW_S3_ENDPOINT_URL is set for server and client."""
    endpoint, bucket = s3_bucket
    folder = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    saved = os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    os.environ["MLFLOW_S3_ENDPOINT_URL"] = endpoint
    log = open(folder / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", f"s3://{bucket}/mlflow"],
        cwd=folder, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_S3_ENDPOINT_URL": endpoint,
                                                                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", timeout_s=90)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if saved is None:
            os.environ.pop("MLFLOW_S3_ENDPOINT_URL", None)
        else:
            os.environ["MLFLOW_S3_ENDPOINT_URL"] = saved


@pytest.fixture(scope="session")
def _embedded_work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("embedded") / "work"


@pytest.fixture
def embedded(_embedded_work_dir, monkeypatch):
    """The embedded default: no tracking URI anywhere, the work folder in a temp folder (one per session:
    creating MLflow's SQLite schema takes seconds, so tests share it and use names of their own)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("UNIFORMER_WORK_DIR", str(_embedded_work_dir))
    return _embedded_work_dir


def tiny_config(tracking_uri: str = "", *, run_name: str | None = None, manifest: str = "", extra: tuple = ()):
    """A uniformer_xs config at 8x64x64; a fresh run name unless one is given."""
    from pipeline.config import load_config

    run_name = run_name or f"tiny-{uuid.uuid4().hex[:8]}"
    overrides = ["model.variant=uniformer_xs", f"model.num_classes={len(LABELS)}", "data.num_frames=8",
                 "data.sampling_rate=2", "data.crop_size=64", "data.short_side=64", "data.test_clips=2",
                 "data.test_crops=1", "train.num_workers=1", "train.batch_size=2", "optim.epochs=2",
                 "optim.warmup_epochs=0", f"train.run_name={run_name}", f"tracking.tracking_uri={tracking_uri}",
                 f"data.manifest={manifest}", *extra]
    return load_config(None, overrides)


def fake_training(cfg, *, val_top1: float, seed: int = 0, finish: bool = True) -> str:
    """A training run as `run_training` leaves it, without Ray Train: the run, per-epoch validation
    metrics, and a checkpoint state from a freshly initialised model handed to finish_training_run."""
    import torch

    from model import create_uniformer
    from pipeline.tracking.logged_models import finish_training_run
    from pipeline.tracking.metrics import log_metrics
    from pipeline.tracking.runs import client_for, find_or_create_run

    run_id = find_or_create_run(cfg)
    client = client_for(cfg)
    log_metrics(client, run_id, {"train_loss": 1.1, "lr": 1e-4, "clips_per_s": 3.0}, 1)
    n = cfg.model.num_classes
    confusion = np.eye(n, dtype=int) * 2 + 1
    last_val = {"val_loss": 1.0, "val_top1": val_top1, "val_top5": 1.0, "val_mean_class": val_top1,
                "val_videos": int(confusion.sum()), "val_unusable": 0, "confusion": confusion.tolist()}
    log_metrics(client, run_id, {k: v for k, v in last_val.items() if k != "confusion"}, 2)
    if finish:
        torch.manual_seed(seed)
        net = create_uniformer(cfg.model.variant, num_classes=n)
        state = {"model_state": net.state_dict(), "optimizer": {}, "scaler": {}, "ema_state": None, "epoch": 2,
                 "step": 2, "last_val": last_val, "mlflow_run_id": run_id, "config": cfg.to_dict()}
        finish_training_run(cfg, run_id, state, LABELS)
    return run_id


@pytest.fixture(scope="session")
def tiny_videos(tmp_path_factory):
    """A prepared dataset of tiny synthetic videos: 3 classes x 3 videos (2 train, 1 val), a manifest
    written by hand (no Ray), plus one val row that prepare marked unreadable."""
    from pipeline.data.decode import count_frames
    from pipeline.data.manifest import write_manifest
    from pipeline.data.synth import synth_dataset

    folder = tmp_path_factory.mktemp("tiny_videos")
    summary = synth_dataset(str(folder), num_classes=len(LABELS), videos_per_class=3, seed=0, num_frames=20,
                            size=64, val_fraction=0.34, threads=1)
    names = summary["labels"]
    rows = []
    for split in ("train", "val"):
        for line in (folder / f"{split}.txt").read_text().splitlines():
            relative, name = line.split()
            path = folder / relative
            rows.append({"index": len(rows), "path": str(path), "source_path": str(path), "label": names.index(name),
                         "label_name": name, "split": split, "status": "ok", "num_frames": count_frames(str(path)),
                         "fps": 30.0, "width": 64, "height": 64, "bytes": path.stat().st_size, "frame_stride": 1})
    # Unusable val videos: one prepare marked unreadable, one it passed that no longer decodes.
    rows.append({"index": len(rows), "path": str(folder / "videos/broken.mp4"), "label": 0, "label_name": names[0],
                 "split": "val", "status": "unreadable", "reason": "moov atom not found"})
    garbage = folder / "videos/garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    rows.append({"index": len(rows), "path": str(garbage), "label": 1, "label_name": names[1], "split": "val",
                 "status": "ok", "num_frames": 20, "fps": 30.0, "width": 64, "height": 64, "bytes": 4096})
    write_manifest(rows, str(folder / "prepared"))
    return {"root": folder, "manifest": str(folder / "prepared"), "labels": names, "rows": rows,
            "video": rows[0]["path"]}


@pytest.fixture(scope="session")
def paired_manifest(tiny_videos, tmp_path_factory):
    """A manifest with 30 usable val rows (the tiny videos again under new row numbers), enough videos
    for a paired test to reach significance, plus the tiny set's train rows and unusable val rows."""
    from pipeline.data.manifest import write_manifest

    rows = list(tiny_videos["rows"])
    usable = [r for r in rows if r["status"] == "ok" and r["split"] == "train"]
    for i in range(30):
        rows.append({**usable[i % len(usable)], "index": len(rows), "split": "val"})
    folder = tmp_path_factory.mktemp("paired") / "prepared"
    write_manifest(rows, str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def held_out_manifest(tiny_videos, tmp_path_factory):
    """The paired manifest's rows plus a held-out `test` split of 30 usable rows."""
    from pipeline.data.manifest import write_manifest

    rows = list(tiny_videos["rows"])
    usable = [r for r in rows if r["status"] == "ok" and r["split"] == "train"]
    for split in ("val", "test"):
        for i in range(30):
            rows.append({**usable[i % len(usable)], "index": len(rows), "split": split})
    folder = tmp_path_factory.mktemp("held_out") / "prepared"
    write_manifest(rows, str(folder))
    return str(folder)


def fake_evaluation(cfg, run_id: str, manifest_uri: str, correct: list[bool], *, clips: int = 2, crops: int = 1,
                    split: str = "val") -> str:
    """An evaluation run of the run's video classifier as `uniformer evaluate` logs it, with the top-1
    outcome of the first len(correct) usable videos of `split` (in manifest order) given by `correct`
    instead of measured; the others are undecodable."""
    from pipeline.data.manifest import manifest_hash, read_manifest
    from pipeline.tracking.evaluate import Evaluation, log_evaluation, metrics_from_predictions
    from pipeline.tracking.inference import _model_source
    from pipeline.tracking.predictions import EvidenceKey, prediction_table
    from pipeline.tracking.runs import client_for

    table = read_manifest(manifest_uri)
    status, labels = (table.column(c).to_pylist() for c in ("status", "label"))
    splits = table.column("split").to_pylist()
    usable = [(i, labels[i]) for i in range(len(labels)) if splits[i] == split and status[i] == "ok"]
    videos = {}
    for (i, label), right in zip(usable, correct):
        scores = np.full(len(LABELS), 0.1)
        scores[label if right else (label + 1) % len(LABELS)] = 0.8
        videos[i] = {"scores": scores * clips * crops, "views": clips * crops}
    model_uri = f"runs:/{run_id}/video_classifier"
    key = EvidenceKey(manifest_hash(table), split, clips, crops)
    predictions = prediction_table(table, videos, key=key, labels=LABELS)
    metrics, confusion = metrics_from_predictions(predictions, len(LABELS))
    result = {**metrics, "eval_views": clips * crops, "model_uri": model_uri, "manifest": manifest_uri,
              "manifest_hash": key.manifest_hash, "split": split, "test_clips": clips, "test_crops": crops,
              "source_run_id": run_id, "model_id": _model_source(client_for(cfg), model_uri)[1]}
    data = dataclasses.replace(cfg.data, test_clips=clips, test_crops=crops)
    evaluation = Evaluation(result, predictions, table, data, LABELS, confusion)
    return log_evaluation(cfg, evaluation, manifest_uri=manifest_uri)
