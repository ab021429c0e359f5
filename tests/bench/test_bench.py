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


def test_bench_data_clip_cost_compares_the_two_augmentation_paths(tmp_path, capsys):
    summary = bench.main([*TINY, "data.rand_augment=rand-m7-n4-mstd0.5-inc1", "--work-dir", str(tmp_path),
                          "--modes", "cost", "--seek-clips", "0", "--clips-per-s-per-gpu", "100"])
    cost = summary["clip_cost"]
    assert cost["clips"] == 4  # one per row: repeated_aug is 1 in the default config
    assert cost["cpu_ms_per_clip"] > 0 and cost["device_ms_per_clip"] > 0
    assert cost["device_over_cpu"] == pytest.approx(cost["device_ms_per_clip"] / cost["cpu_ms_per_clip"])
    assert cost["cpu_cores_per_gpu"] == pytest.approx(cost["cpu_ms_per_clip"] * 100 / 1000)
    # The device path ships whole 48x64 frames; the CPU path 32x32 crops.
    assert cost["device_mb_per_clip"] == pytest.approx(4 * 48 * 64 * 3 / 1e6)
    assert cost["cpu_mb_per_clip"] == pytest.approx(4 * 32 * 32 * 3 / 1e6)
    assert cost["device_augment_ms_per_clip_on_this_cpu"] > 0
    with pytest.raises(SystemExit):
        bench.main([*TINY, "--work-dir", str(tmp_path), "--modes", "cost", "--clips-per-s-per-gpu", "0"])


def test_whole_train_step_runs_the_loops_step_on_the_cpu():
    import torch

    from pipeline.bench.step import measure_train_step
    from pipeline.config import load_config

    cfg = load_config(bench.DEMO_CONFIG, ["data.num_frames=4", "data.rand_augment=rand-m7-n4-mstd0.5-inc1",
                                          "data.random_erasing=0.25", "optim.mixup_alpha=0.8", "optim.cutmix_alpha=1.0",
                                          "optim.ema_decay=0.99", "optim.clip_grad_norm=20"])
    figures = measure_train_step(cfg, device=torch.device("cpu"), micro_batch=2, steps=2, warmup=1,
                                 frame_size=(72, 96))
    assert figures["clips_per_s"] > 0 and figures["ema"] and figures["frames"] == "72x96"
    assert 0 < figures["augment_ms"] and 0 < figures["augment_share"] < 1
    assert figures["step_ms"] == pytest.approx(1000 * 2 / figures["clips_per_s"])


def test_bench_train_stream_against_memory(tmp_path, capsys, ray_local):
    summary = bench.main(["train", "--videos-per-class", "4", "--steps", "2", "--work-dir", str(tmp_path),
                          "train.batch_size=8"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["bench"] == "train" and line["variant"] == "uniformer_xs"  # the demo config by default
    for run in ("stream", "memory", "checkpointing"):
        assert summary[run]["steps"] == 4  # 2 epochs x 2 steps
        assert summary[run]["clips_per_s"] > 0 and summary[run]["step_s"] > 0
    # Only the checkpointing run's measured epoch follows a checkpoint: what it held the step path, and its write.
    assert "checkpoint_blocking_s" not in summary["memory"]
    assert summary["checkpointing"]["checkpoint_blocking_s"] > 0 and summary["checkpointing"]["checkpoint_write_s"] > 0
    blocking = summary["checkpointing"]["checkpoint_blocking_s"]
    assert summary["checkpoint_step_over_plain"] == pytest.approx(1 + blocking / summary["memory"]["step_s"], abs=2e-3)
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
