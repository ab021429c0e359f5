"""The datasets UniFormer was published on, and what an official checkpoint says about itself.

Class lists (`class_list`), shipped in `class_lists/` (sources and evidence in its README.md), in the
class-index order the official checkpoints were trained with, which the official repository's data
lists fix: Kinetics-400 and -600 in its own orders (not sorted: a sorted list gives near-zero top-1),
Something-Something V1 sorted, V2 in the order of `something-something-v2-labels.json`.

Which dataset a checkpoint was trained on (`checkpoint_dataset`): a setting wins (`model.init_dataset`
for a training's start, `uniformer evaluate --dataset`); otherwise the file name, as the official
files are named (`uniformer_small_k400_16x4.pth`, `uniformer_base_k600_32x4.pth`,
`uniformer_small_sthv2_16_prek400.pth`: the token after `pre` is where it started from, not what it
was trained on; `in1k` is ImageNet-1k); otherwise the head's class count (400 Kinetics-400, 600
Kinetics-600, 1000 ImageNet-1k). 174 classes are SSv1 or SSv2, which only a name or the setting tells
apart. A name and a head that disagree are an error.

A label list checked against a dataset's (`label_order`) is the same list, the same names in another
order (the head's rows are then reordered to match, `reorder_head`), or an error naming the first
index where they differ.

The test protocol (`official_preprocess`) and published top-1 (`published_top1`) are those of the official
README (github.com/Sense-X/UniFormer, video_classification/README.md, its Model Zoo and Testing sections):
Kinetics 4 clips x 1 crop, Something-Something 1 clip x 3 crops, short side 224, 224 crops.
"""

from __future__ import annotations

import functools
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

CLASS_LISTS = Path(__file__).resolve().parent / "class_lists"
NOT_OFFICIAL = "none"  # a checkpoint of no official dataset (own training, own classes): nothing to check
IMAGENET = "imagenet"  # the 2D ImageNet-1k weights: their head is never kept


@dataclass(frozen=True)
class OfficialDataset:
    key: str
    title: str
    num_classes: int
    name_tokens: tuple[str, ...]  # how checkpoint file names spell it
    sampling: Literal["dense", "uniform"]
    test_clips: int
    test_crops: int


DATASETS = {d.key: d for d in (
    OfficialDataset("k400", "Kinetics-400", 400, ("k400", "kinetics400"), "dense", 4, 1),
    OfficialDataset("k600", "Kinetics-600", 600, ("k600", "kinetics600"), "dense", 4, 1),
    OfficialDataset("ssv1", "Something-Something V1", 174, ("sthv1", "ssv1"), "uniform", 1, 3),
    OfficialDataset("ssv2", "Something-Something V2", 174, ("sthv2", "ssv2"), "uniform", 1, 3),
)}
CHOICES = (*DATASETS, IMAGENET, NOT_OFFICIAL)
_BY_CLASSES = {400: "k400", 600: "k600", 1000: IMAGENET}

# Top-1 (%) of the official README's Model Zoo, by (dataset, variant, frames, sampling stride for
# Kinetics | pretraining for Something-Something). K600 B32x4: the released multi-node run (the
# paper's single-node run reached 84.8).
PUBLISHED: dict[tuple[str, str, int, str], float] = {
    ("k400", "uniformer_s", 8, "x8"): 78.4, ("k400", "uniformer_s", 16, "x4"): 80.8,
    ("k400", "uniformer_s", 16, "x8"): 80.8, ("k400", "uniformer_s", 32, "x4"): 82.0,
    ("k400", "uniformer_b", 8, "x8"): 79.8, ("k400", "uniformer_b", 16, "x4"): 82.0,
    ("k400", "uniformer_b", 16, "x8"): 81.7, ("k400", "uniformer_b", 32, "x4"): 82.9,
    ("k600", "uniformer_s", 16, "x4"): 82.8, ("k600", "uniformer_s", 16, "x8"): 82.7,
    ("k600", "uniformer_b", 16, "x4"): 84.0, ("k600", "uniformer_b", 16, "x8"): 83.4,
    ("k600", "uniformer_b", 32, "x4"): 84.5,
    ("ssv1", "uniformer_s", 16, "k400"): 57.2, ("ssv1", "uniformer_s", 16, "k600"): 57.6,
    ("ssv1", "uniformer_s", 32, "k400"): 58.8, ("ssv1", "uniformer_s", 32, "k600"): 59.9,
    ("ssv1", "uniformer_b", 16, "k400"): 59.1, ("ssv1", "uniformer_b", 16, "k600"): 58.8,
    ("ssv1", "uniformer_b", 32, "k400"): 60.9, ("ssv1", "uniformer_b", 32, "k600"): 61.0,
    ("ssv2", "uniformer_s", 16, "k400"): 67.7, ("ssv2", "uniformer_s", 16, "k600"): 69.4,
    ("ssv2", "uniformer_s", 32, "k400"): 69.0, ("ssv2", "uniformer_s", 32, "k600"): 70.4,
    ("ssv2", "uniformer_b", 16, "k400"): 70.4, ("ssv2", "uniformer_b", 16, "k600"): 70.2,
    ("ssv2", "uniformer_b", 32, "k400"): 71.1, ("ssv2", "uniformer_b", 32, "k600"): 71.2,
}
_VARIANT_WORDS = {"small": "uniformer_s", "base": "uniformer_b"}


