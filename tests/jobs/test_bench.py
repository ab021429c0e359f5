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


@pytest.mark.parametrize("argv, match", [
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
