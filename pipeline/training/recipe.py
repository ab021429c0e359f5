"""The training recipe's pieces (DESIGN.md "The published recipe"): parameter groups, LR schedule, random erasing,
mixup/cutmix, EMA.

Plain PyTorch functions, testable without Ray.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and norm parameters (every 1-D parameter) get no weight decay, as in the official
    optimizer (SOLVER.ZERO_WD_1D_PARAM). Its `no_weight_decay()` names ('pos_embed') are compared
    with full module paths there and never match, so the position-embedding conv kernels decay."""
    return param.ndim <= 1


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if is_no_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, base_lr: float, min_lr: float) -> float:
    """Learning rate at `step`: linear warmup from 0, then cosine down to `min_lr`."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((labels.numel(), num_classes), off, device=labels.device).scatter_(
        1, labels.view(-1, 1), 1.0 - smoothing + off)


def mix_partners(valid: torch.Tensor) -> torch.Tensor | None:
    """For each clip the index of the clip it is blended with: usable clips pair up among
    themselves in reverse order, unusable (all-zero) ones with themselves, so that no blank is
    mixed into a real clip. `valid` is the batch's host-side mask; None when fewer than 2 are usable."""
    usable = torch.nonzero(valid.cpu()).flatten()
    if usable.numel() < 2:
        return None
    partners = torch.arange(valid.numel())
    partners[usable] = usable.flip(0)
    return partners


def mix_batch(clips: torch.Tensor, labels: torch.Tensor, *, num_classes: int, mixup_alpha: float,
              cutmix_alpha: float, prob: float, smoothing: float, rng: np.random.Generator,
              valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix (chosen at random when both are on) on the device; returns soft targets.

    Clips are (B, C, T, H, W); cutmix cuts the same box out of every frame. The host-side `rng`
    and `valid` mask (every clip usable when None) make the draws reproducible without a device sync.
    """
    targets = smooth_one_hot(labels, num_classes, smoothing)
    if (mixup_alpha == 0 and cutmix_alpha == 0) or rng.random() >= prob:
        return clips, targets
    partners = mix_partners(torch.ones(labels.numel(), dtype=torch.bool) if valid is None else valid)
    if partners is None:
        return clips, targets
    partners = partners.to(clips.device, non_blocking=True)
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or rng.random() < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    flipped = clips[partners]
    if use_cutmix:
        height, width = clips.shape[-2:]
        cut = math.sqrt(1 - lam)
        ch, cw = int(height * cut), int(width * cut)
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
        clips = clips.clone()
        clips[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (height * width)  # the area actually cut
    else:
        clips = clips * lam + flipped * (1 - lam)
    return clips, targets * lam + targets[partners] * (1 - lam)


def random_erase(clips: torch.Tensor, *, prob: float, rng: np.random.Generator,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Random erasing as the official video recipe runs it (timm's RandomErasing, mode "pixel", one
    box, "cube"): with probability `prob` per clip, a box of 2% to 1/3 of the frame, aspect ratio
    0.3 to 3.3, at the same place in every frame, filled with N(0, 1) noise.

    `clips` are normalised (B, C, T, H, W) on the device, where the official applies it: noise in
    normalised units needs no clipping to [0, 255], and it spends idle accelerator time rather than
    decode CPUs, the scarce resource (DESIGN.md "Performance anchors"). Call it before `mix_batch`, as the official
    erases each clip before mixing. Boxes come from the host `rng` (no device sync), noise from
    `generator` (the device's default generator, which the loop seeds, when None).
    """
    if prob == 0:
        return clips
    batch, channels, frames, height, width = clips.shape
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    out = clips
    for index in range(batch):
        if rng.random() > prob:
            continue
        for _ in range(100):  # the official's tries before giving up on this clip
            area = rng.uniform(0.02, 1 / 3) * height * width
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if h < height and w < width:
                top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                out = out.clone() if out is clips else out
                out[index, :, :, top:top + h, left:left + w] = torch.randn(
                    (channels, frames, h, w), generator=generator, device=clips.device, dtype=clips.dtype)
                break
    return out


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class ModelEMA(nn.Module):
    """Exponential moving average of a model's weights (buffers are copied), on the model's device:
    build it after the model has moved. The decay warms up as min(decay, (1 + n) / (10 + n)) over
    the first updates, so that the average is not dominated by the random initial weights."""

    def __init__(self, model: nn.Module, decay: float, updates: int = 0):
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = updates  # a host int: the warm-up needs no device sync

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1 - self.current_decay()
        torch._foreach_lerp_(list(self.module.parameters()), [p.detach() for p in model.parameters()], weight)
        for ema_b, b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(b)
        self.updates += 1
