"""The UniFormer network: variants, released layout, size and cost, numerics, input checks."""

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model import OVERRIDES, create_uniformer, list_variants
from model.uniformer import Attention, DropPath

DATA = Path(__file__).parent / "data"
TINY = (2, 3, 4, 32, 64)  # (B, C, T, H, W): smallest legal clip, non-square


def tiny_clip(seed: int = 0, shape=TINY) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def xs():
    torch.manual_seed(0)
    return create_uniformer("uniformer_xs", num_classes=7).eval()


# -- every variant ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_variants())
def test_forward_backward_every_variant(name):
    torch.manual_seed(0)
    # eval: with batch statistics, the last block's output biases feed only the final
    # BatchNorm, which removes them, so their gradient would rightly be zero.
    net = create_uniformer(name, num_classes=5).eval()
    logits = net(tiny_clip())
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()
    logits.logsumexp(dim=1).sum().backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:5]}"
    zero_grad = [n for n, p in net.named_parameters() if not p.grad.abs().sum() > 0]
    assert not zero_grad, f"parameters with an all-zero gradient: {zero_grad[:5]}"


def test_list_variants():
    assert list_variants() == ["uniformer_xs", "uniformer_s", "uniformer_b"]


# -- the released checkpoints' layout, size and cost ----------------------------------------


def read_tsv(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _dtype = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    return rows


@pytest.mark.parametrize("name,tsv", [("uniformer_s", "uniformer_s_k400_state_dict.tsv"),
                                      ("uniformer_b", "uniformer_b_k400_state_dict.tsv")])
def test_state_dict_is_the_released_layout(name, tsv):
    with torch.device("meta"):
        net = create_uniformer(name, num_classes=400)
    ours = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
    assert ours == read_tsv(DATA / tsv)  # same keys, shapes and order


@pytest.mark.parametrize("name,millions", [("uniformer_s", 21.40), ("uniformer_b", 49.81)])
def test_parameter_count(name, millions):
    with torch.device("meta"):
        net = create_uniformer(name, num_classes=400)
    assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(millions, abs=0.005)


# The paper's GFLOPs are multiply-adds of convolutions, linear layers and the two attention
# matmuls (q k^T and attn v), one view of (1, 3, T, 224, 224). FlopCounterMode counts exactly
# those ops (aten.convolution, addmm, bmm; 2 FLOPs per MAC) and not norms, GELU, softmax,
# additions or the pooling; halved, it reproduces every published figure to 0.05 G.
@pytest.mark.parametrize("name,frames,gmacs", [
    ("uniformer_s", 8, 17.6), ("uniformer_s", 16, 41.7), ("uniformer_s", 32, 109.4),
    ("uniformer_b", 8, 40.1), ("uniformer_b", 16, 96.6), ("uniformer_b", 32, 258.3),
])
def test_multiply_adds_per_view(name, frames, gmacs):
    with torch.device("meta"):
        net = create_uniformer(name, num_classes=400).eval()
        clip = torch.empty(1, 3, frames, 224, 224)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(clip)
    assert counter.get_total_flops() / 2e9 == pytest.approx(gmacs, abs=0.05)


# -- numerics and runtime modes --------------------------------------------------------------


def test_sdpa_and_math_attention_agree():
    torch.manual_seed(0)
    attn = Attention(dim=128, head_dim=32, attn_impl="sdpa")
    tokens = torch.randn(2, 50, 128)
    ref = attn(tokens)
    attn.attn_impl = "math"
    torch.testing.assert_close(attn(tokens), ref, rtol=1e-5, atol=1e-5)

    torch.manual_seed(0)
    sdpa = create_uniformer("uniformer_xs", attn_impl="sdpa").eval()
    math = create_uniformer("uniformer_xs", attn_impl="math").eval()
    math.load_state_dict(sdpa.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(math(tiny_clip()), sdpa(tiny_clip()), rtol=1e-5, atol=1e-5)


def test_bf16_autocast(xs):
    clip = tiny_clip()
    with torch.no_grad():
        ref = xs(clip)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = xs(clip)
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), ref, rtol=0.1, atol=0.1)