class LabelMapError(ValueError):
    """A label list that is not the one a checkpoint was trained on; the message names the first
    index where they differ and the fix."""


@functools.cache
def _read_list(key: str) -> tuple[str, ...]:
    return tuple(line for line in (CLASS_LISTS / f"{key}.txt").read_text().splitlines() if line)


def class_list(key: str) -> list[str]:
    """The class names of an official dataset in the official checkpoints' index order."""
    if key not in DATASETS:
        raise ValueError(f"{key!r} is not an official dataset; official: {', '.join(DATASETS)}")
    return list(_read_list(key))


def class_list_file(key: str) -> Path:
    """The shipped file of `class_list(key)` (one name per line), e.g. for `prepare --labels`."""
    class_list(key)
    return CLASS_LISTS / f"{key}.txt"


# ---------------------------------------------------------------------------------------------
# What a checkpoint was trained on


@dataclass(frozen=True)
class CheckpointName:
    """What an official checkpoint's file name says; None where it says nothing."""

    dataset: str | None  # a DATASETS key, IMAGENET, or None
    variant: str | None  # uniformer_s | uniformer_b
    num_frames: int | None
    sampling_rate: int | None  # Kinetics names: 16x4 -> 4
    pretrained: str | None  # Something-Something names: prek400 -> k400


def parse_checkpoint_name(uri: str) -> CheckpointName:
    name = posixpath.basename(uri.rstrip("/")).lower()
    words = [w for w in re.split(r"[^a-z0-9]+", posixpath.splitext(name)[0]) if w]
    dataset = pretrained = None
    for word in words:
        started_from = word.startswith("pre")
        token = word[3:] if started_from else word
        found = IMAGENET if token in ("in1k", "imagenet") else next(
            (d.key for d in DATASETS.values() if token in d.name_tokens), None)
        if found and started_from:
            pretrained = found
        elif found and dataset is None:
            dataset = found
    variant = next((_VARIANT_WORDS[w] for w in words if w in _VARIANT_WORDS), None)
    frames = rate = None
    for word in words:
        match = re.fullmatch(r"(\d+)x(\d+)", word)
        if match:
            frames, rate = int(match[1]), int(match[2])
    if frames is None and dataset in ("ssv1", "ssv2"):  # uniformer_small_sthv2_16_prek400
        numbers = [int(w) for w in words if w.isdigit()]
        frames = numbers[0] if numbers else None
    return CheckpointName(dataset, variant, frames, rate, pretrained)


