"""The Triton depthwise-conv kernels in Triton's interpreter, against F.conv3d.

Run by `test_dwconv3d.test_triton_kernels_in_interpreter_subprocess` in a child pytest process
with TRITON_INTERPRET=1 (the variable must be set before triton is imported, so not in the parent).
The interpreter is slow (a Python call per tensor op per tap per program), so the shapes are tiny
but still cover: kernel 3, 5 and per-dim (3, 5, 3); fp32 and bf16; more than one block along H, W
and C; ragged blocks; several reduction chunks.
"""

import pytest
import torch
import torch.nn.functional as F

from model import dwconv3d
from model.dwconv3d import DepthwiseConv3d, depthwise_conv3d, depthwise_conv3d_tokens, set_depthwise_impl
from model.uniformer import CBlock
from tests.model.test_dwconv3d import make, reference

if not (dwconv3d.INTERPRET and dwconv3d.HAVE_TRITON):
    raise RuntimeError("run with TRITON_INTERPRET=1 and triton installed (see test_dwconv3d.py)")

CASES = [
    # shape (B, C, T, H, W), kernel, dtype, memory format of x
    ((1, 8, 3, 5, 6), (5, 5, 5), torch.float32, torch.contiguous_format),
    ((2, 8, 4, 6, 7), (3, 3, 3), torch.bfloat16, torch.contiguous_format),
    # two W blocks (ragged), a ragged C block, per-dim kernel, channels-last input
    ((1, 40, 2, 5, 10), (3, 5, 3), torch.float32, torch.channels_last_3d),
]


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