def test_bf16_autocast_backward():
    torch.manual_seed(0)
    net = create_uniformer("uniformer_xs", num_classes=3).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = net(tiny_clip()).float().logsumexp(1).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_channels_last_3d_input_gives_same_output(xs):
    clip = tiny_clip()
    with torch.no_grad():
        ref = xs(clip)
        out = xs(clip.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph_whole_model(xs):
    # fullgraph=True fails on any graph break in forward, input checks included. The "eager"
    # backend stops after Dynamo's capture: Inductor on the whole model takes ~50 s on 2 cores.
    compiled = torch.compile(xs, fullgraph=True, backend="eager")
    clip = tiny_clip()
    with torch.no_grad():
        torch.testing.assert_close(compiled(clip), xs(clip))


# Inductor's own import of torch.ao mkldnn modules warns about torch.jit.script_method.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_inductor_attention_block(xs):
    block = xs.blocks3[0]  # global MHRA: DPE, LayerNorm, SDPA, MLP
    tokens = torch.randn(2, 2, 2, 4, 128)  # (B, T, H, W, C3)
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens), block(tokens), rtol=1e-4, atol=1e-4)


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = create_uniformer("uniformer_xs", num_classes=3).eval()  # eval: BN stats fixed
    ckpt = create_uniformer("uniformer_xs", num_classes=3, grad_checkpointing=True).eval()
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.grad_checkpointing_stages == {1, 2, 3, 4}
    for net in (plain, ckpt):
        net(tiny_clip()).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    ckpt.set_grad_checkpointing(False)
    assert not ckpt.grad_checkpointing_stages
    ckpt.set_grad_checkpointing(stages=(3, 4))
    assert ckpt.grad_checkpointing_stages == {3, 4}
    with pytest.raises(ValueError, match=r"stages must be among 1, 2, 3, 4; got \[0\]"):
        ckpt.set_grad_checkpointing(stages=(0,))


