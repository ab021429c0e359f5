"""UniFormer video backbone and classifier.

Paper: Kunchang Li, Yali Wang, Peng Gao, Guanglu Song, Yu Liu, Hongsheng Li, Yu Qiao,
"UniFormer: Unified Transformer for Efficient Spatiotemporal Representation Learning",
ICLR 2022 (arXiv:2201.04676).

Weights: the state dict has exactly the keys and shapes of the officially released video
checkpoints (Sense-X/UniFormer, Kinetics-400/600 and Something-Something V1/V2), so they load
with `load_state_dict(..., strict=True)` and give the official logits. ImageNet-1k 2D
checkpoints load through `model.checkpoint.load_pretrained`, which inflates them to 3D.

Architecture: four stages. Stages 1-2 use local multi-head relation aggregation (MHRA, a
depthwise 5x5x5 convolution between two 1x1x1 convolutions: `CBlock`); stages 3-4 use global
MHRA (self-attention over all T*H*W tokens: `SABlock`). Every block starts with a dynamic
position embedding (DPE, a depthwise 3x3x3 convolution). The stem is the only temporal
downsampling (stride 2); spatial stride is 4, then 2 per stage, 32 in all.

Memory layout: by default (`layout="tokens"`) activations are token-major (B, T, H, W, C), C
contiguous, from the stem's output to the head. The 1x1x1 convolutions are then matrix products
over the last dim (`F.linear` on the conv weight viewed as (out, in)), BatchNorm normalises the
last dim, the attention stages flatten to (B, N, C) with a view instead of a copy, the depthwise
convolutions take the token-major entry of `model.dwconv3d` (Triton on CUDA; elsewhere F.conv3d
on a channels_last_3d view), and the patch embeds' strided convolutions read a channels_last_3d
view too. `layout="channels_first"` runs the same weights in the original code's
(B, C, T, H, W) layout, op for op as its forward (plain nn.Conv3d and BatchNorm3d calls, the
same views and copies around the LayerNorms; with `attn_impl="math"` the same attention): the
reference formulation for tests and benchmarks. Parameters and state dicts are the same in both.

Inference: `fold_batchnorm(net)` returns an eval-only copy with every BatchNorm folded into the
linear map that follows it.

Pure PyTorch + einops: nothing here knows about Ray, MLflow, configs or optimizers.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from model.dwconv3d import DepthwiseConv3d

AttnImpl = Literal["sdpa", "math"]
ATTN_IMPLS: tuple[str, ...] = ("sdpa", "math")
Layout = Literal["tokens", "channels_first"]
LAYOUTS: tuple[str, ...] = ("tokens", "channels_first")


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


class PointwiseConv3d(nn.Conv3d):
    """1x1x1 Conv3d, with the released checkpoints' (out, in, 1, 1, 1) weight.

    `tokens=True`: takes and returns token-major maps (..., C) and computes the same map as a
    matrix product over the last dim, which needs no layout change.
    """

    def __init__(self, in_dim: int, out_dim: int, tokens: bool = True):
        super().__init__(in_dim, out_dim, kernel_size=1)
        self.tokens = tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens:
            return F.linear(x, self.weight.flatten(1), self.bias)
        return super().forward(x)


class ChannelBatchNorm(nn.BatchNorm3d):
    """BatchNorm3d (same parameters and buffers) that also takes token-major maps (`tokens=True`).

    A (B, T, H, W, C) map is normalised as a (B*T*H*W, C, 1, 1, 1) view by BatchNorm3d's own
    forward: per-channel statistics over the same positions, and the same running-stat updates
    (momentum, num_batches_tracked, unbiased variance) as on the (B, C, T, H, W) map.
    """

    def __init__(self, dim: int, tokens: bool = True):
        super().__init__(dim)
        self.tokens = tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens:
            return super().forward(x.reshape(-1, x.shape[-1], 1, 1, 1)).view(x.shape)
        return super().forward(x)


class ConvMlp(nn.Module):
    """Channel MLP of stages 1-2 as 1x1x1 convolutions, on maps in either layout."""

    def __init__(self, dim: int, hidden_dim: int, tokens: bool = True):
        super().__init__()
        self.fc1 = PointwiseConv3d(dim, hidden_dim, tokens)
        self.act = nn.GELU()
        self.fc2 = PointwiseConv3d(hidden_dim, dim, tokens)

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
    """Local MHRA block (stages 1-2) on (B, T, H, W, C) maps, or (B, C, T, H, W) with tokens=False.

    x + DPE(x); x + conv1x1(dwconv5x5x5(conv1x1(BN(x)))); x + MLP(BN(x)).
    Submodules are registered in the order of the released checkpoints' keys.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, tokens: bool = True):
        super().__init__()
        self.pos_embed = DepthwiseConv3d(dim, kernel_size=3, tokens=tokens)  # Triton on CUDA, else F.conv3d
        self.norm1 = ChannelBatchNorm(dim, tokens)
        self.conv1 = PointwiseConv3d(dim, dim, tokens)
        self.conv2 = PointwiseConv3d(dim, dim, tokens)
        self.attn = DepthwiseConv3d(dim, kernel_size=5, tokens=tokens)
        self.norm2 = ChannelBatchNorm(dim, tokens)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), tokens)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.drop_path(self.conv2(self.attn(self.conv1(self.norm1(x)))))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class SABlock(nn.Module):
    """Global MHRA block (stages 3-4): DPE on the map, then a transformer block on its tokens.

    Maps are (B, T, H, W, C), or (B, C, T, H, W) with tokens=False.
    """

    def __init__(
        self,
        dim: int,
        head_dim: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        attn_impl: AttnImpl = "sdpa",
        tokens: bool = True,
    ):
        super().__init__()
        self.tokens = tokens
        self.pos_embed = DepthwiseConv3d(dim, kernel_size=3, tokens=tokens)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, head_dim, qkv_bias=qkv_bias, attn_impl=attn_impl)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        shape = x.shape
        # (B, N, C), N = T*H*W: a view in both layouts; of a (B, C, T, H, W) map a strided one, the
        # original code's x.flatten(2).transpose(1, 2), which the LayerNorms copy.
        x = x.flatten(1, 3) if self.tokens else rearrange(x, "b c t h w -> b (t h w) c")
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        if self.tokens:
            return x.view(shape)
        return rearrange(x, "b (t h w) c -> b c t h w", t=shape[2], h=shape[3], w=shape[4])


