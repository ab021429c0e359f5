"""`make gpu-check` (`uniformer bench gpu`): every check that needs a GPU, in one run of a few
minutes, printed as one table of targets beside the figures.

1. The GPU tests in `tests/gpu/gpu_*.py` (files `make test` does not collect): Ray Train on one GPU
   with fused AdamW, bf16 and EMA surviving a SIGKILLed worker, fp16 with the grad scaler, the
   Triton depthwise conv against F.conv3d at the S and B shapes, BatchNorm folding, and a compiled
   (fullgraph) train step; and `tests/data/test_device_augment.py` on CUDA (the device RandAugment
   against PIL, no host sync).
2. The benchmarks, each beside the reference formulation in the same run (DESIGN.md §7 targets,
   measured on one H200): UniFormer-S/B 16x224 bf16 training at batch 16 and inference at batch 32,
   and one depthwise 5x5x5 conv forward + backward against F.conv3d.
3. The whole training step of the K400 S16x4 and B16x4 recipes as the loop runs it, device
   augmentation to EMA, at their per-GPU micro-batch (`pipeline.bench.step`), under
   `torch.cuda.set_sync_debug_mode("error")`, with the augmentation's share of the step.

Without CUDA it prints one line saying so and succeeds: nothing here can be measured on a CPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline import PROJECT_ROOT



@dataclass(frozen=True)
class Target:
    name: str
    key: str  # the figure's path in the bench summary, dotted
    at_least: float | None = None
    at_most: float | None = None

    def met(self, value: float | None) -> bool:
        if value is None:
            return False
        return (self.at_least is None or value >= self.at_least) and (self.at_most is None or value <= self.at_most)

    def wanted(self) -> str:
        if self.at_least is None and self.at_most is None:
            return "measured"  # a figure to record, no target
        return f">= {self.at_least:g}" if self.at_least is not None else f"<= {self.at_most:g}"


def _model_args(variant: str, mode: str, batch: int) -> argparse.Namespace:
    return argparse.Namespace(variant=variant, frames=16, size=224, batch=batch, mode=mode, precision="bf16",
                              num_classes=400, compile=False, fold_bn=mode == "infer", reference=False,
                              compare=True, steps=10, warmup=3, device="cuda", seed=0)


# (bench, its arguments, the targets read from its summary). 2x the official eager figure for
# training (86.3 clips/s S, 43 B), the official eager inference figure for inference.
BENCHES: list[tuple[str, argparse.Namespace, list[Target]]] = [
    ("model", _model_args("s", "train", 16), [
        Target("S 16x224 train b16 bf16, clips/s", "optimised.clips_per_s", at_least=172),
        Target("S 16x224 train b16 bf16, peak GiB", "optimised.peak_memory_gib", at_most=8.85)]),
    ("model", _model_args("b", "train", 16), [
        Target("B 16x224 train b16 bf16, clips/s", "optimised.clips_per_s", at_least=86)]),
    ("model", _model_args("s", "infer", 32), [
        Target("S 16x224 infer b32 bf16, clips/s", "optimised.clips_per_s", at_least=342)]),
    ("model", _model_args("b", "infer", 32), [
        Target("B 16x224 infer b32 bf16, clips/s", "optimised.clips_per_s", at_least=165)]),
    ("dwconv", argparse.Namespace(shape="16,64,8,56,56", kernel=5, precision="bf16", steps=20, warmup=5,
                                  device="cuda", sweep=False), [
        Target("dwconv 5x5x5 fwd+bwd, x F.conv3d", "speedup_fwd_bwd_tokens", at_least=10)]),
]
# The recipes' whole step at their per-GPU micro-batch (S16x4: 64 clips over 8 GPUs, B16x4: 80).
for _recipe, _name in (("k400_uniformer_s16x4.yaml", "S16x4"), ("k400_uniformer_b16x4.yaml", "B16x4")):
    BENCHES.append(("step", argparse.Namespace(config=str(PROJECT_ROOT / "infra" / "configs" / _recipe), steps=10,
                                               warmup=3), [
        Target(f"{_name} whole train step, clips/s", "clips_per_s"),
        Target(f"{_name} whole train step, augmentation share", "augment_share", at_most=0.10)]))


def run_step_bench(args: argparse.Namespace, progress: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from pipeline.bench.step import measure_train_step
    from pipeline.config import load_config

    cfg = load_config(args.config, ["model.require_init=false"])
    micro_batch = cfg.train.batch_size // (cfg.train.num_workers * cfg.optim.grad_accum_steps)
    progress(f"whole training step of {Path(args.config).name}, micro-batch {micro_batch}")
    return measure_train_step(cfg, device=torch.device("cuda"), micro_batch=micro_batch, steps=args.steps,
                              warmup=args.warmup)


def _dig(summary: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        summary = summary.get(part) if isinstance(summary, dict) else None
    return summary


def run_gpu_tests(progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """pytest on tests/gpu; one row per test: name and outcome."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "gpu.xml"
        progress("GPU tests: pytest tests/gpu")
        # Beside tests/gpu, the device augmentation's equivalence tests, which run on CUDA when there is
        # one, with host syncs made errors.
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-o", "python_files=gpu_*.py", "-p", "no:cacheprovider",
                        f"--junitxml={report}", "tests/gpu", "tests/data/test_device_augment.py"],
                       cwd=PROJECT_ROOT, check=False)
        if not report.exists():
            return [{"check": "GPU tests", "target": "pass", "measured": "pytest did not run", "ok": False}]
        rows = []
        for case in ET.parse(report).iter("testcase"):
            failed = case.find("failure") is not None or case.find("error") is not None
            skipped = case.find("skipped") is not None
            outcome = "failed" if failed else "skipped" if skipped else "passed"
            rows.append({"check": f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}",
                         "target": "pass", "measured": outcome, "ok": outcome == "passed"})
        return rows


