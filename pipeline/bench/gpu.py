"""`make gpu-check` (`uniformer bench gpu`): every check that needs a GPU, within 8 minutes, printed as
one table of targets beside the figures.

Parts, in this order, each in its own process group:

1. Model GPU tests: `tests/gpu/gpu_*.py` but gpu_train.py (the Triton depthwise conv against F.conv3d
   at the S and B shapes, BatchNorm folding, a compiled fullgraph train step) and
   `tests/data/test_device_augment.py` on CUDA (the device RandAugment against PIL, no host sync).
2. The benchmarks, in one child process (`python -m pipeline.bench.gpu benches`, one JSON line per
   bench): UniFormer-S/B 16x224 bf16 training at batch 16 and inference at batch 32, each beside
   the reference formulation in the same run; one depthwise 5x5x5 conv forward + backward against
   PyTorch's F.conv3d on NCDHW and on channels_last_3d memory; the whole training step of the K400
   S16x4 and B16x4 recipes as the loop runs it, device augmentation to EMA, at their per-GPU
   micro-batch (`pipeline.bench.step`), under `torch.cuda.set_sync_debug_mode("error")`.
3. Training GPU tests, `tests/gpu/gpu_train.py`: fp16 with the grad scaler lowering the loss on a
   fixed batch, and a bf16 Ray Train run with fused AdamW and an EMA surviving a SIGKILLed worker.

Time limit: the whole command gets `TIME_LIMIT_S` (8 minutes), enforced. A part still running when
it comes is stopped (SIGTERM to it and all its descendants, SIGKILL after a grace); a part with too
little time left is not started. The table then shows what was measured, and a row for each part or
figure that was stopped or not run; the command exits non-zero.

Targets: set for one H200, from the figures of the official implementation measured on one H200
(DESIGN.md "Performance anchors": bf16 autocast, 16x224x224 clips) and issue 7's goals (2x the official eager
training speed, half its peak memory, a 10x depthwise convolution; inference at 1x the official
eager figure, where issue 7 asked 2x). None has been measured yet: no GPU has run this check. Each target names its basis (`Target.basis`, the table's last column).
Absolute figures hold only on an H200; the "x reference" rows compare with the reference
formulation run in the same process on the same GPU, so they hold on any GPU.

The reference formulation (`pipeline.bench.model.build_model(reference=True)`, i.e. the model
with `layout="channels_first"`, `attn_impl="math"` and F.conv3d depthwise convolutions) against
the official forward (Sense-X/UniFormer, video_classification/slowfast/models/uniformer.py), op
by op:

| official op | reference formulation | same? |
|---|---|---|
| stem: nn.Conv3d (3,4,4)/(2,4,4) on NCDHW, flatten(2).transpose(1,2), LayerNorm (1e-5), back to contiguous NCDHW | nn.Conv3d on NCDHW, permuted view, LayerNorm (1e-5), permute(...).contiguous() | yes: same kernels, same copies |
| patch embeds 2-4: nn.Conv3d (1,2,2)/(1,2,2), LayerNorm as the stem | the same | yes |
| CBlock DPE and local MHRA: depthwise nn.Conv3d 3x3x3 and 5x5x5 (groups=C) on contiguous NCDHW | `DepthwiseConv3d` with impl "torch": nn.Conv3d's own `_conv_forward` (F.conv3d) on contiguous NCDHW | yes |
| CBlock norms: nn.BatchNorm3d on NCDHW | BatchNorm3d.forward on NCDHW | yes |
| CBlock 1x1x1 convs (conv1, conv2, MLP): nn.Conv3d | nn.Conv3d.forward | yes |
| SABlock DPE: depthwise nn.Conv3d 3x3x3 | as in CBlock | yes |
| SABlock tokens: x.flatten(2).transpose(1,2), a strided view that each LayerNorm (1e-6) copies; x.transpose(1,2).reshape(...) back | einops rearrange, which gives the same views | yes |
| attention: qkv Linear, reshape/permute to (3, B, heads, N, d), softmax(q k^T * d^-0.5) v, proj | `Attention(attn_impl="math")`: the same, einops for reshape/permute | yes |
| MLP: Linear, GELU (erf), Linear | the same | yes |
| dropout (p=0), DropPath | no dropout; DropPath the same, rate 0 in this bench for both (the recipes' rates are in the step bench) | yes (dropout with p=0 returns its input) |
| final nn.BatchNorm3d, x.flatten(2).mean(-1), Linear head | BatchNorm3d, mean over a permuted view of the same memory, Linear | same reduction |
| training: torch.optim.AdamW (default implementation), bf16 autocast | AdamW default implementation (foreach on CUDA), bf16 autocast; the optimised model uses fused AdamW | yes, fixed (the reference stepped with fused AdamW before) |

`tests/bench/test_bench_model.py::test_reference_runs_the_official_ops` checks this on the CPU from
the dispatched ops. So the ratios printed are against the official formulation; the official
repository itself (timm, slowfast) is not run here: the DESIGN.md figures came from it.

Without CUDA it prints one line saying so and succeeds: nothing here can be measured on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pipeline import PROJECT_ROOT

TIME_LIMIT_S = 8 * 60.0
# Kept back from the parts: the start-up before the clock starts (imports, a few seconds), stopping a
# part (up to 2 x KILL_GRACE_S) and printing what was measured.
RESERVE_S = 25.0
# A part is not started with less time left than this.
MIN_PART_S = 20.0
KILL_GRACE_S = 5.0

TARGETS_SET_ON = ("one H200: the targets derive from the official implementation's figures on one H200 "
                  "(DESIGN.md 'Performance anchors'); not yet measured on any GPU")


@dataclass(frozen=True)
class Target:
    name: str
    key: str  # the figure's path in the bench summary, dotted
    at_least: float | None = None
    at_most: float | None = None
    reference_key: str | None = None  # the same figure of the reference, measured in the same run
    basis: str = ""  # which figure the target is relative to, and where it was set

    def met(self, value: float | None) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        return (self.at_least is None or value >= self.at_least) and (self.at_most is None or value <= self.at_most)

    def wanted(self) -> str:
        if self.at_least is None and self.at_most is None:
            return "measured"  # a figure to record, no target
        return f">= {self.at_least:g}" if self.at_least is not None else f"<= {self.at_most:g}"


def _model_args(variant: str, mode: str, batch: int) -> argparse.Namespace:
    return argparse.Namespace(variant=variant, frames=16, size=224, batch=batch, mode=mode, precision="bf16",
                              num_classes=400, compile=False, fold_bn=mode == "infer", reference=False,
                              compare=True, onnx=False, steps=10, warmup=3, device="cuda", seed=0)


def _model_targets(label: str, mode: str, official: float, times: float, note: str = "") -> list[Target]:
    """clips/s at `times` x the official eager figure on the H200, and the same ratio to the reference
    formulation run beside it."""
    return [
        Target(f"{label} 16x224 {mode} bf16, clips/s", "optimised.clips_per_s", at_least=round(times * official),
               reference_key="reference.clips_per_s",
               basis=f"{times:g}x the official eager {official:g} clips/s (H200, DESIGN.md 'Performance anchors'){note}"),
        Target(f"{label} 16x224 {mode} bf16, x reference", "speedup", at_least=times,
               basis=f"{times:g}x the reference formulation in the same run, any GPU{note}")]


_INFER_NOTE = "; issue 7 asked 2x"
# (bench, its arguments, the targets read from its summary).
BENCHES: list[tuple[str, argparse.Namespace, list[Target]]] = [
    ("model", _model_args("s", "train", 16), [
        *_model_targets("S", "train b16", 86, 2),
        Target("S 16x224 train b16 bf16, peak GiB", "optimised.peak_memory_gib", at_most=8.85,
               reference_key="reference.peak_memory_gib",
               basis="half the official eager run's 17.7 GiB (H200, issue 7)")]),
    ("model", _model_args("b", "train", 16), _model_targets("B", "train b16", 43, 2)),
    ("model", _model_args("s", "infer", 32), _model_targets("S", "infer b32", 342, 1, _INFER_NOTE)),
    ("model", _model_args("b", "infer", 32), _model_targets("B", "infer b32", 165, 1, _INFER_NOTE)),
    ("dwconv", argparse.Namespace(shape="16,64,8,56,56", kernel=5, precision="bf16", steps=20, warmup=5,
                                  device="cuda", sweep=False), [
        Target("dwconv 5x5x5 fwd+bwd, x F.conv3d NCDHW", "speedup_fwd_bwd_tokens", at_least=10,
               basis="PyTorch's kernel on NCDHW in the same run (15.4 ms on the H200, DESIGN.md 'Performance anchors'); issue 7's 10x"),
        Target("dwconv 5x5x5 fwd+bwd, x F.conv3d channels-last", "speedup_fwd_bwd_tokens_vs_channels_last",
               at_least=10,
               basis="PyTorch's kernel on channels_last_3d in the same run (13.8 ms on the H200, DESIGN.md 'Performance anchors', "
                     "its faster layout there); issue 7's 10x")]),
]
# The recipes' whole step at their per-GPU micro-batch (S16x4: 64 clips over 8 GPUs, B16x4: 80).
for _recipe, _name in (("k400_uniformer_s16x4.yaml", "S16x4"), ("k400_uniformer_b16x4.yaml", "B16x4")):
    BENCHES.append(("step", argparse.Namespace(config=str(PROJECT_ROOT / "infra" / "configs" / _recipe), steps=10,
                                               warmup=3), [
        Target(f"{_name} whole train step, clips/s", "clips_per_s", basis="a figure to record"),
        Target(f"{_name} whole train step, augmentation share", "augment_share", at_most=0.10,
               basis="the device augmentation's own time over the step's, same run (issue 21)")]))


def run_step_bench(args: argparse.Namespace, progress: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from pipeline.bench.step import measure_train_step
    from pipeline.config import load_config

    cfg = load_config(args.config, ["model.require_init=false"])
    micro_batch = cfg.train.batch_size // (cfg.train.num_workers * cfg.optim.grad_accum_steps)
    progress(f"whole training step of {Path(args.config).name}, micro-batch {micro_batch}")
    return measure_train_step(cfg, device=torch.device("cuda"), micro_batch=micro_batch, steps=args.steps,
                              warmup=args.warmup)


def run_benches_here(emit: Callable[[dict[str, Any]], None], progress: Callable[[str], None]) -> None:
    """Runs BENCHES in this process, one after the other; `emit({"index": i, "summary": ...})` after each."""
    from pipeline.bench.model import run_dwconv_bench, run_model_bench

    for index, (bench, args, _) in enumerate(BENCHES):
        run = {"model": run_model_bench, "dwconv": run_dwconv_bench, "step": run_step_bench}[bench]
        try:
            summary = run(args, progress=progress)
        except Exception as err:  # noqa: BLE001 - one failed bench must not hide the others' figures
            summary = {"error": f"{type(err).__name__}: {err}".splitlines()[0]}
        emit({"index": index, "summary": summary})


# ---------------------------------------------------------------------------------------------
# The time limit


class Deadline:
    """A point in time `seconds` from now, on a monotonic clock."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds, self._clock = seconds, clock
        self._end = clock() + seconds

    def remaining(self) -> float:
        return max(0.0, self._end - self._clock())

    def allows(self, needed_s: float) -> bool:
        return self.remaining() >= needed_s


