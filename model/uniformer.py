"""UniFormer video backbone and classifier.

Paper: Kunchang Li, Yali Wang, Peng Gao, Guanglu Song, Yu Liu, Hongsheng Li, Yu Qiao,
"UniFormer: Unified Transformer for Efficient Spatiotemporal Representation Learning",
ICLR 2022 (arXiv:2201.04676).

Weights: the state dict has exactly the keys and shapes of the officially released video
checkpoints (Sense-X/UniFormer, Kinetics-400/600 and Something-Something V1/V2), so they load
with `load_state_dict(..., strict=True)` and give the official logits. ImageNet-1k 2D
checkpoints load through `model.checkpoint.load_pretrained`, which inflates them to 3D.

Layout: four stages. Stages 1-2 use local multi-head relation aggregation (MHRA, a depthwise
5x5x5 convolution between two 1x1x1 convolutions: `CBlock`); stages 3-4 use global MHRA
(self-attention over all T*H*W tokens: `SABlock`). Every block starts with a dynamic position
embedding (DPE, a depthwise 3x3x3 convolution). The stem is the only temporal downsampling
(stride 2); spatial stride is 4, then 2 per stage, 32 in all.

Pure PyTorch + einops: nothing here knows about Ray, MLflow, configs or optimizers.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from model.dwconv3d import DepthwiseConv3d

AttnImpl = Literal["sdpa", "math"]
ATTN_IMPLS: tuple[str, ...] = ("sdpa", "math")


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample with probability `p`."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


class ConvMlp(nn.Module):
    """Channel MLP on (B, C, T, H, W) maps, as 1x1x1 convolutions (stages 1-2)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Conv3d(dim, hidden_dim, kernel_size=1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv3d(hidden_dim, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Mlp(nn.Module):
    """Channel MLP on (B, N, C) tokens (stages 3-4)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention over (B, N, C) tokens, scale head_dim ** -0.5.

    `attn_impl="sdpa"` calls `F.scaled_dot_product_attention` (flash / memory-efficient
    kernels where the device has them); `"math"` spells out softmax(q k^T * scale) v, the
    form of the original code, for tests and benchmarks. Both compute the same function.
    """

    def __init__(self, dim: int, head_dim: int, qkv_bias: bool = True, attn_impl: AttnImpl = "sdpa"):
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={attn_impl!r} is not one of {ATTN_IMPLS}")
        self.num_heads = dim // head_dim
        self.scale = head_dim**-0.5
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The qkv features are laid out (3, heads, head_dim), as in the released weights.
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        if self.attn_impl == "sdpa":
            x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale  # (B, heads, N, N)
            x = attn.softmax(dim=-1) @ v
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))


