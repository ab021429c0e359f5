"""RandAugment for uint8 video clips `(T, H, W, 3)`: every frame of a clip gets the same ops with the
same parameters, so the augmentation never turns into fake motion.

The official UniFormer video recipes (`AUG.AA_TYPE: rand-m7-n4-mstd0.5-inc1`) run SlowFast's copy of
timm's RandAugment on the decoded frames before the random resized crop. This is the same policy:
`n` ops drawn with replacement from 15, each applied with probability 1/2 at a magnitude drawn from
N(m, mstd) clipped to [0, 10]; `inc1` picks the variants whose strength grows with the magnitude.
Geometric ops use bicubic resampling and fill with grey 128, as there. Draws come from the clip's
seeded numpy generator, so a rerun gives the same clips; pixels are computed by PIL, so an op on
a frame gives what the official op gives on that frame.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_MAGNITUDE = 10.0
_FILL = (128, 128, 128)
_RESAMPLE = Image.Resampling.BICUBIC
_EXAMPLE = "e.g. 'rand-m7-n4-mstd0.5-inc1'"


@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed `rand-...` string; the defaults are those of the official parser."""
    magnitude: int = 10  # m: 0 (no change) to 10
    num_ops: int = 2  # n: ops per clip
    magnitude_std: float = 0.0  # mstd: the magnitude is drawn from N(m, mstd) per op
    increasing: bool = False  # inc1: op variants whose strength increases with the magnitude


def parse_rand_augment(text: str) -> RandAugmentSpec:
    """`rand-m<int>-n<int>-mstd<float>-inc<0|1>`, parts optional and in any order."""
    parts = text.split("-")
    if parts[0] != "rand":
        raise ValueError(f"{text!r} is not a RandAugment spec: it must start with 'rand', {_EXAMPLE}")
    seen: dict[str, str] = {}
    for part in parts[1:]:
        match = re.fullmatch(r"(mstd|inc|m|n)(\d+(?:\.\d+)?)", part)
        if not match or match[1] in seen:
            raise ValueError(f"{text!r}: bad or repeated part {part!r}; the parts are m<0-10>, n<ops>, "
                             f"mstd<std>, inc<0|1>, {_EXAMPLE}")
        seen[match[1]] = match[2]
    default = RandAugmentSpec()
    try:
        spec = RandAugmentSpec(magnitude=int(seen.get("m", default.magnitude)),
                               num_ops=int(seen.get("n", default.num_ops)),
                               magnitude_std=float(seen.get("mstd", default.magnitude_std)),
                               increasing=seen.get("inc", "0") == "1")
    except ValueError:
        raise ValueError(f"{text!r}: m and n take whole numbers, {_EXAMPLE}") from None
    if not 0 <= spec.magnitude <= MAX_MAGNITUDE or spec.num_ops < 1 or seen.get("inc", "0") not in ("0", "1"):
        raise ValueError(f"{text!r}: needs m in [0, 10], n >= 1 and inc0 or inc1, {_EXAMPLE}")
    return spec


@dataclass(frozen=True)
class OpDraw:
    """One op of a clip's plan with its drawn parameter, resolved to what the op needs: degrees
    (Rotate), bits kept (Posterize), threshold (Solarize), amount added (SolarizeAdd), blend factor
    (Color, Contrast, Brightness, Sharpness), shear factor (ShearX/Y), signed fraction of the frame
    (TranslateXRel/YRel); 0 for AutoContrast, Equalize and Invert. A plan is plain numbers, so it can
    travel with the frames and be applied elsewhere (`pipeline.data.device_augment`)."""
    name: str
    value: float = 0.0


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() > 0.5 else value


def _enhance_factor(m: float, rng: np.random.Generator, increasing: bool) -> float:
    # increasing: 1 -/+ up to 0.9, further from "no change" as m grows; else 0.1 + 0.18 m (m=5: no change)
    return 1.0 + _signed(m / MAX_MAGNITUDE * 0.9, rng) if increasing else m / MAX_MAGNITUDE * 1.8 + 0.1


def _posterize_bits(m: float, increasing: bool) -> int:
    bits = int(m / MAX_MAGNITUDE * 4)
    return 4 - bits if increasing else bits  # bits kept: fewer is stronger


def _solarize_threshold(m: float, increasing: bool) -> int:
    threshold = int(m / MAX_MAGNITUDE * 256)
    return 256 - threshold if increasing else threshold  # pixels at or above it are inverted


# How each op turns a magnitude into its parameter, drawing signs from the clip's generator in the
# official order (the official op list, in its order; the `inc` variants where the name says so).
_RESOLVE: dict[str, Callable[[float, np.random.Generator, bool], float]] = {
    "AutoContrast": lambda m, rng, inc: 0.0,
    "Equalize": lambda m, rng, inc: 0.0,
    "Invert": lambda m, rng, inc: 0.0,
    "Rotate": lambda m, rng, inc: _signed(m / MAX_MAGNITUDE * 30, rng),
    "Posterize": lambda m, rng, inc: _posterize_bits(m, inc),
    "Solarize": lambda m, rng, inc: _solarize_threshold(m, inc),
    "SolarizeAdd": lambda m, rng, inc: int(m / MAX_MAGNITUDE * 110),
    "Color": _enhance_factor,
    "Contrast": _enhance_factor,
    "Brightness": _enhance_factor,
    "Sharpness": _enhance_factor,
    "ShearX": lambda m, rng, inc: _signed(m / MAX_MAGNITUDE * 0.3, rng),
    "ShearY": lambda m, rng, inc: _signed(m / MAX_MAGNITUDE * 0.3, rng),
    "TranslateXRel": lambda m, rng, inc: _signed(m / MAX_MAGNITUDE * 0.45, rng),  # up to 45% of the width
    "TranslateYRel": lambda m, rng, inc: _signed(m / MAX_MAGNITUDE * 0.45, rng),
}
OP_NAMES: tuple[str, ...] = tuple(_RESOLVE)


