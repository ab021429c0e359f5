"""Checkpoint handling for UniFormer: unwrap, inflate ImageNet 2D weights to 3D, load strictly.

Pure functions from state dict to state dict, plus `load_pretrained`, which puts them together
and says what it did in a `LoadReport`. Nothing passes silently: a key the model lacks, a key
the checkpoint lacks or a shape that differs is an error unless `strict=False`; the only
exception is the classifier head, which is dropped (and reported) when the class count differs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import IO, Any, Mapping, Union

import torch
import torch.nn as nn

StateDict = dict[str, torch.Tensor]
Source = Union[str, os.PathLike, IO[bytes], Mapping[str, Any]]

WRAPPER_KEYS: tuple[str, ...] = ("model_state", "model", "state_dict")
# DistributedDataParallel saves under "module.", a torch.compile'd module under "_orig_mod.".
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
HEAD_PREFIX = "head."


@dataclass(frozen=True)
class LoadReport:
    """What `load_pretrained` did, by state-dict key."""

    loaded: tuple[str, ...]  # model entries now holding checkpoint values (inflated ones included)
    inflated: tuple[str, ...]  # of those, 2D kernels repeated along time (ImageNet weights)
    skipped: tuple[str, ...]  # checkpoint entries not loaded (a head of another class count, ...)
    missing: tuple[str, ...]  # model entries left as they were (a new head, BN batch counters, ...)

    def __repr__(self) -> str:
        return (
            f"LoadReport(loaded={len(self.loaded)}, inflated={len(self.inflated)}, "
            f"skipped={_preview(self.skipped)}, missing={_preview(self.missing)})"
        )


def unwrap_state_dict(obj: Mapping[str, Any]) -> StateDict:
    """The bare state dict inside `obj`.

    Accepts a bare state dict or one wrapped as `{"model_state": ...}`, `{"model": ...}` or
    `{"state_dict": ...}` (other entries, e.g. optimizer state, are ignored), and strips a
    `module.` (DDP) or `_orig_mod.` (torch.compile) prefix carried by every key.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    for key in WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state = dict(obj)
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not state or not_tensors:
        raise ValueError(
            f"not a state dict: entries {_preview(not_tensors)} are not tensors; expected a bare state "
            f"dict or one wrapped under one of {WRAPPER_KEYS}"
        )
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


def inflate_2d_to_3d(state_dict_2d: Mapping[str, torch.Tensor], model_state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Inflate the 2D convolution kernels of an ImageNet UniFormer to the video model's 3D ones.

    Each (O, I, kh, kw) kernel whose model counterpart is (O, I, kt, kh, kw) is repeated kt
    times along time and divided by kt, so that on a clip of identical frames the 3D network
    computes what the 2D one computes on one frame: stem 4x4 -> 3x4x4, DPE 3x3 -> 3x3x3, local
    attention 5x5 -> 5x5x5, 1x1 -> 1x1x1, later patch embeds 2x2 -> 1x2x2. Every other entry is
    returned unchanged (`load_pretrained` judges whether it fits).
    """
    out: StateDict = {}
    for key, weight in state_dict_2d.items():
        ref = model_state_dict.get(key)
        if ref is not None and weight.ndim == 4 and ref.ndim == 5:
            if tuple(weight.shape) != tuple(ref.shape[:2]) + tuple(ref.shape[3:]):
                raise ValueError(
                    f"cannot inflate {key}: 2D kernel {tuple(weight.shape)} does not match the model's "
                    f"3D kernel {tuple(ref.shape)} without its time axis"
                )
            time = ref.shape[2]
            weight = weight.unsqueeze(2).repeat(1, 1, time, 1, 1) / time
        out[key] = weight
    return out


def load_pretrained(model: nn.Module, source: Source, *, strict: bool = True) -> LoadReport:
    """Load an official video checkpoint, an ImageNet 2D checkpoint or a training checkpoint.

    `source` is a path or file object (read with `torch.load(weights_only=True)` on the CPU)
    or an already loaded (possibly wrapped) state dict. The head is dropped when its class
    count differs from the model's. Any other missing or unexpected key, or shape mismatch,
    raises ValueError naming the first few; with `strict=False` they are skipped and reported.
    """
    if isinstance(source, Mapping):
        obj = source
    else:
        obj = torch.load(source, map_location="cpu", weights_only=True)
    checkpoint_2d_or_3d = unwrap_state_dict(obj)
    target = model.state_dict()
    state = inflate_2d_to_3d(checkpoint_2d_or_3d, target)
    inflated = [k for k in state if state[k].ndim != checkpoint_2d_or_3d[k].ndim]

    skipped = []
    for key in [k for k in state if k.startswith(HEAD_PREFIX)]:
        if key not in target or state[key].shape != target[key].shape:
            skipped.append(key)  # another class count, or a model without head
            del state[key]

    unexpected = [k for k in state if k not in target]
    mismatched = [k for k in state if k in target and state[k].shape != target[k].shape]
    missing = [k for k in target if k not in state]
    # BatchNorm batch counters are bookkeeping (torch's own loader tolerates their absence);
    # a head the checkpoint lacks stays freshly initialised.
    fatal_missing = [k for k in missing if not (k.startswith(HEAD_PREFIX) or k.endswith("num_batches_tracked"))]
    if strict and (unexpected or mismatched or fatal_missing):
        shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(target[k].shape)}" for k in mismatched]
        raise ValueError(
            f"checkpoint does not fit this {type(model).__name__}: {len(fatal_missing)} missing keys "
            f"{_preview(fatal_missing)}, {len(unexpected)} unexpected keys {_preview(unexpected)}, "
            f"{len(mismatched)} shape mismatches {_preview(shapes)}. Is it a checkpoint of another "
            f"variant or architecture? Pass strict=False to load only the entries that fit."
        )
    for key in unexpected + mismatched:
        skipped.append(key)
        del state[key]

    model.load_state_dict({**target, **state}, strict=True)
    return LoadReport(
        loaded=tuple(k for k in target if k in state),
        inflated=tuple(k for k in target if k in state and k in inflated),
        skipped=tuple(skipped),
        missing=tuple(k for k in target if k not in state),
    )


def _preview(keys: list[str] | tuple[str, ...], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}]"
