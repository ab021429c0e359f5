"""The manifest: one row per annotation row, written by `prepare`, read by training.

`path` is what training decodes (the prepared copy when transcoded, else the original);
`frame_stride` says how many frames of the original one frame of `path` stands for, so a
16x4 clip on a copy with `frame_stride=4` is 16 consecutive frames of the copy. Rows whose
`status` is not `ok` carry a one-line `reason` and stay in the manifest: nothing is dropped.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import StorageConfig
from pipeline.data import storage as st

MANIFEST_NAME = "manifest.parquet"

# ok first; then the reasons a row cannot be used, roughly in the order they are checked.
STATUSES = ("ok", "bad_annotation", "missing", "empty", "unreadable", "unsupported", "too_large",
            "no_video_stream", "too_small", "too_short", "transcode_failed")

SCHEMA = pa.schema([
    ("index", pa.int64()),            # position among the annotation rows (the manifest's order)
    ("path", pa.string()),            # URI training decodes
    ("source_path", pa.string()),     # URI of the original video
    ("label", pa.int64()),            # -1 when unknown
    ("label_name", pa.string()),
    ("split", pa.string()),
    ("status", pa.string()),
    ("reason", pa.string()),          # "" when ok
    ("num_frames", pa.int64()),       # of `path`
    ("fps", pa.float64()),            # of `path`
    ("width", pa.int64()),            # of `path`
    ("height", pa.int64()),           # of `path`
    ("bytes", pa.int64()),            # of `path`
    ("duration_s", pa.float64()),
    ("codec", pa.string()),           # of `path`
    ("keyframe_interval", pa.int64()),  # largest keyframe gap of `path`, in its frames
    ("frame_stride", pa.int64()),     # frames of the original per frame of `path`
    ("transcoded", pa.bool_()),       # `path` is a prepared copy
    ("source_bytes", pa.int64()),
    ("source_version", pa.string()),  # ETag or mtime: a changed source is prepared again
    ("source_num_frames", pa.int64()),
    ("source_fps", pa.float64()),
    ("source_width", pa.int64()),
    ("source_height", pa.int64()),
    ("source_codec", pa.string()),
    ("source_pix_fmt", pa.string()),
    ("annotation", pa.string()),      # where the row came from: file:line
    ("work_key", pa.string()),        # hash of source + options (prepare's cache key)
])

REQUIRED = ("path", "label", "label_name", "split", "status", "reason", "num_frames", "fps", "width",
            "height", "bytes")

_DEFAULTS: dict[str, Any] = {f.name: ("" if pa.types.is_string(f.type) else False if pa.types.is_boolean(f.type)
                                      else 0.0 if pa.types.is_floating(f.type) else 0) for f in SCHEMA}
_DEFAULTS["label"] = -1
_DEFAULTS["frame_stride"] = 1


def empty_row() -> dict[str, Any]:
    return dict(_DEFAULTS)


def to_table(table_or_rows: pa.Table | Iterable[dict[str, Any]]) -> pa.Table:
    """A table in `SCHEMA`; rows may leave columns out (defaults: "", 0, -1 for `label`)."""
    if isinstance(table_or_rows, pa.Table):
        missing = [n for n in SCHEMA.names if n not in table_or_rows.column_names]
        table = table_or_rows
        for name in missing:
            table = table.append_column(name, pa.array([_DEFAULTS[name]] * len(table), SCHEMA.field(name).type))
        return table.select(SCHEMA.names).cast(SCHEMA)
    rows = []
    for row in table_or_rows:
        unknown = set(row) - set(SCHEMA.names)
        if unknown:
            raise ValueError(f"unknown manifest column(s) {sorted(unknown)}; columns: {', '.join(SCHEMA.names)}")
        rows.append({**_DEFAULTS, **{k: v for k, v in row.items() if v is not None}})
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _manifest_uri(uri: str) -> str:
    return uri if uri.endswith(".parquet") else st.join(uri, MANIFEST_NAME)


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_manifest(table_or_rows: pa.Table | Iterable[dict[str, Any]], uri: str, *,
                   storage: StorageConfig = StorageConfig()) -> str:
    """Write to `uri` (an output folder, or a `.parquet` file URI); returns the file's URI."""
    table = to_table(table_or_rows)
    bad = sorted(set(table.column("status").to_pylist()) - set(STATUSES))
    if bad:
        raise ValueError(f"unknown status {bad[0]!r}; statuses: {', '.join(STATUSES)}")
    target = _manifest_uri(uri)
    st.write_bytes(target, table_bytes(table), storage=storage)
    return target


def read_manifest(uri: str, *, storage: StorageConfig = StorageConfig()) -> pa.Table:
    """Read `<uri>/manifest.parquet` (or `uri` itself when it names a .parquet file)."""
    target = _manifest_uri(uri)
    try:
        table = pq.read_table(io.BytesIO(st.read_bytes(target, storage=storage)))
    except st.StorageError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged file gets one line naming it
        raise st.StorageError(f"{target}: not a readable parquet manifest ({type(err).__name__})") from None
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise ValueError(f"{target}: not a manifest, missing column(s) {', '.join(missing)}; "
                         "write it with `uniformer prepare`")
    return table


def manifest_hash(table: pa.Table) -> str:
    """A stable content hash (hex sha256) of the rows in order, whatever the parquet encoding."""
    digest = hashlib.sha256()
    for name in sorted(table.column_names):
        digest.update(name.encode() + b"\0")
        digest.update(json.dumps(table.column(name).to_pylist(), default=str).encode() + b"\0")
    return digest.hexdigest()


def summarize(table: pa.Table) -> dict[str, Any]:
    """Counts: `rows`, `status` (per status), `split` (rows per split), `ok` (usable rows per split)."""
    status = table.column("status").to_pylist()
    split = table.column("split").to_pylist()
    return {"rows": table.num_rows,
            "status": dict(sorted(Counter(status).items(), key=lambda kv: STATUSES.index(kv[0])
                                  if kv[0] in STATUSES else len(STATUSES))),
            "split": dict(sorted(Counter(split).items())),
            "ok": dict(sorted(Counter(sp for sp, s in zip(split, status) if s == "ok").items()))}