@dataclass
class PartRun:
    """What a child process printed on stdout, line by line, and how it ended."""

    lines: list[str]
    returncode: int | None  # None: stopped at the time limit
    seconds: float

    @property
    def stopped(self) -> bool:
        return self.returncode is None


def run_until(argv: list[str], deadline: Deadline, *, echo: Callable[[str], None] | None = None,
              reserve_s: float = RESERVE_S, kill_grace_s: float = KILL_GRACE_S) -> PartRun:
    """Runs `argv` in a new process group until it exits or `reserve_s` before the deadline, when it and
    all its descendants (Ray and training subprocesses too) get SIGTERM and, after `kill_grace_s`,
    SIGKILL. Its stdout is read line by line as it comes (and echoed); stderr goes to ours."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if echo:
                echo(lines[-1])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        returncode: int | None = proc.wait(timeout=max(0.0, deadline.remaining() - reserve_s))
    except subprocess.TimeoutExpired:
        returncode = None
        _stop_tree(proc, kill_grace_s)
    reader.join(timeout=kill_grace_s)  # a grandchild that escaped the group may hold the pipe open
    return PartRun(list(lines), returncode, time.monotonic() - started)


def _stop_tree(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the child's process group and every descendant, SIGKILL to what is left after
    `grace_s`. Descendants count apart from the group: a Ray driver (jobs.train under pytest) makes
    itself a group leader, and its Ray processes with it."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        for member in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.send_signal(sig)
        _, tree = psutil.wait_procs(tree, timeout=grace_s)
        if not tree:
            break
    proc.wait()


# ---------------------------------------------------------------------------------------------
# Parts and rows


@dataclass(frozen=True)
class Part:
    name: str
    argv: tuple[str, ...]
    kind: Literal["pytest", "benches"]


def default_parts() -> list[Part]:
    pytest = (sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider")
    gpu_files = sorted(str(p.relative_to(PROJECT_ROOT)) for p in (PROJECT_ROOT / "tests" / "gpu").glob("gpu_*.py"))
    training = [f for f in gpu_files if f.endswith("gpu_train.py")]
    model = [f for f in gpu_files if f not in training]
    return [Part("GPU tests: model", (*pytest, *model, "tests/data/test_device_augment.py"), "pytest"),
            Part("benchmarks", (sys.executable, "-m", "pipeline.bench.gpu", "benches"), "benches"),
            Part("GPU tests: training", (*pytest, *training), "pytest")]


# `pytest -v`: "path.py::test[id] OUTCOME (reason)   [ 50%]"; ids may hold spaces.
_OUTCOME = re.compile(r"^(?P<node>\S+\.py::.+?) (?P<outcome>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)"
                      r"(?: \(.*\))?\s*(?:\[\s*\d+%\])?$")
_STARTED = re.compile(r"^(?P<node>\S+\.py::\S.*?)\s*$")


def pytest_rows(part: Part, run: PartRun | None) -> list[dict[str, Any]]:
    """One row per test from `pytest -v` lines, then one for a test cut off by the time limit or a
    run that gave no result."""
    if run is None:
        return [_row(part.name, "pass", "not run: time limit")]
    outcomes: dict[str, str] = {}
    in_progress, in_tests = None, True
    for line in run.lines:
        match = _OUTCOME.match(line)
        if match:
            node, outcome = match["node"], match["outcome"].lower()
            if outcomes.get(node) not in ("failed", "error"):  # an error in teardown follows its PASSED
                outcomes[node] = outcome
            in_progress = None
        elif line.startswith("=") and outcomes:
            in_tests = False  # the report sections after the tests name tests too
        elif in_tests and _STARTED.match(line):
            in_progress = _STARTED.match(line)["node"]
    rows = [_row(node.split("/")[-1], "pass", outcome, ok=outcome == "passed") for node, outcome in outcomes.items()]
    if run.stopped:
        cut = f"{in_progress.split('/')[-1]} " if in_progress else ""
        rows.append(_row(part.name, "pass", f"{cut}stopped by the time limit after {len(outcomes)} results"))
    elif not outcomes:
        rows.append(_row(part.name, "pass", f"pytest exited {run.returncode} with no test result"))
    elif run.returncode != 0 and all(o == "passed" for o in outcomes.values()):
        rows.append(_row(part.name, "pass", f"pytest exited {run.returncode}"))
    return rows


def bench_rows(run: PartRun | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of the targets of every bench, and the summaries, from the bench child's JSON lines;
    benches without a line are reported as stopped or not run."""
    results: dict[int, dict[str, Any]] = {}
    for line in run.lines if run else []:
        try:
            item = json.loads(line)
            results[int(item["index"])] = item["summary"]
        except (ValueError, KeyError, TypeError):
            continue  # not one of ours
    rows, summaries = [], []
    first_missing = True
    for index, (bench, args, targets) in enumerate(BENCHES):
        summary = results.get(index)
        if summary is None:
            if run is None:
                missing = "not run: time limit"
            elif run.stopped:
                missing = "stopped by the time limit" if first_missing else "not run: time limit"
            else:
                missing = f"no result (the bench process exited {run.returncode})"
            first_missing = False
            rows += [_row(t.name, t.wanted(), missing, basis=t.basis) for t in targets]
            continue
        summaries.append({"bench": bench, **vars(args), "summary": summary})
        for target in targets:
            value = _dig(summary, target.key)
            reference = _dig(summary, target.reference_key) if target.reference_key else None
            rows.append(_row(target.name, target.wanted(), summary.get("error", value), reference=reference,
                             ok=target.met(value), basis=target.basis))
    return rows, summaries


