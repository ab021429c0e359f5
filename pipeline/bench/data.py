"""`uniformer bench data`: how fast the data path turns videos into training clips.

Over the same videos and the same per-video work (`pipeline.data.clips.make_clip_rows`: fetch the bytes,
sample a dense clip, seek-decode, RandomResizedCrop + flip), it measures clips per second of
(a) one plain Python loop, (b) a multiprocessing pool of W processes and (c) the Ray Data
pipeline (`training_stream`, one epoch) with W decode tasks, each after a warm-up, and reports clips/s
per core and the ratio (c)/(b). On a shared machine wall-clock rates swing with other people's load,
so every mode also reports the CPU seconds it consumed in all of its processes (this one, the
pool's, and Ray's own: raylet, GCS, workers) and clips per CPU second, which is what a dedicated
machine's throughput follows (W cores x clips per CPU second when they are kept busy).
Mode `cost` measures what a GPU node pays per training clip (`measure_clip_cost`): the CPU
milliseconds of the decode task with the augmentation there and with it on the training device, side
by side, and the cores per GPU each needs at a given clips/s.
It also measures what seeking costs: one seek-decoded
`frames x rate` clip against decoding just the frames of its window, on the original videos
(keyframe every 250 and every 16 frames) and on a prepared copy at 1/rate frame rate.

Unless a manifest is given it writes its own videos (textured motion from `pipeline.data.synth` under a
panning camera with a little grain, so that every frame costs the decoder something, as real
footage does; default 300 frames at 320x240, 30 fps) into a work folder, reused by later runs: the originals
with x264's default keyframe interval (250) and with one every 16 frames, and a prepared copy
that keeps every `rate`-th frame with a keyframe every 16 frames (as `prepare --frame-stride`
writes them).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from pipeline.config import DataConfig, StorageConfig
from pipeline.data.clips import make_clip_rows, stack_rows
from pipeline.data.decode import decode_frames
from pipeline.data.media import open_media
from pipeline.data.sampling import dense_indices
from pipeline.data.synth import MOTIONS, encode_h264, render_video

VARIANTS = ("original_gop250", "original_gop16", "prepared")


@dataclasses.dataclass(frozen=True)
class BenchVideos:
    videos: int = 8
    video_frames: int = 300
    height: int = 240
    width: int = 320
    fps: float = 30.0
    seed: int = 0


def _note(progress: Callable[[str], None] | None, message: str) -> None:
    if progress is not None:
        progress(message)


def write_bench_videos(work_dir: str, spec: BenchVideos, *, frame_stride: int,
                       progress: Callable[[str], None] | None = None) -> dict[str, list[str]]:
    """Write (or reuse) the benchmark's videos; returns the paths of each variant."""
    key = f"v2_{spec.videos}x{spec.video_frames}_{spec.height}x{spec.width}_s{spec.seed}_stride{frame_stride}"
    folder = Path(work_dir) / key
    paths = {v: [str(folder / v / f"video_{i:03d}.mp4") for i in range(spec.videos)] for v in VARIANTS}
    if (folder / "done.json").is_file():
        return paths
    for i in range(spec.videos):
        _note(progress, f"writing benchmark video {i + 1}/{spec.videos} ({spec.video_frames} frames, "
                        f"{spec.width}x{spec.height})")
        rng = np.random.default_rng([spec.seed, i])
        # Segments of different motions on a wide canvas, seen through a window that pans one pixel
        # per frame, plus grain: no static background for the codec to skip, like real footage.
        segment, wide = 60, spec.width + spec.video_frames
        canvas = np.concatenate([
            render_video(rng, MOTIONS[int(rng.integers(len(MOTIONS)))], num_frames=min(segment, spec.video_frames - s),
                         height=spec.height, width=wide)
            for s in range(0, spec.video_frames, segment)])
        frames = np.stack([canvas[t, :, t:t + spec.width] for t in range(spec.video_frames)])
        del canvas
        grain = rng.normal(0, 3, size=frames.shape[1:]).astype(np.float32)
        frames = np.stack([np.clip(f + np.roll(grain, 7 * t, axis=1), 0, 255).astype(np.uint8)
                           for t, f in enumerate(frames)])
        encoded = {"original_gop250": encode_h264(frames, fps=spec.fps),
                   "original_gop16": encode_h264(frames, fps=spec.fps, gop=16),
                   "prepared": encode_h264(frames[::frame_stride], fps=spec.fps / frame_stride, gop=16)}
        for variant, data in encoded.items():
            Path(paths[variant][i]).parent.mkdir(parents=True, exist_ok=True)
            Path(paths[variant][i]).write_bytes(data)
    (folder / "done.json").write_text(json.dumps(dataclasses.asdict(spec)))
    return paths


