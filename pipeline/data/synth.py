"""A synthetic motion dataset: classes differ only in how textured disks move.

Each video shows 1-2 disks filled with a random texture over a random textured background;
all disks of a video follow the class's motion (travel in a direction, grow, shrink, rotate, or
a combination) at random speeds from random positions. Texture is what makes motion visible
locally (DESIGN.md "Pitfalls": flat colours do not learn), and since every class draws its shapes,
colours, sizes and positions from the same distributions, no single frame tells the class.

`encode_h264` is the project's small H.264 writer (valid, increasing timestamps; optional
variable frame rate) and is reused by the benchmark and tests.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import av
import numpy as np

from pipeline.config import StorageConfig
from pipeline.data import storage as store


@dataclass(frozen=True)
class Motion:
    """One class: a unit travel direction (dy, dx), a scale sense and a rotation sense."""

    name: str
    direction: tuple[float, float] = (0.0, 0.0)
    scale_sign: int = 0  # +1 grows, -1 shrinks
    spin_sign: int = 0  # +1 clockwise, -1 counter-clockwise (in image coordinates)


_S = 0.5 ** 0.5
_DIRECTIONS = {"right": (0.0, 1.0), "left": (0.0, -1.0), "down": (1.0, 0.0), "up": (-1.0, 0.0),
               "down_right": (_S, _S), "down_left": (_S, -_S), "up_right": (-_S, _S), "up_left": (-_S, -_S)}


def _motions() -> list[Motion]:
    motions = [Motion(name, direction=_DIRECTIONS[name]) for name in ("right", "left", "down", "up")]
    motions += [Motion("grow", scale_sign=1), Motion("shrink", scale_sign=-1),
                Motion("rotate_cw", spin_sign=1), Motion("rotate_ccw", spin_sign=-1)]
    motions += [Motion(name, direction=_DIRECTIONS[name]) for name in ("down_right", "down_left", "up_right",
                                                                        "up_left")]
    for name in ("right", "left", "down", "up"):
        motions += [Motion(f"{name}_grow", direction=_DIRECTIONS[name], scale_sign=1),
                    Motion(f"{name}_shrink", direction=_DIRECTIONS[name], scale_sign=-1)]
    for name in ("right", "left", "down", "up"):
        motions += [Motion(f"{name}_rotate_cw", direction=_DIRECTIONS[name], spin_sign=1),
                    Motion(f"{name}_rotate_ccw", direction=_DIRECTIONS[name], spin_sign=-1)]
    return motions


MOTIONS: tuple[Motion, ...] = tuple(_motions())  # class i of an N-class dataset is MOTIONS[i]


def class_names(num_classes: int) -> list[str]:
    if not 2 <= num_classes <= len(MOTIONS):
        raise ValueError(f"num_classes={num_classes} is not supported; use 2 to {len(MOTIONS)} "
                         f"(the first 8 are right, left, down, up, grow, shrink, rotate_cw, rotate_ccw)")
    return [m.name for m in MOTIONS[:num_classes]]


# ---------------------------------------------------------------------------------------------
# Rendering


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random colour texture, uint8 (H, W, 3): random-sized cells of random
    colours around a base colour, plus fine grain, so that motion is visible at every pixel."""
    cell = int(rng.integers(3, 9))
    base = rng.uniform(40, 215, size=3)
    spread = rng.uniform(25, 70)
    cells = base + rng.normal(0, spread, size=(height // cell + 2, width // cell + 2, 3))
    tex = np.repeat(np.repeat(cells, cell, axis=0), cell, axis=1)
    oy, ox = rng.integers(0, cell, size=2)
    tex = tex[oy:oy + height, ox:ox + width]
    tex = tex + rng.normal(0, 12, size=tex.shape)
    return np.clip(tex, 0, 255).astype(np.uint8)


def render_video(rng: np.random.Generator, motion: Motion, *, num_frames: int, height: int,
                 width: int) -> np.ndarray:
    """One video of `motion`: uint8 (T, H, W, 3)."""
    frames = _texture(rng, height, width)[None].repeat(num_frames, axis=0)  # (T, H, W, 3)
    short = min(height, width)
    t = np.linspace(-0.5, 0.5, num_frames, dtype=np.float32)  # time, centred on the middle frame
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    for _ in range(int(rng.integers(1, 3))):
        radius_mid = rng.uniform(0.12, 0.22) * short
        travel = rng.uniform(0.5, 0.8) * short if motion.direction != (0.0, 0.0) else 0.0
        log_scale = rng.uniform(np.log(1.6), np.log(2.4)) * motion.scale_sign
        spin = rng.uniform(0.4, 0.9) * np.pi * motion.spin_sign
        radius = radius_mid * np.exp(log_scale * t)  # (T,)
        # Centre at mid-clip such that the whole path stays inside the frame where it can.
        dy, dx = motion.direction
        half_path_y, half_path_x = abs(dy) * travel / 2, abs(dx) * travel / 2
        margin = radius.max()
        cy_mid = rng.uniform(min(margin + half_path_y, height / 2), max(height - margin - half_path_y, height / 2))
        cx_mid = rng.uniform(min(margin + half_path_x, width / 2), max(width - margin - half_path_x, width / 2))
        cy, cx = cy_mid + dy * travel * t, cx_mid + dx * travel * t  # (T,)
        angle = spin * t
        # The disk's own texture, in units of its mid-clip radius; it moves, scales and turns with it.
        tex_radius = int(np.ceil(radius_mid)) + 1
        tex = _texture(rng, 2 * tex_radius + 1, 2 * tex_radius + 1)
        # All frames at once: pixels inside the disk, mapped back into the disk's texture.
        ti, yi, xi = np.nonzero((ys[None] - cy[:, None, None]) ** 2 + (xs[None] - cx[:, None, None]) ** 2
                                <= (radius * radius)[:, None, None])
        py, px = yi - cy[ti], xi - cx[ti]
        cos, sin, shrink = np.cos(-angle[ti]), np.sin(-angle[ti]), radius_mid / radius[ti]
        ty = np.clip(np.rint((sin * px + cos * py) * shrink).astype(np.int64) + tex_radius, 0, 2 * tex_radius)
        tx = np.clip(np.rint((cos * px - sin * py) * shrink).astype(np.int64) + tex_radius, 0, 2 * tex_radius)
        frames[ti, yi, xi] = tex[ty, tx]
    return frames


# ---------------------------------------------------------------------------------------------
# Encoding


def encode_h264(frames: np.ndarray, *, fps: float = 30, gop: int | None = None, bframes: bool = True,
                pts: list[int] | np.ndarray | None = None, crf: int = 20, preset: str = "veryfast") -> bytes:
    """Encode uint8 RGB (T, H, W, 3) frames (H and W even) as H.264 in MP4; returns the file bytes.

    Timestamps are the frame numbers in a 1/fps time base unless `pts` gives increasing ones
    (in the same time base; gaps make a variable-frame-rate stream). `gop` is the keyframe
    interval in frames (None: x264's default of 250); `bframes=False` disables B-frames.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    num, height, width = frames.shape[:3]
    if height % 2 or width % 2:
        raise ValueError(f"H.264 in yuv420p needs an even size, got {height}x{width}; crop or pad by one pixel")
    if pts is not None and (len(pts) != num or np.any(np.diff(np.asarray(pts)) <= 0)):
        raise ValueError(f"pts must hold {num} strictly increasing timestamps")
    rate = Fraction(fps).limit_denominator(1001)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # One x264 thread keeps the output bit-exact run to run and is the fastest at these sizes.
        options = {"crf": str(crf), "preset": preset, "threads": "1"}
        if gop is not None:  # a keyframe exactly every `gop` frames, none at scene cuts
            options.update({"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"})
        if not bframes:
            options["bf"] = "0"
        stream.options = options
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            frame.pts = int(pts[i]) if pts is not None else i  # in the codec's time base, 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# The dataset


def synth_dataset(output: str, *, num_classes: int, videos_per_class: int, seed: int, num_frames: int = 32,
                  size: int = 96, val_fraction: float = 0.25, fps: float = 30,
                  storage: StorageConfig = StorageConfig(), threads: int = 4,
                  progress: Callable[[int, int], None] | None = None) -> dict:
    """Write `<output>/videos/<class>/<class>_<k>.mp4`, `train.txt`, `val.txt` (lines
    `relative/path label_name`) and `labels.json` (names in index order); returns a summary.

    Video k of class c is drawn from `default_rng([seed, c, k])`: the same seed gives the same
    files. The last `round(videos_per_class * val_fraction)` videos of each class are val.
    """
    names = class_names(num_classes)
    if videos_per_class < 1:
        raise ValueError(f"videos_per_class={videos_per_class} must be at least 1")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    if size < 16 or size % 2:
        raise ValueError(f"size={size} must be an even number of pixels >= 16")
    if num_frames < 2:
        raise ValueError(f"num_frames={num_frames} must be at least 2")
    num_val = int(round(videos_per_class * val_fraction))

    def make(job: tuple[int, int]) -> tuple[str, str, str]:
        c, k = job
        rng = np.random.default_rng([seed, c, k])
        frames = render_video(rng, MOTIONS[c], num_frames=num_frames, height=size, width=size)
        relative = f"videos/{names[c]}/{names[c]}_{k:04d}.mp4"
        store.write_bytes(store.join(output, relative), encode_h264(frames, fps=fps), storage=storage)
        return relative, names[c], "val" if k >= videos_per_class - num_val else "train"

    jobs = [(c, k) for c in range(num_classes) for k in range(videos_per_class)]
    # Threads overlap the writes (uploads to S3); rendering and encoding hold the GIL.
    rows = []
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for row in pool.map(make, jobs):
            rows.append(row)
            if progress is not None:
                progress(len(rows), len(jobs))
    lists = {"train": [], "val": []}
    for relative, name, split in rows:
        lists[split].append(f"{relative} {name}\n")
    for split, lines in lists.items():
        store.write_bytes(store.join(output, f"{split}.txt"), "".join(lines).encode(), storage=storage)
    store.write_bytes(store.join(output, "labels.json"), (json.dumps(names, indent=1) + "\n").encode(),
                      storage=storage)
    return {"output": output, "classes": num_classes, "videos": len(rows), "train": len(lists["train"]),
            "val": len(lists["val"]), "frames": num_frames, "size": size, "seed": seed, "labels": names}