class PatchEmbed(nn.Module):
    """Strided Conv3d, then LayerNorm over channels (eps 1e-5).

    The stem uses kernel (3, 4, 4), stride (2, 4, 4), padding (1, 0, 0); later stages use
    kernel = stride = (1, 2, 2). `norm` is registered first, as in the released checkpoints.
    Maps are (B, T, H, W, C) in and out, or (B, C, T, H, W) with tokens=False.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kernel_size: tuple[int, int, int],
        stride: tuple[int, int, int],
        padding: tuple[int, int, int] = (0, 0, 0),
        tokens: bool = True,
    ):
        super().__init__()
        self.tokens = tokens
        self.norm = nn.LayerNorm(out_dim, eps=1e-5)
        self.proj = nn.Conv3d(in_dim, out_dim, kernel_size=kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens:
            x = x.permute(0, 4, 1, 2, 3)  # a channels_last_3d view, which the conv reads without a copy
        x = self.proj(x)  # (B, C, T, H, W), channels_last_3d strides when the input had them
        x = self.norm(x.permute(0, 2, 3, 4, 1))  # (B, T, H, W, C), copied once if not contiguous
        if self.tokens:
            return x
        # Back to contiguous NCDHW, the layout of the original code.
        return x.permute(0, 4, 1, 2, 3).contiguous()


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class UniFormer(nn.Module):
    """UniFormer video classifier: (B, 3, T, H, W) float clips -> (B, num_classes) logits.

    T must be even (the stem halves it) and H, W multiples of 32 (the total spatial stride).
    `layout`: "tokens" (token-major activations, the fast default) or "channels_first" (the
    original code's (B, C, T, H, W) formulation); see the module docstring.
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
        layout: Layout = "tokens",
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        depths, embed_dims = tuple(depths), tuple(embed_dims)
        _check_arch(num_classes, depths, embed_dims, head_dim, mlp_ratio, drop_path_rate, attn_impl, layout)
        self.num_classes = num_classes
        self.num_features = embed_dims[-1]
        self.depths, self.embed_dims, self.head_dim = depths, embed_dims, head_dim
        self.layout = layout
        self.batchnorm_folded = False  # set by fold_batchnorm on its copy
        tokens = layout == "tokens"

        self.patch_embed1 = PatchEmbed(3, embed_dims[0], (3, 4, 4), (2, 4, 4), (1, 0, 0), tokens)
        self.patch_embed2 = PatchEmbed(embed_dims[0], embed_dims[1], (1, 2, 2), (1, 2, 2), tokens=tokens)
        self.patch_embed3 = PatchEmbed(embed_dims[1], embed_dims[2], (1, 2, 2), (1, 2, 2), tokens=tokens)
        self.patch_embed4 = PatchEmbed(embed_dims[2], embed_dims[3], (1, 2, 2), (1, 2, 2), tokens=tokens)

        # Stochastic depth rises linearly from 0 over all blocks of all stages.
        num_blocks = sum(depths)
        dpr = [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
        starts = [sum(depths[:i]) for i in range(4)]
        self.blocks1 = nn.ModuleList(
            CBlock(embed_dims[0], mlp_ratio, dpr[starts[0] + i], tokens) for i in range(depths[0])
        )
        self.blocks2 = nn.ModuleList(
            CBlock(embed_dims[1], mlp_ratio, dpr[starts[1] + i], tokens) for i in range(depths[1])
        )
        self.blocks3 = nn.ModuleList(
            SABlock(embed_dims[2], head_dim, mlp_ratio, qkv_bias, dpr[starts[2] + i], attn_impl, tokens)
            for i in range(depths[2])
        )
        self.blocks4 = nn.ModuleList(
            SABlock(embed_dims[3], head_dim, mlp_ratio, qkv_bias, dpr[starts[3] + i], attn_impl, tokens)
            for i in range(depths[3])
        )
        self.norm = ChannelBatchNorm(embed_dims[3], tokens)
        self.head = _make_head(self.num_features, num_classes)

        self.grad_checkpointing_stages: frozenset[int] = frozenset()
        self.apply(_init_weights)
        if grad_checkpointing:
            self.set_grad_checkpointing(True)

    # -- common face -------------------------------------------------------------------------

    def set_grad_checkpointing(self, enable: bool = True, *, stages: Sequence[int] = (1, 2, 3, 4)) -> None:
        """Recompute the activations of every block of `stages` (1-4) in the backward pass.

        Memory only: the same outputs, gradients and BatchNorm running statistics (updated once
        per forward, not again by the recompute) as without it.
        """
        bad = [s for s in stages if s not in (1, 2, 3, 4)]
        if bad:
            raise ValueError(f"stages must be among 1, 2, 3, 4; got {list(stages)}")
        self.grad_checkpointing_stages = frozenset(stages) if enable else frozenset()

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one (`num_classes=0`: no head, features out)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if self.batchnorm_folded:
            raise RuntimeError("the final BatchNorm of this fold_batchnorm copy is folded into its head; "
                               "reset the classifier of the unfolded model, then fold it again")
        self.num_classes = num_classes
        self.head = _make_head(self.num_features, num_classes).to(self.norm.weight.device)
        self.head.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) -> normalised last-stage map, token-major (B, T/2, H/32, W/32, C4).

        In either layout. On a `fold_batchnorm` copy the map is not yet normalised: the final
        BatchNorm lives in its head.
        """
        tokens = self.layout == "tokens"
        if tokens:
            # A view: the stem's conv reads it back as the clip itself, then LayerNorm copies
            # its output once to the contiguous (B, T, H, W, C) map that stays to the head.
            x = x.permute(0, 2, 3, 4, 1)
        # Shapes as token-major; in the channels_first layout C comes second.
        x = self.patch_embed1(x)  # (B, T/2, H/4, W/4, C1)
        x = self._run_stage(1, self.blocks1, x)
        x = self.patch_embed2(x)  # (B, T/2, H/8, W/8, C2)
        x = self._run_stage(2, self.blocks2, x)
        x = self.patch_embed3(x)  # (B, T/2, H/16, W/16, C3)
        x = self._run_stage(3, self.blocks3, x)
        x = self.patch_embed4(x)  # (B, T/2, H/32, W/32, C4)
        x = self._run_stage(4, self.blocks4, x)
        x = self.norm(x)
        return x if tokens else x.permute(0, 2, 3, 4, 1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Token-major (B, T', H', W', C4) map -> logits (or pooled features with pre_logits)."""
        x = x.mean(dim=(1, 2, 3))  # (B, C4)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x)
        return self.forward_head(self.forward_features(x))

    def train(self, mode: bool = True) -> "UniFormer":
        if mode and self.batchnorm_folded:
            raise RuntimeError(
                "this UniFormer has its BatchNorms folded into the layers after them (fold_batchnorm), "
                "which holds only for inference; train the unfolded model and fold a fresh copy"
            )
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"layout={self.layout!r}" + (", batchnorm_folded=True" if self.batchnorm_folded else "")

    # -- internals ---------------------------------------------------------------------------

    def _run_stage(self, stage: int, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        recompute = stage in self.grad_checkpointing_stages and torch.is_grad_enabled()
        for block in blocks:
            if recompute and torch.compiler.is_compiling():
                # Traced, the recompute is the partitioner's and updates the buffers once; there
                # context_fn may only be selective-checkpointing dispatch modes.
                x = checkpoint(block, x, use_reentrant=False)
            elif recompute:
                x = checkpoint(block, x, use_reentrant=False,
                               context_fn=functools.partial(_recompute_contexts, block))
            else:
                x = block(x)
        return x


def _recompute_contexts(block: nn.Module) -> tuple[contextlib.nullcontext, contextlib.AbstractContextManager]:
    """Checkpoint contexts for `block`: the forward as is; the recompute in backward with its
    BatchNorms' buffers swapped for copies, so one step moves the running statistics once."""
    return contextlib.nullcontext(), _scratch_batchnorm_buffers(block)


@contextlib.contextmanager
def _scratch_batchnorm_buffers(module: nn.Module) -> Iterator[None]:
    """BatchNorms inside `module` update copies of their running statistics and num_batches_tracked.

    The recompute must call the same op with the same arguments, or the checkpoint finds other
    tensors saved for backward (with no running stats, batch_norm saves two fewer). In train mode
    the output depends on the batch statistics only, so it and the gradients are unchanged.
    """
    names = ("running_mean", "running_var", "num_batches_tracked")
    swapped = []
    for m in module.modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats:
            originals = {n: getattr(m, n) for n in names if getattr(m, n) is not None}
            swapped.append((m, originals))
            for n, t in originals.items():
                setattr(m, n, t.clone())
    try:
        yield
    finally:
        for m, originals in swapped:
            for n, t in originals.items():
                setattr(m, n, t)


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
    layout: str,
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
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")


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
# Inference: BatchNorm folding
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def fold_batchnorm(net: UniFormer) -> UniFormer:
    """An inference-only copy of `net` with each BatchNorm folded into the linear map after it.

    In eval mode a BatchNorm is a per-channel affine map x * s + t (s = weight / sqrt(running_var
    + eps), t = bias - running_mean * s), and each of UniFormer's is followed by a map linear in
    the channels: CBlock's norm1 by conv1, norm2 by mlp.fc1, and the final norm by the mean over
    T, H, W (which commutes with a per-channel affine) and the head. W (x * s + t) + b is
    (W * s) x + (W t + b), so those layers absorb the norms, which become identities: the copy
    computes `net.eval()`'s logits (up to rounding; the folding is done in float64) with one pass
    over the activations fewer per norm. Without a head (num_classes=0) the final norm stays.

    The copy is in eval mode and its `train()` (batch statistics cannot be folded) and
    `reset_classifier()` raise. Its state dict lacks the folded norms, so save and load `net`'s.
    `net` is not changed.
    """
    folded = copy.deepcopy(net).eval()
    for block in (*folded.blocks1, *folded.blocks2):
        _fold_into(block.norm1, block.conv1)
        _fold_into(block.norm2, block.mlp.fc1)
        block.norm1, block.norm2 = nn.Identity(), nn.Identity()
    if isinstance(folded.head, nn.Linear):
        _fold_into(folded.norm, folded.head)
        folded.norm = nn.Identity()
    folded.batchnorm_folded = True
    return folded


def _fold_into(norm: nn.BatchNorm3d, layer: nn.Module) -> None:
    """Fold eval-mode `norm` into `layer` (a Linear, or a 1x1x1 conv) that reads its output."""
    scale = norm.weight.double() * (norm.running_var.double() + norm.eps).rsqrt()
    shift = norm.bias.double() - norm.running_mean.double() * scale
    weight = layer.weight.double().flatten(1)  # (out, in)
    layer.bias.copy_(layer.bias.double() + weight @ shift)
    layer.weight.copy_((weight * scale).view(layer.weight.shape))


# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------

VARIANTS: dict[str, dict[str, Any]] = {
    # A CPU-sized model for tests and the demo; learns the synthetic motion task (DESIGN.md "Pitfalls").
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
