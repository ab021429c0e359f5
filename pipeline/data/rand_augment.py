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


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() > 0.5 else value


def _per_frame(clip: np.ndarray, op: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(op(Image.fromarray(frame))) for frame in clip])


def _affine(clip: np.ndarray, matrix: tuple[float, ...]) -> np.ndarray:
    return _per_frame(clip, lambda im: im.transform(im.size, Image.Transform.AFFINE, matrix, resample=_RESAMPLE,
                                                    fillcolor=_FILL))


def _enhance(enhancer: type, clip: np.ndarray, m: float, rng: np.random.Generator, increasing: bool) -> np.ndarray:
    # increasing: 1 -/+ up to 0.9, further from "no change" as m grows; else 0.1 + 0.18 m (m=5: no change)
    factor = 1.0 + _signed(m / MAX_MAGNITUDE * 0.9, rng) if increasing else m / MAX_MAGNITUDE * 1.8 + 0.1
    return _per_frame(clip, lambda im: enhancer(im).enhance(factor))


def _posterize(clip, m, rng, increasing):
    bits = int(m / MAX_MAGNITUDE * 4)
    bits = 4 - bits if increasing else bits  # bits kept: fewer is stronger
    # ImageOps.posterize's table, written out: current Pillow refuses bits=0 (black), which the
    # Pillow of the official runs accepted and which the policy reaches at the magnitude's ends.
    mask = ~(2 ** (8 - bits) - 1)
    table = [value & mask for value in range(256)] * 3  # one per channel
    return _per_frame(clip, lambda im: im.point(table))


def _solarize(clip, m, rng, increasing):
    threshold = int(m / MAX_MAGNITUDE * 256)
    threshold = 256 - threshold if increasing else threshold  # pixels at or above it are inverted
    return _per_frame(clip, lambda im: ImageOps.solarize(im, threshold))


def _solarize_add(clip, m, rng, increasing):
    add = int(m / MAX_MAGNITUDE * 110)
    table = [min(255, value + add) if value < 128 else value for value in range(256)] * 3  # one per channel
    return _per_frame(clip, lambda im: im.point(table))


def _rotate(clip, m, rng, increasing):
    degrees = _signed(m / MAX_MAGNITUDE * 30, rng)
    return _per_frame(clip, lambda im: im.rotate(degrees, resample=_RESAMPLE, fillcolor=_FILL))


def _shear_x(clip, m, rng, increasing):
    return _affine(clip, (1, _signed(m / MAX_MAGNITUDE * 0.3, rng), 0, 0, 1, 0))


def _shear_y(clip, m, rng, increasing):
    return _affine(clip, (1, 0, 0, _signed(m / MAX_MAGNITUDE * 0.3, rng), 1, 0))


def _translate_x(clip, m, rng, increasing):  # up to 45% of the width
    return _affine(clip, (1, 0, _signed(m / MAX_MAGNITUDE * 0.45, rng) * clip.shape[2], 0, 1, 0))


def _translate_y(clip, m, rng, increasing):
    return _affine(clip, (1, 0, 0, 0, 1, _signed(m / MAX_MAGNITUDE * 0.45, rng) * clip.shape[1]))


# The official op list, in its order (the `inc` variants where the name says so).
OPS: dict[str, Callable[[np.ndarray, float, np.random.Generator, bool], np.ndarray]] = {
    "AutoContrast": lambda clip, m, rng, inc: _per_frame(clip, ImageOps.autocontrast),
    "Equalize": lambda clip, m, rng, inc: _per_frame(clip, ImageOps.equalize),
    "Invert": lambda clip, m, rng, inc: _per_frame(clip, ImageOps.invert),
    "Rotate": _rotate,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "SolarizeAdd": _solarize_add,
    "Color": lambda clip, m, rng, inc: _enhance(ImageEnhance.Color, clip, m, rng, inc),
    "Contrast": lambda clip, m, rng, inc: _enhance(ImageEnhance.Contrast, clip, m, rng, inc),
    "Brightness": lambda clip, m, rng, inc: _enhance(ImageEnhance.Brightness, clip, m, rng, inc),
    "Sharpness": lambda clip, m, rng, inc: _enhance(ImageEnhance.Sharpness, clip, m, rng, inc),
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x,
    "TranslateYRel": _translate_y,
}
_NAMES = tuple(OPS)


def apply_op(clip: np.ndarray, name: str, *, magnitude: float, increasing: bool,
             rng: np.random.Generator) -> np.ndarray:
    """One op at a fixed magnitude on every frame (signs of signed ops are drawn from `rng`)."""
    if clip.ndim != 4 or clip.shape[-1] != 3 or clip.dtype != np.uint8:
        raise ValueError(f"clip must be uint8 (T, H, W, 3), got {clip.dtype} with shape {clip.shape}")
    if name not in OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; known: {', '.join(_NAMES)}")
    return OPS[name](clip, magnitude, rng, increasing)


def rand_augment(clip: np.ndarray, spec: RandAugmentSpec, *, rng: np.random.Generator) -> np.ndarray:
    """`spec.num_ops` ops drawn with replacement, each kept with probability 1/2, the same for every frame."""
    for index in rng.integers(0, len(_NAMES), size=spec.num_ops):
        if rng.random() > 0.5:  # the official op probability
            continue
        magnitude = rng.normal(spec.magnitude, spec.magnitude_std) if spec.magnitude_std > 0 else spec.magnitude
        clip = apply_op(clip, _NAMES[index], magnitude=float(np.clip(magnitude, 0, MAX_MAGNITUDE)),
                        increasing=spec.increasing, rng=rng)
    return clip
