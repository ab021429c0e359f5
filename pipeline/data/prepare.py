"""Raw videos + annotations -> validated, optionally transcoded videos + `manifest.parquet`.

    annotations --parse--> rows (bad ones kept) --list videos--> work items (one per distinct
    source) --Ray Data map_batches: read, probe, transcode, upload--> results --join--> manifest

Restartable: every finished batch of work items is written at once as a part file under
`<output>/_parts/`. A later run reuses every result (from the parts and the previous manifest)
whose work key matches: the same source URI, size and version (ETag or mtime), the same options,
and, for a transcoded row, its prepared copy still present with the recorded size. Results are
keyed by work item and the manifest is rebuilt from the annotation rows, so a run killed at any
point and started again ends with every annotation row exactly once. One prepare at a time per
output folder.

Sources: a video file, a folder of image frames (`<id>/00001.jpg` ...: Something-Something V1;
`pipeline.data.frames`) encoded as a video at `frames_fps`, or a folder inside a tar shard of frame
folders (`*.tar`, `*.tar.gz`, `*.tgz` under the videos URI): an annotation path that is neither a file
nor a frame folder is looked up among the shards' folders (the folder itself, or one ending in
`/<path>`). Each shard is one work item, read once as a stream, and every frame folder in it is
prepared; its results are kept in `<output>/_shards/<work key>.parquet`, which later runs reuse while
the shard and the options are unchanged.

Output: `<output>/manifest.parquet`, `<output>/labels.json`, `<output>/summary.json` and the
prepared copies under `<output>/videos/<relative path with .mp4 suffix>`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from pipeline.config import MediaLimits, StorageConfig
from pipeline.data import manifest as mf
from pipeline.data import storage as st
from pipeline.data.annotations import Annotations, labels_json, load_annotations
from pipeline.data.frames import (FramesError, checked_frames, frame_folders, is_image, is_tar, order_frames,
                                  rgb_frames, tar_folders)
from pipeline.data.media import LimitExceeded, check_bytes, max_bytes
from pipeline.data.video import TranscodeError, encode_rgb_frames, probe_video, transcode_video

# Bump when probing or transcoding changes what it writes: every cached result is redone.
# 2: copies upright with square pixels and the colour description; sizes as shown. 3: allowed containers and
# data.limits (statuses unsupported, too_large).
PREPARE_VERSION = 3
PARTS = "_parts"
SHARDS = "_shards"
VIDEOS = "videos"
_PENDING = "?"  # the key of an annotation row to look up among the shards' folders
# Results that depend on more than the source and the options are never cached.
_NOT_CACHED = ("missing", "transcode_failed")
_ANNOTATION_FIELDS = ("index", "label", "label_name", "split", "annotation")
RESULT_FIELDS = tuple(n for n in mf.SCHEMA.names if n not in _ANNOTATION_FIELDS)


@dataclass(frozen=True)
class PrepareOptions:
    """What `prepare` does to each video (the CLI flags of `uniformer prepare`)."""

    transcode: bool = True
    short_side: int = 320          # 0 keeps the size (dimensions are still made even)
    frame_stride: int = 1          # keep every n-th frame; 4 suits a 16x4 recipe
    keyframe_interval: int = 16    # in frames of the prepared copy
    crf: int = 23
    preset: str = "veryfast"
    min_frames: int = 16           # of the original; fewer -> too_short
    min_side: int = 32             # smaller short side -> too_small
    probe_decode: str = "ends"     # "all" decodes every frame when probing (slow, thorough)
    limits: MediaLimits = field(default_factory=MediaLimits)  # over one -> too_large (the config's data.limits)
    frames_fps: float = 12.0       # frame rate of frame folders (Something-Something V1's JPEGs are 12 per second)

    def __post_init__(self) -> None:
        for name in ("frame_stride", "keyframe_interval", "min_frames", "min_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.short_side < 0:
            raise ValueError(f"short_side={self.short_side} must be >= 0 (0 keeps the size)")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf={self.crf} must be in [0, 51]")
        if not self.transcode and self.frame_stride != 1:
            raise ValueError(f"frame_stride={self.frame_stride} needs transcoding; drop --no-transcode "
                             "or use --frame-stride 1")
        if self.probe_decode not in ("ends", "all"):
            raise ValueError(f"probe_decode={self.probe_decode!r} is not one of 'ends', 'all'")
        if not 0 < self.frames_fps <= 1000:
            raise ValueError(f"frames_fps={self.frames_fps} must be in (0, 1000]")


# ---------------------------------------------------------------------------------------------
# One work item: read, probe, transcode, upload (runs in Ray tasks; plain and testable alone)


def prepare_item(item: dict[str, Any], options: PrepareOptions, *, storage: StorageConfig = StorageConfig(),
                 threads: int = 1) -> dict[str, Any]:
    """The manifest fields of one source video or frame folder (all of `RESULT_FIELDS`) plus `cache` (bool)."""
    source = item["source_path"]
    out: dict[str, Any] = {**{k: mf.empty_row()[k] for k in RESULT_FIELDS}, "work_key": item["work_key"],
                           "path": source, "source_path": source, "source_bytes": item["source_bytes"],
                           "source_version": item["source_version"], "cache": True}
    if item["kind"] == "frames":
        try:
            frames = _read_frames(source, storage)
        except st.StorageError as err:
            return {**out, "status": "unreadable", "reason": f"read failed: {err}", "cache": False}
        return _frames_result(out, frames, item["dest"], options, storage=storage, threads=threads)
    try:
        # The listed size first: a multi-GB object is recorded, not fetched.
        check_bytes(item["source_bytes"], options.limits, source)
        data = st.read_bytes(source, storage=storage, max_bytes=max_bytes(options.limits))
    except (LimitExceeded, st.ObjectTooLarge) as err:
        return {**out, "status": "too_large", "reason": str(err)}
    except st.NotFoundError as err:
        return {**out, "status": "missing", "reason": str(err), "cache": False}
    except st.StorageError as err:
        return {**out, "status": "unreadable", "reason": f"read failed: {err}", "cache": False}
    info = probe_video(data, min_frames=options.min_frames, min_side=options.min_side,
                       decode=options.probe_decode, limits=options.limits)
    out.update(source_bytes=len(data), source_num_frames=info["num_frames"], source_fps=info["fps"],
               source_width=info["width"], source_height=info["height"], source_codec=info["codec"],
               source_pix_fmt=info["pix_fmt"], status=info["status"], reason=info["reason"])
    source_meta = {"num_frames": info["num_frames"], "fps": info["fps"], "width": info["width"],
                   "height": info["height"], "bytes": len(data), "duration_s": info["duration_s"],
                   "codec": info["codec"], "keyframe_interval": info["keyframe_interval"], "frame_stride": 1}
    if info["status"] != "ok" or not options.transcode:
        return {**out, **source_meta}
    with tempfile.TemporaryDirectory(prefix="uniformer-prepare-") as tmp:
        local = os.path.join(tmp, "video.mp4")
        try:
            meta = transcode_video(data, local, short_side=options.short_side or None,
                                   frame_stride=options.frame_stride, keyframe_interval=options.keyframe_interval,
                                   crf=options.crf, preset=options.preset, threads=threads, limits=options.limits)
            st.upload_file(local, item["dest"], storage=storage)
        except TranscodeError as err:
            return {**out, **source_meta, "status": "transcode_failed", "reason": str(err), "cache": False}
        except st.StorageError as err:
            return {**out, **source_meta, "status": "transcode_failed", "reason": f"upload failed: {err}",
                    "cache": False}
    return {**out, "path": item["dest"], "transcoded": True, "num_frames": meta["num_frames"], "fps": meta["fps"],
            "width": meta["width"], "height": meta["height"], "bytes": meta["bytes"],
            "duration_s": meta["duration_s"], "codec": meta["codec"],
            "keyframe_interval": meta["keyframe_interval"], "frame_stride": meta["frame_stride"]}


def _read_frames(folder: str, storage: StorageConfig) -> list[tuple[str, bytes]]:
    """(file name, bytes) of the image files directly in `folder` (S3 objects read concurrently)."""
    uris = [o.uri for o in st.list_objects(folder, storage=storage)
            if is_image(o.uri) and posixpath.dirname(o.uri) == folder.rstrip("/")]
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(zip((posixpath.basename(u) for u in uris), pool.map(lambda u: st.read_bytes(u, storage=storage),
                                                                        uris)))


def _frames_result(out: dict[str, Any], frames: list[tuple[str, bytes]], dest: str, options: PrepareOptions, *,
                   storage: StorageConfig, threads: int) -> dict[str, Any]:
    """The manifest fields of a frame folder: its checks, then its H.264 copy at `dest`."""
    try:
        by_name = dict(frames)
        frames = [(name, by_name[name]) for name in order_frames(list(by_name))]
        info = checked_frames(frames, min_frames=options.min_frames, min_side=options.min_side, limits=options.limits)
    except FramesError as err:
        return {**out, "source_bytes": sum(len(d) for _, d in frames), "status": err.status, "reason": str(err)}
    out = {**out, "source_bytes": info["bytes"], "source_num_frames": info["num_frames"],
           "source_fps": options.frames_fps, "source_width": info["width"], "source_height": info["height"],
           "source_codec": info["codec"], "source_pix_fmt": info["mode"]}
    if not options.transcode:
        return {**out, "status": "unsupported", "reason": "a frame folder is read as a video only once prepared: "
                                                          "drop --no-transcode"}
    with tempfile.TemporaryDirectory(prefix="uniformer-prepare-") as tmp:
        local = os.path.join(tmp, "video.mp4")
        try:
            meta = encode_rgb_frames(rgb_frames(frames, options.limits, frame_stride=options.frame_stride), local,
                                     fps=options.frames_fps / options.frame_stride,
                                     short_side=options.short_side or None, keyframe_interval=options.keyframe_interval,
                                     crf=options.crf, preset=options.preset, threads=threads)
            st.upload_file(local, dest, storage=storage)
        except FramesError as err:
            return {**out, "status": err.status, "reason": str(err)}
        except (TranscodeError, ValueError) as err:
            return {**out, "status": "transcode_failed", "reason": str(err), "cache": False}
        except st.StorageError as err:
            return {**out, "status": "transcode_failed", "reason": f"upload failed: {err}", "cache": False}
    return {**out, "path": dest, "transcoded": True, "num_frames": meta["num_frames"], "fps": meta["fps"],
            "width": meta["width"], "height": meta["height"], "bytes": meta["bytes"], "duration_s": meta["duration_s"],
            "codec": meta["codec"], "keyframe_interval": meta["keyframe_interval"], "frame_stride": options.frame_stride,
            "status": "ok", "reason": ""}


def member_key(shard_key: str, folder: str) -> str:
    return hashlib.sha256(f"{shard_key}\0{folder}".encode()).hexdigest()


def _prepare_shard(item: dict[str, Any], options: PrepareOptions, *, storage: StorageConfig,
                   threads: int) -> tuple[list[dict[str, Any]], str]:
    """The results of every frame folder of a tar shard (`source_path` `<shard>#<folder>`) and "", or the
    results so far and why the shard could not be read to its end."""
    shard, rows = item["source_path"], {}
    try:
        with st.open_input(shard, storage=storage) as stream:
            for folder, files, error in tar_folders(stream, max_member_bytes=max_bytes(options.limits)):
                source = f"{shard}#{folder}"
                out = {**{k: mf.empty_row()[k] for k in RESULT_FIELDS}, "work_key": member_key(item["work_key"], folder),
                       "path": source, "source_path": source, "source_version": item["source_version"], "cache": True}
                earlier = rows.get(folder)
                if error:
                    if earlier and earlier["transcoded"]:
                        st.remove(earlier["path"], storage=storage)
                    rows[folder] = {**out, "status": "unreadable", "reason": f"{folder} in {shard}: {error}"}
                else:
                    # Under the shard's own name: two shards may hold folders of the same name.
                    dest = st.join(item["dest"], posixpath.basename(shard), posixpath.splitext(folder)[0] + ".mp4")
                    rows[folder] = _frames_result(out, files, dest, options, storage=storage, threads=threads)
    except (st.StorageError, tarfile.TarError, OSError, EOFError) as err:
        return list(rows.values()), f"{shard} could not be read to its end ({type(err).__name__}: {err})"
    return list(rows.values()), ""


def _prepare_item_safely(item: dict[str, Any], options: PrepareOptions, *, storage: StorageConfig,
                         threads: int) -> dict[str, Any]:
    """`prepare_item`, but a surprise in one video becomes that row's reason, never a failed job."""
    try:
        return prepare_item(item, options, storage=storage, threads=threads)
    except Exception as err:  # noqa: BLE001
        text = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        return {**{k: mf.empty_row()[k] for k in RESULT_FIELDS}, "work_key": item["work_key"],
                "path": item["source_path"], "source_path": item["source_path"],
                "source_bytes": item["source_bytes"], "source_version": item["source_version"],
                "status": "unreadable", "reason": f"unexpected {type(err).__name__}: {text}", "cache": False}


