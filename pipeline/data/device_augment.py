"""RandAugment plans (`pipeline.data.rand_augment.OpDraw`) applied in plain torch, so the same code runs on
the CPU (tests, CI) and on the training GPU. A clip is uint8 `(T, H, W, 3)`; each op is one set of tensor
ops for all T frames, its parameters are host floats, and nothing reads a device value back to the host
(lookup tables and statistics are built on the device).

How close each op is to the PIL reference `rand_augment.apply_plan` (measured in
`tests/data/test_device_augment.py`):

- Pixel for pixel identical: Invert, Posterize, Solarize, SolarizeAdd, AutoContrast, Equalize, Color,
  Contrast, Brightness and Sharpness. The enhancers repeat PIL's float32 arithmetic step by step (the
  blend `im1 + alpha * (im2 - im1)` in float32 with a float32 alpha, clipped outside [0, 1] and truncated;
  Sharpness's SMOOTH filter as PIL sums it: `0.5 + row below + row + row above`, each row
  `a * k0 + b * k1 + c * k2` with float32 kernel weights, truncated). Each product and sum is its own
  torch op, so no backend can fuse them into an FMA and round differently.
- Rotate, ShearX/Y, TranslateX/YRel: one `grid_sample(mode="bicubic")` per op. PIL's affine transform
  interpolates with the cubic kernel a = -1 (libImaging/Geometry.c; a = -0.5 is its resize kernel),
  torch with a = -0.75, so pixels near edges differ by a few levels. On the tests' blocky, noisy
  textures: mean |diff| up to 1.75 levels for rotations and 1.35 for shears and translations, 99th
  percentile at most 8, worst pixel 15, mean signed diff within 0.05 (both truncate, see
  `_TRUNCATE_MARGIN`). Whether a pixel is grey fill (its source point outside the frame) is decided
  from float64 coordinates computed in PIL's order, so the fill is PIL's exactly. Whole-pixel
  translations, Rotate(0) and any op on a constant frame are exact.

Ops that follow a geometric op in a plan can amplify its level of difference (Solarize at its threshold,
Equalize's table), so whole plans are compared statistically in the tests.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.rand_augment import OpDraw

_FILL = 128.0  # grey, as the reference fills
# PIL truncates its double bicubic result; torch's float32 result for a value PIL hits exactly (flat
# areas, whole-pixel shifts) can land a hair below the integer, so we add this before flooring.
_TRUNCATE_MARGIN = 1e-3


def _float32(value: float) -> float:
    """The value PIL's C code sees where it takes a C float (blend alpha, kernel weights)."""
    return float(np.float32(value))


