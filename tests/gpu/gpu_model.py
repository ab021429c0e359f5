"""The network on CUDA: the Triton depthwise conv against F.conv3d at the paper models' shapes,
BatchNorm folding, and a whole train step under torch.compile(fullgraph=True)."""

import pytest
import torch
import torch.nn.functional as F

from model import create_uniformer, fold_batchnorm
from model.dwconv3d import depthwise_conv3d_tokens, triton_usable

CUDA = torch.device("cuda")

# (B, C, T, H, W) of stages 1 and 2 at 16x224 (the stem halves T to 8), kernels 5 (local MHRA) and 3
# (DPE); stage 3-4 DPEs at 3. S and B share dims and differ in depth, so their shapes are these.
SHAPES = [((8, 64, 8, 56, 56), 5), ((8, 64, 8, 56, 56), 3), ((8, 128, 8, 28, 28), 5),
          ((8, 320, 8, 14, 14), 3), ((8, 512, 8, 7, 7), 3)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape, k", SHAPES)
def test_triton_depthwise_conv_matches_f_conv3d(shape, k, dtype):
    gen = torch.Generator(device=CUDA).manual_seed(0)
    B, C, T, H, W = shape
    x = torch.randn(B, T, H, W, C, device=CUDA, generator=gen).to(dtype)
    w = (torch.randn(C, 1, k, k, k, device=CUDA, generator=gen) / k**1.5).to(dtype)
    b = torch.randn(C, device=CUDA, generator=gen).to(dtype)
    dy = torch.randn(B, T, H, W, C, device=CUDA, generator=gen).to(dtype)
    assert triton_usable(x)
    xs, ws, bs = (t.detach().requires_grad_() for t in (x, w, b))
    y = depthwise_conv3d_tokens(xs, ws, bs, impl="triton")
    got = (y, *torch.autograd.grad(y, (xs, ws, bs), dy))
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    yr = F.conv3d(xr.permute(0, 4, 1, 2, 3), wr, br, padding=k // 2, groups=C).permute(0, 2, 3, 4, 1)
    want = (yr, *torch.autograd.grad(yr, (xr, wr, br), dy.double()))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for name, g, r in zip(("y", "dx", "dw", "db"), got, want):
        rel = ((g.double() - r).abs().max() / r.abs().max().clamp_min(1e-12)).item()
        assert rel < tol, f"{name}: relative error {rel:.2e}"
    assert ws.grad is None and got[2].stride() == w.stride()  # the weight gradient in the weight's layout


@pytest.mark.parametrize("variant", ["uniformer_s", "uniformer_b"])
def test_fold_batchnorm_keeps_the_logits_on_cuda(variant):
    torch.manual_seed(0)
    net = create_uniformer(variant, num_classes=400).to(CUDA)
    net.train()
    with torch.no_grad():  # a few batches so the running statistics are not the initial ones
        for _ in range(2):
            net(torch.randn(2, 3, 8, 96, 96, device=CUDA))
    net.eval()
    clip = torch.randn(2, 3, 8, 96, 96, device=CUDA)
    with torch.no_grad():
        want = net(clip)
        got = fold_batchnorm(net)(clip)
    assert (got - want).abs().max().item() < 1e-3 * max(1.0, want.abs().max().item())


def test_compiled_train_step_fullgraph_bf16():
    torch.manual_seed(0)
    net = create_uniformer("uniformer_s", num_classes=400).to(CUDA)
    compiled = torch.compile(net, fullgraph=True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    clip = torch.randn(2, 3, 16, 224, 224, device=CUDA)
    labels = torch.randint(0, 400, (2,), device=CUDA)
    losses = []
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(compiled(clip).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
