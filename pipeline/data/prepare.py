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
from pipeline.data.media import LimitExceeded, check_bytes, max_bytes
from pipeline.data.video import TranscodeError, probe_video, transcode_video

# Bump when probing or transcoding changes what it writes: every cached result is redone.
# 2: copies upright with square pixels and the colour description; sizes as shown. 3: allowed containers and
# data.limits (statuses unsupported, too_large).
PREPARE_VERSION = 3
PARTS = "_parts"
VIDEOS = "videos"
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


# ---------------------------------------------------------------------------------------------
# One work item: read, probe, transcode, upload (runs in Ray tasks; plain and testable alone)


def prepare_item(item: dict[str, Any], options: PrepareOptions, *, storage: StorageConfig = StorageConfig(),
                 threads: int = 1) -> dict[str, Any]:
    """The manifest fields of one source video (all of `RESULT_FIELDS`) plus `cache` (bool)."""
    source = item["source_path"]
    out: dict[str, Any] = {**{k: mf.empty_row()[k] for k in RESULT_FIELDS}, "work_key": item["work_key"],
                           "path": source, "source_path": source, "source_bytes": item["source_bytes"],
                           "source_version": item["source_version"], "cache": True}
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
    """Ray Data UDF: prepare a batch of work items, save the cacheable results as one part file."""
    results = [_prepare_item_safely(item, options, storage=storage, threads=threads) for item in batch.to_pylist()]
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


def _work_key(source: str, info: st.ObjectInfo, options: PrepareOptions, dest: str) -> str:
    payload = json.dumps([PREPARE_VERSION, source, info.size, info.version, asdict(options), dest])
    return hashlib.sha256(payload.encode()).hexdigest()


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
    """The work key of each annotation row (None: bad or missing) and the distinct work items."""
    listed = {o.uri: o for o in st.list_objects(videos, storage=storage)}
    dests = _dest_paths(sorted({r.path for r in ann.rows if not r.error}))
    row_keys: list[str | None] = []
    items: dict[str, dict[str, Any]] = {}
    for row in ann.rows:
        info = None
        if not row.error:
            src = source_uri(videos, row.path)
            info = listed.get(src) or (st.stat(src, storage=storage) if not src.startswith(videos) else None)
        if info is None:
            row_keys.append(None)
            continue
        dest = st.join(output, VIDEOS, dests[row.path]) if options.transcode else src
        key = _work_key(src, info, options, dest)
        row_keys.append(key)
        items.setdefault(key, {"work_key": key, "source_path": src, "dest": dest, "source_bytes": info.size,
                               "source_version": info.version})
    return row_keys, items


def reuse_results(items: dict[str, dict[str, Any]], output: str, *,
                  storage: StorageConfig) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Results of earlier runs still valid for `items` (prepared copy present) and the old part URIs."""
    cached, old_parts = _cached_results(output, storage)
    copies = {o.uri: o.size for o in st.list_objects(st.join(output, VIDEOS), storage=storage)}
    results = {}
    for key in items:
        hit = cached.get(key)
        if hit and (not hit["transcoded"] or copies.get(hit["path"]) == hit["bytes"]):
            results[key] = hit
    return results, old_parts


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
                         "reason": f"{src}: no such file"})
        else:
            result = results[key]
            rows.append({**base, **{k: result[k] for k in RESULT_FIELDS},
                         # a result that must be redone next time carries no cache key
                         "work_key": result["work_key"] if result.get("cache", True) else ""})
    return rows


def prepare(annotations: str | list[str], videos: str, output: str, *, format: str = "auto",
            labels_uri: str | None = None, split: str | None = None, layout: str = "flat",
            options: PrepareOptions = PrepareOptions(), storage: StorageConfig = StorageConfig(),
            batch_size: int = 8, concurrency: int = 0, num_cpus: float = 1.0, executor: str = "ray") -> dict[str, Any]:
    """Prepare a dataset; returns the summary (also written to `<output>/summary.json`).

    `executor="ray"` runs the work on Ray Data (`concurrency` tasks at most, 0 = as many as fit,
    each reserving `num_cpus`); `"inline"` runs it in this process (debugging, small sets).
    """
    t0 = time.perf_counter()
    if executor not in ("ray", "inline"):
        raise ValueError(f"executor={executor!r} is not one of 'ray', 'inline'")
    videos, output = st.absolute(videos), st.absolute(output)  # manifest paths must hold on every worker
    ann = load_annotations(annotations, format=format, labels_uri=labels_uri, split=split, layout=layout,
                           storage=storage)
    row_keys, items = plan_work(ann, videos, output, options, storage=storage)
    results, old_parts = reuse_results(items, output, storage=storage)
    todo = [item for key, item in items.items() if key not in results]
    print(f"prepare: {len(ann.rows)} annotation rows, {len(items)} videos found, {len(results)} already "
          f"prepared, {len(todo)} to do", file=sys.stderr, flush=True)

    parts_uri = st.join(output, PARTS)
    run = _run_on_ray if executor == "ray" else _run_inline
    done = run(todo, options=options, storage=storage, parts_uri=parts_uri, batch_size=batch_size,
               concurrency=concurrency, num_cpus=num_cpus) if todo else []
    fresh = {r["work_key"]: r for r in done}
    results.update(fresh)

    rows = manifest_rows(ann, videos, row_keys, results)
    table = mf.to_table(rows)
    manifest_uri = mf.write_manifest(table, output, storage=storage)
    st.write_bytes(st.join(output, "labels.json"), labels_json(ann.labels).encode(), storage=storage)
    summary = {"job": "prepare", **mf.summarize(table), "labels": len(ann.labels), "output": output,
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