def checkpoint_dataset(uri: str, head_classes: int | None, declared: str = "", *,
                       setting: str = "model.init_dataset") -> str:
    """Which dataset the checkpoint at `uri` with a head of `head_classes` (None: no head) was trained
    on: a DATASETS key, IMAGENET, or NOT_OFFICIAL. `declared` (the value of `setting`) wins; see the
    module docstring for the rest."""
    if declared:
        if declared not in CHOICES:
            raise LabelMapError(f"{setting}={declared!r} is not one of {', '.join(CHOICES)}")
        if declared in DATASETS and head_classes not in (None, DATASETS[declared].num_classes):
            raise LabelMapError(f"{setting}={declared} has {DATASETS[declared].num_classes} classes but the "
                                f"checkpoint {uri} has a head of {head_classes}")
        return declared
    named = parse_checkpoint_name(uri).dataset
    expected = DATASETS[named].num_classes if named in DATASETS else 1000 if named == IMAGENET else None
    if named and head_classes not in (None, expected):
        raise LabelMapError(f"the name of {uri} says {named} ({expected} classes) but its head has {head_classes} "
                            f"classes; set {setting} to what it was trained on ({', '.join(CHOICES)})")
    if named:
        return named
    if head_classes in _BY_CLASSES:
        return _BY_CLASSES[head_classes]
    if head_classes == 174:
        raise LabelMapError(f"{uri} has a head of 174 classes, Something-Something V1 or V2, and its name does not "
                            f"say which: set {setting}=ssv1 or {setting}=ssv2 ({NOT_OFFICIAL}: own classes)")
    return NOT_OFFICIAL


# ---------------------------------------------------------------------------------------------
# Label lists against a checkpoint's


def label_order(labels: list[str], dataset: str, *, what: str = "the data",
                fix: str = "or train a new head for these classes (model.new_head=true)") -> list[int] | None:
    """None when `labels` is the class list of `dataset`; when it holds the same names in another order,
    for each index j of `labels` the index of that name in the dataset's list (the rows a head trained on
    the dataset must take to answer in `labels`' order); else LabelMapError naming the first difference."""
    official = class_list(dataset)
    if list(labels) == official:
        return None
    title = DATASETS[dataset].title
    if len(labels) == len(official) and set(labels) == set(official):
        where = {name: i for i, name in enumerate(official)}
        return [where[name] for name in labels]
    first = next((i for i, (a, b) in enumerate(zip(labels, official)) if a != b), min(len(labels), len(official)))
    ours = repr(labels[first]) if first < len(labels) else "nothing (the list ends)"
    theirs = repr(official[first]) if first < len(official) else "nothing (its list ends)"
    unknown = [name for name in labels if name not in set(official)]
    extra = f"; {len(unknown)} of its names are not {title} classes, e.g. {unknown[0]!r}" if unknown else ""
    raise LabelMapError(
        f"{what} has {len(labels)} labels, the {title} checkpoint {len(official)}; they differ first at index "
        f"{first}: {ours} where {title} has {theirs}{extra}. Prepare the data with `--labels {dataset}` (the "
        f"official list){', ' + fix if fix else ''}")


def reorder_head(state: dict, order: list[int]) -> dict:
    """`state` with the classifier's rows taken in `order` (see `label_order`): row j of the result is
    row order[j] of the checkpoint's head."""
    import torch

    index = torch.as_tensor(order, dtype=torch.long)
    return {k: (v.index_select(0, index) if k in ("head.weight", "head.bias") else v) for k, v in state.items()}


def head_classes(state: dict) -> int | None:
    """The class count of a state dict's classifier (None: it has none)."""
    weight = state.get("head.weight")
    return int(weight.shape[0]) if weight is not None else None


# ---------------------------------------------------------------------------------------------
# The official test protocol and published figures


def published_top1(dataset: str, variant: str, num_frames: int, *, sampling_rate: int | None = None,
                   pretrained: str | None = None) -> float | None:
    """The official README's top-1 (%) for this model, or None when it lists none."""
    detail = f"x{sampling_rate or 4}" if dataset in ("k400", "k600") else (pretrained or "k400")
    return PUBLISHED.get((dataset, variant, num_frames, detail))


def official_preprocess(dataset: str, *, variant: str, num_frames: int, sampling_rate: int) -> dict:
    """The test-time input of an official checkpoint (the keys of `serving.preprocess_config`)."""
    d = DATASETS[dataset]
    return {"variant": variant, "num_classes": d.num_classes, "sampling": d.sampling, "num_frames": num_frames,
            "sampling_rate": sampling_rate, "short_side": 224, "crop_size": 224, "mean": [0.45] * 3,
            "std": [0.225] * 3, "test_clips": d.test_clips, "test_crops": d.test_crops}
