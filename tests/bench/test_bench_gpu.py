"""`make gpu-check`'s plumbing on the CPU (pipeline.bench.gpu): targets and their bases, the table, the
rows read from pytest and from the bench child, and the 8-minute limit with tiny limits."""

import sys
import time
from pathlib import Path

import pytest

from pipeline.bench import gpu
from pipeline.bench.gpu import BENCHES, Deadline, Part, PartRun, Target, _dig, table

PY = sys.executable


def test_targets_met_wanted_and_the_table():
    speed, memory = Target("train", "optimised.clips_per_s", at_least=172), Target("mem", "m", at_most=8.85)
    assert speed.met(180.0) and not speed.met(171.9) and not speed.met(None) and not speed.met("stopped")
    assert memory.met(8.0) and not memory.met(9.0) and memory.wanted() == "<= 8.85"
    assert _dig({"optimised": {"clips_per_s": 3.5}}, "optimised.clips_per_s") == 3.5
    assert _dig({"error": "x"}, "optimised.clips_per_s") is None
    text = table([{"check": "S train", "target": ">= 172", "measured": 180.123, "reference": 90.0, "ok": True,
                   "basis": "2x official"},
                  {"check": "GPU tests::x", "target": "pass", "measured": "failed", "ok": False}])
    lines = text.splitlines()
    assert lines[0].split() == ["check", "target", "measured", "reference", "ok", "basis"]
    assert lines[1].split()[-5:] == ["180.1", "90", "yes", "2x", "official"] and lines[2].endswith("NO")


def test_every_target_names_its_basis_and_the_gpu_it_was_set_on():
    targets = [t for _, _, ts in BENCHES for t in ts]
    assert len(targets) == 15 and all(t.basis for t in targets)
    assert "H200" in gpu.TARGETS_SET_ON and "not yet measured" in gpu.TARGETS_SET_ON
    by_name = {t.name: t for t in targets}
    # Absolute figures against the official code's on the H200; ratios against the reference run beside them.
    s_train = by_name["S 16x224 train b16 bf16, clips/s"]
    assert s_train.at_least == 172 and "86" in s_train.basis and "H200" in s_train.basis
    assert s_train.reference_key == "reference.clips_per_s"
    for variant in ("S", "B"):
        ratio = by_name[f"{variant} 16x224 train b16 bf16, x reference"]
        assert ratio.key == "speedup" and ratio.at_least == 2 and "any GPU" in ratio.basis
    assert by_name["S 16x224 train b16 bf16, peak GiB"].at_most == 8.85
    # The depthwise conv against PyTorch's kernel in both of its layouts.
    ncdhw = by_name["dwconv 5x5x5 fwd+bwd, x F.conv3d NCDHW"]
    channels_last = by_name["dwconv 5x5x5 fwd+bwd, x F.conv3d channels-last"]
    assert ncdhw.key == "speedup_fwd_bwd_tokens" and channels_last.key == "speedup_fwd_bwd_tokens_vs_channels_last"
    assert ncdhw.at_least == channels_last.at_least == 10
    shares = [t for t in targets if t.key == "augment_share"]
    assert len(shares) == 2 and all(t.met(0.08) and not t.met(0.12) for t in shares)
    recorded = by_name["S16x4 whole train step, clips/s"]
    assert recorded.wanted() == "measured" and recorded.met(1.0) and not recorded.met(None)


