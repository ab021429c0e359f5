"""Manifest rows -> streams of decoded, augmented uint8 clips, in plain Python and on Ray Data.

`make_clip_rows` is the whole per-video work (fetch the bytes, sample frame indices, seek-decode,
crop/flip) and is the one implementation: `training_stream` (every epoch of a training, one
stream that Ray Train splits across its workers) and `view_dataset` (evaluation views) map it
over a manifest split in parallel Ray tasks; the data benchmark runs it in a plain loop and a
process pool.

Every video yields a fixed number of rows: `data.repeated_aug` clips when training, `test_clips x
test_crops` views when evaluating. A video that cannot be fetched or decoded (or, at evaluation,
is not `ok` in the manifest) still yields its rows, with `valid=False` and zero clips, so that
training counts and skips them and evaluation reports them; none is dropped or replaced.

Training clips are augmented where `data.augment_on` says. On "device" (the default) a decode task
draws each clip's augmentation (`transforms.draw_train_augment`) but ships the clip's whole uint8
frames with the draws (`aug_ops`, `aug_values`, `crop`, `flip` columns), and the trainer applies
them on its GPU (`transforms.train_augment_on_device`); frames of different videos may differ in
size. On "cpu" the task applies them itself (`transforms.train_augment`, the reference). Either way a
clip's pixels depend only on (seed, epoch, video).

Columns out: `clip` uint8 (T, crop, crop, 3), `label` int64, `video_id` int64 (the table's
`video_id` column if it has one, else the manifest's `index` column, the row's position in the
whole manifest, else the row's position in the table given), `view` int64 (the
clip's repeat when training; clip x test_crops + crop when evaluating), `valid` bool.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import av
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import DataConfig, StorageConfig
from pipeline.data import storage as store
from pipeline.data.decode import DecodeError, VideoDecoder
from pipeline.data.media import max_bytes
from pipeline.data.rand_augment import parse_rand_augment
from pipeline.data.sampling import dense_indices, effective_sampling_rate, uniform_indices
from pipeline.data.transforms import TrainDraws, draw_train_augment, encode_draws, three_crops, train_augment

log = logging.getLogger(__name__)

ROW_COLUMNS = ("path", "label", "video_id", "status", "frame_stride")  # what make_clip_rows reads
_MAX_VIDEOS_PER_TASK = 64


def views_per_video(data: DataConfig, *, training: bool) -> int:
    return data.repeated_aug if training else data.test_clips * data.test_crops


def clip_shape(data: DataConfig) -> tuple[int, int, int, int]:
    return data.num_frames, data.crop_size, data.crop_size, 3


def _indices(num_frames_in_video: int, data: DataConfig, frame_stride: int, *, rng=None, clip_index=None,
             num_clips: int = 1) -> np.ndarray:
    if data.sampling == "dense":
        return dense_indices(num_frames_in_video, num_frames=data.num_frames, sampling_rate=data.sampling_rate,
                             frame_stride=frame_stride, rng=rng, clip_index=clip_index, num_clips=num_clips)
    return uniform_indices(num_frames_in_video, num_frames=data.num_frames, rng=rng, clip_index=clip_index,
                           num_clips=num_clips)


def _num_ops(data: DataConfig) -> int:
    return parse_rand_augment(data.rand_augment).num_ops if data.rand_augment else 0


def _decode_views(video: VideoDecoder, row: dict[str, Any], data: DataConfig, *, training: bool, seed: int,
                  epoch: int) -> list[np.ndarray] | list[dict[str, Any]]:
    """The clips of one video, in view order (with `data.augment_on="device"`, training clips are dicts
    of whole frames and their augmentation draws)."""
    stride = int(row.get("frame_stride") or 1)
    n = video.num_frames
    if training:
        # One generator per (seed, epoch, video): the same clips on a rerun, new ones each epoch.
        rng = np.random.default_rng([seed, epoch, int(row["video_id"])])
        windows = [_indices(n, data, stride, rng=rng) for _ in range(data.repeated_aug)]
        frames = video.decode(np.concatenate(windows))  # one pass over the union of the windows
        augment = parse_rand_augment(data.rand_augment) if data.rand_augment else None
        clips = [frames[r * data.num_frames:(r + 1) * data.num_frames] for r in range(data.repeated_aug)]
        if data.augment_on == "device":  # whole frames and their draws; the trainer applies them
            num_ops = augment.num_ops if augment else 0
            return [{"clip": clip, **encode_draws(draw_train_augment(
                clip.shape[1], clip.shape[2], scale=data.scale, ratio=data.ratio, flip=data.hflip, rng=rng,
                augment=augment), num_ops)} for clip in clips]
        return [train_augment(clip, size=data.crop_size, scale=data.scale, ratio=data.ratio, flip=data.hflip,
                              rng=rng, augment=augment) for clip in clips]
    windows = [_indices(n, data, stride, clip_index=c, num_clips=data.test_clips) for c in range(data.test_clips)]
    # The decoder scales to the evaluation short side while converting, cheaper than a resize after;
    # one centre crop is cut there too (from the stored picture first when it is very wide).
    crop = data.crop_size if data.test_crops == 1 else None
    frames = video.decode(np.concatenate(windows), size=data.short_side, center_crop=crop)
    clips = [frames[c * data.num_frames:(c + 1) * data.num_frames] for c in range(data.test_clips)]
    return clips if crop else [view for clip in clips for view in three_crops(clip, size=data.crop_size)]


def make_clip_rows(row: dict[str, Any], *, data: DataConfig, storage: StorageConfig, training: bool, seed: int,
                   epoch: int = 0) -> list[dict[str, Any]]:
    """All output rows of one manifest row (keys `path`, `label`, `video_id`, `status`, optional
    `frame_stride`): fetch, sample, decode, augment. Never raises for a bad video or a failed
    fetch (those give `valid=False` rows); raises ValueError for a sampling rate that the video's
    `frame_stride` cannot serve, a config error that must stop the run."""
    count = views_per_video(data, training=training)
    label = -1 if row.get("label") is None else int(row["label"])
    video_id = int(row["video_id"])
    # A sampling rate the prepared copy cannot serve is a config error for the whole run, so it raises.
    if data.sampling == "dense":
        effective_sampling_rate(sampling_rate=data.sampling_rate, frame_stride=int(row.get("frame_stride") or 1))
    clips, reason = None, ""
    if row.get("status", "ok") != "ok":
        reason = f"manifest status {row.get('status')!r}"
    else:
        try:
            data_bytes = store.read_bytes(row["path"], storage=storage, max_bytes=max_bytes(data.limits))
            with VideoDecoder(data_bytes, limits=data.limits) as video:
                clips = _decode_views(video, row, data, training=training, seed=seed, epoch=epoch)
        except (store.StorageError, DecodeError, av.FFmpegError) as err:
            reason = str(err)
        except Exception as err:  # noqa: BLE001 - whatever else a damaged file triggers, counted, never fatal
            reason = f"{type(err).__name__}: {err}"
    device_draws = training and data.augment_on == "device"
    if clips is None:
        log.warning("unusable video %s (video_id %d): %s", row.get("path"), video_id, reason)
        zero = np.zeros(clip_shape(data), np.uint8)
        blank = ({"clip": zero, **encode_draws(TrainDraws((), (0, 0, data.crop_size, data.crop_size), False),
                                               _num_ops(data))} if device_draws else {"clip": zero})
        return [{**blank, "label": label, "video_id": video_id, "view": v, "valid": False} for v in range(count)]
    return [{**(clip if device_draws else {"clip": clip}), "label": label, "video_id": video_id, "view": v,
             "valid": True} for v, clip in enumerate(clips)]


def stack_rows(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """One video's rows -> a batch of numpy columns (what Ray Data and torch take)."""
    return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


