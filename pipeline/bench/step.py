"""One whole training step of a recipe on one device, as `train_loop_per_worker` runs it: the clips'
augmentation on the device (RandAugment, crop, flip), normalisation, random erasing, mixup/cutmix,
the DDP-wrapped model (a process group of one rank) with drop path, gradient clipping, the
optimizer and the EMA when the recipe has one (`loop.forward_backward` and `loop.optimizer_step`,
the loop's own code). `make gpu-check` runs it for S16x4 and B16x4; it runs on a CPU too (tests).

The batches are whole uint8 frames of `frame_size` (a prepared copy's short side 320 at 4:3) with
draws from the recipe, as decode tasks ship them. On CUDA the timed steps run under
`torch.cuda.set_sync_debug_mode("error")`: a host-device sync on the step's path fails the bench.
The augmentation's share is its own time (the same batches, augmented alone) over the step's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any

import numpy as np
import torch

from pipeline.config import Config


def _batches(cfg: Config, micro_batch: int, frame_size: tuple[int, int], *, count: int, pin: bool) -> list[dict]:
    from pipeline.data.clips import stack_rows
    from pipeline.data.rand_augment import parse_rand_augment
    from pipeline.data.transforms import draw_train_augment, encode_draws
    from pipeline.training.ingest import TrainBatch

    data, rng = cfg.data, np.random.default_rng(0)
    augment = parse_rand_augment(data.rand_augment) if data.rand_augment else None
    num_ops = augment.num_ops if augment else 0
    height, width = frame_size
    batches = []
    for _ in range(count):
        rows = [{"clip": rng.integers(0, 256, (data.num_frames, height, width, 3), dtype=np.uint8),
                 **encode_draws(draw_train_augment(height, width, scale=data.scale, ratio=data.ratio, flip=data.hflip,
                                                   rng=rng, augment=augment), num_ops),
                 "label": int(rng.integers(cfg.model.num_classes)), "valid": True} for _ in range(micro_batch)]
        batches.append(TrainBatch(pin)(stack_rows(rows)))
    return batches


@contextlib.contextmanager
def _one_rank_group(device: torch.device):
    """A process group of this process alone, so the model steps DDP-wrapped as on a cluster."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _elapsed_s(device: torch.device, run) -> float:
    """Wall seconds of `run()`, the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure_train_step(cfg: Config, *, device: torch.device, micro_batch: int, steps: int = 10, warmup: int = 3,
                       frame_size: tuple[int, int] = (320, 427)) -> dict[str, Any]:
    """clips/s and ms of a whole training step of `cfg` with `micro_batch` clips per micro-step, and
    the device augmentation's ms and share of it."""
    from torch.nn.parallel import DistributedDataParallel

    from pipeline.training.ingest import clips_on_device
    from pipeline.training.loop import build_training_state, forward_backward, optimizer_step

    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=""))
    cuda = device.type == "cuda"
    batches = _batches(cfg, micro_batch, frame_size, count=2, pin=cuda)
    mix_rng, erase_rng = np.random.default_rng(1), np.random.default_rng(2)
    accum = cfg.optim.grad_accum_steps

    with _one_rank_group(device):
        ts = build_training_state(cfg, device, lambda net: DistributedDataParallel(
            net.to(device), device_ids=[device.index or 0] if cuda else None))

        def step(i: int) -> None:
            for micro in range(accum):
                forward_backward(ts, batches[(i * accum + micro) % len(batches)], cfg, device, world=1,
                                 mix_rng=mix_rng, erase_rng=erase_rng, sync=micro == accum - 1)
            optimizer_step(ts, cfg)

        def augment_only() -> None:
            for i in range(steps * accum):
                clips_on_device(batches[i % len(batches)], cfg.data, device)

        for i in range(warmup):
            step(i)
        # A host-device sync anywhere on the step's path raises here (CUDA only).
        strict = torch.cuda.set_sync_debug_mode if cuda else None
        if strict:
            strict("error")
        try:
            step_s = _elapsed_s(device, lambda: [step(i) for i in range(steps)]) / steps
            augment_s = _elapsed_s(device, augment_only) / steps
        finally:
            if strict:
                strict("default")
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    clips = micro_batch * accum
    return {"variant": cfg.model.variant, "clip": f"{cfg.data.num_frames}x{cfg.data.crop_size}",
            "frames": f"{frame_size[0]}x{frame_size[1]}", "micro_batch": micro_batch, "grad_accum_steps": accum,
            "precision": cfg.train.precision, "rand_augment": cfg.data.rand_augment, "ema": bool(cfg.optim.ema_decay),
            "step_ms": 1000 * step_s, "clips_per_s": clips / step_s, "augment_ms": 1000 * augment_s,
            "augment_share": augment_s / step_s, "peak_memory_gib": peak_gib}
