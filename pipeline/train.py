"""Ray Train DDP training of UniFormer: the driver (`run_training`) and the loop each worker runs.

The loop reads top to bottom: build model and optimizer, resume from the latest checkpoint,
then per epoch stream this worker's clips through Ray Data, step, validate, checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import create_uniformer, load_pretrained
from pipeline import recipe, tracking
from pipeline.clips import build_clip_dataset, clip_shape
from pipeline.config import Config, ConfigError, config_from_dict
from pipeline.manifest import read_manifest
from pipeline.transforms import normalize_on_device

CHECKPOINT_FILE = "checkpoint.pt"
# Ray Train routes workers' logging to the driver; its patched print() would show each line twice.
log = logging.getLogger(__name__)


def split_rows(manifest: pa.Table, split: str) -> pa.Table:
    mask = pa.compute.and_(pa.compute.equal(manifest["split"], split), pa.compute.equal(manifest["status"], "ok"))
    return manifest.filter(mask)


def worker_shard(rows: pa.Table, *, rank: int, world: int, seed: int, epoch: int, equal: bool) -> pa.Table:
    """This worker's rows. Training: a new seeded permutation each epoch, cut into equal shards so
    that every worker takes the same number of steps. Validation: every video exactly once."""
    order = np.arange(rows.num_rows)
    if equal:
        order = np.random.default_rng([seed, epoch]).permutation(rows.num_rows)
        order = order[: rows.num_rows // world * world]
    return rows.take(order[rank::world])


def steps_per_epoch(cfg: Config, num_train_videos: int) -> int:
    clips_per_worker = num_train_videos // cfg.train.num_workers * cfg.data.repeated_aug
    steps = clips_per_worker * cfg.train.num_workers // cfg.train.batch_size
    return min(steps, cfg.train.max_steps_per_epoch) if cfg.train.max_steps_per_epoch else steps


def autocast(cfg: Config, device: torch.device):
    if cfg.train.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def validate(model, cfg: Config, rows: pa.Table, device: torch.device) -> dict:
    """Loss, top-1, top-5 and mean-class accuracy from counts summed over workers; one view per video."""
    model.eval()
    num_classes = cfg.model.num_classes
    view = dataclasses.replace(cfg.data, test_clips=1, test_crops=1)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, unusable
    if rows.num_rows:
        ds = build_clip_dataset(rows, split=cfg.data.val_split, data=view, storage=cfg.storage,
                                training=False, seed=cfg.train.seed)
        for batch in ds.iter_torch_batches(batch_size=max(1, cfg.train.batch_size // cfg.train.num_workers)):
            valid = batch["valid"].to(device)
            sums[3] += (~valid).sum()
            if not valid.any():
                continue
            clips = normalize_on_device(batch["clip"].to(device)[valid], cfg.data.mean, cfg.data.std)
            labels = batch["label"].to(device)[valid]
            with autocast(cfg, device):
                logits = model(clips).float()
            sums[0] += F.cross_entropy(logits, labels, reduction="sum")
            top5 = logits.topk(min(5, num_classes), dim=-1).indices
            sums[1] += (top5[:, 0] == labels).sum()
            sums[2] += (top5 == labels[:, None]).any(dim=-1).sum()
            confusion.index_put_((labels, top5[:, 0]), torch.ones_like(labels, dtype=torch.float64),
                                 accumulate=True)
    all_reduce_sum(sums)
    all_reduce_sum(confusion)
    model.train()
    count = confusion.sum().item()
    per_class_total = confusion.sum(dim=1)
    seen = per_class_total > 0
    per_class_acc = confusion.diagonal()[seen] / per_class_total[seen]
    return {
        "val_loss": sums[0].item() / max(count, 1),
        "val_top1": sums[1].item() / max(count, 1),
        "val_top5": sums[2].item() / max(count, 1),
        "val_mean_class": per_class_acc.mean().item() if seen.any() else 0.0,
        "val_videos": count,
        "val_unusable": sums[3].item(),
        "confusion": confusion.long().tolist(),
    }


def save_checkpoint(directory: Path, state: dict) -> ray.train.Checkpoint:
    torch.save(state, directory / CHECKPOINT_FILE)
    return ray.train.Checkpoint.from_directory(str(directory))


def memory_batches(cfg: Config, micro_batch: int, seed: int):
    """Endless in-memory batches shaped like the clip stream's (uint8 clips on the CPU): the same
    loop with no data pipeline, which `uniformer bench train` compares against the stream."""
    gen = torch.Generator().manual_seed(seed)
    batches = [{"clip": torch.randint(0, 256, (micro_batch, *clip_shape(cfg.data)), dtype=torch.uint8, generator=gen),
                "label": torch.randint(0, cfg.model.num_classes, (micro_batch,), generator=gen),
                "valid": torch.ones(micro_batch, dtype=torch.bool)} for _ in range(2)]
    yield from itertools.cycle(batches)


def load_checkpoint_state(checkpoint: ray.train.Checkpoint) -> dict:
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = config_from_dict(loop_config["config"])
    # Per-worker Ray Data bars interleave into noise; rank 0 prints one line per epoch instead.
    ray.data.DataContext.get_current().enable_progress_bars = False
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    is_rank0 = rank == 0
    device = ray.train.torch.get_device()
    manifest = read_manifest(cfg.data.manifest, storage=cfg.storage)
    train_rows = split_rows(manifest, cfg.data.train_split)
    # Validation takes every row of its split: unusable videos are counted, not skipped.
    val_rows = manifest.filter(pa.compute.equal(manifest["split"], cfg.data.val_split))

    # Same init on every rank from the seed; DDP then broadcasts rank 0's weights anyway.
    torch.manual_seed(cfg.train.seed)
    model = create_uniformer(cfg.model.variant, num_classes=cfg.model.num_classes,
                             drop_path_rate=cfg.model.drop_path_rate)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.model.init_from:
        report = load_pretrained(model, cfg.model.init_from)
        if is_rank0:
            log.info(f"init from {cfg.model.init_from}: {report}")
    micro_batch = cfg.train.batch_size // (world * cfg.optim.grad_accum_steps)
    base_lr = recipe.scaled_lr(cfg.optim.lr_per_32_videos, batch_clips=cfg.train.batch_size,
                               clips_per_video=cfg.data.repeated_aug)
    optimizer = torch.optim.AdamW(recipe.param_groups(model, cfg.optim.weight_decay), lr=base_lr,
                                  betas=cfg.optim.betas, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    ema = recipe.ModelEMA(model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
    epoch_steps = steps_per_epoch(cfg, train_rows.num_rows)
    total_steps = epoch_steps * cfg.optim.epochs
    warmup_steps = int(epoch_steps * cfg.optim.warmup_epochs)

    start_epoch, step, last_val = 0, 0, {}
    run_id = loop_config["mlflow_run_id"]
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        state = load_checkpoint_state(checkpoint)
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema_state"):
            ema.module.load_state_dict(state["ema_state"])
        start_epoch, step, last_val = state["epoch"], state["step"], state["last_val"]
        run_id = state["mlflow_run_id"]
        if is_rank0:
            log.info(f"resumed from checkpoint at epoch {start_epoch}, step {step}")
    model = ray.train.torch.prepare_model(model)
    client = tracking.client_for(cfg) if is_rank0 and run_id else None  # no run: a benchmark
    with tracking.system_metrics(cfg, run_id):
        for epoch in range(start_epoch, cfg.optim.epochs):
            # Every random draw derives from (seed, rank, epoch): a resumed run repeats an uninterrupted one.
            torch.manual_seed(cfg.train.seed * 100_003 + epoch * 1_009 + rank)
            mix_rng = np.random.default_rng([cfg.train.seed, rank, epoch])
            if loop_config.get("data_source") == "memory":
                batches = memory_batches(cfg, micro_batch, seed=cfg.train.seed + rank)
            else:
                shard = worker_shard(train_rows, rank=rank, world=world, seed=cfg.train.seed, epoch=epoch,
                                     equal=True)
                ds = build_clip_dataset(shard, split=cfg.data.train_split, data=cfg.data, storage=cfg.storage,
                                        training=True, seed=cfg.train.seed, epoch=epoch)
                batches = iter(ds.iter_torch_batches(batch_size=micro_batch, drop_last=True, prefetch_batches=2))
            model.train()
            epoch_clips, epoch_s, epoch_wait_s = 0, 0.0, 0.0
            for _ in range(epoch_steps):
                t_step = time.perf_counter()
                wait_s, loss_sum, skipped, clips_done = 0.0, 0.0, 0, 0
                lr = recipe.warmup_cosine(step, warmup_steps=warmup_steps, total_steps=total_steps,
                                          base_lr=base_lr, min_lr=cfg.optim.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                for micro in range(cfg.optim.grad_accum_steps):
                    t_wait = time.perf_counter()
                    batch = next(batches)
                    wait_s += time.perf_counter() - t_wait
                    valid = batch["valid"].to(device)
                    skipped += int((~valid).sum())
                    clips = normalize_on_device(batch["clip"].to(device, non_blocking=True),
                                                cfg.data.mean, cfg.data.std)
                    labels = batch["label"].to(device)
                    clips, targets = recipe.mix_batch(
                        clips, labels, num_classes=cfg.model.num_classes, mixup_alpha=cfg.optim.mixup_alpha,
                        cutmix_alpha=cfg.optim.cutmix_alpha, prob=cfg.optim.mixup_prob,
                        smoothing=cfg.optim.label_smoothing, rng=mix_rng)
                    # Every rank must run forward/backward for DDP, so unusable clips get zero weight.
                    sync = micro == cfg.optim.grad_accum_steps - 1
                    with (contextlib.nullcontext() if sync or world == 1 else model.no_sync()), autocast(cfg, device):
                        logits = model(clips)
                        per_clip = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1)
                        loss = (per_clip * valid).sum() / valid.sum().clamp(min=1)
                        scaler.scale(loss / cfg.optim.grad_accum_steps).backward()
                    loss_sum += loss.item()
                    clips_done += labels.numel()
                if cfg.optim.clip_grad_norm:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(model.module if hasattr(model, "module") else model)
                step += 1
                step_s = time.perf_counter() - t_step
                epoch_clips += clips_done * world
                epoch_s += step_s
                epoch_wait_s += wait_s
                if client:
                    tracking.log_metrics(client, run_id, {
                        "train_loss": loss_sum / cfg.optim.grad_accum_steps, "lr": lr,
                        "clips_per_s": clips_done * world / step_s, "data_wait_fraction": wait_s / step_s,
                        "skipped_clips": skipped, "epoch": epoch}, step)

            batches.close()  # stop this epoch's Ray Data executor: a lingering one holds decode CPUs
            epoch += 1
            # This worker's clips/s and data wait over the epoch (every rank steps in lockstep under DDP).
            fresh = {"epoch_clips_per_s": epoch_clips / epoch_s, "epoch_data_wait_fraction": epoch_wait_s / epoch_s}
            if epoch % cfg.train.val_every_epochs == 0 or epoch == cfg.optim.epochs:
                eval_model = ema.module if ema is not None else model
                last_val = validate(eval_model, cfg, worker_shard(val_rows, rank=rank, world=world, seed=0, epoch=0,
                                                                  equal=False), device)
                fresh.update({k: v for k, v in last_val.items() if k != "confusion"})
            if client:
                tracking.log_metrics(client, run_id, fresh, step)
            metrics = {"epoch": epoch, "step": step, **{k: v for k, v in last_val.items() if k != "confusion"}, **fresh}
            if is_rank0:
                shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
                log.info(f"epoch {epoch}/{cfg.optim.epochs} loss {loss_sum / cfg.optim.grad_accum_steps:.4f} {shown}")
            metrics.setdefault(cfg.train.checkpoint_metric, 0.0)  # Ray ranks checkpoints by it: before any validation
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if is_rank0 and (epoch % cfg.train.checkpoint_every_epochs == 0 or epoch == cfg.optim.epochs):
                    unwrapped = model.module if hasattr(model, "module") else model
                    checkpoint = save_checkpoint(Path(tmp), {
                        "model_state": unwrapped.state_dict(), "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(), "ema_state": ema.module.state_dict() if ema else None,
                        "epoch": epoch, "step": step, "last_val": last_val, "mlflow_run_id": run_id,
                        "config": cfg.to_dict()})
                ray.train.report(metrics, checkpoint=checkpoint)


def with_absolute_inputs(cfg: Config) -> Config:
    """`cfg` with local input paths made absolute: Train workers run in folders of their own."""
    from pipeline.storage import absolute

    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, manifest=absolute(cfg.data.manifest)),
                               model=dataclasses.replace(cfg.model, init_from=absolute(cfg.model.init_from)))


def checked_manifest(cfg: Config) -> pa.Table:
    """The prepared manifest, checked to hold a training batch; fails before any Ray work."""
    if not cfg.data.manifest:
        raise ConfigError("data.manifest is not set: pass data.manifest=URI of a prepared dataset")
    manifest = read_manifest(cfg.data.manifest, storage=cfg.storage)
    num_train = split_rows(manifest, cfg.data.train_split).num_rows
    if num_train < cfg.train.batch_size:
        raise ConfigError(f"data.manifest has {num_train} usable {cfg.data.train_split!r} videos, fewer than "
                          f"train.batch_size={cfg.train.batch_size}")
    return manifest


def make_trainer(cfg: Config, run_id: str | None, *, data_source: str = "stream"):
    """The TorchTrainer of `cfg`; `run_id` None logs nothing to MLflow, `data_source="memory"` trains
    on `memory_batches` instead of the clip stream."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.storage import ray_storage

    storage_path, storage_fs = ray_storage(cfg.train.storage_path, storage=cfg.storage)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "mlflow_run_id": run_id, "data_source": data_source},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.train.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                               checkpoint_score_attribute=cfg.train.checkpoint_metric,
                                               checkpoint_score_order="max")),
    )


def run_training(cfg: Config) -> dict:
    """The driver: check the inputs, open (or continue) the MLflow run, and fit on Ray Train."""
    from pipeline.raycluster import init_ray

    cfg = with_absolute_inputs(tracking.with_resolved_tracking(cfg))  # workers must read and log as the driver
    manifest = checked_manifest(cfg)
    run_id = tracking.find_or_create_run(cfg, manifest=manifest)
    init_ray()
    t0 = time.perf_counter()
    result = make_trainer(cfg, run_id).fit()
    state = load_checkpoint_state(result.checkpoint)
    models = tracking.finish_training_run(cfg, run_id, state, tracking.dataset_labels(cfg, manifest))
    return {**models, "tracking_uri": tracking.tracking_uri(cfg), "checkpoint": result.checkpoint.path,
            "epochs": state["epoch"],
            "steps": state["step"], "seconds": round(time.perf_counter() - t0, 1),
            **{k: v for k, v in state["last_val"].items() if k != "confusion"}}
