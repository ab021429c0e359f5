"""`uniformer bench data` end to end on tiny videos."""

import json

import pytest

from jobs import bench

TINY = ["data", "--videos", "2", "--video-frames", "24", "--height", "48", "--width", "64", "--workers", "1",
        "--clips", "4", "--seek-clips", "2", "--frames", "4", "--rate", "2", "data.crop_size=32"]


def test_bench_data_tiny_run(tmp_path, capsys, ray_local):
    summary = bench.main([*TINY, "--work-dir", str(tmp_path)])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["bench"] == "data"
    assert line["clip"] == "4x2" and line["crop_size"] == 32
    for mode in ("loop", "pool", "ray"):
        assert summary["throughput"][mode]["clips"] == 4
        assert summary["throughput"][mode]["valid"] == 4
        assert summary["throughput"][mode]["clips_per_s_per_core"] > 0
        assert summary["throughput"][mode]["clips_per_cpu_s"] > 0
    assert summary["throughput"]["ray_over_pool"] > 0
    assert set(summary["seek"]) == {"original_gop250", "original_gop16", "prepared"}
    assert summary["seek"]["prepared"]["window_frames"] == 4  # 4 consecutive frames of the 1/2-rate copy
    assert summary["prepared_speedup_vs_original_gop250"] > 0
    assert summary["seek"]["original_gop16"]["window_frames"] == 7
    # a second run reuses the videos
    assert list(tmp_path.iterdir()) and bench.main([*TINY, "--work-dir", str(tmp_path), "--modes", "loop",
                                                   "--seek-clips", "0"])["throughput"].keys() == {"loop"}


def test_bench_train_stream_against_memory(tmp_path, capsys, ray_local):
    summary = bench.main(["train", "--videos-per-class", "4", "--steps", "2", "--work-dir", str(tmp_path),
                          "train.batch_size=8"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["bench"] == "train" and line["variant"] == "uniformer_xs"  # the demo config by default
    for source in ("stream", "memory"):
        assert summary[source]["steps"] == 4  # 2 epochs x 2 steps
        assert summary[source]["clips_per_s"] > 0
    # From memory the loop never waits; the stream at least waits for each epoch's first batch.
    assert summary["memory"]["data_wait_fraction"] < 0.05
    assert summary["stream"]["data_wait_fraction"] > summary["memory"]["data_wait_fraction"]
    ratio = summary["stream"]["clips_per_s"] / summary["memory"]["clips_per_s"]
    assert summary["data_stall_fraction"] == pytest.approx(1 - ratio, abs=2e-3)
    assert (tmp_path / "synth_6x4_seed0" / "prepared" / "manifest.parquet").exists()


@pytest.mark.parametrize("argv, match", [
    (["train", "--epochs", "1"], "1 must be at least 2"),
    (["train", "--manifest", "/nonexistent/prepared"], "/nonexistent/prepared/manifest.parquet: no such file"),
    (["data", "--modes", "loop,gpu"], "use a comma-separated subset of loop, pool, ray"),
    (["data", "--height", "47"], "must be even"),
    (["data", "data.crop_size=30"], "config error: data.crop_size must be a multiple of 32"),
    (["data", "--workers", "0"], "0 must be at least 1"),
])
def test_bench_data_bad_arguments(argv, match, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert match in capsys.readouterr().err


def test_bench_needs_a_subcommand(capsys):
    with pytest.raises(SystemExit):
        bench.main([])
    assert "<what>" in capsys.readouterr().err


def test_gpu_check_without_cuda_says_so_in_one_line_and_succeeds(capsys):
    import torch

    assert not torch.cuda.is_available()  # this suite runs on CPU machines; make gpu-check on GPU ones
    bench.main(["gpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == {"bench": "gpu", "cuda": False,
                                    "note": "no CUDA device here: gpu-check measures nothing on a CPU"}


def test_gpu_check_table_and_targets():
    from pipeline.bench.gpu import BENCHES, Target, _dig, table

    speed, memory = Target("train", "optimised.clips_per_s", at_least=172), Target("mem", "m", at_most=8.85)
    assert speed.met(180.0) and not speed.met(171.9) and not speed.met(None)
    assert memory.met(8.0) and not memory.met(9.0) and memory.wanted() == "<= 8.85"
    assert _dig({"optimised": {"clips_per_s": 3.5}}, "optimised.clips_per_s") == 3.5
    assert _dig({"error": "x"}, "optimised.clips_per_s") is None
    text = table([{"check": "S train", "target": ">= 172", "measured": 180.123, "reference": 90.0, "ok": True},
                  {"check": "GPU tests::x", "target": "pass", "measured": "failed", "ok": False}])
    lines = text.splitlines()
    assert lines[0].split() == ["check", "target", "measured", "reference", "ok"]
    assert lines[1].split()[-3:] == ["180.1", "90", "yes"] and lines[2].endswith("NO")
    names = [t.name for _, _, targets in BENCHES for t in targets]
    assert len(names) == 6 and any("peak GiB" in n for n in names)


def test_gpu_test_files_are_not_collected_by_make_test():
    import subprocess
    import sys

    from pipeline import PROJECT_ROOT as ROOT

    files = sorted(p.name for p in (ROOT / "tests" / "gpu").glob("gpu_*.py"))
    assert files == ["gpu_model.py", "gpu_train.py"]
    for name in files:  # they still compile
        compile((ROOT / "tests" / "gpu" / name).read_text(), name, "exec")
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests"], cwd=ROOT,
                               capture_output=True, text=True)
    assert collected.returncode == 0, collected.stdout[-2000:]
    assert "tests/gpu" not in collected.stdout and "tests/model/test_uniformer.py" in collected.stdout
