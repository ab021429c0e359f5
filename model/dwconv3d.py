"""Depthwise 3D convolution (groups == channels, stride 1, 'same' zero padding) as Triton kernels.

UniFormer runs a depthwise 5x5x5 convolution (local MHRA) and a depthwise 3x3x3 convolution
(dynamic position embedding) in every block of stages 1-2, and the 3x3x3 one in stages 3-4.
PyTorch's native CUDA kernels for these are slow: one bf16 5x5x5 conv on a (16, 64, 8, 56, 56)
activation takes 15.4 ms forward + backward on an H200, about 69% of an official training step
(DESIGN.md "Performance anchors"), while its memory traffic would take under 0.1 ms. This module has:

- `depthwise_conv3d(x, weight, bias)`: (B, C, T, H, W) in and out, any memory format.
- `depthwise_conv3d_tokens(x, weight, bias)`: token-major (B, T, H, W, C) in and out.
- `DepthwiseConv3d`: an `nn.Conv3d` (same parameters, so the same state-dict keys and shapes)
  whose forward takes the Triton path on CUDA tensors and plain `F.conv3d` elsewhere; built
  with `tokens=True` it takes and returns token-major maps.

Kernels (all work in the token-major layout (B, T, H, W, C), C contiguous, so that a warp's
loads run along channels and coalesce; every sum is accumulated in fp32):

- forward: one program per output tile of BLOCK_H x BLOCK_W positions of one frame and
  BLOCK_C channels (8 x 8 x 64, 8 warps: 16 fp32 accumulators and two 16-byte loads per thread
  per tap). Loops over kt and kh with kw unrolled (93 registers on sm_90; all 125 taps of 5^3
  unrolled needed 255 and spilled) load the shifted input tile (masked at the borders: that is
  the zero padding) and one fp32 weight vector per tap. The taps of one frame offset reuse a
  (BLOCK_H + KH - 1) x (BLOCK_W + KW - 1) input patch, which stays in L1; each input element
  is read from L2 about KT * (8+4)^2 / 8^2 ~ 11 times for 5^3.
- grad input: the same kernel on grad_output with the kernel flipped in all three dimensions
  (for stride 1 and padding k // 2 with odd k, the transposed convolution is that correlation).
- grad weight and grad bias: a two-stage reduction over the B*T*H*W positions. Stage 1: each
  program owns a chunk of consecutive row tiles (BLOCK_W positions of one row), BLOCK_C channels
  and one group of temporal taps; for every tile it loads grad_output once and gathers the
  input for all taps of its group as one (BLOCK_W, TAPS, BLOCK_C) tensor, accumulating
  dy * x into an fp32 register tile of that shape (8 x 32 x 32 for 5^3, 8 warps: 80 registers
  on sm_90), reduced over positions once at the end and
  written to its own slot of an fp32 partial buffer (no atomics, so the result is
  deterministic). One spare tap slot gathers 1.0 instead of x: that slot is the bias gradient.
  Stage 2: `partials.sum(0)` in fp32, then a cast to the parameter dtype.

Layout cost: the kernels need (B, T, H, W, C) contiguous. A (B, C, T, H, W) tensor in
`torch.channels_last_3d` memory format is exactly that, and is used without a copy; a contiguous
NCDHW tensor is copied once (one read and one write of the activation) before the forward, and
grad_output likewise before the backward. The NCDHW entry point returns a tensor whose strides
are channels_last_3d (its shape is the usual (B, C, T, H, W)).

Under autocast the input is cast to the autocast dtype, as autocast does for F.conv3d (one copy
for layout and dtype together); weights and bias are read in fp32, gradients come out in the
dtypes of their tensors.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (`TRITON_INTERPRET=1`
set before triton is imported); tests use that on small shapes. Without triton, or on a CPU
tensor otherwise, everything is `F.conv3d`. A token-major map reaches `F.conv3d` as a permuted
view, which is a channels_last_3d tensor: no copy, and PyTorch's CPU (oneDNN) convolution keeps
that format in its output, so the result permutes back to a contiguous token-major map.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # an optional dependency: the model itself needs only torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

HAVE_TRITON = triton is not None
# Triton's interpreter runs kernels on CPU tensors; it must be chosen before triton is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

Impl = Literal["auto", "triton", "torch"]
IMPLS: tuple[str, ...] = ("auto", "triton", "torch")
KERNEL_SIZES: tuple[int, ...] = (3, 5)

# Launch parameters, picked without a GPU to hand: `uniformer bench dwconv --sweep`
# times alternatives on one. wgrad_block_c=0: 32 when the tap slots are more than 16, else 64.
TUNING: dict[str, int] = dict(
    fwd_block_h=8, fwd_block_w=8, fwd_block_c=64, fwd_warps=8,
    wgrad_block_w=8, wgrad_block_c=0, wgrad_warps=8, wgrad_programs_per_sm=8,
)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

if HAVE_TRITON:

    @triton.jit
    def _dwconv3d_fwd_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr,
        T, H, W, C, n_hb, n_wb,
        KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """y[b, t, h, w, c] = bias[c] + sum_k w[k, c] * x[b, t + kt - KT//2, h + kh - KH//2, w + kw - KW//2, c].

        x, y: (B, T, H, W, C) contiguous; w: (KT*KH*KW, C) fp32; grid (B*T*n_hb*n_wb, cdiv(C, BLOCK_C)).
        """
        pid = tl.program_id(0)
        wb = pid % n_wb
        hb = (pid // n_wb) % n_hb
        bt = pid // (n_wb * n_hb)  # b * T + t
        t = bt % T
        offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_w = wb * BLOCK_W + tl.arange(0, BLOCK_W)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        frame_size = H * W * C

        lanes = offs_w[None, :, None] * C + offs_c[None, None, :]  # (1, BLOCK_W, BLOCK_C) element offsets
        c_ok3 = c_ok[None, None, :]

        acc = tl.zeros((BLOCK_H, BLOCK_W, BLOCK_C), dtype=tl.float32)
        # kt and kh are loops, kw is unrolled: unrolling all 125 taps of a 5x5x5 kernel takes
        # minutes to compile and its hoisted loads need over 200 registers per thread.
        for kt in range(KT):
            t_in = t + (kt - KT // 2)
            t_ok = (t_in >= 0) & (t_in < T)
            frame = x_ptr + (bt + (kt - KT // 2)).to(tl.int64) * frame_size
            for kh in range(KH):
                h_in = offs_h + (kh - KH // 2)
                # where(), not &: Triton's interpreter mis-types (scalar & block) masks.
                h_ok = tl.where(t_ok, (h_in >= 0) & (h_in < H), False)
                rows = frame + (h_in * (W * C))[:, None, None]  # (BLOCK_H, 1, 1) pointers
                row_ok = h_ok[:, None, None] & c_ok3
                for kw in tl.static_range(KW):
                    w_in = offs_w + (kw - KW // 2)
                    mask = row_ok & ((w_in >= 0) & (w_in < W))[None, :, None]
                    xv = tl.load(rows + lanes + (kw - KW // 2) * C, mask=mask, other=0.0).to(tl.float32)
                    wv = tl.load(w_ptr + ((kt * KH + kh) * KW + kw) * C + offs_c, mask=c_ok, other=0.0)
                    acc += xv * wv[None, None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_c, mask=c_ok, other=0.0)[None, None, :]

        out_ok = (offs_h < H)[:, None, None] & (offs_w < W)[None, :, None] & c_ok[None, None, :]
        out = y_ptr + bt.to(tl.int64) * frame_size + (offs_h[:, None, None] * W + offs_w[None, :, None]) * C
        tl.store(out + offs_c[None, None, :], acc.to(y_ptr.dtype.element_ty), mask=out_ok)

    @triton.jit
    def _dwconv3d_bwd_weight_kernel(
        x_ptr, dy_ptr, part_ptr,
        T, H, W, C, n_wb, n_tiles, tiles_per_chunk,
        KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, KT_PER: tl.constexpr, TAPS: tl.constexpr,
        BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Stage 1 of grad weight / grad bias: partial sums over one chunk of row tiles.

        A row tile is BLOCK_W positions of one (b, t, h) row; tile i covers row i // n_wb.
        Program (chunk, kt group) writes part[chunk, group, j, c] for its TAPS tap slots j:
        j < KT_PER*KH*KW is tap (kt = group*KT_PER + j // (KH*KW), kh, kw), j == KT_PER*KH*KW
        is the bias (sum of dy). grid (n_chunks * KT // KT_PER, cdiv(C, BLOCK_C)).
        """
        N_GROUPS: tl.constexpr = KT // KT_PER
        N_TAPS: tl.constexpr = KT_PER * KH * KW
        pid = tl.program_id(0)
        group = pid % N_GROUPS  # fastest: the groups of one chunk share its grad_output in L2
        chunk = pid // N_GROUPS
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C

        j = tl.arange(0, TAPS)
        is_tap = j < N_TAPS
        is_bias = j == N_TAPS
        dt = group * KT_PER + j // (KH * KW) - KT // 2
        dh = (j // KW) % KH - KH // 2
        dw = j % KW - KW // 2
        lane = tl.arange(0, BLOCK_W)

        acc = tl.zeros((BLOCK_W, TAPS, BLOCK_C), dtype=tl.float32)
        for i in range(tiles_per_chunk):
            tile = chunk * tiles_per_chunk + i
            tile_ok = tile < n_tiles
            row = tile // n_wb  # (b * T + t) * H + h
            h = row % H
            bt = row // H
            t = bt % T
            offs_w = (tile % n_wb) * BLOCK_W + lane
            w_ok = tl.where(tile_ok, offs_w < W, False)

            dy_ptrs = dy_ptr + (row.to(tl.int64) * W + offs_w[:, None]) * C + offs_c[None, :]
            dy = tl.load(dy_ptrs, mask=w_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)

            t_in = t + dt
            h_in = h + dh
            tap_ok = tl.where(tile_ok, is_tap & (t_in >= 0) & (t_in < T) & (h_in >= 0) & (h_in < H), False)
            src_row = (bt + dt).to(tl.int64) * H + h_in  # (b * T + t_in) * H + h_in, per tap
            w_in = offs_w[:, None] + dw[None, :]  # (BLOCK_W, TAPS)
            ok = tap_ok[None, :] & (w_in >= 0) & (w_in < W)
            x_ptrs = x_ptr + (src_row[None, :, None] * W + w_in[:, :, None]) * C + offs_c[None, None, :]
            xv = tl.load(x_ptrs, mask=ok[:, :, None] & c_ok[None, None, :], other=0.0).to(tl.float32)
            xv = tl.where(is_bias[None, :, None], 1.0, xv)
            acc += dy[:, None, :] * xv

        part = tl.sum(acc, axis=0)  # (TAPS, BLOCK_C)
        out = part_ptr + ((chunk * N_GROUPS + group) * TAPS + j[:, None]).to(tl.int64) * C + offs_c[None, :]
        tl.store(out, part, mask=c_ok[None, :])


# --------------------------------------------------------------------------------------------
# Launchers (token-major, contiguous tensors)
# --------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch_conv(x: torch.Tensor, w_taps: torch.Tensor, bias: Optional[torch.Tensor], y: torch.Tensor,
                 ksize: tuple[int, int, int]) -> None:
    """y = depthwise conv of x with (KT*KH*KW, C) fp32 taps; x, y (B, T, H, W, C) contiguous."""
    B, T, H, W, C = x.shape
    block_h, block_w = min(TUNING["fwd_block_h"], _next_pow2(H)), min(TUNING["fwd_block_w"], _next_pow2(W))
    block_c = min(TUNING["fwd_block_c"], _next_pow2(C))
    n_hb, n_wb = triton.cdiv(H, block_h), triton.cdiv(W, block_w)
    grid = (B * T * n_hb * n_wb, triton.cdiv(C, block_c))
    with _device_guard(x):
        _dwconv3d_fwd_kernel[grid](
            x, w_taps, bias if bias is not None else w_taps, y,
            T, H, W, C, n_hb, n_wb,
            KT=ksize[0], KH=ksize[1], KW=ksize[2], HAS_BIAS=bias is not None,
            BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=TUNING["fwd_warps"],
        )


def _launch_grad_weight(x: torch.Tensor, dy: torch.Tensor, ksize: tuple[int, int, int],
                        n_chunks: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (grad weight as (KT, KH, KW, C), grad bias (C,)) from x, dy (B, T, H, W, C) contiguous."""
    B, T, H, W, C = x.shape
    kt, kh, kw = ksize
    # All taps in one gather when they fit 32 slots (3x3x3: 27 + bias); else one frame offset each.
    kt_per = kt if kt * kh * kw + 1 <= 32 else 1
    n_taps = kt_per * kh * kw
    taps = _next_pow2(n_taps + 1)  # + 1: the bias slot
    n_groups = kt // kt_per
    block_w = min(TUNING["wgrad_block_w"], _next_pow2(W))
    block_c = min(TUNING["wgrad_block_c"] or (32 if taps > 16 else 64), _next_pow2(C))
    n_wb = triton.cdiv(W, block_w)
    n_cb = triton.cdiv(C, block_c)
    n_tiles = B * T * H * n_wb
    if n_chunks is None:
        # Enough programs to fill the GPU several times over; few enough that stage 2 is tiny.
        sms = _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device()) if x.is_cuda else 4
        n_chunks = triton.cdiv(TUNING["wgrad_programs_per_sm"] * sms, n_groups * n_cb)
    tiles_per_chunk = triton.cdiv(n_tiles, max(1, min(n_chunks, n_tiles)))
    n_chunks = triton.cdiv(n_tiles, tiles_per_chunk)

    partials = torch.empty((n_chunks, n_groups, taps, C), device=x.device, dtype=torch.float32)
    with _device_guard(x):
        _dwconv3d_bwd_weight_kernel[(n_chunks * n_groups, n_cb)](
            x, dy, partials,
            T, H, W, C, n_wb, n_tiles, tiles_per_chunk,
            KT=kt, KH=kh, KW=kw, KT_PER=kt_per, TAPS=taps,
            BLOCK_W=block_w, BLOCK_C=block_c, num_warps=TUNING["wgrad_warps"],
        )
    total = partials.sum(dim=0)  # stage 2, fp32: (n_groups, taps, C)
    grad_w = total[:, :n_taps].reshape(kt, kh, kw, C)
    grad_b = total[0, n_taps]
    return grad_w, grad_b


# --------------------------------------------------------------------------------------------
# The op: forward and backward as custom ops, so torch.compile sees one opaque node each
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("uniformer::dwconv3d_tokens", mutates_args=())
def _dwconv3d_tokens_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    # x: (B, T, H, W, C); weight (C, 1, KT, KH, KW); returns (B, T, H, W, C) contiguous.
    x = x.contiguous()  # a no-op for callers here; compiled graphs may hand over other strides
    C = x.shape[-1]
    ksize = tuple(weight.shape[2:])
    w_taps = weight.detach().reshape(C, -1).t().float().contiguous()  # (KT*KH*KW, C)
    b = bias.detach().float().contiguous() if bias is not None else None
    y = torch.empty_like(x)
    _launch_conv(x, w_taps, b, y, ksize)
    return y


@_dwconv3d_tokens_op.register_fake
def _(x, weight, bias):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("uniformer::dwconv3d_tokens_backward", mutates_args=())
def _dwconv3d_tokens_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                 need_input_grad: bool, bias_dtype: Optional[torch.dtype]
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # dy, x: (B, T, H, W, C). Returns (grad x or empty, grad weight, grad bias or empty).
    dy, x = dy.contiguous(), x.contiguous()
    C = x.shape[-1]
    ksize = tuple(weight.shape[2:])
    if need_input_grad:
        flipped = weight.detach().flip(2, 3, 4).reshape(C, -1).t().float().contiguous()
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _launch_conv(dy, flipped, None, dx, ksize)
    else:
        dx = x.new_empty(0)
    grad_w, grad_b = _launch_grad_weight(x, dy, ksize)
    dw = grad_w.permute(3, 0, 1, 2).unsqueeze(1).to(weight.dtype).contiguous()  # (C, 1, KT, KH, KW)
    db = grad_b.to(bias_dtype) if bias_dtype is not None else x.new_empty(0)
    return dx, dw, db


@_dwconv3d_tokens_backward_op.register_fake
def _(dy, x, weight, need_input_grad, bias_dtype):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_input_grad else x.new_empty(0)
    db = weight.new_empty(weight.shape[0], dtype=bias_dtype) if bias_dtype is not None else x.new_empty(0)
    return dx, torch.empty_like(weight, memory_format=torch.contiguous_format), db


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    dx, dw, db = _dwconv3d_tokens_backward_op(dy.contiguous(), x, weight, need_x, ctx.bias_dtype)
    return (dx if need_x else None), dw, (db if ctx.bias_dtype is not None else None)


_dwconv3d_tokens_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public functions and module
# --------------------------------------------------------------------------------------------


def triton_usable(x: torch.Tensor) -> bool:
    """True where the Triton kernels can run on `x`: a CUDA tensor with triton installed, or a
    CPU tensor under Triton's interpreter (TRITON_INTERPRET=1, for tests)."""
    return HAVE_TRITON and (x.is_cuda or (INTERPRET and x.device.type == "cpu"))


def _check(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], channels: int, impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    if x.ndim != 5:
        raise ValueError(f"expected a 5-D input, got shape {tuple(x.shape)}")
    ksize = tuple(weight.shape[2:])
    if weight.ndim != 5 or weight.shape[:2] != (channels, 1) or any(k not in KERNEL_SIZES for k in ksize):
        raise ValueError(
            f"expected a depthwise weight of shape ({channels}, 1, KT, KH, KW) with kernel sizes in "
            f"{KERNEL_SIZES}; got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"expected a bias of shape ({channels},), got {tuple(bias.shape)}")


def _use_triton(x: torch.Tensor, impl: str) -> bool:
    if impl == "torch":
        return False
    if impl == "triton" and not triton_usable(x):
        raise RuntimeError(
            f"impl='triton' needs a CUDA tensor and the triton package (or TRITON_INTERPRET=1 for CPU "
            f"tensors); got a {x.device.type} tensor with triton {'installed' if HAVE_TRITON else 'missing'}. "
            f"Use impl='auto' to fall back to F.conv3d."
        )
    return triton_usable(x)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # As F.conv3d under autocast: the input is cast to the autocast dtype (so is the saved copy),
    # the output has that dtype. The weight is read in fp32 either way.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _GradInWeightLayout(torch.autograd.Function):
    """Identity on the weight whose backward returns the gradient with the weight's own strides.

    On a channels-last input F.conv3d returns the (C, 1, KT, KH, KW) weight gradient with stride 1
    on the size-1 dim, the contiguous weight has KT*KH*KW there: the same memory order, but DDP's
    reducer compares strides, warns "Grad strides do not match bucket view strides" and copies
    every step. Restriding a dense gradient is free; anything else is copied into the weight's layout.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor) -> torch.Tensor:
        ctx.weight_stride = weight.stride()
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        stride = ctx.weight_stride
        if grad.stride() == stride:
            return grad
        if all(g == s or n == 1 for g, s, n in zip(grad.stride(), stride, grad.shape)):
            return grad.as_strided(grad.shape, stride, grad.storage_offset())
        return torch.empty_strided(grad.shape, stride, dtype=grad.dtype, device=grad.device).copy_(grad)


def _torch_conv(x_ncdhw: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    padding = tuple(k // 2 for k in weight.shape[2:])
    if weight.requires_grad:
        weight = _GradInWeightLayout.apply(weight)
    return F.conv3d(x_ncdhw, weight, bias, padding=padding, groups=x_ncdhw.shape[1])


def depthwise_conv3d_tokens(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                            *, impl: Impl = "auto") -> torch.Tensor:
    """Depthwise 'same' 3D convolution on token-major maps: (B, T, H, W, C) -> (B, T, H, W, C).

    `weight` is an nn.Conv3d depthwise weight (C, 1, KT, KH, KW), kernel sizes 3 or 5.
    `impl`: "auto" (Triton where usable, else F.conv3d), "triton" (error where not usable),
    "torch" (always F.conv3d). A non-contiguous `x` is copied once.
    """
    _check(x, weight, bias, x.shape[-1], impl)
    if not _use_triton(x, impl):
        return _torch_conv(x.permute(0, 4, 1, 2, 3), weight, bias).permute(0, 2, 3, 4, 1)
    # One copy at most (layout and dtype together), made here, outside the op, so that autograd
    # sees it and the backward reuses the copy the op saved.
    return _dwconv3d_tokens_op(x.to(dtype=_compute_dtype(x), memory_format=torch.contiguous_format), weight, bias)


def depthwise_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     *, impl: Impl = "auto") -> torch.Tensor:
    """Depthwise 'same' 3D convolution: (B, C, T, H, W) -> (B, C, T, H, W), as
    `F.conv3d(x, weight, bias, padding=k // 2, groups=C)`.

    On the Triton path a channels_last_3d `x` is used as it is, a contiguous one is copied once,
    and the result has channels_last_3d strides.
    """
    _check(x, weight, bias, x.shape[1] if x.ndim == 5 else -1, impl)
    if not _use_triton(x, impl):
        return _torch_conv(x, weight, bias)
    y = depthwise_conv3d_tokens(x.permute(0, 2, 3, 4, 1), weight, bias, impl="triton")  # (B, T, H, W, C)
    return y.permute(0, 4, 1, 2, 3)  # (B, C, T, H, W), channels_last_3d strides


def _triple(k: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (k, k, k) if isinstance(k, int) else tuple(k)


class DepthwiseConv3d(nn.Conv3d):
    """`nn.Conv3d(dim, dim, kernel_size, padding=k // 2, groups=dim)` whose forward uses the
    Triton kernels on CUDA (when triton is installed) and plain F.conv3d elsewhere.

    Same parameters as nn.Conv3d, so state dicts are unchanged. `impl` ("auto" | "torch") can be
    switched per module, e.g. by `set_depthwise_impl(model, "torch")` for a reference run.
    `tokens=True`: input and output are token-major (B, T, H, W, C) instead of (B, C, T, H, W).
    """

    def __init__(self, dim: int, kernel_size: int | tuple[int, int, int] = 3, bias: bool = True,
                 impl: Impl = "auto", tokens: bool = False, device=None, dtype=None):
        ksize = _triple(kernel_size)
        if len(ksize) != 3 or any(k not in KERNEL_SIZES for k in ksize):
            raise ValueError(f"kernel_size must be {KERNEL_SIZES} or a triple of them, got {kernel_size!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
        super().__init__(dim, dim, ksize, padding=tuple(k // 2 for k in ksize), groups=dim, bias=bias,
                         device=device, dtype=dtype)
        self.impl = impl
        self.tokens = tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens:
            return depthwise_conv3d_tokens(x, self.weight, self.bias, impl=self.impl)
        if self.impl == "torch" or (self.impl == "auto" and not triton_usable(x)):
            return self._conv_forward(x, self.weight, self.bias)
        return depthwise_conv3d(x, self.weight, self.bias, impl="triton")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", impl={self.impl!r}, tokens={self.tokens}"


def set_depthwise_impl(module: nn.Module, impl: Impl) -> int:
    """Set `impl` on every DepthwiseConv3d inside `module`; returns how many there are."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    convs = [m for m in module.modules() if isinstance(m, DepthwiseConv3d)]
    for m in convs:
        m.impl = impl
    return len(convs)