def test_dwconv_speedups_over_both_pytorch_layouts():
    from pipeline.bench.model import dwconv_speedups

    timings = {"torch_ncdhw": {"fwd_ms": 2.6, "fwd_bwd_ms": 15.4},
               "torch_channels_last": {"fwd_ms": 2.0, "fwd_bwd_ms": 13.8},
               "triton_ncdhw": {"fwd_ms": 0.5, "fwd_bwd_ms": 2.0},
               "triton_tokens": {"fwd_ms": 0.2, "fwd_bwd_ms": 1.38}}
    got = dwconv_speedups(timings)
    assert got["speedup_fwd_bwd_tokens"] == pytest.approx(11.16, abs=0.01)
    assert got["speedup_fwd_bwd_tokens_vs_channels_last"] == pytest.approx(10.0)
    assert got["speedup_fwd_tokens_vs_channels_last"] == pytest.approx(10.0)
    assert got["speedup_fwd_bwd_ncdhw_vs_channels_last"] == pytest.approx(6.9)
    assert len(got) == 8


def test_pytest_rows_from_verbose_lines():
    part = Part("GPU tests: model", (), "pytest")
    lines = ["============================= test session starts ==============================",
             "collecting ... collected 5 items",
             "tests/gpu/gpu_model.py::test_a[shape0-5-dtype0] PASSED                     [ 20%]",
             "tests/gpu/gpu_model.py::test_b[case with spaces, 1.0] FAILED              [ 40%]",
             "tests/gpu/gpu_model.py::test_c PASSED                                     [ 60%]",
             "tests/gpu/gpu_model.py::test_c ERROR                                      [ 60%]",
             "tests/gpu/gpu_model.py::test_d SKIPPED (no triton)                        [ 80%]",
             "tests/data/test_device_augment.py::test_e XFAIL (x)                       [100%]",
             "=============================== warnings summary ===============================",
             "tests/gpu/gpu_model.py::test_a",
             "FAILED tests/gpu/gpu_model.py::test_b[case with spaces, 1.0] - AssertionError"]
    rows = gpu.pytest_rows(part, PartRun(lines, 1, 3.0))
    assert [(r["check"], r["measured"], r["ok"]) for r in rows] == [
        ("gpu_model.py::test_a[shape0-5-dtype0]", "passed", True),
        ("gpu_model.py::test_b[case with spaces, 1.0]", "failed", False),
        ("gpu_model.py::test_c", "error", False),  # passed, then failed in teardown
        ("gpu_model.py::test_d", "skipped", False),  # a GPU check that did not run is not a pass
        ("test_device_augment.py::test_e", "xfail", False)]
    cut = gpu.pytest_rows(part, PartRun(lines[:3] + ["tests/gpu/gpu_model.py::test_b[case with spaces, 1.0]"],
                                        None, 9.0))
    assert [r["measured"] for r in cut] == [
        "passed", "gpu_model.py::test_b[case with spaces, 1.0] stopped by the time limit after 1 results"]
    assert not cut[-1]["ok"] and cut[-1]["check"] == "GPU tests: model"
    assert gpu.pytest_rows(part, None)[0]["measured"] == "not run: time limit"
    assert gpu.pytest_rows(part, PartRun(["ERROR collecting tests/gpu/gpu_model.py"], 2, 1.0))[0]["measured"] == \
        "pytest exited 2 with no test result"


def test_deadline_counts_down_on_its_clock():
    now = [100.0]
    deadline = Deadline(480, clock=lambda: now[0])
    assert deadline.remaining() == 480 and deadline.allows(480)
    now[0] += 470
    assert deadline.remaining() == pytest.approx(10) and not deadline.allows(10.5)
    now[0] += 20
    assert deadline.remaining() == 0


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_run_until_stops_the_whole_process_group_at_the_deadline():
    # The child starts a grandchild that leaves the process group, as a Ray driver under pytest does,
    # prints, then hangs.
    script = ("import subprocess, sys, time; g = subprocess.Popen([sys.executable, '-c', "
              "'import os, time; os.setpgrp(); time.sleep(60)']); print('grandchild', g.pid, flush=True); "
              "time.sleep(60)")
    started = time.monotonic()
    run = gpu.run_until([PY, "-c", script], Deadline(3.0), reserve_s=0.5, kill_grace_s=1.0)
    assert time.monotonic() - started < 6
    assert run.stopped and run.returncode is None
    grandchild = int(run.lines[0].split()[1])
    time.sleep(0.5)
    assert not _alive(grandchild)