def _row(check: str, target: str, measured: Any, *, reference: Any = None, ok: bool = False,
         basis: str = "") -> dict[str, Any]:
    return {"check": check, "target": target, "measured": measured, "reference": reference, "ok": ok,
            "basis": basis}


def _dig(summary: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        summary = summary.get(part) if isinstance(summary, dict) else None
    return summary


def check_within(deadline: Deadline, parts: list[Part], progress: Callable[[str], None] = print,
                 *, min_part_s: float = MIN_PART_S, reserve_s: float = RESERVE_S,
                 kill_grace_s: float = KILL_GRACE_S) -> dict[str, Any]:
    """Runs `parts` in order before `deadline`; rows of the table, the bench summaries, and which
    parts were stopped or not run."""
    rows: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    stopped, not_run = [], []
    for part in parts:
        run = None
        if deadline.allows(min_part_s + reserve_s):
            progress(f"{part.name}: {deadline.remaining():.0f} s left of {deadline.seconds:.0f}")
            run = run_until(list(part.argv), deadline, reserve_s=reserve_s, kill_grace_s=kill_grace_s,
                            echo=_echo if part.kind == "pytest" else None)
            if run.stopped:
                stopped.append(part.name)
        else:
            not_run.append(part.name)
        if part.kind == "pytest":
            rows += pytest_rows(part, run)
        else:
            bench_part_rows, bench_summaries = bench_rows(run)
            rows += bench_part_rows
            summaries += bench_summaries
    return {"rows": rows, "benches": summaries, "stopped": stopped, "not_run": not_run,
            "ok": all(r["ok"] for r in rows) and not stopped and not not_run}


def _echo(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width text table: check, target, measured, reference, ok, basis."""
    header = ("check", "target", "measured", "reference", "ok", "basis")
    cells = [header] + [(r["check"], r["target"], _fmt(r["measured"]), _fmt(r.get("reference")),
                         "yes" if r["ok"] else "NO", r.get("basis", "")) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(header))).rstrip() for c in cells)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_gpu_check(progress: Callable[[str], None] = print, *, time_limit_s: float = TIME_LIMIT_S) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False, "note": "no CUDA device here: gpu-check measures nothing on a CPU"}
    deadline = Deadline(time_limit_s)
    device_name = torch.cuda.get_device_name(0)
    result = check_within(deadline, default_parts(), progress)
    elapsed = deadline.seconds - deadline.remaining()
    note = "" if "H200" in device_name else (f"measured on {device_name}: the absolute targets were set for an "
                                              "H200; the x reference rows hold on any GPU")
    lines = [f"targets set on {TARGETS_SET_ON}", *([note] if note else []), table(result["rows"])]
    if result["stopped"] or result["not_run"]:
        lines.append(f"time limit of {time_limit_s:.0f} s: stopped {result['stopped'] or 'none'}, "
                     f"not run {result['not_run'] or 'none'}")
    print("\n".join(lines), file=sys.stderr, flush=True)
    return {"cuda": True, "device_name": device_name, "targets_set_on": TARGETS_SET_ON, "note": note,
            "time_limit_s": time_limit_s, "elapsed_s": round(elapsed, 1), "ok": result["ok"],
            "failed": [r["check"] for r in result["rows"] if not r["ok"]], "stopped": result["stopped"],
            "not_run": result["not_run"], "rows": result["rows"], "benches": result["benches"]}


if __name__ == "__main__":  # the benchmarks part: `python -m pipeline.bench.gpu benches`
    if sys.argv[1:] != ["benches"]:
        sys.exit("usage: python -m pipeline.bench.gpu benches  (run by `uniformer bench gpu`)")
    run_benches_here(lambda item: print(json.dumps(item), flush=True),
                     lambda message: print(f"[bench] {message}", file=sys.stderr, flush=True))
