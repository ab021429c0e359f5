"""The loop each Ray Train worker runs (`train_loop_per_worker`), with its helpers.

It reads top to bottom: build model and optimizer, resume from the latest checkpoint, then per
epoch take this worker's steps from its shard of the one clip stream (pipeline.training.ingest),
step, validate, checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import ray
import ray.data
import ray.train
import ray.train.torch
from ray.train import CheckpointUploadMode
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import create_uniformer
from pipeline.config import (Config, ConfigError, changed_keys, checkpoint_order, config_from_dict, identity_digest,
                             training_identity)
from pipeline.data.clips import clip_shape
from pipeline.data.manifest import manifest_hash, read_manifest
from pipeline.data.transforms import normalize_on_device
from pipeline.tracking.metrics import MetricQueue, system_metrics
from pipeline.tracking.runs import client_for
from pipeline.training import recipe
from pipeline.training.ingest import (PROGRESS_FILE, TRAIN, VAL, StepBatches, TrainBatch, clips_on_device,
                                      steps_per_epoch, usable_rows, worker_share)
from pipeline.training.pretrained import load_initial_weights

CHECKPOINT_FILE = "checkpoint.pt"
# Ray Train routes workers' logging to the driver; its patched print() would show each line twice.
log = logging.getLogger(__name__)


def autocast(cfg: Config, device: torch.device):
    if cfg.train.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def dist_world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def validate(model, cfg: Config, views, device: torch.device) -> dict:
    """Loss, top-1, top-5 and mean-class accuracy from counts summed over workers; one view per
    video (`views`: this worker's shard of the validation views, or None without a validation split)."""
    model.eval()
    num_classes = cfg.model.num_classes
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, unusable
    if views is not None:
        for batch in views.iter_torch_batches(batch_size=max(1, cfg.train.batch_size // dist_world())):
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


def write_checkpoint(directory: Path, state: dict) -> None:
    torch.save(state, directory / CHECKPOINT_FILE)
    (directory / PROGRESS_FILE).write_text(json.dumps({"epoch": state["epoch"], "step": state["step"]}))


def host_snapshot(tree):
    """A copy of `tree`'s tensors in host memory, taken now: on a GPU into pinned buffers, copied
    without blocking and waited for once (tens of ms for UniFormer-B's weights, moments and EMA)."""
    on_gpu = []

    def copy(value):
        if isinstance(value, torch.Tensor):
            if value.device.type != "cuda":
                return value.detach().clone()
            on_gpu.append(value.device)
            return torch.empty(value.shape, dtype=value.dtype, pin_memory=True).copy_(value, non_blocking=True)
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copy(v) for v in value)
        return value

    snapshot = copy(tree)
    for device in set(on_gpu):
        torch.cuda.current_stream(device).synchronize()
    return snapshot


def report_with_checkpoint(metrics: dict, state: dict, timings: dict) -> None:
    """`ray.train.report` with a checkpoint of `state`, kept off the step path: the state is copied to
    host memory here, then written and uploaded by Ray Train's upload thread while training goes
    on; Ray registers the checkpoint once that upload is done. `timings` gets the seconds this call
    held the step path (`blocking_s`) and, from the upload thread, the write and upload (`write_s`)."""
    t0 = time.perf_counter()
    snapshot = host_snapshot(state)
    directory = Path(tempfile.mkdtemp(prefix="uniformer-checkpoint-"))  # Ray deletes it after the upload
    storage = ray.train.get_context().get_storage()

    def write_and_upload(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        t_write = time.perf_counter()
        write_checkpoint(directory, snapshot)
        persisted = storage.persist_current_checkpoint(checkpoint, dir_name)
        timings["write_s"] = time.perf_counter() - t_write
        return persisted

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                     checkpoint_upload_mode=CheckpointUploadMode.ASYNC, checkpoint_upload_fn=write_and_upload)
    timings["blocking_s"] = time.perf_counter() - t0


def memory_batches(cfg: Config, micro_batch: int, seed: int, pin: bool = False):
    """Endless in-memory batches shaped like the clip stream's (uint8 clips on the CPU): the same
    loop with no data pipeline, which `uniformer bench train` compares against the stream."""
    gen = torch.Generator().manual_seed(seed)
    batches = [{"clip": torch.randint(0, 256, (micro_batch, *clip_shape(cfg.data)), dtype=torch.uint8, generator=gen),
                "label": torch.randint(0, cfg.model.num_classes, (micro_batch,), generator=gen),
                "valid": torch.ones(micro_batch, dtype=torch.bool)} for _ in range(2)]
    if pin:
        batches = [{k: v.pin_memory() for k, v in batch.items()} for batch in batches]
    yield from itertools.cycle(batches)


def stream_from(stream, start_epoch: int):
    """The clip stream, checked to start at the checkpoint's epoch: clips of an older epoch first
    would mean the stream was built from an older checkpoint than the one the worker resumed."""
    first = next(stream, None)
    if first is None:
        return stream
    if int(first["epoch"].min()) < start_epoch:
        raise RuntimeError(f"the clip stream starts at epoch {int(first['epoch'].min())} but the checkpoint at epoch "
                           f"{start_epoch}: it was built from an older checkpoint")
    log.info(f"clip stream starts at epoch {int(first['epoch'].min())}")
    return itertools.chain([first], stream)


def load_checkpoint_state(checkpoint: ray.train.Checkpoint) -> dict:
    """A training checkpoint: tensors and plain values only, so it loads without unpickling code."""
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


@dataclasses.dataclass
class TrainingState:
    model: torch.nn.Module  # what steps: DDP-wrapped when there are several workers
    net: torch.nn.Module  # the plain network inside (validated, checkpointed)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: recipe.ModelEMA | None


def bf16_all_reduce(group, bucket):  # no annotations: DDP compares them with its types, and here they are strings
    """A DDP communication hook that averages each gradient bucket (dist.GradBucket) in bf16: half the
    bytes of fp32 on the wire, at bf16's precision (8-bit mantissa). torch's own bf16 hook refuses gloo."""
    group = group or dist.group.WORLD
    compressed = bucket.buffer().to(torch.bfloat16).div_(group.size())

    def decompress(future):
        return bucket.buffer().copy_(future.value()[0])

    return dist.all_reduce(compressed, group=group, async_op=True).get_future().then(decompress)


def build_training_state(cfg: Config, device: torch.device, place: Callable[[torch.nn.Module], torch.nn.Module],
                         checkpoint_state: dict | None = None) -> TrainingState:
    """Model, optimizer, scaler and EMA, resumed from `checkpoint_state` when given.

    The order matters on a GPU: `place` (Ray's prepare_model: move to the device, wrap in DDP)
    comes first, so that the optimizer's and EMA's tensors are created, and the checkpoint's
    optimizer state is loaded, on the parameters' device. Loaded before the move, AdamW's state
    stays on the CPU and the fused step fails at the first step after every restart.
    """
    torch.manual_seed(cfg.train.seed)  # same init on every rank; DDP broadcasts rank 0's anyway
    net = create_uniformer(cfg.model.variant, num_classes=cfg.model.num_classes,
                           drop_path_rate=cfg.model.drop_path_rate)
    if cfg.model.grad_checkpointing:
        net.set_grad_checkpointing(True)
    if cfg.model.init_from and checkpoint_state is None:
        log.info(f"init from {cfg.model.init_from}: {load_initial_weights(net, cfg)}")
    model = place(net)
    net = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if cfg.train.grad_compression == "bf16" and model is not net:
        model.register_comm_hook(None, bf16_all_reduce)
    optimizer = torch.optim.AdamW(recipe.param_groups(net, cfg.optim.weight_decay), lr=cfg.base_lr(),
                                  betas=cfg.optim.betas, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    ema = None
    if cfg.optim.ema_decay:
        ema = recipe.ModelEMA(net, cfg.optim.ema_decay, updates=(checkpoint_state or {}).get("ema_updates", 0))
    if checkpoint_state is not None:
        net.load_state_dict(checkpoint_state["model_state"])
        optimizer.load_state_dict(checkpoint_state["optimizer"])
        scaler.load_state_dict(checkpoint_state["scaler"])
        if ema is not None and checkpoint_state.get("ema_state"):
            ema.module.load_state_dict(checkpoint_state["ema_state"])
    return TrainingState(model, net, optimizer, scaler, ema)


def check_resumable(checkpoint_state: dict, identity: dict[str, str]) -> None:
    """Refuse to continue a checkpoint of another training (see config.RESUMABLE_KEYS)."""
    if checkpoint_state.get("identity_digest", identity_digest(identity)) != identity_digest(identity):
        changed = changed_keys(checkpoint_state.get("identity", {}), identity)
        raise ConfigError(f"the checkpoint of train.run_name={identity['train.run_name']!r} was trained with "
                          f"other values of {', '.join(changed) or 'the config'}; keep them, or start a new run "
                          f"(--new-run or another train.run_name)")


def worst_score(metric: str) -> float:
    """What a checkpoint scores before any validation: the worst, so that Ray never keeps it over a
    validated one (Ray scores a missing metric as -inf, which under "min" would be the best).
    Finite: Ray saves its checkpoint list as JSON, restores infinities as None and then fails."""
    return sys.float_info.max if checkpoint_order(metric) == "min" else -sys.float_info.max


def forward_backward(ts: TrainingState, batch: dict, cfg: Config, device: torch.device, *, world: int,
                     mix_rng: np.random.Generator, erase_rng: np.random.Generator, sync: bool) -> torch.Tensor:
    """One micro-batch of the recipe on the device: augmentation (when the clips came as whole frames),
    normalisation, random erasing, mixup/cutmix, forward and backward (gradients all-reduced when
    `sync`). Returns [summed loss, unusable clips, usable clips] on the device, for running sums read
    once per interval.

    The loss is summed over the micro-batch's clips and divided by each worker's mean share of the
    global batch (`train.batch_size / world`): DDP averages over workers, so every step's gradient is
    the mean over its `train.batch_size` clips however they were spread over workers and micro-batches.
    """
    valid_host = batch["valid"]
    valid = valid_host.to(device, non_blocking=True)
    clips = normalize_on_device(clips_on_device(batch, cfg.data, device), cfg.data.mean, cfg.data.std)
    clips = recipe.random_erase(clips, prob=cfg.data.random_erasing, rng=erase_rng)
    labels = batch["label"].to(device, non_blocking=True)
    clips, targets = recipe.mix_batch(
        clips, labels, num_classes=cfg.model.num_classes, mixup_alpha=cfg.optim.mixup_alpha,
        cutmix_alpha=cfg.optim.cutmix_alpha, prob=cfg.optim.mixup_prob,
        smoothing=cfg.optim.label_smoothing, rng=mix_rng, valid=valid_host)
    # Every rank must run forward/backward for DDP, so unusable clips get zero weight.
    with (contextlib.nullcontext() if sync or world == 1 else ts.model.no_sync()), autocast(cfg, device):
        logits = ts.model(clips)
        per_clip = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1)
        loss_sum = (per_clip * valid).sum()
        ts.scaler.scale(loss_sum * (world / cfg.train.batch_size)).backward()
    usable = valid.sum().double()
    return torch.stack([loss_sum.detach().double(), valid.numel() - usable, usable])


def optimizer_step(ts: TrainingState, cfg: Config) -> None:
    """Gradient clipping, the optimizer step (through the fp16 scaler), zeroing, the EMA update."""
    if cfg.optim.clip_grad_norm:
        ts.scaler.unscale_(ts.optimizer)
        torch.nn.utils.clip_grad_norm_(ts.model.parameters(), cfg.optim.clip_grad_norm)
    ts.scaler.step(ts.optimizer)
    ts.scaler.update()
    ts.optimizer.zero_grad(set_to_none=True)
    if ts.ema is not None:
        ts.ema.update(ts.net)


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = config_from_dict(loop_config["config"])
    # Per-worker Ray Data bars interleave into noise; rank 0 prints one line per epoch instead.
    ray.data.DataContext.get_current().enable_progress_bars = False
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    is_rank0 = rank == 0
    device = ray.train.torch.get_device()
    manifest = read_manifest(cfg.data.manifest, storage=cfg.storage)
    identity = training_identity(cfg, manifest_hash(manifest))
    num_train_videos = usable_rows(manifest, cfg.data.train_split).num_rows

    checkpoint = ray.train.get_checkpoint()
    state = load_checkpoint_state(checkpoint) if checkpoint else None
    if state is not None:
        check_resumable(state, identity)
    ts = build_training_state(cfg, device, ray.train.torch.prepare_model, state)
    model, net, optimizer, ema = ts.model, ts.net, ts.optimizer, ts.ema
    share = worker_share(cfg, world, rank)  # this rank's clips and micro-batches per step, at this group size
    micro_batch = share.largest_micro_batch()
    base_lr = cfg.base_lr()
    epoch_steps = steps_per_epoch(cfg, num_train_videos)
    total_steps = epoch_steps * cfg.optim.epochs
    warmup_steps = int(epoch_steps * cfg.optim.warmup_epochs)

    start_epoch, step, last_val = 0, 0, {}
    run_id = loop_config["mlflow_run_id"]
    if state is not None:
        start_epoch, step, last_val = state["epoch"], state["step"], state["last_val"]
        run_id = state["mlflow_run_id"]
        if is_rank0:
            log.info(f"resumed from checkpoint at epoch {start_epoch}, step {step}")
    # Rank 0's metrics leave through a queue drained by a thread: no step waits on the tracking server.
    metric_queue = MetricQueue(client_for(cfg), run_id) if is_rank0 and run_id else None
    pin = device.type == "cuda"  # pinned host batches let the copies below overlap compute
    if loop_config.get("data_source") == "memory":
        host_batches, val_views = memory_batches(cfg, micro_batch, seed=cfg.train.seed + rank, pin=pin), None
    else:
        # One iterator over every remaining epoch; each epoch takes its steps' batches from it.
        host_batches = stream_from(iter(ray.train.get_dataset_shard(TRAIN).iter_torch_batches(
            batch_size=micro_batch, drop_last=False, prefetch_batches=2, collate_fn=TrainBatch(pin))), start_epoch)
        val_views = ray.train.get_dataset_shard(VAL) if cfg.data.val_split in manifest["split"].to_pylist() else None
    batches = StepBatches(host_batches)
    if is_rank0:
        log.info(f"{world} workers: {share.clips(0)} clips per worker and step in {share.accum} micro-batches "
                 f"(global batch {cfg.train.batch_size})")
    checkpoint_timings: dict[str, float] = {}
    with system_metrics(cfg, run_id):
        for epoch in range(start_epoch, cfg.optim.epochs):
            # Every random draw derives from (seed, rank, epoch): a resumed run repeats an uninterrupted one.
            torch.manual_seed(cfg.train.seed * 100_003 + epoch * 1_009 + rank)
            mix_rng = np.random.default_rng([cfg.train.seed, rank, epoch])
            erase_rng = np.random.default_rng([cfg.train.seed, rank, epoch, 1])  # mixup's draws stay as they were
            model.train()
            # Running sums stay on the device and are read once per log interval: no per-step sync.
            sums = torch.zeros(3, dtype=torch.float64, device=device)  # summed loss, skipped clips, usable clips
            interval_t0, interval_wait_s, interval_clips = time.perf_counter(), 0.0, 0
            epoch_t0, epoch_wait_s, epoch_clips = interval_t0, 0.0, 0
            for epoch_step in range(epoch_steps):
                lr = recipe.warmup_cosine(step, warmup_steps=warmup_steps, total_steps=total_steps,
                                          base_lr=base_lr, min_lr=cfg.optim.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                micro_batches = share.micro_batches(step)
                for micro, clips in enumerate(micro_batches):
                    t_wait = time.perf_counter()
                    batch = batches.take(clips)
                    interval_wait_s += time.perf_counter() - t_wait
                    sums += forward_backward(ts, batch, cfg, device, world=world, mix_rng=mix_rng, erase_rng=erase_rng,
                                             sync=micro == len(micro_batches) - 1)
                interval_clips += cfg.train.batch_size
                optimizer_step(ts, cfg)
                step += 1
                if step % cfg.tracking.log_every_steps == 0 or epoch_step == epoch_steps - 1:
                    loss_sum, skipped, usable = sums.tolist()  # the one device sync of the interval
                    interval_s = time.perf_counter() - interval_t0
                    train_loss = loss_sum / max(usable, 1)
                    if metric_queue:
                        metric_queue.log({"train_loss": train_loss, "lr": lr, "epoch": epoch, "skipped_clips": skipped,
                                          "clips_per_s": interval_clips / interval_s,
                                          "data_wait_fraction": interval_wait_s / interval_s}, step)
                    epoch_wait_s += interval_wait_s
                    epoch_clips += interval_clips
                    sums.zero_()
                    interval_t0, interval_wait_s, interval_clips = time.perf_counter(), 0.0, 0

            epoch += 1
            epoch_s = time.perf_counter() - epoch_t0
            # This worker's clips/s and data wait over the epoch (every rank steps in lockstep under DDP).
            fresh = {"epoch_clips_per_s": epoch_clips / epoch_s, "epoch_data_wait_fraction": epoch_wait_s / epoch_s,
                     "epoch_step_s": epoch_s / epoch_steps}
            if epoch % cfg.train.val_every_epochs == 0 or epoch == cfg.optim.epochs:
                # The plain network, never the DDP wrapper: its forward broadcasts buffers, and a rank
                # with fewer validation batches would leave the others waiting in that collective.
                last_val = validate(ema.module if ema is not None else net, cfg, val_views, device)
                fresh.update({k: v for k, v in last_val.items() if k != "confusion"})
            if metric_queue:
                metric_queue.log(fresh, step)
            metrics = {"epoch": epoch, "step": step, **{k: v for k, v in last_val.items() if k != "confusion"}, **fresh}
            if is_rank0:
                shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
                log.info(f"epoch {epoch}/{cfg.optim.epochs} loss {train_loss:.4f} {shown}")
            metrics.setdefault(cfg.train.checkpoint_metric, worst_score(cfg.train.checkpoint_metric))
            # What the previous checkpoint cost: on the step path, and in the background (`bench train`).
            metrics.update({f"checkpoint_{k}": v for k, v in checkpoint_timings.items()})
            if is_rank0 and (epoch % cfg.train.checkpoint_every_epochs == 0 or epoch == cfg.optim.epochs):
                checkpoint_timings = {}
                report_with_checkpoint(metrics, {
                    "model_state": net.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": ts.scaler.state_dict(), "ema_state": ema.module.state_dict() if ema else None,
                    "ema_updates": ema.updates if ema else 0,
                    "epoch": epoch, "step": step, "last_val": last_val, "mlflow_run_id": run_id,
                    "config": cfg.to_dict(), "identity": identity, "identity_digest": identity_digest(identity)},
                    checkpoint_timings)
            else:
                ray.train.report(metrics)
    if metric_queue:
        metric_queue.close()