def test_check_within_reports_what_was_measured_what_was_stopped_and_what_did_not_run():
    tests_done = Part("tests", (PY, "-c", "print('tests/gpu/gpu_x.py::test_ok PASSED [100%]')"), "pytest")
    # The bench child gives the first bench's summary, then hangs in the second.
    first = {"optimised": {"clips_per_s": 180.0, "peak_memory_gib": 8.0}, "reference": {"clips_per_s": 86.0},
             "speedup": 2.09}
    benches = Part("benchmarks", (PY, "-c", f"import json, time; print(json.dumps({{'index': 0, 'summary': {first!r}}}), "
                                            "flush=True); time.sleep(60)"), "benches")
    never = Part("training tests", (PY, "-c", "print('never')"), "pytest")
    started = time.monotonic()
    result = gpu.check_within(Deadline(6.0), [tests_done, benches, never], progress=lambda m: None,
                              min_part_s=1.0, reserve_s=1.0, kill_grace_s=1.0)
    assert time.monotonic() - started < 8
    assert result["stopped"] == ["benchmarks"] and result["not_run"] == ["training tests"] and not result["ok"]
    rows = {r["check"]: r for r in result["rows"]}
    assert rows["gpu_x.py::test_ok"]["ok"]
    s_train = rows["S 16x224 train b16 bf16, clips/s"]
    assert s_train["measured"] == 180.0 and s_train["reference"] == 86.0 and s_train["ok"]
    assert rows["S 16x224 train b16 bf16, x reference"]["ok"]
    assert rows["B 16x224 train b16 bf16, clips/s"]["measured"] == "stopped by the time limit"
    assert rows["dwconv 5x5x5 fwd+bwd, x F.conv3d channels-last"]["measured"] == "not run: time limit"
    assert rows["training tests"]["measured"] == "not run: time limit"
    assert len(result["benches"]) == 1 and result["benches"][0]["summary"] == first


def test_bench_child_gives_one_json_line_per_bench():
    # On the CPU every bench fails at once (no CUDA), and says so in its row.
    run = gpu.run_until(list(gpu.default_parts()[1].argv), Deadline(300), reserve_s=0)
    assert run.returncode == 0
    rows, summaries = gpu.bench_rows(run)
    assert len(summaries) == len(BENCHES) and len(rows) == 15
    assert all("CUDA" in str(r["measured"]) or "accelerator" in str(r["measured"]) for r in rows)
    assert not any(r["ok"] for r in rows)


def test_gpu_check_prints_the_table_and_fails_when_a_part_was_stopped(monkeypatch, capsys):
    import json

    import torch

    import jobs.bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H100 80GB HBM3")
    seen = {}

    def check_within(deadline, parts, progress):
        seen["limit"], seen["parts"] = deadline.seconds, [p.name for p in parts]
        row = gpu._row("S 16x224 train b16 bf16, clips/s", ">= 172", "stopped by the time limit", basis="2x")
        return {"rows": [row], "benches": [], "stopped": ["benchmarks"], "not_run": ["GPU tests: training"],
                "ok": False}

    monkeypatch.setattr(gpu, "check_within", check_within)
    with pytest.raises(SystemExit) as exit_info:
        jobs.bench.main(["gpu"])
    assert exit_info.value.code == 1
    assert seen == {"limit": 480.0, "parts": ["GPU tests: model", "benchmarks", "GPU tests: training"]}
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["ok"] is False and summary["stopped"] == ["benchmarks"]
    assert summary["not_run"] == ["GPU tests: training"] and summary["time_limit_s"] == 480
    assert "not yet measured" in summary["targets_set_on"] and "H100" in summary["note"]
    assert "stopped by the time limit" in err and "not run ['GPU tests: training']" in err
