"""The data a training reads: one clip stream for all its workers, and the validation views.

    trainer = TorchTrainer(..., datasets=training_datasets(cfg, ray_run_name, manifest),
                           dataset_config=ClipDataConfig())
    shard = ray.train.get_dataset_shard(TRAIN)      # in each worker, iterated once for the whole run

The training stream is one Ray Dataset holding every remaining epoch; Ray Train builds it (the
`TrainStream` factory) each time its worker group starts, so a run resumed from a checkpoint,
or restarted after a lost worker, streams from the checkpoint's epoch on. `ClipDataConfig` splits
it across workers with `streaming_split(equal=True)` (every worker takes the same number of
steps) and splits validation with `equal=False` (every video counted exactly once).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import pyarrow as pa
import ray.train
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from pipeline.config import Config, DataConfig, accumulation, config_from_dict
from pipeline.data.clips import training_stream, view_dataset
from pipeline.data.manifest import read_manifest
from pipeline.data.storage import ray_storage
from pipeline.data.transforms import decode_draws, train_augment_on_device

TRAIN, VAL = "train", "val"
PROGRESS_FILE = "progress.json"  # beside checkpoint.pt: the epoch a factory resumes from, without loading weights


def usable_rows(manifest: pa.Table, split: str) -> pa.Table:
    mask = pa.compute.and_(pa.compute.equal(manifest["split"], split), pa.compute.equal(manifest["status"], "ok"))
    return manifest.filter(mask)


def steps_per_epoch(cfg: Config, num_train_videos: int) -> int:
    """Optimizer steps per epoch: the usable videos' clips in whole global batches (capped by
    `train.max_steps_per_epoch`)."""
    steps = num_train_videos * cfg.data.repeated_aug // cfg.train.batch_size
    return min(steps, cfg.train.max_steps_per_epoch) if cfg.train.max_steps_per_epoch else steps


def videos_per_epoch(cfg: Config, num_train_videos: int) -> int:
    """The videos an epoch streams: exactly its steps' clips (batch_size counts whole videos' clips)."""
    return steps_per_epoch(cfg, num_train_videos) * cfg.train.batch_size // cfg.data.repeated_aug


def latest_checkpoint_epoch(cfg: Config, ray_run_name: str) -> int:
    """The epoch of the checkpoint Ray Train restores the run from (0 without one): the latest
    one its checkpoint manager registered, read from the snapshot it keeps in the run folder. A
    checkpoint folder written but never registered (a worker lost while reporting it) does not
    count, since Ray does not restore it either."""
    root, filesystem = ray_storage(cfg.train.storage_path, storage=cfg.storage)
    try:
        checkpoint = ray.train.Result.from_path(f"{root}/{ray_run_name}", storage_filesystem=filesystem).checkpoint
    except RuntimeError:  # no run folder or no snapshot yet: a new run
        return 0
    if checkpoint is None:
        return 0
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{PROGRESS_FILE}") as f:
        return int(json.loads(f.read())["epoch"])


@dataclasses.dataclass(frozen=True)
class TrainStream:
    """What Ray Train calls to build the training stream when its worker group starts."""

    config: dict[str, Any]
    ray_run_name: str

    def __call__(self):
        cfg = config_from_dict(self.config)
        manifest = read_manifest(cfg.data.manifest, storage=cfg.storage)
        num_videos = usable_rows(manifest, cfg.data.train_split).num_rows
        start = min(latest_checkpoint_epoch(cfg, self.ray_run_name), cfg.optim.epochs)
        return training_stream(manifest, split=cfg.data.train_split, data=cfg.data, storage=cfg.storage,
                               seed=cfg.train.seed, epochs=range(start, cfg.optim.epochs),
                               videos_per_epoch=videos_per_epoch(cfg, num_videos))


def validation_views(cfg: Config, manifest: pa.Table):
    """One view (1 clip x 1 crop) of every row of the validation split, unusable ones included."""
    one_view = dataclasses.replace(cfg.data, test_clips=1, test_crops=1)
    return view_dataset(manifest, split=cfg.data.val_split, data=one_view, storage=cfg.storage)


def training_datasets(cfg: Config, ray_run_name: str, manifest: pa.Table) -> dict[str, Any]:
    datasets: dict[str, Any] = {TRAIN: TrainStream(cfg.to_dict(), ray_run_name)}
    if pa.compute.any(pa.compute.equal(manifest["split"], cfg.data.val_split)).as_py():
        datasets[VAL] = validation_views(cfg, manifest)
    return datasets


class ClipDataConfig(ray.train.DataConfig):
    """Training clips split equally (DDP steps in lockstep); validation views split unequally, so
    that no video is dropped or counted twice. `object_store_budget_gb` caps what the streams hold."""

    def __init__(self, object_store_budget_gb: float = 0.0):
        options = self.default_ingest_options()
        if object_store_budget_gb:
            options.resource_limits = options.resource_limits.copy(object_store_memory=object_store_budget_gb * 1e9)
        super().__init__(datasets_to_split=[TRAIN, VAL], execution_options=options)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        shards = [{} for _ in range(world_size)]
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, dataset in datasets.items():
            dataset = dataset.copy(dataset)
            dataset.context.execution_options = self._resolve_execution_options(name)
            splits = dataset.streaming_split(world_size, equal=name == TRAIN, locality_hints=hints)
            for rank, split in enumerate(splits):
                shards[rank][name] = split
        return shards


class TrainBatch(NumpyBatchCollateFn):
    """A training batch as torch tensors on the host, pinned when `pin` (so the copies to the GPU can
    overlap compute). Clips shipped as whole frames for the device augmentation may differ in size
    between videos, so they stay a list of per-clip tensors."""

    def __init__(self, pin: bool):
        super().__init__()
        self.pin = pin

    def _host(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor.pin_memory() if self.pin else tensor

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        out = {key: self._host(value) for key, value in batch.items() if key != "clip"}
        out["clip"] = [self._host(clip) for clip in batch["clip"]] if "crop" in batch else self._host(batch["clip"])
        return out


def clips_on_device(batch: dict, data: DataConfig, device: torch.device) -> torch.Tensor:
    """The batch's uint8 (B, T, crop, crop, 3) training clips on `device`: copied as they are, or, when
    they came as whole frames with their draws, augmented there (`train_augment_on_device`)."""
    if "crop" not in batch:
        return batch["clip"].to(device, non_blocking=True)
    return torch.stack([
        train_augment_on_device(frames.to(device, non_blocking=True),
                                decode_draws(ops.tolist(), values.tolist(), crop.tolist(), bool(flip)),
                                size=data.crop_size)
        for frames, ops, values, crop, flip in zip(batch["clip"], batch["aug_ops"], batch["aug_values"],
                                                   batch["crop"], batch["flip"])])


@dataclasses.dataclass(frozen=True)
class WorkerShare:
    """This worker's part of every optimizer step: the global batch of `batch_size` clips spread over
    `world` workers, in `accum` micro-batches each. When `world` does not divide the batch, the
    `batch_size % world` extra clips of a step go to ranks in turn, so that every step still trains
    on exactly `batch_size` clips and every worker takes the same share over `world` steps."""

    batch_size: int
    world: int
    rank: int
    accum: int

    def clips(self, step: int) -> int:
        base, extra = divmod(self.batch_size, self.world)
        return base + int((self.rank + step) % self.world < extra)

    def micro_batches(self, step: int) -> list[int]:
        clips = self.clips(step)
        return [clips // self.accum + int(i < clips % self.accum) for i in range(self.accum)]

    def largest_micro_batch(self) -> int:
        most_clips = -(-self.batch_size // self.world)
        return -(-most_clips // self.accum)


def worker_share(cfg: Config, world: int, rank: int) -> WorkerShare:
    """This rank's share of `cfg`'s global batch in a group of `world` workers (`config.accumulation`
    says how many micro-batches, or why that group cannot keep the batch)."""
    return WorkerShare(cfg.train.batch_size, world, rank, accumulation(cfg, world))


class StepBatches:
    """This worker's micro-batches, cut to the sizes `WorkerShare` asks for from the host batches of
    its shard (which come at the largest micro-batch size, so with an even share each is passed on
    whole). Ray Data's equal split gives every worker `rows // world` rows, so with an uneven share a
    worker may be a row short at the very end of the stream: that one is padded with an unusable
    (zero-weight) row, and a stream that ends earlier is an error."""

    max_padded_rows = 1

    def __init__(self, batches):
        self.batches = batches
        self.held: dict | None = None
        self.padded_rows = 0

    def take(self, count: int) -> dict:
        parts, have = [], 0
        while have < count:
            if self.held is None:
                self.held = next(self.batches, None)
                if self.held is None:
                    if not parts or self.padded_rows + count - have > self.max_padded_rows:
                        raise RuntimeError(f"the clip stream ended {count - have} rows short of this step's share")
                    self.padded_rows += count - have
                    self.held = _unusable_copies(parts[-1], count - have)
            rows = len(self.held["label"])
            if have + rows <= count:
                parts.append(self.held)
                have += rows
                self.held = None
            else:
                parts.append(_rows(self.held, 0, count - have))
                self.held = _rows(self.held, count - have, rows)
                have = count
        return parts[0] if len(parts) == 1 else _concat_rows(parts)


def _rows(batch: dict, start: int, stop: int) -> dict:
    return {key: value[start:stop] for key, value in batch.items()}


def _concat_rows(parts: list[dict]) -> dict:
    return {key: [row for part in parts for row in part[key]] if isinstance(parts[0][key], list)
            else torch.cat([part[key] for part in parts]) for key in parts[0]}


def _unusable_copies(like: dict, count: int) -> dict:
    """`count` copies of the last row of `like`, marked unusable: they weigh nothing in the loss."""
    rows = {key: [value[-1]] * count if isinstance(value, list) else value[-1:].repeat(count, *[1] * (value.ndim - 1))
            for key, value in like.items()}
    rows["valid"] = torch.zeros(count, dtype=torch.bool)
    return rows
