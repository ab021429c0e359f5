"""Checkpoint handling: unwrapping, 2D->3D inflation, strict loading and its report."""

import pytest
import torch

from model import create_uniformer, inflate_2d_to_3d, load_pretrained, unwrap_state_dict


def xs(num_classes: int = 400, seed: int = 0):
    torch.manual_seed(seed)
    return create_uniformer("uniformer_xs", num_classes=num_classes).eval()


def assert_same_state(a: dict, b: dict, skip_prefix: str = "\0") -> None:
    assert a.keys() == b.keys()
    for key in a:
        if not key.startswith(skip_prefix):
            assert torch.equal(a[key], b[key]), key


def imagenet_2d_state(model_state: dict, num_classes: int = 1000, seed: int = 0) -> dict:
    """A fake ImageNet UniFormer checkpoint: the video keys with 2D kernels and a 1000-way head."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, ref in model_state.items():
        shape = tuple(ref.shape)
        if len(shape) == 5:
            shape = shape[:2] + shape[3:]  # (O, I, kt, kh, kw) -> (O, I, kh, kw)
        if key == "head.weight":
            shape = (num_classes, shape[1])
        elif key == "head.bias":
            shape = (num_classes,)
        out[key] = torch.randn(shape, generator=gen) if ref.is_floating_point() else ref.clone()
    return out


# -- unwrap ----------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"model_state": sd, "optimizer_state": {"step": 3}, "epoch": 2},
    lambda sd: {"model": sd},
    lambda sd: {"state_dict": sd},
    lambda sd: {f"module.{k}": v for k, v in sd.items()},
    lambda sd: {"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}},
], ids=["bare", "model_state", "model", "state_dict", "ddp_prefix", "ddp_compiled_prefix"])
def test_unwrap_state_dict(wrap):
    sd = xs().state_dict()
    assert_same_state(unwrap_state_dict(wrap(sd)), sd)


def test_unwrap_refuses_what_is_not_a_state_dict():
    with pytest.raises(ValueError, match=r"expected a state dict \(a mapping of names to tensors\), got list"):
        unwrap_state_dict([1, 2])
    with pytest.raises(ValueError, match=r"not a state dict: entries \[epoch, config\] are not tensors; "
                                         r"expected a bare state dict or one wrapped under one of"):
        unwrap_state_dict({"epoch": 3, "config": {}, "w": torch.zeros(1)})


# -- load_pretrained -------------------------------------------------------------------------


@pytest.mark.parametrize("wrapped", ["bare", "model_state", "module"])
def test_load_from_file_bare_wrapped_and_ddp(tmp_path, wrapped):
    source = xs(seed=1).state_dict()
    obj = {"bare": source, "model_state": {"model_state": source, "epoch": 7},
           "module": {f"module.{k}": v for k, v in source.items()}}[wrapped]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    target = xs(seed=2)
    report = load_pretrained(target, path)
    assert_same_state(target.state_dict(), source)
    assert report.loaded == tuple(source) and not report.skipped and not report.missing and not report.inflated


def test_load_from_state_dict_object():
    source = xs(seed=1).state_dict()
    target = xs(seed=2)
    load_pretrained(target, {"model": source})
    assert_same_state(target.state_dict(), source)


def test_head_dropped_when_class_count_differs():
    source = xs(num_classes=400, seed=1).state_dict()
    target = xs(num_classes=10, seed=2)
    head_before = target.head.weight.clone()
    report = load_pretrained(target, source)
    assert report.skipped == ("head.weight", "head.bias")
    assert report.missing == ("head.weight", "head.bias")
    assert torch.equal(target.head.weight, head_before)
    assert_same_state({k: v for k, v in target.state_dict().items() if not k.startswith("head.")},
                      {k: v for k, v in source.items() if not k.startswith("head.")})
    assert "skipped=[head.weight, head.bias]" in repr(report)


def test_partial_checkpoint_refused_naming_keys():
    source = xs(seed=1).state_dict()
    for key in [k for k in source if k.startswith("blocks4.")]:
        del source[key]
    target = xs(seed=2)
    with pytest.raises(ValueError, match=r"checkpoint does not fit this UniFormer: 14 missing keys "
                                         r"\[blocks4\.0\.pos_embed\.weight, blocks4\.0\.pos_embed\.bias, "
                                         r"blocks4\.0\.norm1\.weight, blocks4\.0\.norm1\.bias, \.\.\.\], "
                                         r"0 unexpected keys \[\], 0 shape mismatches \[\]\. .*strict=False"):
        load_pretrained(target, source)
    report = load_pretrained(target, source, strict=False)
    assert len(report.missing) == 14 and all(k.startswith("blocks4.") for k in report.missing)
    assert torch.equal(target.state_dict()["blocks1.0.attn.weight"], source["blocks1.0.attn.weight"])


def test_missing_batchnorm_counters_are_tolerated():
    source = {k: v for k, v in xs(seed=1).state_dict().items() if not k.endswith("num_batches_tracked")}
    report = load_pretrained(xs(seed=2), source)
    assert report.missing and all(k.endswith("num_batches_tracked") for k in report.missing)


def test_other_architecture_refused():
    with torch.device("meta"):
        small = create_uniformer("uniformer_s").state_dict()
    with pytest.raises(ValueError, match=r"checkpoint does not fit this UniFormer: 0 missing keys \[\], "
                                         r"\d+ unexpected keys \[blocks1\.1\.pos_embed\.weight, .*\], "
                                         r"\d+ shape mismatches \[patch_embed1\.norm\.weight: checkpoint \(64,\) "
                                         r"vs model \(32,\), .*another variant or architecture"):
        load_pretrained(xs(), small)
    foreign = {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}
    with pytest.raises(ValueError, match=r"\d+ missing keys \[patch_embed1\.norm\.weight, .*"
                                         r"2 unexpected keys \[conv1\.weight, fc\.weight\]"):
        load_pretrained(xs(), foreign)


def test_shape_mismatch_refused_then_skipped_when_not_strict():
    source = xs(seed=1).state_dict()
    source["blocks3.0.mlp.fc1.weight"] = torch.zeros(3, 3)
    target = xs(seed=2)
    with pytest.raises(ValueError, match=r"1 shape mismatches \[blocks3\.0\.mlp\.fc1\.weight: "
                                         r"checkpoint \(3, 3\) vs model \(512, 128\)\]"):
        load_pretrained(target, source)
    report = load_pretrained(target, source, strict=False)
    assert report.skipped == ("blocks3.0.mlp.fc1.weight",) and report.missing == ("blocks3.0.mlp.fc1.weight",)


# -- 2D -> 3D inflation ----------------------------------------------------------------------


def test_inflate_imagenet_weights():
    target = xs(num_classes=400)
    model_state = target.state_dict()
    state_2d = imagenet_2d_state(model_state)
    report = load_pretrained(target, {"model": state_2d})
    loaded = target.state_dict()

    five_d = [k for k, v in model_state.items() if v.ndim == 5]
    assert report.inflated == tuple(five_d)
    assert report.skipped == ("head.weight", "head.bias")  # ImageNet's 1000 classes
    expected_time = {"patch_embed1.proj.weight": 3, "patch_embed2.proj.weight": 1, "blocks1.0.pos_embed.weight": 3,
                     "blocks1.0.attn.weight": 5, "blocks1.0.conv1.weight": 1, "blocks3.0.pos_embed.weight": 3}
    for key, time in expected_time.items():
        w3, w2 = loaded[key], state_2d[key]
        assert w3.shape[2] == time
        torch.testing.assert_close(w3.sum(dim=2), w2)  # summed over time: the 2D kernel
        torch.testing.assert_close(w3, (w2 / time).unsqueeze(2).expand_as(w3))  # spread evenly
    assert torch.equal(loaded["blocks3.0.attn.qkv.weight"], state_2d["blocks3.0.attn.qkv.weight"])
    assert torch.equal(loaded["norm.running_var"], state_2d["norm.running_var"])


def test_inflate_is_pure_and_refuses_misfit_kernels():
    model_state = xs().state_dict()
    state_2d = imagenet_2d_state(model_state)
    before = {k: v.clone() for k, v in state_2d.items()}
    out = inflate_2d_to_3d(state_2d, model_state)
    assert out["patch_embed1.proj.weight"].shape == (32, 3, 3, 4, 4)
    assert out["blocks1.0.attn.weight"].shape == (32, 1, 5, 5, 5)
    assert_same_state(state_2d, before)  # input untouched
    state_2d["patch_embed1.proj.weight"] = torch.zeros(32, 3, 7, 7)
    with pytest.raises(ValueError, match=r"cannot inflate patch_embed1\.proj\.weight: 2D kernel \(32, 3, 7, 7\) "
                                         r"does not match the model's 3D kernel \(32, 3, 3, 4, 4\)"):
        inflate_2d_to_3d(state_2d, model_state)