def resolve_op(name: str, *, magnitude: float, increasing: bool, rng: np.random.Generator) -> OpDraw:
    if name not in _RESOLVE:
        raise ValueError(f"unknown RandAugment op {name!r}; known: {', '.join(OP_NAMES)}")
    return OpDraw(name, float(_RESOLVE[name](magnitude, rng, increasing)))


def draw_plan(spec: RandAugmentSpec, *, rng: np.random.Generator) -> list[OpDraw]:
    """A clip's ops: `spec.num_ops` drawn with replacement, each kept with probability 1/2 at a
    magnitude from N(m, mstd) clipped to [0, 10]. Consumes `rng` exactly as applying them does."""
    plan = []
    for index in rng.integers(0, len(OP_NAMES), size=spec.num_ops):
        if rng.random() > 0.5:  # the official op probability
            continue
        magnitude = rng.normal(spec.magnitude, spec.magnitude_std) if spec.magnitude_std > 0 else spec.magnitude
        plan.append(resolve_op(OP_NAMES[index], magnitude=float(np.clip(magnitude, 0, MAX_MAGNITUDE)),
                               increasing=spec.increasing, rng=rng))
    return plan


# ---------------------------------------------------------------------------------------------
# The reference: each op computed by PIL on each frame, as the official loaders compute it.


def _per_frame(clip: np.ndarray, op: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(op(Image.fromarray(frame))) for frame in clip])


def _affine(clip: np.ndarray, matrix: tuple[float, ...]) -> np.ndarray:
    return _per_frame(clip, lambda im: im.transform(im.size, Image.Transform.AFFINE, matrix, resample=_RESAMPLE,
                                                    fillcolor=_FILL))


def _point(clip: np.ndarray, table: list[int]) -> np.ndarray:
    return _per_frame(clip, lambda im: im.point(table * 3))  # the same table for each channel


def _posterize(clip: np.ndarray, bits: float) -> np.ndarray:
    # ImageOps.posterize's table, written out: current Pillow refuses bits=0 (black), which the
    # Pillow of the official runs accepted and which the policy reaches at the magnitude's ends.
    mask = ~(2 ** (8 - int(bits)) - 1)
    return _point(clip, [value & mask for value in range(256)])


def _solarize_add(clip: np.ndarray, add: float) -> np.ndarray:
    return _point(clip, [min(255, value + int(add)) if value < 128 else value for value in range(256)])


_APPLY: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "AutoContrast": lambda clip, v: _per_frame(clip, ImageOps.autocontrast),
    "Equalize": lambda clip, v: _per_frame(clip, ImageOps.equalize),
    "Invert": lambda clip, v: _per_frame(clip, ImageOps.invert),
    "Rotate": lambda clip, v: _per_frame(clip, lambda im: im.rotate(v, resample=_RESAMPLE, fillcolor=_FILL)),
    "Posterize": _posterize,
    "Solarize": lambda clip, v: _per_frame(clip, lambda im: ImageOps.solarize(im, int(v))),
    "SolarizeAdd": _solarize_add,
    "Color": lambda clip, v: _per_frame(clip, lambda im: ImageEnhance.Color(im).enhance(v)),
    "Contrast": lambda clip, v: _per_frame(clip, lambda im: ImageEnhance.Contrast(im).enhance(v)),
    "Brightness": lambda clip, v: _per_frame(clip, lambda im: ImageEnhance.Brightness(im).enhance(v)),
    "Sharpness": lambda clip, v: _per_frame(clip, lambda im: ImageEnhance.Sharpness(im).enhance(v)),
    "ShearX": lambda clip, v: _affine(clip, (1, v, 0, 0, 1, 0)),
    "ShearY": lambda clip, v: _affine(clip, (1, 0, 0, v, 1, 0)),
    "TranslateXRel": lambda clip, v: _affine(clip, (1, 0, v * clip.shape[2], 0, 1, 0)),
    "TranslateYRel": lambda clip, v: _affine(clip, (1, 0, 0, 0, 1, v * clip.shape[1])),
}
OPS = _APPLY  # the op names, in the official order


def _check(clip: np.ndarray) -> None:
    if clip.ndim != 4 or clip.shape[-1] != 3 or clip.dtype != np.uint8:
        raise ValueError(f"clip must be uint8 (T, H, W, 3), got {clip.dtype} with shape {clip.shape}")


def apply_plan(clip: np.ndarray, plan: list[OpDraw]) -> np.ndarray:
    """The plan's ops in order, each the same on every frame, by PIL (the reference)."""
    _check(clip)
    for op in plan:
        clip = _APPLY[op.name](clip, op.value)
    return clip


def apply_op(clip: np.ndarray, name: str, *, magnitude: float, increasing: bool,
             rng: np.random.Generator) -> np.ndarray:
    """One op at a fixed magnitude on every frame (signs of signed ops are drawn from `rng`)."""
    _check(clip)
    return apply_plan(clip, [resolve_op(name, magnitude=magnitude, increasing=increasing, rng=rng)])
