"""The prediction table: one row per video of a split (or of a whole manifest), unusable videos included.

Every evaluation keeps it as `predictions.parquet` in its MLflow run; promotion pairs two of them
video by video; `uniformer predict --manifest` writes one. The table says what it was measured on in
its schema metadata (`manifest_hash`, `split`, `test_clips`, `test_crops`; `split` empty: every
split): two tables are only comparable when all four agree.

`video_id` is the row's position in the manifest, so on one manifest hash it names the same video
in every table. A video that could not be scored has `status` other than `ok` (the manifest's own
status, or `undecodable` when no view decoded), a `reason`, and nulls for what was not measured.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ARTIFACT = "predictions.parquet"
TOP_K = 5

SCHEMA = pa.schema([
    ("video_id", pa.int64()),          # row of the manifest
    ("path", pa.string()),
    ("label", pa.int64()),
    ("label_name", pa.string()),
    ("prediction", pa.int64()),        # top-1 class; null when unusable
    ("correct", pa.bool_()),           # top-1 == label; null when unusable
    ("top5_correct", pa.bool_()),      # label among the top min(5, classes); null when unusable
    ("views", pa.int64()),             # views that decoded and were scored (0 when unusable)
    ("top_labels", pa.list_(pa.string())),   # the top-k classes, best first (k: 5 when evaluating)
    ("top_scores", pa.list_(pa.float64())),  # mean softmax over the views, same order as top_labels
    ("status", pa.string()),           # ok | the manifest's status | undecodable
    ("reason", pa.string()),           # "" when ok
])


@dataclass(frozen=True)
class EvidenceKey:
    """What a prediction table was measured on; tables compare only under one key."""

    manifest_hash: str
    split: str | None  # None: every split of the manifest
    test_clips: int
    test_crops: int

    @property
    def views(self) -> str:
        return f"{self.test_clips}x{self.test_crops}"

    def __str__(self) -> str:
        split = "every split" if self.split is None else f"split {self.split!r}"
        return f"manifest {self.manifest_hash[:12]}, {split}, {self.views} views"


def prediction_table(manifest: pa.Table, videos: dict[int, dict], *, key: EvidenceKey, labels: Sequence[str],
                     top_k: int = TOP_K) -> pa.Table:
    """The table of `key.split` (of every row when it is None): `videos` is
    `pipeline.tracking.inference.score_videos`'s result (summed scores and views per manifest row); rows
    missing from it are unusable. `top_labels` and `top_scores` hold the `top_k` best classes."""
    k = min(top_k, len(labels))
    rows: list[dict[str, Any]] = []
    for i, (path, label, name, split, status, reason) in enumerate(zip(*(
            manifest.column(c).to_pylist() for c in ("path", "label", "label_name", "split", "status", "reason")))):
        if key.split is not None and split != key.split:
            continue
        row = {"video_id": i, "path": path, "label": label, "label_name": name, "prediction": None, "correct": None,
               "top5_correct": None, "views": 0, "top_labels": [], "top_scores": [], "status": status,
               "reason": reason or ""}
        entry = videos.get(i)
        if entry is not None:
            scores = entry["scores"] / entry["views"]
            order = np.argsort(-scores, kind="stable")
            row.update(prediction=int(order[0]), correct=bool(order[0] == label),
                       top5_correct=bool(label in order[:5].tolist()), views=entry["views"],
                       top_labels=[labels[j] for j in order[:k]],
                       top_scores=[round(float(scores[j]), 6) for j in order[:k]], status="ok", reason="")
        elif status == "ok":
            row.update(status="undecodable", reason="no view could be decoded")
        rows.append(row)
    return with_key(pa.Table.from_pylist(rows, schema=SCHEMA), key)


def with_key(table: pa.Table, key: EvidenceKey) -> pa.Table:
    return table.replace_schema_metadata({"manifest_hash": key.manifest_hash, "split": key.split or "",
                                          "test_clips": str(key.test_clips), "test_crops": str(key.test_crops)})


def key_of(table: pa.Table) -> EvidenceKey:
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    try:
        return EvidenceKey(meta["manifest_hash"], meta["split"] or None, int(meta["test_clips"]),
                           int(meta["test_crops"]))
    except KeyError as err:
        raise ValueError(f"a prediction table without its key ({err.args[0]} missing from the schema metadata); "
                         "evaluate again with `uniformer evaluate`") from None


def to_parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def read(path_or_bytes) -> pa.Table:
    source = pa.BufferReader(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    return pq.read_table(source)
