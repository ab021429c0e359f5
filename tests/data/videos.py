"""Test videos written with PyAV: good ones with known frame counts, and every broken kind.

Frames are textured (a smooth random pattern sliding sideways plus a per-frame brightness
step) so that lossy codecs keep neighbouring frames distinguishable: a decoded frame can be
matched back to the frame that was written. `KINDS` lists one small video of each kind with
the status `pipeline.data.video.probe_video` should give it; `write_kind` writes one.
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence

import av
import numpy as np


def make_frames(num_frames: int = 40, height: int = 48, width: int = 64, *, seed: int = 0,
                speed_px: int = 3, cell: int = 4) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB frames: a texture of `cell`-pixel squares moving `speed_px` pixels per frame."""
    rng = np.random.default_rng(seed)
    big_w = width + num_frames * speed_px + cell
    coarse = rng.integers(0, 256, size=(height // cell + 2, big_w // cell + 2, 3), dtype=np.uint8)
    texture = np.repeat(np.repeat(coarse, cell, axis=0), cell, axis=1)[:height, :big_w].astype(np.int16)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        shifted = texture[:, t * speed_px: t * speed_px + width]
        frames[t] = np.clip(shifted // 2 + (t * 37) % 128, 0, 255).astype(np.uint8)
    return frames


# name -> (matrix for RGB -> YUV, range, stream tags: colorspace, color_range, color_primaries, color_trc)
COLOURS = {
    "bt709": ("ITU709", "MPEG", (1, 1, 1, 1)),
    "bt601_full": ("ITU601", "JPEG", (6, 2, 6, 6)),  # SMPTE 170M, full range
}


def write_video(path: str | Path, frames: np.ndarray, *, fps: float = 30, codec: str = "libx264",
                pix_fmt: str = "yuv420p", gop: int | None = None, bframes: bool = True,
                times_s: Sequence[float] | None = None, faststart: bool = False,
                container_format: str | None = None, colour: str | None = None, rotation: int = 0,
                hflip: bool = False, sample_aspect_ratio: Fraction | None = None) -> Path:
    """Encode RGB `(T, H, W, 3)` uint8 frames; returns `path`.

    `times_s` gives each frame's timestamp (variable frame rate); otherwise frame i is at i/fps.
    `bframes` asks libx264 (3) or MPEG-4 Part 2 (2) for B-frames (so decode order differs from
    presentation order).
    `colour` (a `COLOURS` name) converts RGB to YUV with that matrix and range and tags the stream
    so; without it PyAV converts with BT.601 limited range and tags nothing. `rotation` (degrees
    counter-clockwise, as `VideoFrame.rotation` reads it back), `hflip` (mirror after turning) and
    `sample_aspect_ratio` only tag the stream: the frames are stored as given.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.asarray(frames, np.uint8)
    rate = Fraction(fps).limit_denominator(1001)
    time_base = Fraction(1, 1000) if times_s is not None else 1 / rate
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", format=container_format, options=options) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.codec_context.time_base = time_base
        if rotation or hflip:
            stream.set_display_rotation(rotation, hflip=hflip)
        if sample_aspect_ratio:
            stream.codec_context.sample_aspect_ratio = sample_aspect_ratio
        if colour:
            matrix, color_range, tags = COLOURS[colour]
            context = stream.codec_context
            context.colorspace, context.color_range, context.color_primaries, context.color_trc = tags
        if gop:
            stream.codec_context.gop_size = gop
        if codec == "mpeg4" and bframes:
            stream.codec_context.max_b_frames = 2
        if codec == "libx264":
            params = [f"bframes={3 if bframes else 0}"]
            if gop:
                params += [f"keyint={gop}", f"min-keyint={gop}", "scenecut=0"]
            stream.options = {"preset": "ultrafast" if not bframes else "veryfast", "crf": "18",
                              "x264-params": ":".join(params)}
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if colour:
                frame = frame.reformat(format=pix_fmt, dst_colorspace=matrix, dst_color_range=color_range)
            frame.pts = round(times_s[i] * 1000) if times_s is not None else i
            frame.time_base = time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_audio_only(path: str | Path, *, seconds: float = 1.0) -> Path:
    """An mp4 holding one AAC stream and no video."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = 16000
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=rate)
        stream.layout = "mono"
        t = np.arange(int(seconds * rate)) / rate
        samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        step = 1024
        for i in range(0, len(samples), step):
            chunk = samples[i:i + step][None, :]
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = i
            frame.time_base = Fraction(1, rate)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_truncated(path: str | Path, frames: np.ndarray, *, keep: float = 0.6, faststart: bool = True,
                    **kwargs) -> Path:
    """A good video cut after `keep` of its bytes (as a download that stopped half-way).

    With `faststart` the index (moov) is at the front and the tail of the frames is missing;
    without it the index itself is lost and the file cannot be opened at all.
    """
    path = write_video(path, frames, faststart=faststart, **kwargs)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def write_empty(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write_not_video(path: str | Path, *, size: int = 4096, seed: int = 0) -> Path:
    """Bytes that are no media container at all (an HTML error page saved as .mp4, say)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    path.write_bytes(b"<html><body>404 Not Found</body></html>\n" + rng.bytes(size))
    return path


def vfr_times(num_frames: int, *, fps: float = 30, seed: int = 0) -> list[float]:
    """Increasing timestamps whose gaps vary between 0.5 and 2 frame periods."""
    rng = np.random.default_rng(seed)
    gaps = rng.uniform(0.5, 2.0, size=num_frames) / fps
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]).round(3).tolist()


def decode_all(src: str | Path | bytes) -> tuple[np.ndarray, list[int]]:
    """Sequential decode of the first video stream: (T, H, W, 3) RGB frames and their pts."""
    source = io.BytesIO(src) if isinstance(src, bytes) else str(src)
    frames, pts = [], []
    with av.open(source) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            pts.append(frame.pts)
    return np.stack(frames), pts


# One of each kind, small enough for moto (which copies whole objects per request).
# name -> (file name, expected probe status, writer(path))
KINDS: dict[str, tuple[str, str, Callable[[Path], Path]]] = {
    "good": ("good.mp4", "ok", lambda p: write_video(p, make_frames(40))),
    "good_webm": ("good.webm", "ok", lambda p: write_video(p, make_frames(24, seed=1), codec="libvpx")),
    "odd_size": ("odd_size.mp4", "ok",
                 lambda p: write_video(p, make_frames(24, 49, 65, seed=2), pix_fmt="yuv444p")),
    "vfr": ("vfr.mp4", "ok", lambda p: write_video(p, make_frames(30, seed=3), times_s=vfr_times(30))),
    "ten_bit": ("ten_bit.mp4", "ok",
                lambda p: write_video(p, make_frames(24, seed=4), pix_fmt="yuv420p10le")),
    "truncated": ("truncated.mp4", "unreadable", lambda p: write_truncated(p, make_frames(40), faststart=True)),
    "truncated_index": ("truncated_index.mp4", "unreadable",
                        lambda p: write_truncated(p, make_frames(40), faststart=False)),
    "truncated_webm": ("truncated_webm.webm", "unreadable",
                       lambda p: write_truncated(p, make_frames(40), faststart=False, codec="libvpx")),
    "mpeg_ps": ("mpeg_ps.mpg", "ok",
                lambda p: write_video(p, make_frames(24, seed=5), codec="mpeg2video", container_format="mpeg")),
    "flv1": ("flv1.flv", "ok", lambda p: write_video(p, make_frames(24, seed=6), codec="flv", container_format="flv")),
    # B-frames delay the first frame: the FLV's duration counts from 0, not from that frame.
    "h264_flv": ("h264.flv", "ok", lambda p: write_video(p, make_frames(40, seed=7), container_format="flv")),
    "truncated_flv": ("truncated_flv.flv", "unreadable",
                      lambda p: write_truncated(p, make_frames(40), faststart=False, container_format="flv")),
    "empty": ("empty.mp4", "empty", write_empty),
    "not_video": ("not_video.mp4", "unreadable", write_not_video),
    "audio_only": ("audio_only.mp4", "no_video_stream", write_audio_only),
    "tiny": ("tiny.mp4", "too_small", lambda p: write_video(p, make_frames(24, 16, 24))),
    "short": ("short.mp4", "too_short", lambda p: write_video(p, make_frames(6))),
}


def write_kind(folder: str | Path, kind: str) -> Path:
    """Write the `kind` video of `KINDS` into `folder`; returns its path."""
    name, _, writer = KINDS[kind]
    return writer(Path(folder) / name)