def _results_table(results: list[dict[str, Any]]) -> pa.Table:
    return mf.to_table([{k: r[k] for k in RESULT_FIELDS} for r in results])


def prepare_batch(batch: pa.Table, *, options: PrepareOptions, storage: StorageConfig, parts_uri: str,
                  threads: int = 1) -> pa.Table:
    """Ray Data UDF: prepare a batch of work items, save the cacheable results as one part file (a tar
    shard's as its own file under `_shards/`, beside the parts)."""
    results = []
    for item in batch.to_pylist():
        if item["kind"] != "shard":
            results.append(_prepare_item_safely(item, options, storage=storage, threads=threads))
            continue
        try:
            rows, error = _prepare_shard(item, options, storage=storage, threads=threads)
        except Exception as err:  # noqa: BLE001 - the shard's rows are then missing, with the reason logged
            rows, error = [], f"{item['source_path']}: unexpected {type(err).__name__}: {str(err)[:200]}"
        if error:  # what could be read is used now, and redone next time
            print(f"prepare: {error}", file=sys.stderr, flush=True)
            rows = [{**r, "cache": False} for r in rows]
        else:
            uri = st.join(posixpath.dirname(parts_uri.rstrip("/")), SHARDS, f"{item['work_key']}.parquet")
            st.write_bytes(uri, mf.table_bytes(_results_table(rows)), storage=storage)
        results += [{**r, "cache": False} for r in rows]  # kept by the shard's own file, not the parts
    keep = [r for r in results if r["cache"]]
    if keep:
        name = hashlib.sha256("\n".join(sorted(r["work_key"] for r in keep)).encode()).hexdigest()[:24]
        st.write_bytes(st.join(parts_uri, f"part-{name}.parquet"), mf.table_bytes(_results_table(keep)),
                       storage=storage)
    return _results_table(results).append_column("cache", pa.array([r["cache"] for r in results], pa.bool_()))


