"""A team's own videos, one folder per class: the annotation rows `prepare` needs, read from the layout.

    DIR/<class>/<video>                          the split is drawn here (`val_fraction` of each class)
    DIR/train/<class>/<video>, DIR/val/<class>/<video> [, DIR/test/<class>/<video>]   split as laid out

A video is a file with a video suffix (`VIDEO_SUFFIXES`) or a folder of image frames
(`DIR/<class>/<video>/00001.jpg` ..., `pipeline.data.frames`); other files are not videos and are
counted, not listed. The class is the folder under DIR (under the split folder); deeper folders stay
part of the video's path. A video with no class folder above it (`DIR/clip.mp4`,
`DIR/train/clip.mp4`) becomes a `bad_annotation` row saying so: nothing is dropped silently.

The drawn split is deterministic and stratified: the videos of each class are ordered by a hash of
their path and the first `round(n x val_fraction)` go to `val`, so the same folder always gives the
same split, every class is split in the same proportion, and the order files were listed or written
in does not matter. Labels are the class names sorted, unless a labels file (or `k400`, ...) fixes them.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from pipeline.config import StorageConfig
from pipeline.data import storage as st
from pipeline.data.annotations import Annotations, AnnotationRow, labels_of, resolve_labels
from pipeline.data.frames import frame_folders, is_image

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".3gp")
SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val", "test": "test"}


class NoVideosError(ValueError):
    """The folder holds no video: the message names it and the layout expected."""


@dataclass(frozen=True)
class FolderLayout:
    annotations: Annotations
    split_from: str  # "folders" (DIR/train, DIR/val) or "drawn"
    skipped: int  # files that are neither videos nor frames


def _order_key(path: str) -> str:
    return hashlib.sha256(path.encode()).hexdigest()


def draw_split(paths_by_class: dict[str, list[str]], val_fraction: float) -> dict[str, str]:
    """path -> "train" | "val": per class, the `round(n x val_fraction)` paths first in hash order are val."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    split = {}
    for paths in paths_by_class.values():
        ordered = sorted(paths, key=_order_key)
        num_val = math.floor(len(ordered) * val_fraction + 0.5)
        split.update({p: "val" if i < num_val else "train" for i, p in enumerate(ordered)})
    return split


def folder_annotations(videos: str, *, val_fraction: float = 0.2, labels: str | None = None,
                       storage: StorageConfig = StorageConfig()) -> FolderLayout:
    """Annotation rows for every video under `videos`, in path order (see the module docstring)."""
    root = videos.rstrip("/")
    listing = [o.uri for o in st.list_objects(videos, storage=storage)]
    relative = [uri[len(root) + 1:] for uri in listing]
    found = sorted({p for p in relative if p.lower().endswith(VIDEO_SUFFIXES)} | set(frame_folders(relative)) - {""})
    skipped = sum(1 for p in relative if not p.lower().endswith(VIDEO_SUFFIXES) and not is_image(p))
    if not found:
        raise NoVideosError(f"{videos}: no videos ({', '.join(VIDEO_SUFFIXES)}) or frame folders found; expected "
                         "DIR/<class>/<video> or DIR/train/<class>/<video> and DIR/val/<class>/<video>")
    tops = {p.split("/")[0] for p in found if "/" in p}
    by_split = bool(tops) and tops <= set(SPLIT_FOLDERS)
    rows: list[AnnotationRow] = []
    by_class: dict[str, list[str]] = {}
    for path in found:
        parts = path.split("/")
        where = f"{videos} (class folders)"
        depth = 3 if by_split else 2
        if len(parts) < depth:
            hint = "DIR/<split>/<class>/<video>" if by_split else "DIR/<class>/<video>"
            rows.append(AnnotationRow(path, "", -1, SPLIT_FOLDERS.get(parts[0], "train") if by_split else "train",
                                      f"not inside a class folder ({hint})", where))
            continue
        label = parts[1] if by_split else parts[0]
        rows.append(AnnotationRow(path, label, -1, SPLIT_FOLDERS[parts[0]] if by_split else "", "", where))
        by_class.setdefault(label, []).append(path)
    if not by_split:
        drawn = draw_split(by_class, val_fraction)
        rows = [r if r.error else AnnotationRow(r.path, r.label_name, -1, drawn[r.path], "", r.where) for r in rows]
    fixed = labels_of(labels, storage=storage) if labels else None
    return FolderLayout(resolve_labels(rows, fixed), "folders" if by_split else "drawn", skipped)

