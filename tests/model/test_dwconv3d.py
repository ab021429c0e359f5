"""Depthwise 3D convolution: the Triton kernels against F.conv3d, the CPU path, the module.

The kernels are checked without a GPU in Triton's interpreter, which must be switched on
(TRITON_INTERPRET=1) before triton is imported. So they are checked in a child pytest process
with that variable set, started by `test_triton_kernels_in_interpreter_subprocess`, on the tests of
`interpreted_dwconv3d.py` (a name pytest does not collect by itself).
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

REPO = Path(__file__).resolve().parents[2]


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


@pytest.mark.parametrize("ksize", [(3, 3, 3), (5, 5, 5), (3, 5, 3)])
def test_cpu_path_is_f_conv3d(ksize):
    x, w, b = make((2, 8, 4, 6, 7), ksize, torch.float32)
    ref = F.conv3d(x, w, b, padding=tuple(k // 2 for k in ksize), groups=8)
    torch.testing.assert_close(depthwise_conv3d(x, w, b), ref, rtol=0, atol=0)
    tokens = depthwise_conv3d_tokens(x.permute(0, 2, 3, 4, 1), w, b)  # (B, T, H, W, C)
    torch.testing.assert_close(tokens.permute(0, 4, 1, 2, 3), ref, rtol=0, atol=0)


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


def test_set_depthwise_impl_counts_every_depthwise_conv():
    block = CBlock(dim=8)
    assert set_depthwise_impl(block, "torch") == 2  # pos_embed (3x3x3) and attn (5x5x5)
    assert block.pos_embed.impl == block.attn.impl == "torch"
    with pytest.raises(ValueError, match=r"impl='cuda' is not one of \('auto', 'triton', 'torch'\)"):
        set_depthwise_impl(block, "cuda")


def test_compile_fullgraph_on_the_cpu_path():
    torch.manual_seed(0)
    block = CBlock(dim=8).eval()
    x = torch.randn(1, 2, 4, 4, 8)  # (B, T, H, W, C)
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x))


@pytest.mark.skipif(dwconv3d.INTERPRET, reason="under the interpreter CPU tensors may use Triton")
def test_impl_triton_on_cpu_tensor_is_an_error():
    x, w, b = make((1, 4, 2, 3, 3), (3, 3, 3), torch.float32)
    with pytest.raises(RuntimeError, match=r"impl='triton' needs a CUDA tensor and the triton package .*"
                                           r"got a cpu tensor.* Use impl='auto' to fall back to F.conv3d"):
        depthwise_conv3d(x, w, b, impl="triton")


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


def test_triton_kernels_in_interpreter_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).with_name(
        "interpreted_dwconv3d.py"))]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout[-6000:] + proc.stderr[-3000:])
    assert proc.returncode == 0, tail
    assert "7 passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], tail