def bench_manifest(paths: list[str], *, frame_stride: int) -> pa.Table:
    """A minimal manifest (the columns `make_clip_rows` and `training_stream` read)."""
    n = len(paths)
    return pa.table({"path": paths, "label": pa.array(np.arange(n) % 2, pa.int64()), "split": ["train"] * n,
                     "status": ["ok"] * n, "frame_stride": pa.array([frame_stride] * n, pa.int64())})


# ---------------------------------------------------------------------------------------------
# Throughput: plain loop, process pool, Ray Data


def tree_cpu_s() -> float:
    """CPU seconds (user + system) used so far by this process and all its descendants, live or reaped."""
    import psutil

    me = psutil.Process()
    times = me.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in me.children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system
        except psutil.Error:  # exited meanwhile: its parent has reaped (and counts) it, or will
            pass
    return total


def _rates(clips: int, valid: int, seconds: float, cpu_s: float | None, cores: int) -> dict[str, float | None]:
    return {"clips": clips, "valid": valid, "seconds": seconds, "clips_per_s": clips / seconds,
            "clips_per_s_per_core": clips / seconds / cores,
            "cpu_s": cpu_s, "clips_per_cpu_s": clips / cpu_s if cpu_s else None}


def _clip_rows(manifest: pa.Table, clips: int) -> list[dict[str, Any]]:
    """`clips` rows cycling over the videos, each with its own video_id (so its own random clip)."""
    rows = manifest.to_pylist()
    return [dict(rows[i % len(rows)], video_id=i) for i in range(clips)]


def _work(row: dict[str, Any], data: DataConfig, storage: StorageConfig) -> int:
    out = make_clip_rows(row, data=data, storage=storage, training=True, seed=0)
    return sum(r["valid"] for r in out)


def _pool_init() -> None:
    import torch

    torch.set_num_threads(1)  # one core per process, as Ray gives each decode task


def _pool_task(args: tuple[dict[str, Any], DataConfig, StorageConfig]) -> int:
    return _work(*args)


def measure_loop(rows: list[dict[str, Any]], data: DataConfig, storage: StorageConfig) -> dict[str, float]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _work(rows[0], data, storage)  # warm-up: imports, first allocation
        start, cpu = time.perf_counter(), time.process_time()
        valid = sum(_work(row, data, storage) for row in rows)
        seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    finally:
        torch.set_num_threads(threads)
    return _rates(len(rows), valid, seconds, cpu_s, 1)


def measure_pool(rows: list[dict[str, Any]], data: DataConfig, storage: StorageConfig, *,
                 workers: int) -> dict[str, float]:
    # forkserver: children that do not inherit this process's threads (Ray's, torch's).
    ctx = multiprocessing.get_context("forkserver")
    t0 = time.perf_counter()
    with ctx.Pool(workers, initializer=_pool_init) as pool:
        pool.map(_pool_task, [(rows[i % len(rows)], data, storage) for i in range(workers)], chunksize=1)  # warm-up
        startup = time.perf_counter() - t0
        start, cpu = time.perf_counter(), tree_cpu_s()
        valid = sum(pool.imap_unordered(_pool_task, [(row, data, storage) for row in rows], chunksize=1))
        seconds, cpu_s = time.perf_counter() - start, tree_cpu_s() - cpu
    return {**_rates(len(rows), valid, seconds, cpu_s, workers), "startup_s": startup}


def measure_ray(rows: list[dict[str, Any]], data: DataConfig, storage: StorageConfig, *,
                workers: int, count_cpu: bool = True) -> dict[str, float]:
    """Ray Data over the rows; `count_cpu` when Ray's processes descend from this one (a local Ray)."""
    from pipeline.data.clips import training_stream

    data = dataclasses.replace(data, decode_concurrency=workers, decode_cpus=1.0)
    table = pa.Table.from_pylist(rows)

    def run(manifest: pa.Table) -> tuple[int, int, float, float, float]:
        ds = training_stream(manifest, split="train", data=data, storage=storage, seed=0, epochs=range(1),
                             videos_per_epoch=manifest.num_rows)
        start, cpu = time.perf_counter(), tree_cpu_s()
        first = None
        count = valid = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if first is None:
                first = time.perf_counter() - start
            count += len(batch["valid"])
            valid += int(batch["valid"].sum())
        return count, valid, time.perf_counter() - start, tree_cpu_s() - cpu, first or 0.0

    t0 = time.perf_counter()
    run(table.slice(0, min(table.num_rows, 2 * workers)))  # warm-up: worker processes and their imports
    startup = time.perf_counter() - t0
    count, valid, seconds, cpu_s, first = run(table)
    return {**_rates(count, valid, seconds, cpu_s if count_cpu else None, workers), "first_batch_s": first,
            "startup_s": startup}