# ---------------------------------------------------------------------------------------------
# The driver


def source_uri(videos: str, path: str) -> str:
    """The URI of an annotation's video: absolute URIs and paths as they are, else under `videos`."""
    if "://" in path or path.startswith("/"):
        return path
    return st.join(videos, posixpath.normpath(path))


def _dest_paths(rows_paths: list[str]) -> dict[str, str]:
    """Relative path of each source -> relative path of its prepared copy (`.mp4` suffix)."""
    wanted = {p: posixpath.splitext(p)[0] + ".mp4" for p in rows_paths}
    owners: dict[str, set[str]] = {}
    for src, dst in wanted.items():
        owners.setdefault(dst, set()).add(src)
    # Of sources that would share a name (a.webm, a.mp4) only a.mp4 keeps it; a.webm -> a.webm.mp4.
    return {src: (dst if len(owners[dst]) == 1 or src == dst else src + ".mp4") for src, dst in wanted.items()}


def _work_key(source: str, info: st.ObjectInfo, options: PrepareOptions, dest: str, kind: str = "video") -> str:
    opts = asdict(options)
    if kind == "video":  # frames_fps is not a video's option: keys from before it existed stay valid
        del opts["frames_fps"]
    payload = json.dumps([PREPARE_VERSION, source, info.size, info.version, opts, dest]
                         + ([] if kind == "video" else [kind]))
    return hashlib.sha256(payload.encode()).hexdigest()


