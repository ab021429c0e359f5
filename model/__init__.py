"""The network: UniFormer video classifiers, their named variants and checkpoint loading.

    from model import create_uniformer, load_pretrained
    net = create_uniformer("uniformer_s", num_classes=400, drop_path_rate=0.1)
    report = load_pretrained(net, "uniformer_small_k400_16x4.pth")
"""

from __future__ import annotations

from typing import Any

from model.checkpoint import LoadReport, inflate_2d_to_3d, load_pretrained, unwrap_state_dict
from model.uniformer import OVERRIDES, VARIANTS, UniFormer, fold_batchnorm, uniformer_b, uniformer_s, uniformer_xs

_BUILDERS = {"uniformer_xs": uniformer_xs, "uniformer_s": uniformer_s, "uniformer_b": uniformer_b}


def list_variants() -> list[str]:
    """Names `create_uniformer` accepts, smallest first."""
    return list(_BUILDERS)


def create_uniformer(name: str, num_classes: int = 400, **overrides: Any) -> UniFormer:
    """Build a named variant with freshly initialised weights.

    `overrides` replace architecture or runtime arguments of `UniFormer` (`drop_path_rate`,
    `attn_impl` "sdpa" | "math", `layout` "tokens" | "channels_first", `grad_checkpointing`,
    `depths`, `embed_dims`, `head_dim`, `mlp_ratio`, `qkv_bias`); anything else is a TypeError.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown UniFormer variant {name!r}; known variants: {', '.join(_BUILDERS)}")
    return _BUILDERS[name](num_classes, **overrides)


__all__ = [
    "OVERRIDES",
    "VARIANTS",
    "LoadReport",
    "UniFormer",
    "create_uniformer",
    "fold_batchnorm",
    "inflate_2d_to_3d",
    "list_variants",
    "load_pretrained",
    "unwrap_state_dict",
]