def _blend(degenerate: torch.Tensor, frames: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL's `Image.blend(degenerate, frames, factor)`: float32 `im1 + alpha * (im2 - im1)`, clipped to
    [0, 255] (a no-op for alpha in [0, 1]) and truncated toward zero by the uint8 cast."""
    im1 = degenerate.to(torch.float32)
    step = (frames.to(torch.float32) - im1) * _float32(factor)
    return (im1 + step).clamp_(0, 255).to(torch.uint8)


def _luma(frames: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16, as int32 `(T, H, W, 1)`."""
    rgb = frames.to(torch.int32)
    weighted = rgb[..., 0:1] * 19595 + rgb[..., 1:2] * 38470 + rgb[..., 2:3] * 7471 + 0x8000
    return weighted >> 16


def _smooth(frames: torch.Tensor) -> torch.Tensor:
    """PIL's ImageFilter.SMOOTH: kernel [[1,1,1],[1,5,1],[1,1,1]] / 13 on the interior, the border copied
    (the whole frame copied when it is under 3 pixels on a side)."""
    side, centre = _float32(1 / 13), _float32(5 / 13)
    x = frames.to(torch.float32)  # (T, H, W, 3)

    def row(r: torch.Tensor, middle: float) -> torch.Tensor:  # one kernel row, summed in PIL's order
        return r[:, :, :-2] * side + r[:, :, 1:-1] * middle + r[:, :, 2:] * side

    # PIL starts from 0.5 (its rounding offset) and adds the row below, the row, then the row above.
    total = 0.5 + row(x[:, 2:], side)
    total = total + row(x[:, 1:-1], centre)
    total = total + row(x[:, :-2], side)
    out = frames.clone()
    out[:, 1:-1, 1:-1] = total.clamp_(0, 255).to(torch.uint8)
    return out


def _level_index(frames: torch.Tensor) -> torch.Tensor:
    """Each pixel's index into per-frame-and-channel tables flattened from (T, 3, 256)."""
    t = frames.shape[0]
    table = torch.arange(t, device=frames.device).view(t, 1, 1, 1) * 3 + torch.arange(3, device=frames.device)
    return table * 256 + frames.long()  # (T, H, W, 3)


def _apply_lut(frames: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """`lut` (T, 3, 256): one table per frame and channel."""
    return torch.take(lut.to(torch.uint8), _level_index(frames))


def _histogram(frames: torch.Tensor) -> torch.Tensor:
    """Per frame and channel counts (T, 3, 256), by scatter_add (bincount would read its size back)."""
    index = _level_index(frames).flatten()
    counts = torch.zeros(frames.shape[0] * 3 * 256, dtype=torch.int64, device=frames.device)
    counts.scatter_add_(0, index, torch.ones_like(index))
    return counts.view(-1, 3, 256)


def _autocontrast(frames: torch.Tensor, value: float) -> torch.Tensor:
    # ImageOps.autocontrast with cutoff 0, in float64 as PIL's Python computes it: the table's ends
    # depend on how `i * scale + offset` rounds (e.g. 254.99999... at i = hi truncates to 254).
    lo = frames.amin(dim=(1, 2)).unsqueeze(-1).to(torch.float64)  # (T, 3, 1)
    hi = frames.amax(dim=(1, 2)).unsqueeze(-1).to(torch.float64)
    # Tensor / tensor: `255.0 / tensor` is computed as 255 * reciprocal, which rounds differently.
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp(min=1)
    offset = -lo * scale
    levels = torch.arange(256, device=frames.device, dtype=torch.float64)
    lut = (levels * scale + offset).trunc().clamp(0, 255)
    return _apply_lut(frames, torch.where(hi > lo, lut, levels))


def _equalize(frames: torch.Tensor, value: float) -> torch.Tensor:
    # ImageOps.equalize: step = (pixels - count of the highest level present) // 255, identity if 0,
    # else lut[i] = (step // 2 + pixels below level i) // step, clipped to 255 as PIL's point() does.
    counts = _histogram(frames)  # (T, 3, 256)
    levels = torch.arange(256, device=frames.device)
    top = torch.where(counts > 0, levels, -1).amax(dim=-1, keepdim=True)  # >= 0: a frame has pixels
    step = (counts.sum(dim=-1, keepdim=True) - counts.gather(-1, top)) // 255
    below = counts.cumsum(dim=-1) - counts
    safe_step = step.clamp(min=1)
    lut = ((safe_step // 2 + below) // safe_step).clamp(max=255)
    return _apply_lut(frames, torch.where(step > 0, lut, levels))


def _posterize(frames: torch.Tensor, bits: float) -> torch.Tensor:
    mask = ~(2 ** (8 - int(bits)) - 1) & 0xFF  # bits 0 keeps nothing: black, as the reference
    return frames & mask


def _solarize(frames: torch.Tensor, threshold: float) -> torch.Tensor:
    if threshold > 255:  # nothing inverted; 256 compared with uint8 would wrap to 0
        return frames.clone()
    return torch.where(frames >= int(threshold), 255 - frames, frames)


def _solarize_add(frames: torch.Tensor, add: float) -> torch.Tensor:
    added = (frames.to(torch.int16) + int(add)).clamp_(max=255).to(torch.uint8)
    return torch.where(frames < 128, added, frames)


def _color(frames: torch.Tensor, factor: float) -> torch.Tensor:
    return _blend(_luma(frames), frames, factor)  # the grey image, broadcast over the channels


def _contrast(frames: torch.Tensor, factor: float) -> torch.Tensor:
    # PIL's degenerate is grey at int(mean(L) + 0.5). In integers: floor((2 * sum + n) / (2 * n)); equal
    # to PIL's float result because sum / n is never within 1 / (2n) >> float64 error of a half.
    n = frames.shape[1] * frames.shape[2]
    total = _luma(frames).sum(dim=(1, 2, 3), dtype=torch.int64)
    mean = ((2 * total + n) // (2 * n)).view(-1, 1, 1, 1)
    return _blend(mean, frames, factor)


def _brightness(frames: torch.Tensor, factor: float) -> torch.Tensor:
    return _blend(torch.zeros_like(frames[:1, :1, :1, :1]), frames, factor)


def _sharpness(frames: torch.Tensor, factor: float) -> torch.Tensor:
    return _blend(_smooth(frames), frames, factor)


def _affine(frames: torch.Tensor, matrix: tuple[float, ...]) -> torch.Tensor:
    """PIL's `transform(AFFINE, matrix, BICUBIC, fillcolor=128)`: output pixel centre (x + .5, y + .5)
    reads the input at (a x + b y + c, d x + e y + f), in pixel-edge coordinates; grey where that
    point is outside [0, W) x [0, H); the 4 x 4 taps clamped to the frame (padding "border")."""
    t, h, w, _ = frames.shape
    a, b, c, d, e, f = matrix
    ys = torch.arange(h, device=frames.device, dtype=torch.float64).view(h, 1) + 0.5
    xs = torch.arange(w, device=frames.device, dtype=torch.float64).view(1, w) + 0.5
    src_x = a * xs + b * ys + c  # (H, W), float64 and in PIL's order, so the fill edge is PIL's
    src_y = d * xs + e * ys + f
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    # align_corners=False: -1 and 1 are the outer edges of the first and last pixels.
    grid = torch.stack([src_x * (2 / w) - 1, src_y * (2 / h) - 1], dim=-1).to(torch.float32)
    image = frames.permute(0, 3, 1, 2).to(torch.float32)  # (T, 3, H, W)
    out = F.grid_sample(image, grid.expand(t, h, w, 2), mode="bicubic", padding_mode="border",
                        align_corners=False)
    out = torch.where(inside, out, _FILL)
    out = (out + _TRUNCATE_MARGIN).clamp_(0, 255).floor_()  # PIL clips, then truncates
    return out.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _rotate_matrix(degrees: float, width: int, height: int) -> tuple[float, ...]:
    """PIL's `Image.rotate` matrix (about the centre, counter-clockwise), computed as PIL does."""
    angle = -math.radians(degrees % 360.0)
    cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
    cx, cy = width / 2, height / 2
    return (cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy)


def _rotate(frames: torch.Tensor, degrees: float) -> torch.Tensor:
    if degrees % 360.0 == 0:
        return frames.clone()  # PIL returns a copy
    return _affine(frames, _rotate_matrix(degrees, frames.shape[2], frames.shape[1]))


_OPS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
    "Invert": lambda frames, v: 255 - frames,
    "Rotate": _rotate,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "SolarizeAdd": _solarize_add,
    "Color": _color,
    "Contrast": _contrast,
    "Brightness": _brightness,
    "Sharpness": _sharpness,
    "ShearX": lambda frames, v: _affine(frames, (1, v, 0, 0, 1, 0)),
    "ShearY": lambda frames, v: _affine(frames, (1, 0, 0, v, 1, 0)),
    "TranslateXRel": lambda frames, v: _affine(frames, (1, 0, v * frames.shape[2], 0, 1, 0)),
    "TranslateYRel": lambda frames, v: _affine(frames, (1, 0, 0, 0, 1, v * frames.shape[1])),
}


def apply_plan_torch(frames: torch.Tensor, plan: Sequence[OpDraw]) -> torch.Tensor:
    """The plan's ops in order on uint8 frames `(T, H, W, 3)` of one clip, each the same on every frame;
    uint8 `(T, H, W, 3)` on the frames' device. See the module docstring for how close to PIL."""
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} with shape "
                         f"{tuple(frames.shape)}; decode to uint8 RGB before augmenting")
    unknown = [op.name for op in plan if op.name not in _OPS]
    if unknown:
        raise ValueError(f"unknown RandAugment op {unknown[0]!r}; known: {', '.join(_OPS)}")
    for op in plan:
        frames = _OPS[op.name](frames, float(op.value))
    return frames