def select_rows(manifest: pa.Table, *, split: str | None, training: bool) -> pa.Table:
    """The split's rows (every row when `split` is None) with a `video_id` column; training keeps only
    `ok` rows, evaluation keeps all of them (the unusable ones come out as `valid=False`)."""
    missing = [c for c in ("path", "label", "split", "status") if c not in manifest.column_names]
    if missing:
        raise ValueError(f"manifest lacks column(s) {', '.join(missing)}; it has {', '.join(manifest.column_names)}")
    if "video_id" not in manifest.column_names:
        # The manifest's `index` is the row's position in the whole manifest, so a video keeps its id
        # (and its random draws) in any shard of it; a bare table falls back to positions.
        ids = (manifest["index"].cast(pa.int64()) if "index" in manifest.column_names
               else pa.array(np.arange(manifest.num_rows, dtype=np.int64)))
        manifest = manifest.append_column("video_id", ids)
    mask = pc.equal(manifest["split"], split) if split is not None else pa.array(np.ones(manifest.num_rows, bool))
    if training:
        mask = pc.and_(mask, pc.equal(manifest["status"], "ok"))
    rows = manifest.filter(mask)
    if rows.num_rows == 0:
        splits = sorted(set(manifest["split"].to_pylist()) - {None})
        raise ValueError(f"no {'usable ' if training else ''}rows in split {split!r}; the manifest has splits "
                         f"{splits}: check data.train_split / data.val_split, or the manifest's status counts")
    keep = [c for c in ROW_COLUMNS if c in rows.column_names]
    return rows.select(keep)