def _folder_info(folder: str, files: list[st.ObjectInfo]) -> st.ObjectInfo:
    """A frame folder as one object: its images' total size, and a version that changes with any of them."""
    digest = hashlib.sha256(json.dumps(sorted((o.uri, o.size, o.version) for o in files)).encode()).hexdigest()
    return st.ObjectInfo(folder, sum(o.size for o in files), digest[:32])


def _read_tables(uris: list[str], storage: StorageConfig) -> list[pa.Table]:
    def read(uri: str) -> pa.Table | None:
        try:
            return mf.read_manifest(uri, storage=storage)
        except (st.StorageError, ValueError) as err:  # a damaged part is redone, not fatal
            print(f"prepare: ignoring {uri}: {err}", file=sys.stderr)
            return None

    with ThreadPoolExecutor(max_workers=16) as pool:
        return [t for t in pool.map(read, uris) if t is not None]


def _cached_results(output: str, storage: StorageConfig) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Earlier results by work key (previous manifest, then parts, newer winning) and the part URIs."""
    tables = []
    manifest_uri = st.join(output, mf.MANIFEST_NAME)
    if st.exists(manifest_uri, storage=storage):
        tables += _read_tables([manifest_uri], storage)
    parts = [o.uri for o in st.list_objects(st.join(output, PARTS), storage=storage, suffixes=(".parquet",))]
    tables += _read_tables(parts, storage)
    cached: dict[str, dict[str, Any]] = {}
    for table in tables:
        if "work_key" not in table.column_names:
            continue
        for row in mf.to_table(table).select(list(RESULT_FIELDS)).to_pylist():
            if row["work_key"] and row["status"] not in _NOT_CACHED:
                cached[row["work_key"]] = row
    return cached, parts


def _run_on_ray(todo: list[dict[str, Any]], *, options: PrepareOptions, storage: StorageConfig, parts_uri: str,
                batch_size: int, concurrency: int, num_cpus: float) -> list[dict[str, Any]]:
    import ray.data

    from pipeline.cluster.connect import init_ray

    started = init_ray()
    try:
        blocks = max(1, min(math.ceil(len(todo) / batch_size), 4096))
        ds = ray.data.from_items(todo, override_num_blocks=blocks)
        ds = ds.map_batches(prepare_batch, batch_size=batch_size, batch_format="pyarrow",
                            fn_kwargs={"options": options, "storage": storage, "parts_uri": parts_uri,
                                       "threads": max(1, int(num_cpus))},
                            compute=ray.data.TaskPoolStrategy(size=concurrency) if concurrency else None,
                            num_cpus=num_cpus)
        return ds.take_all()
    finally:
        if started:
            import ray

            ray.shutdown()


def _run_inline(todo: list[dict[str, Any]], *, options: PrepareOptions, storage: StorageConfig, parts_uri: str,
                batch_size: int, concurrency: int, num_cpus: float) -> list[dict[str, Any]]:
    del concurrency  # one item at a time
    from rich.console import Console
    from rich.progress import Progress

    done: list[dict[str, Any]] = []
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("prepare", total=len(todo))
        for i in range(0, len(todo), batch_size):
            batch = pa.Table.from_pylist(todo[i:i + batch_size])
            done += prepare_batch(batch, options=options, storage=storage, parts_uri=parts_uri,
                                  threads=max(1, int(num_cpus))).to_pylist()
            progress.advance(task, batch.num_rows)
    return done


def plan_work(ann: Annotations, videos: str, output: str, options: PrepareOptions, *,
              storage: StorageConfig) -> tuple[list[str | None], dict[str, dict[str, Any]]]:
    """The work key of each annotation row (None: bad or missing; `_PENDING`: to look up in the tar shards)
    and the distinct work items (videos, frame folders, and the shards when a row is pending)."""
    listing = st.list_objects(videos, storage=storage)
    listed = {o.uri: o for o in listing}
    folders = frame_folders(o.uri for o in listing)
    shards = [o for o in listing if is_tar(o.uri)]
    dests = _dest_paths(sorted({r.path for r in ann.rows if not r.error}))
    row_keys: list[str | None] = []
    items: dict[str, dict[str, Any]] = {}
    for row in ann.rows:
        info, kind = None, "video"
        if not row.error:
            src = source_uri(videos, row.path)
            info = listed.get(src) if not is_image(src) else None
            if info is None and src in folders:
                info, kind = _folder_info(src, [listed[u] for u in folders[src]]), "frames"
            if info is None and not src.startswith(videos):
                info = st.stat(src, storage=storage)
        if info is None:
            row_keys.append(_PENDING if shards and not row.error else None)
            continue
        dest = st.join(output, VIDEOS, dests[row.path]) if options.transcode or kind == "frames" else src
        key = _work_key(src, info, options, dest, kind)
        row_keys.append(key)
        items.setdefault(key, {"work_key": key, "kind": kind, "source_path": src, "dest": dest,
                               "source_bytes": info.size, "source_version": info.version})
    if _PENDING in row_keys:
        for shard in shards:
            dest = st.join(output, VIDEOS)
            key = _work_key(shard.uri, shard, options, dest, "shard")
            items[key] = {"work_key": key, "kind": "shard", "source_path": shard.uri, "dest": dest,
                          "source_bytes": shard.size, "source_version": shard.version}
    return row_keys, items


def reuse_results(items: dict[str, dict[str, Any]], output: str, *,
                  storage: StorageConfig) -> tuple[dict[str, dict[str, Any]], list[str], set[str]]:
    """Results of earlier runs still valid for `items` (prepared copy present), the old part URIs, and the
    keys of the shards whose every result is reused (their rows are in the results by member key)."""
    cached, old_parts = _cached_results(output, storage)
    copies = {o.uri: o.size for o in st.list_objects(st.join(output, VIDEOS), storage=storage)}
    valid = lambda hit: not hit["transcoded"] or copies.get(hit["path"]) == hit["bytes"]  # noqa: E731
    results, shards_done = {}, set()
    for key, item in items.items():
        if item["kind"] == "shard":
            uri = st.join(output, SHARDS, f"{key}.parquet")
            rows = _read_tables([uri], storage) if st.exists(uri, storage=storage) else []
            rows = mf.to_table(rows[0]).select(list(RESULT_FIELDS)).to_pylist() if rows else []
            if rows and all(valid(r) for r in rows):
                results.update({r["work_key"]: {**r, "cache": False} for r in rows})
                shards_done.add(key)
            continue
        hit = cached.get(key)
        if hit and valid(hit):
            results[key] = hit
    return results, old_parts, shards_done


def resolve_shard_rows(ann: Annotations, row_keys: list[str | None],
                       results: dict[str, dict[str, Any]]) -> list[str | None]:
    """`row_keys` with each pending row given the result of its frame folder in a shard: the folder whose
    path is the row's path, or ends in `/<path>` (None when there is none, or several)."""
    members: dict[str, list[str]] = {}
    for key, result in results.items():
        shard, sep, folder = result["source_path"].partition("#")
        if sep and is_tar(shard):
            for i in range(folder.count("/") + 1):  # "a/b/id" is found as "a/b/id", "b/id" and "id"
                members.setdefault(folder.split("/", i)[-1], []).append(key)
    resolved = []
    for row, key in zip(ann.rows, row_keys):
        found = members.get(posixpath.normpath(row.path), []) if key == _PENDING else []
        resolved.append(found[0] if len(found) == 1 else None if key == _PENDING else key)
    return resolved


