"""Decode work of one seek-decoded clip per container: `python -m pipeline.bench.containers`.

Writes a 10 s, 30 fps, 320x240 video with B-frames and a keyframe every 30 frames in each
container (MPEG-4 Part 2 keeps its scene-change keyframes; "avi IBBI" makes every anchor a
keyframe, as scene-change detection does on fast motion and flashes; "avi h264" is H.264 in AVI,
whose pts FFmpeg makes up) and seek-decodes a 16x4 clip (16 frames, every 4th) in the middle and
at the end. Prints frames decoded, seeks, sequential decodes and milliseconds per clip (the
mean of 5, on the shared machine's clock). The README's data-path section has the figures.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from pipeline.data.decode import VideoDecoder
from pipeline.data.synth import MOTIONS, render_video

FRAMES, HEIGHT, WIDTH, GOP = 300, 240, 320, 30
CLIPS = {"middle": list(range(130, 194, 4)), "end": list(range(236, 300, 4))}
# name -> (file name, container format, codec, encoder options)
VIDEOS = {
    "mp4 h264": ("v.mp4", "mp4", "libx264", {}),
    "mkv h264": ("v.mkv", "matroska", "libx264", {}),
    "ts h264": ("v.ts", "mpegts", "libx264", {}),
    "ts mpeg2": ("v2.ts", "mpegts", "mpeg2video", {}),
    "avi mpeg4": ("v.avi", "avi", "mpeg4", {}),
    "avi IBBI": ("ibbi.avi", "avi", "mpeg4", {"sc_threshold": "-100000000"}),
    "avi h264": ("h264.avi", "avi", "libx264", {}),
}


def write(path: Path, container_format: str, codec: str, options: dict[str, str], frames: np.ndarray) -> Path:
    with av.open(str(path), "w", format=container_format) as out:
        stream = out.add_stream(codec, rate=30)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.gop_size = GOP
        if codec == "libx264":
            options = {"preset": "veryfast", "x264-params": f"bframes=3:keyint={GOP}:min-keyint={GOP}:scenecut=0"}
        else:
            stream.codec_context.max_b_frames = 2
        stream.options = options
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def main(repeats: int = 5) -> None:
    frames = render_video(np.random.default_rng(0), MOTIONS[0], num_frames=FRAMES, height=HEIGHT, width=WIDTH)
    print(f"{'video':10s} {'clip':6s} {'frames decoded':>14s} {'seeks':>5s} {'sequential':>10s} {'ms':>6s}")
    with tempfile.TemporaryDirectory() as folder:
        for name, (file_name, container_format, codec, options) in VIDEOS.items():
            data = write(Path(folder) / file_name, container_format, codec, options, frames).read_bytes()
            for clip, indices in CLIPS.items():
                start = time.perf_counter()
                for _ in range(repeats):
                    with VideoDecoder(data) as video:
                        video.decode(indices)
                ms = (time.perf_counter() - start) / repeats * 1000
                stats = video.stats
                print(f"{name:10s} {clip:6s} {stats.frames_decoded:14d} {stats.seeks:5d} "
                      f"{stats.sequential_decodes:10d} {ms:6.1f}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
