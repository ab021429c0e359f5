"""`uniformer bench train`: the training loop fed by the real clip stream against the same loop fed
from memory, which gives the data-stall fraction.

    uniformer bench train --config infra/configs/demo.yaml            # synthetic set, CPU workers
    uniformer bench train --config infra/configs/k400_uniformer_s16x4.yaml model.require_init=false \
        --manifest s3://bucket/prepared                                 # from scratch: speed only

Both runs are the full `train_loop_per_worker` on Ray Train with the config's workers and
recipe; only the batches differ: the stream decodes this worker's videos on Ray Data, memory
cycles two random uint8 batches of the same shape (`pipeline.train.memory_batches`). Each runs
`--epochs` epochs (capped at `--steps` steps each) and is measured over its last epoch, so the
first epoch's start-up (process groups, model build) stays out of the figures while each epoch's
own Ray Data start-up, a real cost, stays in. Nothing is logged to MLflow.

data_stall_fraction = 1 - stream clips/s / memory clips/s: the share of training speed the data
pipeline costs. On a GPU cluster it should be near 0; on a 2-core CPU machine decode and training
share the cores, so the stream is slower for want of CPU as well as for waiting.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.config import Config

SOURCES = ("stream", "memory")


def synth_manifest(work_dir: str, *, classes: int, videos_per_class: int, seed: int,
                   progress: Callable[[str], None]) -> str:
    """A prepared synthetic motion set under `work_dir` (made once, then reused); its URI."""
    from pipeline.prepare import PrepareOptions, prepare
    from pipeline.synth import synth_dataset

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
    from pipeline.raycluster import init_ray
    from pipeline.train import checked_manifest, make_trainer, with_absolute_inputs

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
        for source in SOURCES:
            progress(f"{source}: {epochs} epochs of at most {steps} steps on {cfg.train.num_workers} workers")
            run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                         run_name=f"bench-{source}-{stamp}"))
            t0 = time.perf_counter()
            metrics = make_trainer(run_cfg, None, data_source=source).fit().metrics
            result[source] = {"clips_per_s": round(metrics["epoch_clips_per_s"], 2),
                              "data_wait_fraction": round(metrics["epoch_data_wait_fraction"], 4),
                              "steps": metrics["step"], "seconds": round(time.perf_counter() - t0, 1)}
    finally:
        if started:
            import ray

            ray.shutdown()
    result["stream_over_memory"] = round(result["stream"]["clips_per_s"] / result["memory"]["clips_per_s"], 3)
    result["data_stall_fraction"] = round(1 - result["stream_over_memory"], 3)
    return result
