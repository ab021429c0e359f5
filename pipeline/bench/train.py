"""`uniformer bench train`: the training loop fed by the real clip stream against the same loop fed
from memory, which gives the data-stall fraction.

    uniformer bench train --config infra/configs/demo.yaml            # synthetic set, CPU workers
    uniformer bench train --config infra/configs/k400_uniformer_s16x4.yaml model.require_init=false \
        --manifest s3://bucket/prepared                                 # from scratch: speed only

Both runs are the full `train_loop_per_worker` on Ray Train with the config's workers and
recipe; only the batches differ: the stream decodes this worker's videos on Ray Data, memory
cycles two random uint8 batches of the same shape (`pipeline.training.loop.memory_batches`). Each runs
`--epochs` epochs (capped at `--steps` steps each) and is measured over its last epoch, so the
first epoch's start-up (process groups, model build) stays out of the figures while each epoch's
own Ray Data start-up, a real cost, stays in. Nothing is logged to MLflow.

data_stall_fraction = 1 - stream clips/s / memory clips/s: the share of training speed the data
pipeline costs. A third run from memory checkpoints after every epoch: its last epoch reports what
the previous checkpoint held the step path (`checkpoint_blocking_s`: the copy to host memory and
Ray's report) and how long its write and upload took in the background (`checkpoint_write_s`, what a
synchronous save would have added), with that epoch's step time beside the plain run's;
checkpoint_step_over_plain = (plain step + blocking) / plain step. On a GPU cluster it should be near 0; on a 2-core CPU machine decode and training
share the cores, so the stream is slower for want of CPU as well as for waiting.

    uniformer bench train --tracking-outage 60

instead trains once on the stream while logging every step to a local `mlflow server`, which is
stopped for that many seconds after a quarter of the steps and then started again; it reports the
median step time before, during and after the outage (from the steps' own metrics, delivered
once the server is back) and how many steps' metrics arrived.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.config import Config

SOURCES = ("stream", "memory")


def synth_manifest(work_dir: str, *, classes: int, videos_per_class: int, seed: int,
                   progress: Callable[[str], None]) -> str:
    """A prepared synthetic motion set under `work_dir` (made once, then reused); its URI."""
    from pipeline.data.prepare import PrepareOptions, prepare
    from pipeline.data.synth import synth_dataset

    root = Path(work_dir) / f"synth_{classes}x{videos_per_class}_seed{seed}"
    raw, prepared = root / "raw", root / "prepared"
    if not (prepared / "manifest.parquet").exists():
        progress(f"synthetic set: {classes} classes x {videos_per_class} videos -> {root}")
        synth_dataset(str(raw), num_classes=classes, videos_per_class=videos_per_class, seed=seed)
        prepare([str(raw / "train.txt"), str(raw / "val.txt")], str(raw), str(prepared),
                labels_uri=str(raw / "labels.json"), options=PrepareOptions(transcode=False))
    return str(prepared)


def run_train_bench(cfg: Config, *, manifest_uri: str = "", epochs: int = 2, steps: int = 8,
                    videos_per_class: int = 16, work_dir: str = "work/bench_train",
                    progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Train `cfg` on the stream and on memory, one after the other; returns the figures."""
    from pipeline.cluster.connect import init_ray
    from pipeline.training.driver import checked_manifest, make_trainer, with_absolute_inputs

    if epochs < 2 or steps < 1:
        raise ValueError(f"epochs={epochs} must be at least 2 (the last one is measured) and steps={steps} at least 1")
    if not manifest_uri:
        manifest_uri = synth_manifest(work_dir, classes=cfg.model.num_classes, videos_per_class=videos_per_class,
                                      seed=cfg.train.seed, progress=progress)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cfg = with_absolute_inputs(dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, manifest=manifest_uri),
        optim=dataclasses.replace(cfg.optim, epochs=epochs),
        train=dataclasses.replace(cfg.train, max_steps_per_epoch=steps, val_every_epochs=epochs, max_failures=0,
                                  checkpoint_every_epochs=epochs,
                                  storage_path=str(Path(work_dir) / "ray_results")),
        tracking=dataclasses.replace(cfg.tracking, system_metrics=False)))
    checked_manifest(cfg)
    started = init_ray()
    result: dict[str, Any] = {"variant": cfg.model.variant, "workers": cfg.train.num_workers,
                              "use_gpu": cfg.train.use_gpu, "batch_size": cfg.train.batch_size,
                              "clip": f"{cfg.data.num_frames}x{cfg.data.sampling_rate}x{cfg.data.crop_size}",
                              "precision": cfg.train.precision, "manifest": cfg.data.manifest, "epochs": epochs,
                              "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    try:
        # (name, batches, checkpoint every): the stream and memory checkpoint after their last epoch only,
        # so the measured epoch has no checkpoint; the third run checkpoints after every epoch.
        for name, source, every in [*((source, source, epochs) for source in SOURCES), ("checkpointing", "memory", 1)]:
            progress(f"{name}: {epochs} epochs of at most {steps} steps on {cfg.train.num_workers} workers")
            run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(
                cfg.train, run_name=f"bench-{name}-{stamp}", checkpoint_every_epochs=every))
            t0 = time.perf_counter()
            metrics = make_trainer(run_cfg, None, data_source=source).fit().metrics
            result[name] = {"clips_per_s": round(metrics["epoch_clips_per_s"], 2),
                            "data_wait_fraction": round(metrics["epoch_data_wait_fraction"], 4),
                            "step_s": round(metrics["epoch_step_s"], 4),
                            "steps": metrics["step"], "seconds": round(time.perf_counter() - t0, 1),
                            **{k: round(v, 4) for k, v in metrics.items() if k.startswith("checkpoint_")}}
    finally:
        if started:
            import ray

            ray.shutdown()
    result["stream_over_memory"] = round(result["stream"]["clips_per_s"] / result["memory"]["clips_per_s"], 3)
    result["data_stall_fraction"] = round(1 - result["stream_over_memory"], 3)
    # A checkpointing step: a plain step plus what the checkpoint held the step path (host copy, report);
    # the write and upload ran beside the next epoch's steps, which `checkpointing.step_s` measures.
    plain_s, blocking_s = result["memory"]["step_s"], result["checkpointing"]["checkpoint_blocking_s"]
    result["checkpoint_step_over_plain"] = round((plain_s + blocking_s) / plain_s, 3)
    return result


