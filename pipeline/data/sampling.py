"""Which frames of a video make a clip: dense (Kinetics) and uniform segment (SSv2) sampling; and
where a test crop sits in a frame (`crop_origin`).

All functions return 0-based frame indices (int64) into the video they are given the length of.
Training draws from `rng`; evaluation (`rng=None`) is deterministic. Indices never exceed the
video: in a video shorter than the clip's window the last frame repeats.

`sampling_rate` is always in frames of the ORIGINAL video. A prepared copy that keeps every
`frame_stride`-th frame (manifest column `frame_stride`) is indexed with the stride
`sampling_rate // frame_stride`, so a 16x4 clip from a copy at 1/4 frame rate is 16 consecutive
frames of the copy.
"""

from __future__ import annotations

import numpy as np


def effective_sampling_rate(*, sampling_rate: int, frame_stride: int = 1) -> int:
    """Stride in frames of a prepared copy that keeps every `frame_stride`-th original frame."""
    if sampling_rate < 1 or frame_stride < 1:
        raise ValueError(f"sampling_rate={sampling_rate} and frame_stride={frame_stride} must be >= 1")
    if frame_stride > sampling_rate or sampling_rate % frame_stride:
        raise ValueError(
            f"sampling_rate={sampling_rate} (in original frames) is not a multiple of the video's "
            f"frame_stride={frame_stride}: the prepared copy does not hold the frames this recipe samples; "
            f"prepare the videos with a frame stride that divides {sampling_rate} (e.g. 1 or {sampling_rate}), "
            f"or pick a sampling rate that is a multiple of {frame_stride}")
    return sampling_rate // frame_stride


def _check_common(num_frames_in_video: int, num_frames: int, clip_index: int | None, num_clips: int) -> None:
    if num_frames_in_video < 1:
        raise ValueError(f"num_frames_in_video={num_frames_in_video}: the video has no frames")
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames} must be >= 1")
    if num_clips < 1:
        raise ValueError(f"num_clips={num_clips} must be >= 1")
    if clip_index is not None and not 0 <= clip_index < num_clips:
        raise ValueError(f"clip_index={clip_index} must be in [0, num_clips={num_clips})")


def dense_indices(num_frames_in_video: int, *, num_frames: int, sampling_rate: int, frame_stride: int = 1,
                  rng: np.random.Generator | None = None, clip_index: int | None = None,
                  num_clips: int = 1) -> np.ndarray:
    """`num_frames` frames `sampling_rate` original frames apart, as in SlowFast/UniFormer.

    Training (`rng` given): the window starts uniformly at random in the video. Evaluation:
    clip `clip_index` of `num_clips` evenly spaced windows from the first frame to the last
    (one clip: the middle window; `clip_index=None` means 0).
    """
    if rng is not None and clip_index is not None:
        raise ValueError("give rng (training: random start) or clip_index (evaluation), not both")
    clip_index = 0 if clip_index is None else clip_index
    _check_common(num_frames_in_video, num_frames, clip_index, num_clips)
    stride = effective_sampling_rate(sampling_rate=sampling_rate, frame_stride=frame_stride)
    span = (num_frames - 1) * stride + 1  # frames the window covers
    slack = max(num_frames_in_video - span, 0)
    if rng is not None:
        start = int(rng.integers(0, slack + 1))
    elif num_clips == 1:
        start = slack // 2
    else:
        start = clip_index * slack // (num_clips - 1)
    return np.minimum(start + stride * np.arange(num_frames, dtype=np.int64), num_frames_in_video - 1)


def uniform_indices(num_frames_in_video: int, *, num_frames: int, rng: np.random.Generator | None = None,
                    clip_index: int | None = None, num_clips: int = 1) -> np.ndarray:
    """One frame from each of `num_frames` equal segments of the video (TSN / SSv2 sampling).

    Training (`rng` given): a random frame within each segment. Evaluation: the middle of each
    segment, or for clip `clip_index` of `num_clips` the point at (clip_index + 0.5) / num_clips
    of each segment. Short videos repeat frames.
    """
    if rng is not None and clip_index is not None:
        raise ValueError("give rng (training: random offsets) or clip_index (evaluation), not both")
    clip_index = 0 if clip_index is None else clip_index
    _check_common(num_frames_in_video, num_frames, clip_index, num_clips)
    # Segment bounds as in UniFormer's SSv2 loader: [round(i * seg), round((i + 1) * seg)] inclusive.
    seg = (num_frames_in_video - 1) / num_frames
    starts = np.round(seg * np.arange(num_frames)).astype(np.int64)
    ends = np.round(seg * np.arange(1, num_frames + 1)).astype(np.int64)
    if rng is not None:
        return rng.integers(starts, ends + 1).astype(np.int64)
    fraction = (clip_index + 0.5) / num_clips
    return starts + np.floor((ends - starts) * fraction).astype(np.int64)  # one clip: (start + end) // 2


def crop_origin(height: int, width: int, size: int, position: float = 0.5) -> tuple[int, int]:
    """(top, left) of the size x size crop of a height x width frame that is centred on the short side
    and at `position` in [0, 1] along the long side (0.5: the centre crop)."""
    if min(height, width) < size:
        raise ValueError(f"cannot crop {size}x{size} from {height}x{width} frames; resize the short side "
                         f"to at least {size} first (short_side_resize, data.short_side)")
    if height <= width:
        return (height - size) // 2, int(round((width - size) * position))
    return int(round((height - size) * position)), (width - size) // 2
