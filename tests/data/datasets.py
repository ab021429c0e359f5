"""Small datasets in the layouts users bring, written from the synthetic motion videos: Something-Something
V1 as distributed (JPEG frame folders, `id;label` CSVs, a labels file) and a team's class folders."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.official import class_list
from pipeline.data.synth import MOTIONS, encode_h264, render_video

SSV1_FRAMES = "20bn-something-something-v1"


def write_frames(folder: Path, frames: np.ndarray, *, quality: int = 90, start: int = 1) -> Path:
    """JPEG frames `00001.jpg` ... of uint8 RGB (T, H, W, 3), as Something-Something V1 ships them."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{start + i:05d}.jpg", quality=quality)
    return folder


def ssv1_dataset(root: Path, *, videos_per_class: int = 3, classes: int = 2, num_frames: int = 20, height: int = 100,
                 width: int = 132) -> dict:
    """`root/20bn-something-something-v1/<id>/00001.jpg ...`, `something-something-v1-{train,validation}.csv`
    (`id;label`, the last video of each class in validation) and `something-something-v1-labels.csv` (the 174
    names, one a line, in the official checkpoints' order). Class c is the SSv1 class `names[c]` and shows
    motion c of the synthetic set."""
    names = class_list("ssv1")
    lines: dict[str, list[str]] = {"train": [], "validation": []}
    ids = []
    for c in range(classes):
        for k in range(videos_per_class):
            video = render_video(np.random.default_rng([c, k]), MOTIONS[c], num_frames=num_frames, height=height,
                                 width=width)
            vid = str(100 * (c + 1) + k)
            write_frames(root / SSV1_FRAMES / vid, video)
            lines["validation" if k == videos_per_class - 1 else "train"].append(f"{vid};{names[c]}")
            ids.append(vid)
    for split, rows in lines.items():
        (root / f"something-something-v1-{split}.csv").write_text("\n".join(rows) + "\n")
    (root / "something-something-v1-labels.csv").write_text("\n".join(names) + "\n")
    return {"frames": root / SSV1_FRAMES, "annotations": [root / f"something-something-v1-{s}.csv" for s in lines],
            "labels": root / "something-something-v1-labels.csv", "ids": ids, "classes": names[:classes]}


def tar_shards(frames: Path, shards: Path, ids: list[str], per_shard: int, *, prefix: str = "") -> list[Path]:
    """Tar shards of the frame folders `ids`, `per_shard` folders each (every other one gzipped), the
    members named `<prefix><id>/00001.jpg`."""
    shards.mkdir(parents=True, exist_ok=True)
    out = []
    for n, start in enumerate(range(0, len(ids), per_shard)):
        path = shards / f"part-{n:03d}.{'tar' if n % 2 == 0 else 'tar.gz'}"
        with tarfile.open(path, "w" if n % 2 == 0 else "w:gz") as tar:
            for vid in ids[start:start + per_shard]:
                tar.add(frames / vid, arcname=f"{prefix}{vid}")
        out.append(path)
    return out


CLASSES = ("left", "right", "up")


def class_folders(root: Path, *, videos_per_class: int = 5, split_folders: bool = False, num_frames: int = 24,
                  size: int = 64) -> Path:
    """A team's videos: `root/<class>/<class>_<k>.mp4` (or `root/{train,val}/<class>/...`, the last video of
    each class in val), class c showing the synthetic motion of the same name; returns `root`."""
    by_name = {m.name: m for m in MOTIONS}
    for c, name in enumerate(CLASSES):
        for k in range(videos_per_class):
            video = render_video(np.random.default_rng([7, c, k]), by_name[name], num_frames=num_frames, height=size,
                                 width=size)
            split = ("val" if k == videos_per_class - 1 else "train") + "/" if split_folders else ""
            path = root / f"{split}{name}" / f"{name}_{k}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_h264(video))
    return root