def epoch_order(num_rows: int, *, seed: int, epoch: int) -> np.ndarray:
    """The training order of the rows in an epoch: a permutation drawn from (seed, epoch)."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_rows)


def decode_slots(data: DataConfig) -> int:
    """How many decode tasks can run at once: `data.decode_concurrency`, else the cluster's CPUs
    over `data.decode_cpus` (8 when Ray is not started yet)."""
    if data.decode_concurrency:
        return data.decode_concurrency
    import ray

    cpus = ray.cluster_resources().get("CPU", 8) if ray.is_initialized() else 8
    return max(1, int(cpus / data.decode_cpus))


def videos_per_task(num_videos: int, slots: int) -> int:
    """Videos per Ray task: about four rounds of tasks over the decode slots, at most 64 videos.

    Each Ray task costs tens of ms of CPU in scheduling and bookkeeping on a small machine (one
    task per video ran at a fraction of the clips/s), so tasks take many videos; four rounds keep
    the slots evenly busy to the end, and the cap bounds the work a failed task repeats.
    """
    return max(1, min(_MAX_VIDEOS_PER_TASK, -(-num_videos // (4 * slots))))


def decode_placement(data: DataConfig) -> dict[str, Any]:
    """Where decode tasks run, as `map_batches` keyword arguments: at most `data.decode_concurrency`
    tasks at once (0: Ray Data's choice); when the cluster has nodes labelled `data.decode_nodes`,
    first on the other nodes (the trainers', so that their clips never cross the network) and on the
    decode nodes when those are full ("trainers_first"), or on the decode nodes only."""
    import ray

    placement: dict[str, Any] = {"num_cpus": data.decode_cpus}
    if data.decode_concurrency:
        placement["compute"] = ray.data.TaskPoolStrategy(size=data.decode_concurrency)
    if data.decode_nodes and ray.is_initialized():
        key, value = data.decode_nodes.split("=", 1)
        if any(n["Alive"] and n.get("Labels", {}).get(key) == value for n in ray.nodes()):
            if data.decode_placement == "decode_nodes_only":
                placement["label_selector"] = {key: value}
            else:
                placement["label_selector"] = {key: f"!{value}"}
                placement["fallback_strategy"] = [{"label_selector": {key: value}}]
    return placement


def node_tag() -> int:
    """This process's Ray node as an int64 (the first 60 bits of its id): what the `decode_node` column
    holds, numeric so that every batch format takes it."""
    import ray

    return int(ray.get_runtime_context().get_node_id()[:15], 16)


def _train_task_clips(batch: dict[str, np.ndarray], *, rows: pa.Table, first_epoch: int, tasks_per_epoch: int,
                      videos_per_epoch: int, per_task: int, data: DataConfig, storage: StorageConfig,
                      seed: int) -> Iterator[dict[str, np.ndarray]]:
    """The clips of the training tasks numbered in `batch["id"]`: task t decodes slice t % T of epoch
    first_epoch + t // T's order; every draw comes from (seed, epoch, video)."""
    node = node_tag()
    for task in batch["id"].tolist():
        epoch, slot = first_epoch + task // tasks_per_epoch, task % tasks_per_epoch
        order = epoch_order(rows.num_rows, seed=seed, epoch=epoch)[:videos_per_epoch]
        for row in rows.take(order[slot * per_task:(slot + 1) * per_task]).to_pylist():
            clips = stack_rows(make_clip_rows(row, data=data, storage=storage, training=True, seed=seed, epoch=epoch))
            yield {**clips, "epoch": np.full(len(clips["label"]), epoch, dtype=np.int64),
                   "decode_node": np.full(len(clips["label"]), node, dtype=np.int64)}


def training_stream(manifest: pa.Table, *, split: str, data: DataConfig, storage: StorageConfig, seed: int,
                    epochs: range, videos_per_epoch: int):
    """One Ray Dataset of every training clip of `epochs`, for all workers together (Ray Train splits
    it): per epoch the first `videos_per_epoch` usable videos of the (seed, epoch) order, each giving
    `data.repeated_aug` clips, with `epoch` and `decode_node` (`node_tag()` of the node that decoded the
    clip) columns besides the usual ones.

    The source is one small row per decode task (`range`, one block per epoch, cut into one-row
    blocks as it streams), so starting costs nothing per epoch or per worker, and the number of
    tasks per epoch depends on the cluster's decode slots, not on the number of trainers. Ray Data's
    resource budgets and backpressure bound how far decoding runs ahead of the trainers.
    """
    import ray.data

    rows = select_rows(manifest, split=split, training=True)
    videos_per_epoch = min(videos_per_epoch, rows.num_rows)
    per_task = videos_per_task(videos_per_epoch, decode_slots(data))
    tasks_per_epoch = -(-videos_per_epoch // per_task)
    tasks = ray.data.range(len(epochs) * tasks_per_epoch, override_num_blocks=max(1, len(epochs)))
    return tasks.repartition(target_num_rows_per_block=1).map_batches(
        _train_task_clips, batch_size=None, **decode_placement(data),
        fn_kwargs={"rows": rows, "first_epoch": epochs.start, "tasks_per_epoch": tasks_per_epoch,
                   "videos_per_epoch": videos_per_epoch, "per_task": per_task, "data": data, "storage": storage,
                   "seed": seed})


def _view_batches(batch: pa.Table, *, data: DataConfig, storage: StorageConfig) -> Iterator[dict[str, np.ndarray]]:
    for row in batch.to_pylist():  # one output batch per video; Ray Data packs them into blocks
        yield stack_rows(make_clip_rows(row, data=data, storage=storage, training=False, seed=0))


def view_dataset(manifest: pa.Table, *, split: str | None, data: DataConfig, storage: StorageConfig):
    """A Ray Dataset of the evaluation views of every row of the split (of the manifest when `split` is
    None), in manifest order:
    `test_clips x test_crops` deterministic views per video, `valid=False` rows for the unusable."""
    import ray.data

    rows = select_rows(manifest, split=split, training=False)
    per_block = videos_per_task(rows.num_rows, decode_slots(data))
    blocks = [rows.slice(i, per_block) for i in range(0, rows.num_rows, per_block)]
    return ray.data.from_arrow(blocks).map_batches(_view_batches, batch_size=per_block, batch_format="pyarrow",
                                                   **decode_placement(data),
                                                   fn_kwargs={"data": data, "storage": storage})
