"""Depthwise 3D convolution: the Triton kernels against F.conv3d, the CPU path, the module.

The kernels are checked without a GPU in Triton's interpreter, which must be switched on
(TRITON_INTERPRET=1) before triton is imported. So the `test_interp_*` tests run in a child
pytest process with that variable set, started by `test_triton_kernels_in_interpreter_subprocess`;
in this process they are skipped. The interpreter is slow (a Python call per tensor op per tap
per program), so the shapes are tiny but still cover: kernel 3, 5 and per-dim (3, 5, 3);
fp32 and bf16; more than one block along H, W and C; ragged blocks; several reduction chunks.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import dwconv3d
from model.dwconv3d import (
    DepthwiseConv3d,
    depthwise_conv3d,
    depthwise_conv3d_tokens,
    set_depthwise_impl,
)
from model.uniformer import CBlock

CHILD_ENV = "UNIFORMER_DWCONV_INTERPRETER_CHILD"
IN_CHILD = os.environ.get(CHILD_ENV) == "1"
REPO = Path(__file__).resolve().parents[2]

interp = pytest.mark.skipif(
    not (IN_CHILD and dwconv3d.INTERPRET and dwconv3d.HAVE_TRITON),
    reason="runs in the TRITON_INTERPRET=1 child of test_triton_kernels_in_interpreter_subprocess",
)
parent_only = pytest.mark.skipif(IN_CHILD, reason="the in-process CPU tests run in the parent only")


def reference(x, weight, bias, dy):
    """F.conv3d and its gradients in float64, from the same (possibly bf16-rounded) values."""
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_() if bias is not None else None
    y = F.conv3d(x64, w64, b64, padding=tuple(k // 2 for k in weight.shape[2:]), groups=x.shape[1])
    grads = torch.autograd.grad(y, [t for t in (x64, w64, b64) if t is not None], dy.double())
    return (y, *grads)


def make(shape, ksize, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    w = (torch.randn((c, 1, *ksize), generator=g) * 0.2).to(dtype).requires_grad_()
    b = torch.randn(c, generator=g).to(dtype).requires_grad_() if bias else None
    return x, w, b


# -- in this process: the CPU path, the module, errors ----------------------------------------


@parent_only
@pytest.mark.parametrize("ksize", [(3, 3, 3), (5, 5, 5), (3, 5, 3)])
def test_cpu_path_is_f_conv3d(ksize):
    x, w, b = make((2, 8, 4, 6, 7), ksize, torch.float32)
    ref = F.conv3d(x, w, b, padding=tuple(k // 2 for k in ksize), groups=8)
    torch.testing.assert_close(depthwise_conv3d(x, w, b), ref, rtol=0, atol=0)
    tokens = depthwise_conv3d_tokens(x.permute(0, 2, 3, 4, 1), w, b)  # (B, T, H, W, C)
    torch.testing.assert_close(tokens.permute(0, 4, 1, 2, 3), ref, rtol=0, atol=0)


@parent_only
def test_module_keeps_conv3d_parameters_and_cpu_output():
    torch.manual_seed(0)
    conv = nn.Conv3d(16, 16, kernel_size=5, padding=2, groups=16)
    dw = DepthwiseConv3d(16, kernel_size=5)
    assert isinstance(dw, nn.Conv3d)
    assert [(k, v.shape) for k, v in dw.state_dict().items()] == [(k, v.shape) for k, v in conv.state_dict().items()]
    assert (dw.padding, dw.groups, dw.stride) == ((2, 2, 2), 16, (1, 1, 1))
    dw.load_state_dict(conv.state_dict(), strict=True)
    x = torch.randn(1, 16, 4, 5, 6)
    torch.testing.assert_close(dw(x), conv(x), rtol=0, atol=0)
    assert "impl='auto', tokens=False" in repr(dw)


@parent_only
def test_module_on_tokens_is_the_same_conv_and_keeps_the_layout():
    torch.manual_seed(0)
    dw = DepthwiseConv3d(16, kernel_size=5)
    dw_tokens = DepthwiseConv3d(16, kernel_size=5, tokens=True)
    dw_tokens.load_state_dict(dw.state_dict(), strict=True)
    x = torch.randn(2, 16, 4, 5, 6)
    y = dw_tokens(x.permute(0, 2, 3, 4, 1).contiguous())  # (B, T, H, W, C)
    torch.testing.assert_close(y.permute(0, 4, 1, 2, 3), dw(x), rtol=1e-6, atol=1e-6)
    # F.conv3d keeps the channels_last_3d format of the permuted view: the output needs no copy.
    assert y.is_contiguous()


@parent_only
def test_set_depthwise_impl_counts_every_depthwise_conv():
    block = CBlock(dim=8)
    assert set_depthwise_impl(block, "torch") == 2  # pos_embed (3x3x3) and attn (5x5x5)
    assert block.pos_embed.impl == block.attn.impl == "torch"
    with pytest.raises(ValueError, match=r"impl='cuda' is not one of \('auto', 'triton', 'torch'\)"):
        set_depthwise_impl(block, "cuda")


@parent_only
def test_compile_fullgraph_on_the_cpu_path():
    torch.manual_seed(0)
    block = CBlock(dim=8).eval()
    x = torch.randn(1, 2, 4, 4, 8)  # (B, T, H, W, C)
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x))


@parent_only
@pytest.mark.skipif(dwconv3d.INTERPRET, reason="under the interpreter CPU tensors may use Triton")
def test_impl_triton_on_cpu_tensor_is_an_error():
    x, w, b = make((1, 4, 2, 3, 3), (3, 3, 3), torch.float32)
    with pytest.raises(RuntimeError, match=r"impl='triton' needs a CUDA tensor and the triton package .*"
                                           r"got a cpu tensor.* Use impl='auto' to fall back to F.conv3d"):
        depthwise_conv3d(x, w, b, impl="triton")


@parent_only
@pytest.mark.parametrize("call,match", [
    (lambda: DepthwiseConv3d(8, kernel_size=4), r"kernel_size must be \(3, 5\) or a triple of them, got 4"),
    (lambda: DepthwiseConv3d(8, kernel_size=(3, 3)), r"kernel_size must be .* got \(3, 3\)"),
    (lambda: DepthwiseConv3d(8, impl="fast"), r"impl='fast' is not one of"),
    (lambda: depthwise_conv3d(torch.zeros(1, 4, 2, 3, 3), torch.zeros(4, 1, 7, 7, 7)),
     r"expected a depthwise weight of shape \(4, 1, KT, KH, KW\) with kernel sizes in \(3, 5\); got \(4, 1, 7, 7, 7\)"),
    (lambda: depthwise_conv3d(torch.zeros(1, 4, 2, 3, 3), torch.zeros(8, 1, 3, 3, 3)),
     r"expected a depthwise weight of shape \(4, 1, KT, KH, KW\)"),
    (lambda: depthwise_conv3d(torch.zeros(1, 4, 2, 3, 3), torch.zeros(4, 1, 3, 3, 3), torch.zeros(5)),
     r"expected a bias of shape \(4,\), got \(5,\)"),
    (lambda: depthwise_conv3d(torch.zeros(4, 2, 3, 3), torch.zeros(4, 1, 3, 3, 3)),
     r"expected a 5-D input, got shape \(4, 2, 3, 3\)"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@parent_only
def test_triton_kernels_in_interpreter_subprocess():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", CHILD_ENV: "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "test_interp_", str(Path(__file__))]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout[-6000:] + proc.stderr[-3000:])
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], tail


# -- in the interpreter child: the Triton kernels ----------------------------------------------

CASES = [
    # shape (B, C, T, H, W), kernel, dtype, memory format of x
    ((1, 8, 3, 5, 6), (5, 5, 5), torch.float32, torch.contiguous_format),
    ((2, 8, 4, 6, 7), (3, 3, 3), torch.bfloat16, torch.contiguous_format),
    # two W blocks (ragged), a ragged C block, per-dim kernel, channels-last input
    ((1, 40, 2, 5, 10), (3, 5, 3), torch.float32, torch.channels_last_3d),
]


@interp
@pytest.mark.parametrize("shape,ksize,dtype,fmt", CASES, ids=["k5-fp32", "k3-bf16", "k353-fp32-cl"])
def test_interp_matches_conv3d(shape, ksize, dtype, fmt):
    x, w, b = make(shape, ksize, dtype)
    x_in = x.detach().contiguous(memory_format=fmt).requires_grad_()
    y = depthwise_conv3d(x_in, w, b, impl="triton")
    assert y.shape == shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    gx, gw, gb = torch.autograd.grad(y, (x_in, w, b), dy)
    ry, rx, rw, rb = reference(x, w, b, dy)
    assert gx.dtype == gw.dtype == gb.dtype == dtype
    # fp32: summation order only. bf16: each result is rounded once to bf16 (2^-8 relative)
    # from an fp32 accumulator; grad weight sums ~100 products per tap here.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    wtol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=0.25)
    torch.testing.assert_close(y.double(), ry, **tol)
    torch.testing.assert_close(gx.double(), rx, **tol)
    torch.testing.assert_close(gw.double(), rw, **wtol)
    torch.testing.assert_close(gb.double(), rb, **wtol)


@interp
def test_interp_weight_grad_chunking_and_no_input_grad():
    # 72 channels: two C blocks in the forward, three in the weight gradient, the last ragged.
    x, w, b = make((1, 72, 3, 5, 6), (3, 3, 3), torch.float32, seed=2)
    x = x.detach()  # no grad for x: only the weight-gradient kernel runs in the backward
    dy = torch.randn(1, 3, 5, 6, 72)  # (B, T, H, W, C)
    y = depthwise_conv3d_tokens(x.permute(0, 2, 3, 4, 1), w, b, impl="triton")
    gw, gb = torch.autograd.grad(y, (w, b), dy)
    _, _, rw, rb = reference(x, w, b, dy.permute(0, 4, 1, 2, 3))
    torch.testing.assert_close(gw.double(), rw, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gb.double(), rb, rtol=1e-5, atol=1e-4)
    # The two-stage reduction gives the same sums for any number of chunks (1 .. one per tile).
    xt, dyc = x.permute(0, 2, 3, 4, 1).contiguous(), dy.contiguous()
    sums = [dwconv3d._launch_grad_weight(xt, dyc, (3, 3, 3), n_chunks=n) for n in (1, 4, 1000)]
    for gw_n, gb_n in sums[1:]:
        torch.testing.assert_close(gw_n, sums[0][0], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(gb_n, sums[0][1], rtol=1e-6, atol=1e-5)


@interp
def test_interp_module_under_autocast_follows_f_conv3d():
    torch.manual_seed(0)
    conv = DepthwiseConv3d(8, kernel_size=3)
    x = torch.randn(1, 8, 2, 4, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)  # Triton (interpreter) path
        ref = F.conv3d(x, conv.weight, conv.bias, padding=1, groups=8)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and conv.weight.grad.dtype == torch.float32


@interp
def test_interp_model_block_routes_through_triton_and_agrees(monkeypatch):
    calls = []
    launch = dwconv3d._launch_conv
    monkeypatch.setattr(dwconv3d, "_launch_conv", lambda *a, **k: (calls.append(a[-1]), launch(*a, **k))[1])
    torch.manual_seed(0)
    fast = CBlock(dim=8).eval()
    plain = CBlock(dim=8).eval()
    plain.load_state_dict(fast.state_dict())
    assert set_depthwise_impl(plain, "torch") == 2
    x = torch.randn(1, 2, 4, 4, 8)  # (B, T, H, W, C): the token-major entry of the op
    with torch.no_grad():
        out, ref = fast(x), plain(x)
    assert calls == [(3, 3, 3), (5, 5, 5)]  # pos_embed, then the local-affinity conv
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@interp
def test_interp_compile_fullgraph_with_the_triton_op():
    torch.manual_seed(0)
    conv = DepthwiseConv3d(8, kernel_size=3)
    x = torch.randn(1, 8, 2, 4, 5, requires_grad=True)
    # aot_eager traces forward and backward through the custom ops' fake kernels, then runs them.
    compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    gx, gw = x.grad.clone(), conv.weight.grad.clone()
    x.grad = conv.weight.grad = conv.bias.grad = None
    ref = F.conv3d(x, conv.weight, conv.bias, padding=1, groups=8)
    ref.square().sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, conv.weight.grad, rtol=1e-5, atol=1e-4)