def manifest_rows(ann: Annotations, videos: str, row_keys: list[str | None],
                  results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One manifest row per annotation row, in annotation order."""
    rows = []
    for index, (row, key) in enumerate(zip(ann.rows, row_keys)):
        base = {"index": index, "label": row.label, "label_name": row.label_name, "split": row.split,
                "annotation": row.where}
        src = source_uri(videos, row.path) if row.path else ""
        if row.error:
            rows.append({**base, "path": src, "source_path": src, "status": "bad_annotation", "reason": row.error})
        elif key is None:
            rows.append({**base, "path": src, "source_path": src, "status": "missing",
                         "reason": f"{src}: no such file or frame folder"})
        else:
            result = results[key]
            rows.append({**base, **{k: result[k] for k in RESULT_FIELDS},
                         # a result that must be redone next time carries no cache key
                         "work_key": result["work_key"] if result.get("cache", True) else ""})
    return rows


def prepare(annotations: str | list[str] | None, videos: str, output: str, *, format: str = "auto",
            labels_uri: str | None = None, split: str | None = None, layout: str = "flat",
            options: PrepareOptions = PrepareOptions(), storage: StorageConfig = StorageConfig(),
            batch_size: int = 8, concurrency: int = 0, num_cpus: float = 1.0, executor: str = "ray",
            val_fraction: float | None = None) -> dict[str, Any]:
    """Prepare a dataset; returns the summary (also written to `<output>/summary.json`).

    Without `annotations` the videos are a team's own, one folder per class (`pipeline.data.folders`):
    split as their folders say, else drawn with `val_fraction` (default 0.2) of each class in val.
    `executor="ray"` runs the work on Ray Data (`concurrency` tasks at most, 0 = as many as fit,
    each reserving `num_cpus`); `"inline"` runs it in this process (debugging, small sets).
    """
    t0 = time.perf_counter()
    if executor not in ("ray", "inline"):
        raise ValueError(f"executor={executor!r} is not one of 'ray', 'inline'")
    if annotations and val_fraction is not None:
        raise ValueError("val_fraction draws the split of class folders; annotation files name their own splits")
    videos, output = st.absolute(videos), st.absolute(output)  # manifest paths must hold on every worker
    if annotations:
        ann = load_annotations(annotations, format=format, labels_uri=labels_uri, split=split, layout=layout,
                               storage=storage)
        split_from = "annotations"
    else:
        from pipeline.data.folders import folder_annotations

        found = folder_annotations(videos, val_fraction=0.2 if val_fraction is None else val_fraction,
                                   labels=labels_uri, storage=storage)
        ann, split_from = found.annotations, found.split_from
        print(f"prepare: class folders under {videos}: {len(ann.labels)} classes, split from the "
              f"{'folders' if split_from == 'folders' else 'draw'}; {found.skipped} other files skipped",
              file=sys.stderr, flush=True)
    row_keys, items = plan_work(ann, videos, output, options, storage=storage)
    results, old_parts, shards_done = reuse_results(items, output, storage=storage)
    todo = [item for key, item in items.items() if key not in results and key not in shards_done]
    print(f"prepare: {len(ann.rows)} annotation rows, {len(items)} sources found (videos, frame folders, tar "
          f"shards), {len(items) - len(todo)} already prepared, {len(todo)} to do", file=sys.stderr, flush=True)

    parts_uri = st.join(output, PARTS)
    run = _run_on_ray if executor == "ray" else _run_inline
    done = run(todo, options=options, storage=storage, parts_uri=parts_uri, batch_size=batch_size,
               concurrency=concurrency, num_cpus=num_cpus) if todo else []
    fresh = {r["work_key"]: r for r in done}
    results.update(fresh)

    rows = manifest_rows(ann, videos, resolve_shard_rows(ann, row_keys, results), results)
    table = mf.to_table(rows)
    manifest_uri = mf.write_manifest(table, output, storage=storage)
    st.write_bytes(st.join(output, "labels.json"), labels_json(ann.labels).encode(), storage=storage)
    summary = {"job": "prepare", **mf.summarize(table), "labels": len(ann.labels), "splits_from": split_from,
               "output": output,
               "manifest": manifest_uri, "manifest_hash": mf.manifest_hash(table),
               "processed": len(todo), "transcoded": sum(1 for r in fresh.values() if r["transcoded"]),
               "reused": len(items) - len(todo)}
    # The manifest now holds every cached result: the parts are no longer needed.
    new_parts = [o.uri for o in st.list_objects(parts_uri, storage=storage, suffixes=(".parquet",))]
    st.remove_many(sorted(set(old_parts) | set(new_parts)), storage=storage)
    st.remove_empty_folder(parts_uri)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    st.write_bytes(st.join(output, "summary.json"), (json.dumps(summary, indent=1) + "\n").encode(),
                   storage=storage)
    return summary