def assert_one_step_as_without_checkpointing(layout: str, compile_backend: str | None = None) -> None:
    """Train mode, one forward + backward with and without grad checkpointing: the same
    BatchNorm buffers (each updated once) and the same gradients."""
    torch.manual_seed(0)
    plain = create_uniformer("uniformer_xs", num_classes=3, layout=layout, drop_path_rate=0.1).train()
    ckpt = create_uniformer("uniformer_xs", num_classes=3, layout=layout, drop_path_rate=0.1,
                            grad_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    run = torch.compile(ckpt, backend=compile_backend, fullgraph=True) if compile_backend else ckpt
    for net in (plain, run):
        torch.manual_seed(1)  # the same drop-path draws
        net(tiny_clip()).square().sum().backward()
    norms = [(n, m) for n, m in ckpt.named_modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert len(norms) == 2 * 2 + 1  # norm1, norm2 of the two CBlocks, and the final norm
    for name, m in norms:
        assert m.num_batches_tracked.item() == 1, name
        assert m.track_running_stats and m.training, name
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("layout", ["tokens", "channels_first"])
def test_grad_checkpointing_updates_batchnorm_once_per_step(layout):
    # The recompute in backward runs the blocks again in train mode; it must not move the
    # running statistics a second time.
    assert_one_step_as_without_checkpointing(layout)


def test_grad_checkpointing_under_torch_compile_updates_batchnorm_once_per_step():
    # Traced, the checkpoint takes no context_fn; the compiled recompute must not update twice either.
    assert_one_step_as_without_checkpointing("tokens", compile_backend="aot_eager")


def test_drop_path_rises_linearly_and_only_in_training():
    net = create_uniformer("uniformer_xs", drop_path_rate=0.2)
    rates = [m.p for m in net.modules() if isinstance(m, DropPath)]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    drop = DropPath(0.5).train()
    x = torch.ones(64, 4)
    kept = drop(x)
    assert set(kept[:, 0].tolist()) <= {0.0, 2.0} and 0 < kept[:, 0].sum() < 128
    assert torch.equal(drop.eval()(x), x)


def test_forward_features_head_and_reset_classifier():
    torch.manual_seed(0)
    net = create_uniformer("uniformer_xs", num_classes=7).eval()
    clip = tiny_clip(shape=(1, 3, 8, 64, 96))
    with torch.no_grad():
        feats = net.forward_features(clip)
        assert feats.shape == (1, 4, 2, 3, 256)  # (B, T/2, H/32, W/32, C4)
        assert net.forward_head(feats, pre_logits=True).shape == (1, 256)
        net.reset_classifier(11)
        assert net(clip).shape == (1, 11) and net.num_classes == 11
        net.reset_classifier(0)
        torch.testing.assert_close(net(clip), feats.mean(dim=(1, 2, 3)))


# -- errors ----------------------------------------------------------------------------------

SHAPE_HINT = r"expected input of shape \(B, 3, T, H, W\) with T even and H, W multiples of 32; "


@pytest.mark.parametrize("shape,match", [
    ((3, 4, 32, 32), SHAPE_HINT + r"got shape \(3, 4, 32, 32\) \(4 dims\)"),
    ((1, 1, 4, 32, 32), SHAPE_HINT + r"got shape \(1, 1, 4, 32, 32\): 1 channels instead of 3"),
    ((1, 3, 5, 32, 32), SHAPE_HINT + r"got shape \(1, 3, 5, 32, 32\): T=5 is odd"),
    ((1, 3, 4, 32, 48), SHAPE_HINT + r"got shape \(1, 3, 4, 32, 48\): H, W = 32, 48 are not both multiples of 32"),
    ((1, 3, 4, 40, 32), r"H, W = 40, 32 are not both multiples of 32"),
])
def test_bad_input_shape(xs, shape, match):
    with pytest.raises(ValueError, match=match):
        xs(torch.zeros(shape))


def test_bad_input_dtype(xs):
    with pytest.raises(ValueError, match=r"expected a floating-point clip, got dtype torch.uint8"):
        xs(torch.zeros(TINY, dtype=torch.uint8))


def test_unknown_variant():
    with pytest.raises(ValueError, match=r"unknown UniFormer variant 'uniformer_l'; known variants: "
                                         r"uniformer_xs, uniformer_s, uniformer_b"):
        create_uniformer("uniformer_l")


def test_unknown_override():
    with pytest.raises(TypeError, match=r"unknown override\(s\) \['drop_rate'\] for uniformer_s; valid overrides: "):
        create_uniformer("uniformer_s", drop_rate=0.1)
    assert set(OVERRIDES) == {"depths", "embed_dims", "head_dim", "mlp_ratio", "qkv_bias",
                              "drop_path_rate", "attn_impl", "layout", "grad_checkpointing"}


@pytest.mark.parametrize("overrides,match", [
    (dict(depths=(1, 1, 1)), r"depths must be 4 positive ints \(one per stage\), got \(1, 1, 1\)"),
    (dict(embed_dims=(32, 64, 128, 0)), r"embed_dims must be 4 positive ints"),
    (dict(head_dim=48), r"head_dim=48 must be a positive int dividing the attention stages' embed_dims \(128, 256\)"),
    (dict(attn_impl="flash"), r"attn_impl='flash' is not one of \('sdpa', 'math'\)"),
    (dict(layout="nchw"), r"layout='nchw' is not one of \('tokens', 'channels_first'\)"),
    (dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0, 1\), got 1.0"),
    (dict(mlp_ratio=0), r"mlp_ratio must be > 0, got 0"),
])
def test_bad_overrides(overrides, match):
    with pytest.raises(ValueError, match=match):
        create_uniformer("uniformer_xs", **overrides)


def test_bad_num_classes():
    with pytest.raises(ValueError, match=r"num_classes must be an int >= 0, got -1"):
        create_uniformer("uniformer_xs", num_classes=-1)
    with pytest.raises(ValueError, match=r"num_classes must be >= 0, got -2"):
        create_uniformer("uniformer_xs").reset_classifier(-2)


@pytest.mark.parametrize("layout", ["tokens", "channels_first"])
def test_every_gradient_has_its_parameters_strides(layout):
    # DDP copies (and warns about) any gradient whose strides differ from its bucket view's.
    net = create_uniformer("uniformer_xs", num_classes=4, layout=layout)
    net(torch.randn(2, 3, 8, 64, 64)).sum().backward()
    mismatched = [name for name, p in net.named_parameters() if p.grad.stride() != p.stride()]
    assert mismatched == []


def test_ddp_reducer_takes_the_gradients_without_a_stride_warning(tmp_path):
    import warnings

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(create_uniformer("uniformer_xs", num_classes=4))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ddp(torch.randn(2, 3, 8, 64, 64)).sum().backward()
        assert not [w for w in caught if "Grad strides do not match" in str(w.message)]
    finally:
        dist.destroy_process_group()
