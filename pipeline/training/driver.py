"""The driver of a training: check the inputs, open (or continue) the MLflow run, fit on Ray Train.

    result = run_training(cfg)          # jobs/train.py, the demo
"""

from __future__ import annotations

import dataclasses
import sys
import time

import pyarrow as pa

from pipeline.config import Config, ConfigError, checkpoint_order, worker_counts
from pipeline.data.manifest import read_manifest
from pipeline.data.storage import storage_uri
from pipeline.tracking.datasets import dataset_labels
from pipeline.tracking.logged_models import finish_training_run
from pipeline.tracking.runs import find_or_create_run, mark_failed, ray_run_name, tracking_uri, with_resolved_tracking
from pipeline.training.ingest import ClipDataConfig, training_datasets, usable_rows
from pipeline.training.loop import load_checkpoint_state, train_loop_per_worker


def with_absolute_inputs(cfg: Config) -> Config:
    """`cfg` with local input paths made absolute: Train workers run in folders of their own."""
    from pipeline.data.storage import absolute

    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, manifest=absolute(cfg.data.manifest)),
                               model=dataclasses.replace(cfg.model, init_from=absolute(cfg.model.init_from)))


def with_dataset_classes(cfg: Config) -> Config:
    """`cfg` with `model.num_classes` 0 replaced by the number of classes the data's labels.json names (else
    one more than the manifest's largest label)."""
    if cfg.model.num_classes or not cfg.data.manifest:
        return cfg
    from pipeline.tracking.datasets import manifest_labels

    labels = manifest_labels(cfg.data.manifest, cfg.storage)
    count = len(labels) if labels is not None else max(
        [-1, *read_manifest(cfg.data.manifest, storage=cfg.storage).column("label").to_pylist()]) + 1
    if count < 2:
        raise ConfigError(f"data.manifest {cfg.data.manifest} names {count} class(es); a classifier needs 2 or more")
    print(f"train: model.num_classes={count}, from the data's labels", file=sys.stderr, flush=True)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=count))


def checked_manifest(cfg: Config) -> pa.Table:
    """The prepared manifest, checked to hold a training batch, and `model.init_from` checked against its
    labels (pipeline.training.pretrained); fails before any Ray work."""
    if not cfg.data.manifest:
        raise ConfigError("data.manifest is not set: pass data.manifest=URI of a prepared dataset")
    if not cfg.model.num_classes:
        raise ConfigError("model.num_classes=0 (from the data) is not resolved yet: pass the config through "
                          "with_dataset_classes, or set model.num_classes")
    manifest = read_manifest(cfg.data.manifest, storage=cfg.storage)
    num_train = usable_rows(manifest, cfg.data.train_split).num_rows
    if num_train < cfg.train.batch_size:
        raise ConfigError(f"data.manifest has {num_train} usable {cfg.data.train_split!r} videos, fewer than "
                          f"train.batch_size={cfg.train.batch_size}")
    if usable_rows(manifest, cfg.data.val_split).num_rows == 0:
        # Training works without one, but nothing validates it and a later `promote` has nothing to judge.
        print(f"train: data.manifest has no usable {cfg.data.val_split!r} videos (data.val_split): the run reports "
              f"no validation metrics, and `promote` needs a validation or --eval-split split", file=sys.stderr,
              flush=True)
    if cfg.model.init_from:
        from pipeline.training.pretrained import check_init

        plan = check_init(cfg, dataset_labels(cfg, manifest))
        print(f"train: init from {cfg.model.init_from}: {plan.describe()}", file=sys.stderr, flush=True)
    return manifest


def worker_group_size(cfg: Config) -> int | tuple[int, int]:
    """Ray Train's `num_workers`: fixed, or (min, max) for an elastic group, which Ray sizes to the
    cluster's free GPUs when it starts and restarts it (from the latest checkpoint) after a loss."""
    counts = worker_counts(cfg)
    return counts[-1] if len(counts) == 1 else (counts[0], counts[-1])


def make_trainer(cfg: Config, run_id: str | None, *, manifest: pa.Table | None = None, data_source: str = "stream",
                 ray_run_name: str = "", callbacks: tuple = (), loop=train_loop_per_worker):
    """The TorchTrainer of `cfg`; `run_id` None logs nothing to MLflow, `data_source="memory"` trains
    on `memory_batches` instead of the clip stream. `ray_run_name` (default `train.run_name`) names
    the Ray run, whose checkpoints a rerun resumes from; `manifest` is the table when already read;
    `callbacks` are Ray Train user callbacks (a sweep's trial hands its reports to Ray Tune with one) and
    `loop` the per-worker function (`train_loop_per_worker`, which a sweep's trial wraps)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.data.storage import ray_storage

    storage_path, storage_fs = ray_storage(cfg.train.storage_path, storage=cfg.storage)
    ray_run_name = ray_run_name or cfg.train.run_name
    datasets = None
    if data_source == "stream":
        manifest = manifest if manifest is not None else read_manifest(cfg.data.manifest, storage=cfg.storage)
        datasets = training_datasets(cfg, ray_run_name, manifest)
    return TorchTrainer(
        loop,
        train_loop_config={"config": cfg.to_dict(), "mlflow_run_id": run_id, "data_source": data_source},
        datasets=datasets, dataset_config=ClipDataConfig(cfg.data.object_store_budget_gb),
        scaling_config=ScalingConfig(num_workers=worker_group_size(cfg), use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(
            name=ray_run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures), callbacks=list(callbacks),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                               checkpoint_score_attribute=cfg.train.checkpoint_metric,
                                               checkpoint_score_order=checkpoint_order(cfg.train.checkpoint_metric))),
    )


def run_training(cfg: Config, *, new_run: bool = False) -> dict:
    """The driver: check the inputs, open (or continue) the MLflow run, and fit on Ray Train.

    The same `train.run_name` continues the same training, refused when its config or data
    changed (beyond config.RESUMABLE_KEYS); `new_run` starts a fresh one under that name instead.
    """
    from pipeline.cluster.connect import init_ray

    cfg = with_dataset_classes(with_absolute_inputs(with_resolved_tracking(cfg)))  # workers read and log as the driver
    manifest = checked_manifest(cfg)
    run_id = find_or_create_run(cfg, manifest=manifest, new_run=new_run)
    init_ray()
    t0 = time.perf_counter()
    try:
        result = make_trainer(cfg, run_id, manifest=manifest, ray_run_name=ray_run_name(cfg, run_id)).fit()
        # Inside the handler too: a run whose checkpoint cannot be read or whose models cannot be
        # logged after fit() is FAILED, not left RUNNING.
        state = load_checkpoint_state(result.checkpoint)
        models = finish_training_run(cfg, run_id, state, dataset_labels(cfg, manifest))
    except BaseException:
        mark_failed(cfg, run_id)
        raise
    checkpoint = storage_uri(result.checkpoint.path, result.checkpoint.filesystem)  # Ray's S3 path has no s3://
    return {**models, "tracking_uri": tracking_uri(cfg), "checkpoint": checkpoint,
            "epochs": state["epoch"],
            "steps": state["step"], "seconds": round(time.perf_counter() - t0, 1),
            **{k: v for k, v in state["last_val"].items() if k != "confusion"}}