def measure_clip_cost(rows: list[dict[str, Any]], data: DataConfig, storage: StorageConfig, *,
                      clips_per_s_per_gpu: float) -> dict[str, Any]:
    """CPU milliseconds per training clip in the decode task, with the augmentation there
    (`augment_on="cpu"`, the old path) and on the training device (`"device"`: decode and draws
    only), the two measured row by row in turn in one process on one core; the cores per GPU each
    needs at `clips_per_s_per_gpu`; the bytes of uint8 each ships per clip; and, for scale, the
    device augmentation of the shipped frames on this machine's CPU (on a GPU it is GPU time)."""
    import torch

    from pipeline.training.ingest import TrainBatch, clips_on_device

    paths = {"cpu": dataclasses.replace(data, augment_on="cpu"), "device": dataclasses.replace(data, augment_on="device")}
    cpu_s = {name: 0.0 for name in paths}
    shipped = {name: 0 for name in paths}
    apply_s, clips = 0.0, 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, cfg in paths.items():  # warm-up: imports, first allocations
            make_clip_rows(rows[0], data=cfg, storage=storage, training=True, seed=0)
        for row in rows:
            for name, cfg in paths.items():
                start = time.process_time()
                out = make_clip_rows(row, data=cfg, storage=storage, training=True, seed=0)
                cpu_s[name] += time.process_time() - start
                shipped[name] += sum(r["clip"].nbytes for r in out)
            batch = TrainBatch(pin=False)(stack_rows(out))  # one video's clips, as a decode task ships them
            start = time.process_time()
            clips_on_device(batch, data, torch.device("cpu"))
            apply_s += time.process_time() - start
            clips += len(out)
    finally:
        torch.set_num_threads(threads)
    per_clip = {name: 1000 * cpu_s[name] / clips for name in paths}
    return {"clips": clips, "clips_per_s_per_gpu": clips_per_s_per_gpu,
            **{f"{name}_ms_per_clip": per_clip[name] for name in paths},
            "device_over_cpu": per_clip["device"] / per_clip["cpu"],
            **{f"{name}_cores_per_gpu": per_clip[name] * clips_per_s_per_gpu / 1000 for name in paths},
            **{f"{name}_mb_per_clip": shipped[name] / clips / 1e6 for name in paths},
            "device_augment_ms_per_clip_on_this_cpu": 1000 * apply_s / clips}


# ---------------------------------------------------------------------------------------------
# Seek cost: one clip against decoding just its window


def _sequential_decode_s(data: bytes) -> tuple[float, int]:
    """CPU seconds to decode every frame (no RGB conversion) and the number of frames."""
    start = time.process_time()
    with open_media(data) as container:
        stream = container.streams.video[0]
        stream.thread_type = "SLICE"
        stream.codec_context.thread_count = 1
        count = sum(1 for _ in container.decode(stream))
    return time.process_time() - start, count


def _rgb_s(data: bytes, count: int) -> float:
    """CPU seconds to convert `count` decoded frames to RGB."""
    with open_media(data) as container:
        frames = [f for _, f in zip(range(count), container.decode(video=0))]
    start = time.process_time()
    for frame in frames:
        frame.to_ndarray(format="rgb24")
    return time.process_time() - start


