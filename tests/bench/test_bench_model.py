"""`uniformer bench model` (pipeline.bench.model) on the CPU with a tiny model."""

import argparse
import json

import pytest
import torch

import jobs.bench
from pipeline.bench import model as bench_model
from pipeline.bench.model import add_dwconv_parser, add_model_parser, build_model, run_dwconv_bench, run_model_bench

TINY = ["--variant", "xs", "--frames", "2", "--size", "32", "--batch", "2", "--steps", "1", "--warmup", "0",
        "--precision", "fp32", "--device", "cpu", "--num-classes", "5"]


def parse(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    add_model_parser(sub)
    add_dwconv_parser(sub)
    return parser.parse_args(argv)


def test_compare_runs_both_formulations_and_reports_the_fields():
    summary = run_model_bench(parse(["model", *TINY, "--compare"]))
    json.dumps(summary)  # one JSON line
    assert summary["model"] == "uniformer_xs" and summary["device_name"] == "cpu"
    assert summary["gmacs_per_clip"] > 0 and summary["peak_tflops"] is None
    for impl in ("reference", "optimised"):
        run = summary[impl]
        assert run["impl"] == impl and run["step_ms_median"] > 0 and run["clips_per_s"] > 0
        assert run["peak_memory_gib"] is None and run["cpu_peak_rss_growth_gib"] >= 0
        assert "peak RSS" in run["memory_note"] and run["mfu"] is None
        assert run["depthwise_impl"] == "torch"  # no GPU: F.conv3d on both sides
        assert run["optimizer"] == "AdamW, default implementation"  # fused only for the optimised model on CUDA
    assert summary["reference"]["attn_impl"] == "math" and summary["optimised"]["attn_impl"] == "sdpa"
    assert summary["reference"]["layout"] == "channels_first" and summary["optimised"]["layout"] == "tokens"
    assert not summary["reference"]["batchnorm_folded"] and not summary["optimised"]["batchnorm_folded"]
    assert summary["speedup"] > 0
    assert summary["logits_close"] and summary["max_abs_logit_diff"] < 1e-4


def test_single_run_is_flat_and_infer_mode_works():
    summary = run_model_bench(parse(["model", *TINY, "--mode", "infer", "--reference"]))
    assert summary["impl"] == "reference" and summary["mode"] == "infer"
    assert {"clips_per_s", "step_ms_median", "peak_memory_gib", "mfu", "device_name"} <= set(summary)
    assert "optimised" not in summary


def test_reference_and_optimised_models_give_the_same_logits():
    args = parse(["model", *TINY])
    torch.manual_seed(0)
    state = build_model(args, reference=False, device=torch.device("cpu")).state_dict()
    ref = build_model(args, reference=True, device=torch.device("cpu"), state_dict=state).eval()
    opt = build_model(args, reference=False, device=torch.device("cpu"), state_dict=state).eval()
    assert ref.blocks1[0].attn.impl == "torch" and ref.blocks3[0].attn.attn_impl == "math"
    assert ref.layout == "channels_first" and opt.layout == "tokens"
    clip = torch.randn(2, 3, 4, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(opt(clip), ref(clip), rtol=1e-5, atol=1e-5)


def test_reference_runs_the_official_ops():
    """The reference's ops, as pipeline.bench.gpu's table says: what the official forward runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append((func, args))
            return func(*args, **(kwargs or {}))

    net = build_model(parse(["model", *TINY]), reference=True, device=torch.device("cpu")).train()
    record = Record()
    with record:
        net(torch.randn(2, 3, 4, 32, 64)).sum().backward()
    ops = [str(func) for func, _ in record.calls]
    c_blocks, sa_blocks = len(net.blocks1) + len(net.blocks2), len(net.blocks3) + len(net.blocks4)
    # Explicit softmax attention: no fused attention kernel.
    assert not [op for op in ops if "attention" in op or "flash" in op]
    assert ops.count("aten._softmax.default") == sa_blocks
    # Every convolution is the native one on contiguous (B, C, T, H, W) memory; depthwise ones as
    # nn.Conv3d(groups=C): 3x3x3 DPE in every block, 5x5x5 in the CBlocks. No Triton op.
    convs = [args for func, args in record.calls if func is aten.convolution.default]
    assert convs and all(x.is_contiguous() for x, *_ in convs)
    depthwise = [w.shape[2] for x, w, *rest in convs if rest[-1] == x.shape[1] > 1]
    assert sorted(depthwise) == sorted([3] * (c_blocks + sa_blocks) + [5] * c_blocks)
    assert not [op for op in ops if op.startswith("uniformer.")]
    # BatchNorm in the CBlocks and before the head; LayerNorm after each patch embed and in the
    # SABlocks, which read the tokens as a strided view of the (B, C, T, H, W) map, as the official does.
    assert ops.count("aten.native_batch_norm.default") == 2 * c_blocks + 1
    norms = [args[0] for func, args in record.calls if func is aten.native_layer_norm.default]
    assert len(norms) == 4 + 2 * sa_blocks
    tokens = [x for x in norms if x.ndim == 3]  # (B, N, C), N = T*H*W
    assert len(tokens) == 2 * sa_blocks and all(x.stride(1) == 1 for x in tokens)


def test_fold_bn_in_infer_mode_folds_the_optimised_model_only():
    summary = run_model_bench(parse(["model", *TINY, "--mode", "infer", "--compare", "--fold-bn"]))
    assert summary["optimised"]["batchnorm_folded"] and not summary["reference"]["batchnorm_folded"]
    assert summary["logits_close"] and summary["max_abs_logit_diff"] < 1e-4
    args = parse(["model", *TINY, "--mode", "infer", "--fold-bn"])
    assert build_model(args, reference=False, device=torch.device("cpu")).batchnorm_folded
    assert not build_model(args, reference=True, device=torch.device("cpu")).batchnorm_folded


def test_onnx_times_onnxruntime_beside_the_folded_pytorch_model():
    summary = run_model_bench(parse(["model", *TINY, "--mode", "infer", "--onnx"]))
    json.dumps(summary)
    pytorch, ort = summary["pytorch"], summary["onnxruntime"]
    assert pytorch["impl"] == "optimised" and pytorch["batchnorm_folded"]  # the graph ONNX Runtime runs
    assert ort["provider"] == "CPUExecutionProvider" and ort["intra_op_threads"] == summary["torch_threads"]
    assert ort["step_ms_median"] > 0 and ort["clips_per_s"] > 0 and ort["export_s"] > 0
    assert summary["speedup_onnxruntime_vs_pytorch"] == pytest.approx(ort["clips_per_s"] / pytorch["clips_per_s"],
                                                                      rel=1e-3)
    assert summary["max_abs_logit_diff"] < 1e-4 and summary["top1_agreement"] == 1.0


def test_peak_table_and_mfu_inputs():
    assert bench_model.peak_tflops("NVIDIA H200", "bf16") == 989.4
    assert bench_model.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert bench_model.peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert bench_model.peak_tflops("NVIDIA H100 80GB HBM3", "fp32") == 66.9
    assert bench_model.peak_tflops("Some GPU", "bf16") is None
    # The paper's 41.7 G multiply-adds for UniFormer-S at 16x224x224.
    assert bench_model.gmacs_per_clip(parse(["model", "--variant", "S"])) == pytest.approx(41.7, abs=0.05)


@pytest.mark.parametrize("argv,match", [
    (["--frames", "3"], r"--frames 3 must be even"),
    (["--size", "40"], r"--size 40 must be a multiple of 32"),
    (["--fold-bn"], r"--fold-bn needs --mode infer: folded BatchNorms hold only for inference"),
    (["--fold-bn", "--mode", "infer", "--reference"], r"--fold-bn applies to the optimised model; use it with "
                                                      r"--compare or alone, not --reference"),
    (["--onnx"], r"--onnx times inference in fp32 against ONNX Runtime's fp32 graph: use --mode infer"),
    (["--onnx", "--mode", "infer", "--precision", "bf16"], r"--onnx times inference in fp32"),
])
def test_bad_model_arguments(argv, match):
    with pytest.raises(ValueError, match=match):
        run_model_bench(parse(["model", *TINY, *argv]))


def test_bad_device():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match=r"--device cuda: CUDA is not available here; use --device cpu or auto"):
        run_model_bench(parse(["model", *TINY, "--device", "cuda"]))


def test_dwconv_bench_on_cpu_times_pytorch_only():
    summary = run_dwconv_bench(parse(["dwconv", "--shape", "1,4,2,6,6", "--kernel", "3", "--precision", "fp32",
                                      "--steps", "1", "--warmup", "0", "--device", "cpu"]))
    assert summary["triton"] is False and "note" in summary
    assert set(summary["timings"]) == {"torch_ncdhw", "torch_channels_last"}
    with pytest.raises(ValueError, match=r"--shape '1,4,2' must be five positive ints B,C,T,H,W"):
        run_dwconv_bench(parse(["dwconv", "--shape", "1,4,2", "--device", "cpu"]))


def test_uniformer_bench_model_prints_one_json_line(capsys):
    jobs.bench.main(["model", *TINY, "--mode", "infer"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["bench"] == "model"
