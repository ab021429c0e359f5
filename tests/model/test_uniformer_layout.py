"""Token-major layout against the (B, C, T, H, W) reference formulation, and BatchNorm folding."""

import pytest
import torch
import torch.nn as nn

from model import create_uniformer, fold_batchnorm
from model.dwconv3d import set_depthwise_impl

CLIP = (2, 3, 4, 64, 64)  # (B, C, T, H, W)


def clip(seed: int = 0) -> torch.Tensor:
    return torch.randn(CLIP, generator=torch.Generator().manual_seed(seed))


def scramble_batchnorms(net: nn.Module, seed: int = 1) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics (fresh ones are
    the identity in eval mode, which would make folding and eval-mode checks vacuous)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                c = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(c, generator=gen))
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))


def pair():
    """The default (token-major, SDPA) model and the reference formulation of the same weights."""
    torch.manual_seed(0)
    fast = create_uniformer("uniformer_xs", num_classes=7)
    scramble_batchnorms(fast)
    ref = create_uniformer("uniformer_xs", num_classes=7, layout="channels_first", attn_impl="math")
    ref.load_state_dict(fast.state_dict(), strict=True)
    set_depthwise_impl(ref, "torch")
    return fast, ref


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float, name: str = "",
                        floor: float = 1e-12) -> None:
    """max |actual - expected| <= rel * max(max |expected|, floor): fp32 summation order only."""
    scale = expected.abs().max().clamp_min(floor)
    err = (actual - expected).abs().max()
    assert err <= rel * scale, f"{name}: max abs diff {err:.3g} over scale {scale:.3g}"


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_tokens_match_the_reference_formulation(train):
    fast, ref = pair()
    assert fast.layout == "tokens" and ref.layout == "channels_first"
    fast.train(train), ref.train(train)
    x = clip()
    out_fast, out_ref = fast(x), ref(x)
    assert_close_scaled(out_fast, out_ref, 1e-5, "logits")
    # A loss that weighs every logit differently, so every path carries gradient.
    weights = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(3))
    (out_fast * weights).sum().backward()
    (out_ref * weights).sum().backward()
    # In train mode the biases added in the last block feed only the final BatchNorm, which
    # removes per-channel shifts: their gradients are ~0 plus rounding noise, so each scale has
    # a floor at 1e-2 of the largest gradient.
    floor = 1e-2 * max(p.grad.abs().max().item() for p in ref.parameters())
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        assert a.grad is not None and b.grad is not None, name
        assert_close_scaled(a.grad, b.grad, 1e-5, name, floor)
    if train:
        # Running statistics, their momentum updates and num_batches_tracked match too.
        for (name, a), b in zip(fast.named_buffers(), ref.buffers()):
            if "running_var" in name:
                assert_close_scaled(a, b, 1e-5, name)
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        assert fast.norm.num_batches_tracked.item() == 1


def test_activations_stay_token_major_and_contiguous():
    torch.manual_seed(0)
    net = create_uniformer("uniformer_xs", num_classes=7).train()
    seen = []

    def record(module, inputs, output):
        for role, t in (("input", inputs[0]), ("output", output)):
            if t.ndim == 5:
                seen.append((type(module).__name__, role, tuple(t.shape), t.stride(), t.is_contiguous()))

    # Blocks, later patch embeds, the final norm, and inside the blocks every depthwise conv,
    # 1x1x1 conv and BatchNorm: a copy anywhere would show as a non-contiguous map.
    modules = [net.patch_embed2, net.patch_embed3, net.patch_embed4, net.norm]
    for block in (*net.blocks1, *net.blocks2):
        modules += [block, block.pos_embed, block.norm1, block.conv1, block.attn, block.conv2, block.norm2,
                    block.mlp.fc1, block.mlp.fc2]
    for block in (*net.blocks3, *net.blocks4):
        modules += [block, block.pos_embed]
    for m in modules:
        m.register_forward_hook(record)
    net(clip()).sum().backward()

    assert len(seen) == 2 * len(modules)
    not_contiguous = [s for s in seen if not s[4]]
    assert not not_contiguous, not_contiguous
    # Block inputs are (B, T, H, W, C): C last, stride 1.
    block_inputs = [(shape, stride) for name, role, shape, stride, _ in seen
                    if name in ("CBlock", "SABlock") and role == "input"]
    assert [shape for shape, _ in block_inputs] == [
        (2, 2, 16, 16, 32), (2, 2, 8, 8, 64), (2, 2, 4, 4, 128), (2, 2, 4, 4, 128), (2, 2, 2, 2, 256)]
    assert all(stride[-1] == 1 for _, stride in block_inputs)


def test_forward_features_is_token_major_in_both_layouts():
    fast, ref = pair()
    fast.eval(), ref.eval()
    with torch.no_grad():
        a, b = fast.forward_features(clip()), ref.forward_features(clip())
    assert a.shape == b.shape == (2, 2, 2, 2, 256)  # (B, T/2, H/32, W/32, C4)
    assert_close_scaled(a, b, 1e-5)


def test_torch_compile_fullgraph_training_step_on_tokens():
    # aot_eager traces forward and backward (batch statistics, the depthwise op on its CPU path)
    # without graph breaks and runs them eagerly: no Inductor compile time on 2 cores.
    fast, ref = pair()
    fast.train(), ref.train()
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    out = compiled(clip())
    out.square().sum().backward()
    ref(clip()).square().sum().backward()
    assert_close_scaled(fast.head.weight.grad, ref.head.weight.grad, 1e-4)
    assert_close_scaled(fast.blocks1[0].attn.weight.grad, ref.blocks1[0].attn.weight.grad, 1e-4)


# -- BatchNorm folding -----------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["tokens", "channels_first"])
def test_fold_batchnorm_gives_the_same_logits_and_leaves_the_model_alone(layout):
    torch.manual_seed(0)
    net = create_uniformer("uniformer_xs", num_classes=7, layout=layout).train()
    scramble_batchnorms(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_batchnorm(net)
    assert net.training and not net.batchnorm_folded  # the original is untouched, mode included
    assert list(net.state_dict()) == list(before)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k

    assert folded.batchnorm_folded and not folded.training
    assert not any(isinstance(m, nn.BatchNorm3d) for m in folded.modules())
    net.eval()
    x = clip()
    with torch.no_grad():
        assert_close_scaled(folded(x), net(x), 1e-5, "logits")


def test_folded_model_refuses_training_and_compiles():
    torch.manual_seed(0)
    net = create_uniformer("uniformer_xs", num_classes=7)
    scramble_batchnorms(net)
    folded = fold_batchnorm(net)
    with pytest.raises(RuntimeError, match=r"BatchNorms folded .* holds only for inference; train the unfolded "
                                           r"model and fold a fresh copy"):
        folded.train()
    folded.eval()  # still allowed
    with pytest.raises(RuntimeError, match=r"final BatchNorm of this fold_batchnorm copy is folded into its head; "
                                           r"reset the classifier of the unfolded model, then fold it again"):
        folded.reset_classifier(3)
    assert "batchnorm_folded=True" in repr(folded)
    compiled = torch.compile(folded, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(clip()), folded(clip()))


def test_fold_batchnorm_without_a_head_keeps_the_final_norm():
    torch.manual_seed(0)
    net = create_uniformer("uniformer_xs", num_classes=0).eval()
    scramble_batchnorms(net)
    folded = fold_batchnorm(net)
    assert isinstance(folded.norm, nn.BatchNorm3d) and isinstance(folded.blocks1[0].norm1, nn.Identity)
    with torch.no_grad():
        assert_close_scaled(folded(clip()), net(clip()), 1e-5, "features")
