"""`uniformer bench ingest`: its CPU accounting, and one tiny run on a simulated cluster."""

import json
import subprocess
import sys

from pipeline import PROJECT_ROOT
from pipeline.bench.ingest import CpuTally, decode_tasks


def test_cpu_tally_counts_decoders_only_and_processes_that_come_and_go():
    samples = iter([
        {("decode", 1): (10.0, "ray::IDLE"), ("gpu0", 2): (5.0, "ray::IDLE")},
        {("decode", 1): (12.0, "ray::MapBatches(_train_task_clips)"), ("gpu0", 2): (9.0, "ray::SplitCoordinator"),
         ("decode", 3): (1.0, "ray::MapBatches(_train_task_clips)")},
        {("decode", 3): (4.0, "ray::IDLE")},  # process 1 ended; 3 is idle again
    ])
    tally = CpuTally(lambda: next(samples))
    for _ in range(3):
        tally()
    # Process 1 counts up to its last sample (12 - 10), process 3 from zero (4); gpu0 ran no decode.
    assert tally.per_node() == {"decode": 6.0}


def test_decode_tasks_reads_ray_datas_stats():
    stats = ("Operator 1 ReadRange->SplitBlocks(1): 2 tasks executed, 2 blocks produced in 0.01s\n"
             "Operator 2 MapBatches(_train_task_clips): 7 tasks executed, 7 blocks produced in 3.2s\n"
             "Operator 3 MapBatches(_train_task_clips): \n 5 tasks executed, 5 blocks produced in 1s\n")
    assert decode_tasks(stats) == 12


def test_bench_ingest_tiny_run(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "jobs.bench", "ingest", "--workers", "2", "--gpu-nodes", "1", "--decode-cpus", "2",
         "--videos-per-class", "2", "--epochs", "1", "--step-ms", "1", "--work-dir", str(tmp_path),
         "train.batch_size=4"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    line = json.loads(run.stdout.strip().splitlines()[-1])
    assert line["bench"] == "ingest"
    runs = {r["design"]: r for r in line["runs"]}
    assert set(runs) == {"decode_nodes_only", "trainers_first"} and all(r["workers"] == 2 for r in runs.values())
    for r in runs.values():
        assert r["clips_per_s"] > 0 and 0 <= r["data_wait_fraction"] <= 1 and r["decode_tasks_per_epoch"] >= 1
        assert 0 <= r["crossed_mb_per_clip"] <= r["clip_mb"]
    # Decode-nodes-only decodes there, so every clip crosses to the trainers' node; trainers-first decodes
    # on the trainers' node (it has a free CPU) and its clips stay there.
    only, first = runs["decode_nodes_only"], runs["trainers_first"]
    assert only["decode_node_cpu_share"] > 0.9 and only["crossed_mb_per_clip"] > 0.9 * only["clip_mb"], only
    assert first["decode_node_cpu_share"] < only["decode_node_cpu_share"], first
    assert first["crossed_mb_per_clip"] < only["crossed_mb_per_clip"], first