def run_benches(progress: Callable[[str], None]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The benchmarks; rows of the table and the full summaries."""
    from pipeline.bench.model import run_dwconv_bench, run_model_bench

    rows, summaries = [], []
    for bench, args, targets in BENCHES:
        run = {"model": run_model_bench, "dwconv": run_dwconv_bench, "step": run_step_bench}[bench]
        try:
            summary = run(args, progress=progress)
        except Exception as err:  # noqa: BLE001 - one failed bench must not hide the others' figures
            summary = {"error": f"{type(err).__name__}: {err}".splitlines()[0]}
        summaries.append({"bench": bench, **vars(args), "summary": summary})
        for target in targets:
            value = _dig(summary, target.key)
            reference = _dig(summary, target.key.replace("optimised.", "reference.")) if "optimised." in target.key \
                else None
            rows.append({"check": target.name, "target": target.wanted(),
                         "measured": summary.get("error", value), "reference": reference, "ok": target.met(value)})
    return rows, summaries


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width text table: check, target, measured, reference, ok."""
    header = ("check", "target", "measured", "reference", "ok")
    cells = [header] + [(r["check"], r["target"], _fmt(r["measured"]), _fmt(r.get("reference")),
                         "yes" if r["ok"] else "NO") for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(header))).rstrip() for c in cells)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_gpu_check(progress: Callable[[str], None] = print) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False, "note": "no CUDA device here: gpu-check measures nothing on a CPU"}
    device_name = torch.cuda.get_device_name(0)
    rows = run_gpu_tests(progress)
    bench_rows, summaries = run_benches(progress)
    rows += bench_rows
    print(table(rows), file=sys.stderr, flush=True)
    return {"cuda": True, "device_name": device_name, "ok": all(r["ok"] for r in rows),
            "failed": [r["check"] for r in rows if not r["ok"]], "rows": rows, "benches": summaries}