class LocalMlflowServer:
    """`mlflow server` on a loopback port with a SQLite store in `folder`; stop and start it again
    on the same port and store to stage an outage."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90.0) -> None:
        import urllib.request

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", str(self.folder / "artifacts")],
            cwd=self.folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server on {self.url} did not start") from None
                time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_outage_bench(cfg: Config, *, outage_s: float, manifest_uri: str = "", steps: int = 40,
                     videos_per_class: int = 16, work_dir: str = "work/bench_train",
                     progress: Callable[[str], None] = print) -> dict[str, Any]:
    """One training of `steps` steps on the stream (as many epochs as that takes), logging every
    step to a local server that is stopped for `outage_s` after a quarter of the steps."""
    from mlflow.tracking import MlflowClient

    from pipeline.cluster.connect import init_ray
    from pipeline.tracking.runs import find_or_create_run
    from pipeline.training.driver import checked_manifest, make_trainer, with_absolute_inputs
    from pipeline.training.ingest import steps_per_epoch, usable_rows

    if not manifest_uri:
        manifest_uri = synth_manifest(work_dir, classes=cfg.model.num_classes, videos_per_class=videos_per_class,
                                      seed=cfg.train.seed, progress=progress)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    server = LocalMlflowServer(Path(work_dir).resolve() / f"mlflow-{stamp}")
    cfg = with_absolute_inputs(dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, manifest=manifest_uri),
        train=dataclasses.replace(cfg.train, max_steps_per_epoch=0, max_failures=0, run_name=f"bench-outage-{stamp}",
                                  storage_path=str(Path(work_dir) / "ray_results")),
        tracking=dataclasses.replace(cfg.tracking, tracking_uri=server.url, system_metrics=False, log_every_steps=1)))
    manifest = checked_manifest(cfg)
    epoch_steps = min(steps, steps_per_epoch(cfg, usable_rows(manifest, cfg.data.train_split).num_rows))
    epochs = -(-steps // epoch_steps)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, epochs=epochs, warmup_epochs=0),
                              train=dataclasses.replace(cfg.train, max_steps_per_epoch=epoch_steps,
                                                        val_every_epochs=epochs))
    steps = epochs * epoch_steps
    server.start()
    started = init_ray()
    outage: dict[str, float] = {}
    try:
        run_id = find_or_create_run(cfg, manifest=manifest)
        client = MlflowClient(server.url)
        fit = threading.Thread(target=lambda: make_trainer(cfg, run_id).fit(), daemon=True)
        fit.start()
        while fit.is_alive() and len(client.get_metric_history(run_id, "clips_per_s")) < steps // 4:
            time.sleep(0.5)
        progress(f"stopping the tracking server for {outage_s:.0f} s")
        outage["start"] = time.time()
        server.stop()
        time.sleep(outage_s)
        server.start()
        outage["end"] = time.time()
        progress("tracking server back; waiting for the training and its metrics")
        fit.join()
        history = client.get_metric_history(run_id, "clips_per_s")
    finally:
        server.stop()
        if started:
            import ray

            ray.shutdown()
    batch = cfg.train.batch_size

    def median_step_s(lo: float, hi: float) -> float | None:
        times = [batch / m.value for m in history if lo <= m.timestamp / 1e3 < hi and m.value > 0]
        return round(statistics.median(times), 4) if times else None

    before = median_step_s(0, outage["start"])
    during = median_step_s(outage["start"], outage["end"])
    return {"variant": cfg.model.variant, "workers": cfg.train.num_workers, "steps": steps, "outage_s": outage_s,
            "steps_with_metrics": len({m.step for m in history}),
            "step_s_median": {"before": before, "during": during, "after": median_step_s(outage["end"], float("inf"))},
            "steps_during_outage": sum(1 for m in history if outage["start"] <= m.timestamp / 1e3 < outage["end"]),
            "during_over_before": round(during / before, 3) if before and during else None}