class CBlock(nn.Module):
    """Local MHRA block (stages 1-2) on (B, C, T, H, W) maps.

    x + DPE(x); x + conv1x1(dwconv5x5x5(conv1x1(BN(x)))); x + MLP(BN(x)).
    Submodules are registered in the order of the released checkpoints' keys.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.pos_embed = DepthwiseConv3d(dim, kernel_size=3)  # Triton kernels on CUDA, else F.conv3d
        self.norm1 = nn.BatchNorm3d(dim)
        self.conv1 = nn.Conv3d(dim, dim, kernel_size=1)
        self.conv2 = nn.Conv3d(dim, dim, kernel_size=1)
        self.attn = DepthwiseConv3d(dim, kernel_size=5)
        self.norm2 = nn.BatchNorm3d(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.drop_path(self.conv2(self.attn(self.conv1(self.norm1(x)))))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class SABlock(nn.Module):
    """Global MHRA block (stages 3-4): DPE on the map, then a transformer block on its tokens."""

    def __init__(
        self,
        dim: int,
        head_dim: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        attn_impl: AttnImpl = "sdpa",
    ):
        super().__init__()
        self.pos_embed = DepthwiseConv3d(dim, kernel_size=3)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, head_dim, qkv_bias=qkv_bias, attn_impl=attn_impl)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        t, h, w = x.shape[2:]
        x = rearrange(x, "b c t h w -> b (t h w) c")  # (B, N, C), N = T*H*W
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return rearrange(x, "b (t h w) c -> b c t h w", t=t, h=h, w=w)


class PatchEmbed(nn.Module):
    """Strided Conv3d, then LayerNorm over channels (eps 1e-5).

    The stem uses kernel (3, 4, 4), stride (2, 4, 4), padding (1, 0, 0); later stages use
    kernel = stride = (1, 2, 2). `norm` is registered first, as in the released checkpoints.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kernel_size: tuple[int, int, int],
        stride: tuple[int, int, int],
        padding: tuple[int, int, int] = (0, 0, 0),
    ):
        super().__init__()
        self.norm = nn.LayerNorm(out_dim, eps=1e-5)
        self.proj = nn.Conv3d(in_dim, out_dim, kernel_size=kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, C, T, H, W)
        x = self.norm(x.permute(0, 2, 3, 4, 1))  # (B, T, H, W, C)
        # Back to contiguous NCDHW: the depthwise 3D convolutions that follow are no faster
        # (the 3x3x3 ones slower) in channels-last-3d.
        return x.permute(0, 4, 1, 2, 3).contiguous()


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class UniFormer(nn.Module):
    """UniFormer video classifier: (B, 3, T, H, W) float clips -> (B, num_classes) logits.

    T must be even (the stem halves it) and H, W multiples of 32 (the total spatial stride).
    """

    def __init__(
        self,
        *,
        num_classes: int = 400,
        depths: Sequence[int] = (3, 4, 8, 3),
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        head_dim: int = 64,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        attn_impl: AttnImpl = "sdpa",
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        depths, embed_dims = tuple(depths), tuple(embed_dims)
        _check_arch(num_classes, depths, embed_dims, head_dim, mlp_ratio, drop_path_rate, attn_impl)
        self.num_classes = num_classes
        self.num_features = embed_dims[-1]
        self.depths, self.embed_dims, self.head_dim = depths, embed_dims, head_dim

        self.patch_embed1 = PatchEmbed(3, embed_dims[0], (3, 4, 4), (2, 4, 4), (1, 0, 0))
        self.patch_embed2 = PatchEmbed(embed_dims[0], embed_dims[1], (1, 2, 2), (1, 2, 2))
        self.patch_embed3 = PatchEmbed(embed_dims[1], embed_dims[2], (1, 2, 2), (1, 2, 2))
        self.patch_embed4 = PatchEmbed(embed_dims[2], embed_dims[3], (1, 2, 2), (1, 2, 2))

        # Stochastic depth rises linearly from 0 over all blocks of all stages.
        num_blocks = sum(depths)
        dpr = [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
        starts = [sum(depths[:i]) for i in range(4)]
        self.blocks1 = nn.ModuleList(
            CBlock(embed_dims[0], mlp_ratio, dpr[starts[0] + i]) for i in range(depths[0])
        )
        self.blocks2 = nn.ModuleList(
            CBlock(embed_dims[1], mlp_ratio, dpr[starts[1] + i]) for i in range(depths[1])
        )
        self.blocks3 = nn.ModuleList(
            SABlock(embed_dims[2], head_dim, mlp_ratio, qkv_bias, dpr[starts[2] + i], attn_impl)
            for i in range(depths[2])
        )
        self.blocks4 = nn.ModuleList(
            SABlock(embed_dims[3], head_dim, mlp_ratio, qkv_bias, dpr[starts[3] + i], attn_impl)
            for i in range(depths[3])
        )
        self.norm = nn.BatchNorm3d(embed_dims[3])
        self.head = _make_head(self.num_features, num_classes)

        self.grad_checkpointing_stages: frozenset[int] = frozenset()
        self.apply(_init_weights)
        if grad_checkpointing:
            self.set_grad_checkpointing(True)

    # -- common face -------------------------------------------------------------------------

    def set_grad_checkpointing(self, enable: bool = True, *, stages: Sequence[int] = (1, 2, 3, 4)) -> None:
        """Recompute the activations of every block of `stages` (1-4) in the backward pass."""
        bad = [s for s in stages if s not in (1, 2, 3, 4)]
        if bad:
            raise ValueError(f"stages must be among 1, 2, 3, 4; got {list(stages)}")
        self.grad_checkpointing_stages = frozenset(stages) if enable else frozenset()

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one (`num_classes=0`: no head, features out)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.head = _make_head(self.num_features, num_classes).to(self.norm.weight.device)
        self.head.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) -> normalised last-stage map (B, C4, T/2, H/32, W/32)."""
        x = self.patch_embed1(x)  # (B, C1, T/2, H/4, W/4)
        x = self._run_stage(1, self.blocks1, x)
        x = self.patch_embed2(x)  # (B, C2, T/2, H/8, W/8)
        x = self._run_stage(2, self.blocks2, x)
        x = self.patch_embed3(x)  # (B, C3, T/2, H/16, W/16)
        x = self._run_stage(3, self.blocks3, x)
        x = self.patch_embed4(x)  # (B, C4, T/2, H/32, W/32)
        x = self._run_stage(4, self.blocks4, x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3, 4))  # (B, C4)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x)
        return self.forward_head(self.forward_features(x))

    # -- internals ---------------------------------------------------------------------------

    def _run_stage(self, stage: int, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        recompute = stage in self.grad_checkpointing_stages and torch.is_grad_enabled()
        for block in blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return x


def _make_head(num_features: int, num_classes: int) -> nn.Module:
    return nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()


def _check_arch(
    num_classes: int,
    depths: tuple[int, ...],
    embed_dims: tuple[int, ...],
    head_dim: int,
    mlp_ratio: float,
    drop_path_rate: float,
    attn_impl: str,
) -> None:
    if not (isinstance(num_classes, int) and num_classes >= 0):
        raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
    for name, value in (("depths", depths), ("embed_dims", embed_dims)):
        if len(value) != 4 or not all(isinstance(v, int) and v > 0 for v in value):
            raise ValueError(f"{name} must be 4 positive ints (one per stage), got {value!r}")
    if not (isinstance(head_dim, int) and head_dim > 0) or any(d % head_dim for d in embed_dims[2:]):
        raise ValueError(
            f"head_dim={head_dim!r} must be a positive int dividing the attention stages' "
            f"embed_dims {embed_dims[2:]}"
        )
    if not mlp_ratio > 0:
        raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio!r}")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl={attn_impl!r} is not one of {ATTN_IMPLS}")


def _check_input(x: torch.Tensor) -> None:
    """Reject clips the network cannot take, before they fail deep inside with a shape error.

    Only static shape facts are read, so torch.compile(fullgraph=True) traces it without a break.
    """
    expected = "(B, 3, T, H, W) with T even and H, W multiples of 32"
    shape = tuple(x.shape)
    if x.ndim != 5:
        raise ValueError(f"expected input of shape {expected}; got shape {shape} ({x.ndim} dims)")
    _, c, t, h, w = shape
    problems = []
    if c != 3:
        problems.append(f"{c} channels instead of 3 (RGB)")
    if t % 2:
        problems.append(f"T={t} is odd (sample an even number of frames)")
    if h % 32 or w % 32:
        problems.append(f"H, W = {h}, {w} are not both multiples of 32 (crop or resize, e.g. to 224)")
    if problems:
        raise ValueError(f"expected input of shape {expected}; got shape {shape}: " + "; ".join(problems))
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point clip, got dtype {x.dtype}; convert and normalise it first")


# --------------------------------------------------------------------------------------------
# Weight init
# --------------------------------------------------------------------------------------------


def _init_weights(module: nn.Module) -> None:
    """Linear: normal (std 0.02), zero bias; LayerNorm: identity. Convolutions and BatchNorm
    keep PyTorch's defaults, as in the original training recipe.

    The original draws Linear weights with timm's trunc_normal_(std=0.02), whose bounds are
    +-2 in absolute terms (100 std), so it never truncates: plain normal_ is the same
    distribution, and much faster than torch's rejection sampler here.
    """
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------

VARIANTS: dict[str, dict[str, Any]] = {
    # A CPU-sized model for tests and the demo; learns the synthetic motion task (DESIGN §8).
    "uniformer_xs": dict(depths=(1, 1, 2, 1), embed_dims=(32, 64, 128, 256), head_dim=32),
    # The paper's video models: 21.40 M / 49.81 M parameters at 400 classes.
    "uniformer_s": dict(depths=(3, 4, 8, 3), embed_dims=(64, 128, 320, 512), head_dim=64),
    "uniformer_b": dict(depths=(5, 8, 20, 7), embed_dims=(64, 128, 320, 512), head_dim=64),
}

OVERRIDES: tuple[str, ...] = tuple(
    name for name in inspect.signature(UniFormer.__init__).parameters if name not in ("self", "num_classes")
)


def _build(name: str, num_classes: int, overrides: dict[str, Any]) -> UniFormer:
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise TypeError(f"unknown override(s) {unknown} for {name}; valid overrides: {', '.join(OVERRIDES)}")
    return UniFormer(num_classes=num_classes, **{**VARIANTS[name], **overrides})


def uniformer_xs(num_classes: int = 400, **overrides: Any) -> UniFormer:
    return _build("uniformer_xs", num_classes, overrides)


def uniformer_s(num_classes: int = 400, **overrides: Any) -> UniFormer:
    return _build("uniformer_s", num_classes, overrides)


def uniformer_b(num_classes: int = 400, **overrides: Any) -> UniFormer:
    return _build("uniformer_b", num_classes, overrides)
