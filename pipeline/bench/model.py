"""`uniformer bench model`: speed of the UniFormer network alone, on in-memory clips.

    uniformer bench model --variant S --frames 16 --batch 16 --size 224 --mode train --precision bf16 --compare
    uniformer bench model --variant xs --frames 4 --size 64 --batch 2 --steps 3   # CPU smoke run
    uniformer bench model --variant xs --frames 8 --size 64 --batch 8 --mode infer --fold-bn --compare
    uniformer bench model --variant s --batch 1 --mode infer --precision fp32 --device cpu --onnx   # ORT vs PyTorch
    uniformer bench dwconv --shape 16,64,8,56,56 --kernel 5 --precision bf16   # one conv, GPU

`model` times a training step (forward, backward, AdamW: fused on CUDA) or an inference step
and reports clips/s, the median step time, peak memory and model FLOP utilisation (MFU: the
network's multiply-adds x 2, x 3 for a training step, over the GPU's dense peak for the
precision from `PEAK_TFLOPS`; null on CPU or an unknown GPU).

Two formulations of the same weights:
- optimised: the model as built by default (token-major (B, T, H, W, C) activations, SDPA
  attention, the Triton depthwise 3D convolutions of `model.dwconv3d` on CUDA), compiled with
  `--compile`; in infer mode `--fold-bn` folds its BatchNorms into the layers after them
  (`model.fold_batchnorm`);
- reference (`--reference`): explicit softmax attention (`attn_impl="math"`), plain F.conv3d
  depthwise convolutions, the (B, C, T, H, W) layout (`layout="channels_first"`), eager, and in
  train mode torch.optim.AdamW with its default implementation (foreach on CUDA) as the original
  training code builds it: the original code's formulation, op by op (the comparison is in
  `pipeline.bench.gpu`'s docstring). The optimised model steps with fused AdamW on CUDA.
`--compare` runs both in one invocation, one after the other (each built, run and freed on its
own, so peak memory is per model), checks their logits on one clip and reports the speed-up.
With `--compare --compile` only the optimised model is compiled (the reference stays eager).

`--onnx` (infer mode, fp32, CPU) times the network in ONNX Runtime beside PyTorch on the same clips:
the BatchNorm-folded model eager in PyTorch, and its export (`pipeline.tracking.onnx_export`, as
`uniformer export` writes it) in an ONNX Runtime CPU session with as many intra-op threads as
PyTorch uses; it also reports their largest logit difference and the speed-up.

`dwconv` times one depthwise convolution forward and forward + backward: PyTorch's kernel
(NCDHW and channels-last-3d) against the Triton op (NCDHW input, which pays a layout copy, and
token-major input), with the Triton results' errors against an fp32 F.conv3d, and the Triton
op's speed-ups over both of PyTorch's layouts (`dwconv_speedups`); `--sweep` also times a few
launch configurations (`model.dwconv3d.TUNING`) and reports the fastest.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import resource
import statistics
import sys
import time
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from model import create_uniformer, dwconv3d, fold_batchnorm
from model.dwconv3d import set_depthwise_impl
from pipeline.config import int_at_least
from pipeline.training.recipe import param_groups

VARIANTS = {"xs": "uniformer_xs", "s": "uniformer_s", "b": "uniformer_b"}
MODES = ("train", "infer")
PRECISIONS = ("bf16", "fp32")

# Dense peak TFLOP/s by (a substring of) torch.cuda.get_device_name: bf16 tensor cores, and fp32
# without tensor cores (what an fp32 run's matmuls use unless TF32 is switched on). First match wins.
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989.4, 66.9),  # H200 SXM; GH200 (an H100 die) has the same peaks
    ("H100 PCIe", 756.0, 51.2),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.4, 66.9),  # H100 SXM
    ("A100", 312.0, 19.5),
    ("L40S", 362.1, 91.6),
    ("L4", 121.0, 30.3),
)


def _sig(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def peak_tflops(device_name: str, precision: str) -> Optional[float]:
    for key, bf16, fp32 in PEAK_TFLOPS:
        if key in device_name:
            return bf16 if precision == "bf16" else fp32
    return None


# ---------------------------------------------------------------------------------------------
# Command line


def add_model_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds `model` to a `uniformer bench` subparser set; `args.run(args, cfg, parser)` runs it."""
    p = subparsers.add_parser("model", help="clips/s, step time, peak memory and MFU of the network",
                              description="Times a UniFormer training or inference step on random clips; "
                              "--compare also runs the plain reference formulation and reports the speed-up.")
    p.add_argument("--variant", type=str.lower, choices=tuple(VARIANTS), default="s",
                   help="xs (CPU-sized), s or b (default s)")
    p.add_argument("--frames", type=int_at_least(1), default=16, help="frames per clip, even (default 16)")
    p.add_argument("--size", type=int_at_least(1), default=224, help="crop size, a multiple of 32 (default 224)")
    p.add_argument("--batch", type=int_at_least(1), default=16, help="clips per step (default 16)")
    p.add_argument("--mode", choices=MODES, default="train", help="train: forward+backward+AdamW (default)")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16", help="bf16 autocast or fp32 (default bf16)")
    p.add_argument("--num-classes", type=int_at_least(1), default=400, help="head size (default 400)")
    p.add_argument("--compile", action="store_true", help="torch.compile the (optimised) model")
    p.add_argument("--fold-bn", action="store_true",
                   help="infer mode: fold the (optimised) model's BatchNorms into the layers after them")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--reference", action="store_true", help="run only the plain reference formulation")
    group.add_argument("--compare", action="store_true", help="run reference and optimised, report the speed-up")
    group.add_argument("--onnx", action="store_true",
                       help="infer mode on CPU: the folded model in PyTorch and exported to ONNX Runtime, side by side")
    p.add_argument("--steps", type=int_at_least(1), default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int_at_least(0), default=5, help="untimed steps first (default 5)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run_model_from_job)
    return p


def add_dwconv_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds `dwconv` (one depthwise 3D convolution, PyTorch against Triton)."""
    p = subparsers.add_parser("dwconv", help="one depthwise 3D convolution: PyTorch against the Triton op")
    p.add_argument("--shape", default="16,64,8,56,56", help="B,C,T,H,W (default 16,64,8,56,56)")
    p.add_argument("--kernel", type=int_at_least(1), choices=(3, 5), default=5, help="cubic kernel size (default 5)")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16")
    p.add_argument("--steps", type=int_at_least(1), default=20)
    p.add_argument("--warmup", type=int_at_least(0), default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--sweep", action="store_true", help="also time launch configurations, report the fastest")
    p.set_defaults(run=_run_dwconv_from_job)
    return p


def _stderr(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _run_model_from_job(args: argparse.Namespace, cfg: Any = None, parser: Any = None) -> dict[str, Any]:
    return run_model_bench(args, progress=_stderr)


def _run_dwconv_from_job(args: argparse.Namespace, cfg: Any = None, parser: Any = None) -> dict[str, Any]:
    return run_dwconv_bench(args, progress=_stderr)


# ---------------------------------------------------------------------------------------------
# Model bench


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    return device


def _check_model_args(args: argparse.Namespace) -> None:
    if args.frames % 2:
        raise ValueError(f"--frames {args.frames} must be even (the stem halves time)")
    if args.size % 32:
        raise ValueError(f"--size {args.size} must be a multiple of 32 (e.g. 224)")
    if args.fold_bn and args.mode != "infer":
        raise ValueError("--fold-bn needs --mode infer: folded BatchNorms hold only for inference")
    if args.fold_bn and args.reference:
        raise ValueError("--fold-bn applies to the optimised model; use it with --compare or alone, not --reference")
    if args.onnx and (args.mode != "infer" or args.precision != "fp32" or args.compile):
        raise ValueError("--onnx times inference in fp32 against ONNX Runtime's fp32 graph: use --mode infer "
                         "--precision fp32, without --compile")


def build_model(args: argparse.Namespace, *, reference: bool, device: torch.device,
                state_dict: Optional[dict] = None) -> torch.nn.Module:
    """The variant, with `state_dict` loaded when given. Reference: math attention, F.conv3d,
    (B, C, T, H, W) layout; optimised: the defaults, BatchNorms folded with `--fold-bn`."""
    net = create_uniformer(VARIANTS[args.variant], num_classes=args.num_classes,
                           attn_impl="math" if reference else "sdpa",
                           layout="channels_first" if reference else "tokens")
    if state_dict is not None:
        net.load_state_dict(state_dict, strict=True)
    if reference:
        set_depthwise_impl(net, "torch")
    elif args.fold_bn:
        net = fold_batchnorm(net)
    return net.to(device)


def gmacs_per_clip(args: argparse.Namespace) -> float:
    """Multiply-adds of one forward pass per clip (convolutions, linear layers, attention matmuls)."""
    with torch.device("meta"):
        net = create_uniformer(VARIANTS[args.variant], num_classes=args.num_classes).eval()
        clip = torch.empty(1, 3, args.frames, args.size, args.size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(clip)
    return counter.get_total_flops() / 2e9


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _time_one(args, net: torch.nn.Module, *, impl: str, compiled: bool, device: torch.device,
              progress: Callable[[str], None]) -> dict[str, Any]:
    """Warm up, then time `args.steps` steps of `net` (already on `device`)."""
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    clip = torch.randn(args.batch, 3, args.frames, args.size, args.size, device=device, generator=gen)
    labels = torch.randint(0, args.num_classes, (args.batch,), device=device, generator=gen)
    train = args.mode == "train"
    net.train(train)
    model = torch.compile(net) if compiled else net
    # The original code's AdamW is torch's default implementation; fusing it is part of the optimised step.
    fused = train and device.type == "cuda" and impl != "reference"
    if train:
        optimizer = torch.optim.AdamW(param_groups(net, 0.05), lr=1e-4, fused=fused)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, args.precision):
                logits = model(clip)
            F.cross_entropy(logits.float(), labels).backward()
            optimizer.step()
    else:
        def step() -> None:
            with torch.inference_mode(), _autocast(device, args.precision):
                model(clip)

    rss_before = _max_rss_bytes()
    started = time.perf_counter()
    for _ in range(args.warmup):
        step()
    _sync(device)
    progress(f"{impl}: {args.warmup} warm-up steps in {time.perf_counter() - started:.1f} s")
    times_ms = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        _sync(device)  # each step timed to completion on the GPU
        times_ms.append((time.perf_counter() - t0) * 1e3)
    median_ms = statistics.median(times_ms)
    progress(f"{impl}: median step {median_ms:.1f} ms over {args.steps} steps")

    result: dict[str, Any] = {
        "impl": impl,
        "attn_impl": "math" if impl == "reference" else "sdpa",
        "layout": "channels_first" if impl == "reference" else "tokens",
        "batchnorm_folded": impl != "reference" and args.fold_bn,
        "depthwise_impl": "torch" if impl == "reference" or not dwconv3d.triton_usable(clip) else "triton",
        "compile": compiled,
        "optimizer": ("AdamW, fused" if fused else "AdamW, default implementation") if train else None,
        "step_ms_median": round(median_ms, 3),
        "step_ms_min": round(min(times_ms), 3),
        "step_ms_max": round(max(times_ms), 3),
        "clips_per_s": _sig(args.batch / (median_ms / 1e3)),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        result["memory_note"] = "torch.cuda.max_memory_allocated over build, warm-up and timed steps"
    else:
        result["peak_memory_gib"] = None
        result["cpu_peak_rss_growth_gib"] = round(max(0, _max_rss_bytes() - rss_before) / 2**30, 3)
        result["memory_note"] = ("CPU: no allocator peak; cpu_peak_rss_growth_gib is how far the process's "
                                 "peak RSS rose during the steps (a lower bound, not comparable to GPU figures)")
    return result


def _eval_logits(net: torch.nn.Module, clip: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    net.eval()
    with torch.no_grad(), _autocast(device, precision):
        return net(clip).float().cpu()


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_model_bench(args: argparse.Namespace, progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Runs `uniformer bench model` as parsed by `add_model_parser`; returns the summary dict."""
    progress = progress or (lambda message: None)
    _check_model_args(args)
    device = resolve_device(args.device)
    if args.onnx and device.type != "cpu":
        raise ValueError(f"--onnx compares CPU inference (ONNX Runtime's CPU provider); use --device cpu, not {device}")
    if args.onnx:
        args.fold_bn = True  # the exported graph is the folded model: time PyTorch on the same
    torch.manual_seed(args.seed)
    # The weights both formulations share, made once on the CPU.
    state = create_uniformer(VARIANTS[args.variant], num_classes=args.num_classes).state_dict()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    gmacs = gmacs_per_clip(args)
    flops_per_step = gmacs * 2e9 * args.batch * (3 if args.mode == "train" else 1)
    peak = peak_tflops(device_name, args.precision) if device.type == "cuda" else None

    runs = ["reference", "optimised"] if args.compare else ["reference" if args.reference else "optimised"]
    check_clip = torch.randn(min(args.batch, 2), 3, args.frames, args.size, args.size,
                             generator=torch.Generator().manual_seed(args.seed + 2))
    results: dict[str, dict[str, Any]] = {}
    logits: dict[str, torch.Tensor] = {}
    for impl in runs:
        _release(device)
        reference = impl == "reference"
        progress(f"{impl}: building {VARIANTS[args.variant]} on {device_name}")
        net = build_model(args, reference=reference, device=device, state_dict=state)
        if args.compare:
            logits[impl] = _eval_logits(net, check_clip.to(device), device, args.precision)
        compiled = args.compile and not (args.compare and reference)
        result = _time_one(args, net, impl=impl, compiled=compiled, device=device, progress=progress)
        tflops = flops_per_step / (result["step_ms_median"] / 1e3) / 1e12
        result["model_tflops_per_s"] = _sig(tflops)
        result["mfu"] = round(tflops / peak, 4) if peak else None
        results[impl] = result
        del net
    _release(device)

    summary: dict[str, Any] = {
        "model": VARIANTS[args.variant], "mode": args.mode, "precision": args.precision,
        "batch": args.batch, "frames": args.frames, "size": args.size,
        "steps": args.steps, "warmup": args.warmup,
        "device": str(device), "device_name": device_name,
        "gmacs_per_clip": _sig(gmacs),
        "peak_tflops": peak,
        "mfu_note": ("model MACs x 2 (x 3 for train) per second over the device's dense peak for the "
                     "precision" + ("" if peak else "; null: CPU or a GPU missing from PEAK_TFLOPS")),
    }
    if args.onnx:
        return {**summary, **_onnx_side_by_side(args, state, results["optimised"], check_clip, progress)}
    if not args.compare:
        return {**summary, **results[runs[0]]}
    ref, opt = logits["reference"], logits["optimised"]
    diff = (ref - opt).abs().max().item()
    scale = ref.abs().max().item()
    # fp32: summation order only; bf16: both run in bf16 autocast, with different kernels.
    tol = 1e-3 * max(1.0, scale) if args.precision == "fp32" else 5e-2 * max(1.0, scale)
    return {
        **summary,
        "reference": results["reference"],
        "optimised": results["optimised"],
        "speedup": _sig(results["optimised"]["clips_per_s"] / results["reference"]["clips_per_s"]),
        "max_abs_logit_diff": diff,
        "logits_close": diff <= tol,
    }


def _onnx_side_by_side(args: argparse.Namespace, state: dict, pytorch: dict[str, Any], check_clip: torch.Tensor,
                       progress: Callable[[str], None]) -> dict[str, Any]:
    """The folded model exported to ONNX and timed in ONNX Runtime on the clips PyTorch was timed on."""
    import tempfile

    import numpy as np
    import onnxruntime

    from pipeline.tracking.onnx_export import INPUT, OUTPUT, compare_logits, export_network, ort_session

    net = build_model(args, reference=False, device=torch.device("cpu"), state_dict=state)
    with tempfile.TemporaryDirectory() as tmp:
        progress("onnxruntime: exporting the folded model")
        t0 = time.perf_counter()
        path = export_network(net, (3, args.frames, args.size, args.size), f"{tmp}/model.onnx")
        export_s = time.perf_counter() - t0
        session = ort_session(path)
        clip = torch.randn(args.batch, 3, args.frames, args.size, args.size,
                           generator=torch.Generator().manual_seed(args.seed + 1)).numpy()

        def step() -> None:
            session.run([OUTPUT], {INPUT: clip})

        median_ms = _time_cuda_ms(step, args.steps, args.warmup, torch.device("cpu"))
        with torch.no_grad():
            reference = net(check_clip).numpy()
        exported = session.run([OUTPUT], {INPUT: np.ascontiguousarray(check_clip.numpy())})[0]
    agreement = compare_logits(reference, exported)
    progress(f"onnxruntime: median step {median_ms:.1f} ms over {args.steps} steps")
    ort = {"impl": "onnxruntime", "provider": "CPUExecutionProvider", "version": onnxruntime.__version__,
           "intra_op_threads": torch.get_num_threads(), "export_s": round(export_s, 1),
           "step_ms_median": round(median_ms, 3), "clips_per_s": _sig(args.batch / (median_ms / 1e3))}
    return {"torch_threads": torch.get_num_threads(), "pytorch": pytorch, "onnxruntime": ort,
            "speedup_onnxruntime_vs_pytorch": _sig(ort["clips_per_s"] / pytorch["clips_per_s"]),
            "max_abs_logit_diff": agreement["max_abs_logit_diff"], "top1_agreement": agreement["top1_agreement"]}


# ---------------------------------------------------------------------------------------------
# One depthwise convolution


def _time_cuda_ms(fn: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type != "cuda":
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_dwconv_bench(args: argparse.Namespace, progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Times one depthwise conv forward and forward + backward; see the module docstring."""
    progress = progress or (lambda message: None)
    device = resolve_device(args.device)
    try:
        shape = tuple(int(s) for s in args.shape.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 5 or min(shape) < 1:
        raise ValueError(f"--shape {args.shape!r} must be five positive ints B,C,T,H,W, e.g. 16,64,8,56,56")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    k = args.kernel
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    w = (torch.randn((shape[1], 1, k, k, k), device=device, generator=gen) / k**1.5).to(dtype)
    b = torch.randn(shape[1], device=device, generator=gen).to(dtype)
    dy = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    x_cl = x.contiguous(memory_format=torch.channels_last_3d)
    dy_cl = dy.contiguous(memory_format=torch.channels_last_3d)

    def case(impl: str, xin: torch.Tensor, grad: torch.Tensor):
        xg, wg, bg = xin.detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_()

        def fwd():
            with torch.no_grad():
                return dwconv3d.depthwise_conv3d(xin, w, b, impl=impl)

        def fwd_bwd():
            y = dwconv3d.depthwise_conv3d(xg, wg, bg, impl=impl)
            return torch.autograd.grad(y, (xg, wg, bg), grad)

        return fwd, fwd_bwd

    cases = {"torch_ncdhw": ("torch", x, dy), "torch_channels_last": ("torch", x_cl, dy_cl)}
    triton_ok = dwconv3d.triton_usable(x)
    if triton_ok:
        cases["triton_ncdhw"] = ("triton", x, dy)  # pays a layout copy of x (and dy) each way
        cases["triton_tokens"] = ("triton", x_cl, dy_cl)  # channels-last = token-major: no copy
    timings: dict[str, dict[str, float]] = {}
    for name, (impl, xin, grad) in cases.items():
        fwd, fwd_bwd = case(impl, xin, grad)
        timings[name] = {"fwd_ms": round(_time_cuda_ms(fwd, args.steps, args.warmup, device), 4),
                         "fwd_bwd_ms": round(_time_cuda_ms(fwd_bwd, args.steps, args.warmup, device), 4)}
        progress(f"{name}: {timings[name]}")

    result: dict[str, Any] = {
        "shape": list(shape), "kernel": k, "precision": args.precision, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "activation_mib": round(x.numel() * x.element_size() / 2**20, 1),
        "timings": timings, "triton": triton_ok,
    }
    if not triton_ok:
        result["note"] = "the Triton op needs a CUDA device and the triton package; only PyTorch was timed"
        return result
    result.update(dwconv_speedups(timings))
    result["errors_vs_fp32"] = _dwconv_errors(x_cl, w, b, dy_cl)
    if args.sweep:
        result["sweep"] = _sweep(x_cl, w, b, dy_cl, args, device, progress)
    return result


def dwconv_speedups(timings: dict[str, dict[str, float]]) -> dict[str, float]:
    """The Triton op's speed-ups over PyTorch's F.conv3d in both of its layouts, from one run's timings.

    `speedup_<pass>_<triton input>[_vs_channels_last]`: PyTorch on NCDHW memory (the original
    code's layout) is the base without suffix; `_vs_channels_last` is over PyTorch on a
    channels_last_3d tensor, its other layout and the one the token-major Triton input matches.
    """
    out = {}
    for torch_case, suffix in (("torch_ncdhw", ""), ("torch_channels_last", "_vs_channels_last")):
        for triton_case in ("tokens", "ncdhw"):
            for phase in ("fwd_bwd", "fwd"):
                base, ours = timings[torch_case][f"{phase}_ms"], timings[f"triton_{triton_case}"][f"{phase}_ms"]
                out[f"speedup_{phase}_{triton_case}{suffix}"] = round(base / ours, 2)
    return out


def _dwconv_errors(x, w, b, dy) -> dict[str, float]:
    """Max |triton - F.conv3d in fp32| over max |F.conv3d in fp32|, for y, dx, dw, db."""
    xs, ws, bs = (t.detach().requires_grad_() for t in (x, w, b))
    y = dwconv3d.depthwise_conv3d(xs, ws, bs, impl="triton")
    got = (y, *torch.autograd.grad(y, (xs, ws, bs), dy))
    xr, wr, br = (t.detach().float().requires_grad_() for t in (x, w, b))
    yr = F.conv3d(xr, wr, br, padding=tuple(s // 2 for s in w.shape[2:]), groups=x.shape[1])
    want = (yr, *torch.autograd.grad(yr, (xr, wr, br), dy.float()))
    return {name: float((g.float() - r).abs().max() / r.abs().max().clamp_min(1e-12))
            for name, g, r in zip(("y", "dx", "dw", "db"), got, want)}


def _sweep(x, w, b, dy, args, device, progress) -> dict[str, Any]:
    """Times forward configurations on the forward, weight-gradient ones on the backward."""
    saved = dict(dwconv3d.TUNING)
    xt, dyt = x.permute(0, 2, 3, 4, 1), dy.permute(0, 2, 3, 4, 1)  # (B, T, H, W, C), contiguous
    ksize = tuple(w.shape[2:])
    w_taps = w.reshape(w.shape[0], -1).t().float().contiguous()
    out = torch.empty_like(xt)
    found: dict[str, Any] = {"fwd": [], "wgrad": []}
    try:
        for bh, bw, bc, warps in itertools.product((4, 8), (8, 16), (32, 64), (4, 8)):
            dwconv3d.TUNING.update(fwd_block_h=bh, fwd_block_w=bw, fwd_block_c=bc, fwd_warps=warps)
            try:
                ms = _time_cuda_ms(lambda: dwconv3d._launch_conv(xt, w_taps, None, out, ksize),
                                   args.steps, 2, device)
            except Exception as err:  # e.g. out of resources for a big tile
                progress(f"fwd config {bh, bw, bc, warps} failed: {type(err).__name__}")
                continue
            found["fwd"].append({"fwd_block_h": bh, "fwd_block_w": bw, "fwd_block_c": bc, "fwd_warps": warps,
                                 "ms": round(ms, 4)})
        dwconv3d.TUNING.update(saved)
        for bw, bc, warps, per_sm in itertools.product((4, 8, 16), (16, 32, 64), (4, 8), (4, 8, 16)):
            dwconv3d.TUNING.update(wgrad_block_w=bw, wgrad_block_c=bc, wgrad_warps=warps,
                                   wgrad_programs_per_sm=per_sm)
            try:
                ms = _time_cuda_ms(lambda: dwconv3d._launch_grad_weight(xt, dyt, ksize), args.steps, 2, device)
            except Exception as err:  # e.g. out of registers or shared memory for a big tile
                progress(f"wgrad config {bw, bc, warps} failed: {type(err).__name__}")
                continue
            found["wgrad"].append({"wgrad_block_w": bw, "wgrad_block_c": bc, "wgrad_warps": warps,
                                   "wgrad_programs_per_sm": per_sm, "ms": round(ms, 4)})
    finally:
        dwconv3d.TUNING.clear()
        dwconv3d.TUNING.update(saved)
    return {"best_fwd": min(found["fwd"], key=lambda r: r["ms"]),
            "best_wgrad": min(found["wgrad"], key=lambda r: r["ms"]) if found["wgrad"] else None,
            "current": saved}