def measure_seek(paths: list[str], *, num_frames: int, sampling_rate: int, frame_stride: int, clips: int,
                 seed: int = 0) -> dict[str, float]:
    """Mean CPU ms of a seek-decoded clip (open, demux pass, seek, decode, RGB) vs its window's frames
    decoded at the sequential per-frame cost plus the clip's RGB conversion (CPU time, single-threaded
    decoding: robust to other load on the machine)."""
    blobs = [Path(p).read_bytes() for p in paths]
    rng = np.random.default_rng(seed)
    seq = [_sequential_decode_s(b) for b in blobs]
    per_frame_s = sum(s for s, _ in seq) / sum(n for _, n in seq)
    window = (num_frames - 1) * (sampling_rate // frame_stride) + 1
    rgb_s = float(np.median([_rgb_s(b, num_frames) for b in blobs[:3]]))
    times = []
    decode_frames(blobs[0], [0])  # warm-up
    for i in range(clips):
        blob, n = blobs[i % len(blobs)], seq[i % len(blobs)][1]
        idx = dense_indices(n, num_frames=num_frames, sampling_rate=sampling_rate, frame_stride=frame_stride, rng=rng)
        start = time.process_time()
        decode_frames(blob, idx)
        times.append(time.process_time() - start)
    clip_s = float(np.mean(times))
    window_s = window * per_frame_s + rgb_s
    return {"clip_ms": 1000 * clip_s, "window_frames": window, "window_ms": 1000 * window_s,
            "ratio": clip_s / window_s, "decode_fps": 1 / per_frame_s}


# ---------------------------------------------------------------------------------------------


def _ray_for(workers: int) -> bool:
    """Use the running Ray, else $RAY_ADDRESS, else start a local Ray with `workers` CPUs; True if started."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, configure_logging=False)
    else:
        ray.init(address="local", num_cpus=workers, include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
    return True


def run_data_bench(*, data: DataConfig, storage: StorageConfig = StorageConfig(), spec: BenchVideos = BenchVideos(),
                   workers: int = 2, clips: int = 128, seek_clips: int = 24, manifest_uri: str = "",
                   split: str = "train", work_dir: str = "work/bench_data",
                   modes: tuple[str, ...] = ("loop", "pool", "ray"), clips_per_s_per_gpu: float = 172.0,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the data benchmark; returns the figures (see the module docstring)."""
    if workers < 1 or clips < 1:
        raise ValueError(f"workers={workers} and clips={clips} must be at least 1")
    frame_stride = data.sampling_rate
    result: dict[str, Any] = {"workers": workers, "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
                              "clip": f"{data.num_frames}x{data.sampling_rate}", "crop_size": data.crop_size}
    if manifest_uri:
        from pipeline.data.manifest import read_manifest

        table = read_manifest(manifest_uri, storage=storage)
        import pyarrow.compute as pc

        table = table.filter(pc.and_(pc.equal(table["split"], split), pc.equal(table["status"], "ok")))
        if table.num_rows == 0:
            raise ValueError(f"{manifest_uri} has no ok rows in split {split!r}")
        manifest = table.select([c for c in ("path", "label", "split", "status", "frame_stride")
                                 if c in table.column_names])
        result["videos"] = {"manifest": manifest_uri, "rows": manifest.num_rows}
        paths = None
    else:
        paths = write_bench_videos(work_dir, spec, frame_stride=frame_stride, progress=progress)
        manifest = bench_manifest(paths["prepared"], frame_stride=frame_stride)
        result["videos"] = {**dataclasses.asdict(spec), "throughput_on": f"prepared (every {frame_stride}th frame, "
                            f"keyframe every 16)", "work_dir": work_dir}

    rows = _clip_rows(manifest, clips)
    throughput: dict[str, Any] = {}
    if "loop" in modes:
        _note(progress, f"plain loop: {clips} clips on one core")
        throughput["loop"] = measure_loop(rows, data, storage)
    if "pool" in modes:
        _note(progress, f"multiprocessing pool of {workers}: {clips} clips")
        throughput["pool"] = measure_pool(rows, data, storage, workers=workers)
    if "ray" in modes:
        _note(progress, f"Ray Data with {workers} decode tasks: {clips} clips")
        started = _ray_for(workers)
        try:
            throughput["ray"] = measure_ray(rows, data, storage, workers=workers,
                                            count_cpu=not os.environ.get("RAY_ADDRESS"))
        finally:
            if started:
                import ray

                ray.shutdown()
    if "cost" in modes:
        _note(progress, f"CPU per training clip, augmentation in the decode task vs on the device: {clips} clips")
        result["clip_cost"] = measure_clip_cost(rows, data, storage, clips_per_s_per_gpu=clips_per_s_per_gpu)
    if "ray" in throughput and "pool" in throughput:
        throughput["ray_over_pool"] = throughput["ray"]["clips_per_s"] / throughput["pool"]["clips_per_s"]
        if throughput["ray"]["clips_per_cpu_s"] and throughput["pool"]["clips_per_cpu_s"]:
            throughput["ray_over_pool_per_cpu_s"] = (throughput["ray"]["clips_per_cpu_s"]
                                                     / throughput["pool"]["clips_per_cpu_s"])
    result["throughput"] = throughput

    if paths is not None and seek_clips:
        seek = {}
        for variant in VARIANTS:
            _note(progress, f"seek cost on {variant}: {seek_clips} clips")
            seek[variant] = measure_seek(paths[variant], num_frames=data.num_frames, sampling_rate=data.sampling_rate,
                                         frame_stride=frame_stride if variant == "prepared" else 1, clips=seek_clips)
        # What the prepared copy buys per clip, seek cost included (README "Benchmarks": 1.64x).
        result["seek"] = seek
        result["prepared_speedup_vs_original_gop250"] = seek["original_gop250"]["clip_ms"] / seek["prepared"]["clip_ms"]
    return result
