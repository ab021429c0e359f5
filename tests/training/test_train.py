"""Ray Train end to end through the real CLI, on a two-node Ray cluster on this machine."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from pipeline.data.prepare import PrepareOptions, prepare
from pipeline.data.synth import synth_dataset

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "infra" / "configs" / "demo.yaml"


def prepared_motion_set(root: Path, videos_per_class: int) -> Path:
    """The demo's synthetic motion set (6 classes), prepared in-process (no Ray); its folder."""
    synth_dataset(str(root / "raw"), num_classes=6, videos_per_class=videos_per_class, seed=0)
    prepare([str(root / "raw" / "train.txt"), str(root / "raw" / "val.txt")], str(root / "raw"),
            str(root / "prepared"), labels_uri=str(root / "raw" / "labels.json"),
            options=PrepareOptions(short_side=0), executor="inline")
    return root / "prepared"


@pytest.fixture(scope="module")
def motion_set(tmp_path_factory):
    """54 training videos (6 steps of 16 clips per epoch) and 18 validation videos: enough for every
    mechanism below; how well the model learns is the demo's check, not these tests'."""
    return prepared_motion_set(tmp_path_factory.mktemp("motion"), videos_per_class=12)


@pytest.fixture(scope="module")
def two_node_cluster():
    """Two Ray nodes (separate raylets) of one CPU each on this machine."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster.address
    cluster.shutdown()


def run_train(tmp_path: Path, address: str, *overrides: str, timeout_s: int = 1500) -> tuple[dict, str]:
    cmd = [sys.executable, "-m", "jobs.train", "--config", str(DEMO),
           f"train.storage_path={tmp_path / 'ray_results'}",
           f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "RAY_ADDRESS": address}, capture_output=True,
                          text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr


def committed_checkpoints(run_dir: Path) -> int:
    """Checkpoints Ray Train has registered (every rank reported them): a checkpoint folder alone may be
    an upload whose report never completed, which a restart does not resume from."""
    try:
        return len(json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
        return 0


def kill_one_worker_after_first_checkpoint(run_dir: Path, killed: list) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not committed_checkpoints(run_dir):
        time.sleep(0.2)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
            os.kill(proc.info["pid"], signal.SIGKILL)
            killed.append(proc.info["pid"])
            return


def test_a_lost_worker_resumes_from_the_checkpoint_and_finishes_the_same_run(tmp_path, motion_set,
                                                                            two_node_cluster):
    killed: list[int] = []
    killer = threading.Thread(target=kill_one_worker_after_first_checkpoint,
                              args=(tmp_path / "ray_results" / "recover", killed), daemon=True)
    killer.start()
    summary, log = run_train(tmp_path, two_node_cluster, f"data.manifest={motion_set}", "train.run_name=recover",
                             "optim.epochs=4")
    killer.join(timeout=1)
    assert killed, "no RayTrainWorker process was found to kill"
    # The replacement group started from a checkpoint (not from scratch) at an epoch boundary.
    resumed = [tuple(map(int, m)) for m in re.findall(r"resumed from checkpoint at epoch (\d+), step (\d+)", log)]
    assert resumed and all(epoch >= 1 and step == 6 * epoch for epoch, step in resumed), log[-3000:]
    # ... and ended where an uninterrupted run ends: every epoch, every step, every validation video.
    assert (summary["epochs"], summary["steps"], summary["val_videos"]) == (4, 24, 18), summary
    assert 0.0 <= summary["val_top1"] <= 1.0 and summary["val_unusable"] == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("uniformer-demo").experiment_id])
    assert [r.info.run_id for r in runs] == [summary["run_id"]]  # recovery continued the same run
    losses = client.get_metric_history(summary["run_id"], "train_loss")
    assert {m.step for m in losses} == set(range(1, 25))
    speeds = client.get_metric_history(summary["run_id"], "epoch_clips_per_s")
    assert len(speeds) >= 4 and all(m.value > 0 for m in speeds)  # a recovered epoch logs twice


def test_resume_on_fewer_workers_continues_at_the_checkpoints_step_and_epoch(tmp_path, motion_set, two_node_cluster):
    # A relative manifest path: Train workers run in other folders, so the driver must resolve it.
    short = (f"data.manifest={os.path.relpath(motion_set, ROOT)}", "train.max_steps_per_epoch=2",
             "optim.warmup_epochs=0")
    first, _ = run_train(tmp_path, two_node_cluster, *short, "train.run_name=resume", "optim.epochs=1")
    assert (first["epochs"], first["steps"]) == (1, 2)
    # On one worker instead of two: the global batch of 16 clips stays, in 2 micro-batches of 8 as before.
    resumed, log = run_train(tmp_path, two_node_cluster, *short, "train.run_name=resume", "optim.epochs=2",
                             "train.num_workers=1", "optim.grad_accum_steps=2")
    assert "resumed from checkpoint at epoch 1, step 2" in log
    assert "1 workers: 16 clips per worker and step in 2 micro-batches (global batch 16)" in log
    assert "clip stream starts at epoch 1" in log  # the stream was built from the checkpoint, not epoch 0
    assert (resumed["epochs"], resumed["steps"], resumed["run_id"]) == (2, 4, first["run_id"])


@pytest.mark.parametrize("override, message", [
    ("optim.bogus=1", "unknown config key optim.bogus"),
    ("optim.lr_per_32_videos=-1", "optim.lr_per_32_videos must be > 0"),
    ("train.batch_size=15", "train.batch_size counts clips and must hold whole videos"),
    ("data.manifest=/nonexistent/prepared", "/nonexistent/prepared"),
])
def test_bad_config_fails_before_any_ray_work(tmp_path, override, message):
    cmd = [sys.executable, "-m", "jobs.train", "--config", str(DEMO), override,
           f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})  # any Ray call would hang or fail
    assert proc.returncode == 2
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and message in errors[0], proc.stderr


def one_val_video_manifest(motion_set: Path, folder: Path) -> Path:
    """The motion set with a validation split of one video: one of the two workers validates nothing."""
    import pyarrow.compute as pc

    from pipeline.data.manifest import read_manifest, write_manifest

    table = read_manifest(str(motion_set))
    val_index = pc.index(table["split"], "val").as_py()
    keep = [i for i in range(table.num_rows) if table["split"][i].as_py() != "val" or i == val_index]
    write_manifest(table.take(keep), str(folder))
    return folder


def test_two_workers_validate_a_split_of_one_video(tmp_path, motion_set, two_node_cluster):
    # Through the DDP wrapper the worker with the video would wait in a buffer broadcast that the
    # worker without one never enters: the run would hang or mix up collectives.
    manifest = one_val_video_manifest(motion_set, tmp_path / "one_val")
    # With the bf16 gradient hook on gloo, as a multi-node run would send gradients.
    summary, _ = run_train(tmp_path, two_node_cluster, f"data.manifest={manifest}", "train.run_name=oneval",
                           "optim.epochs=1", "train.max_steps_per_epoch=2", "optim.warmup_epochs=0",
                           "train.checkpoint_metric=val_loss", "train.grad_compression=bf16", timeout_s=600)
    assert summary["val_videos"] == 1 and summary["val_unusable"] == 0
    assert 0 < summary["val_loss"] < 10


def test_a_tracking_server_down_for_20_s_neither_stops_training_nor_loses_metrics(tmp_path, motion_set):
    from pipeline.bench.train import LocalMlflowServer

    server = LocalMlflowServer(tmp_path / "mlflow")
    server.start()
    url = server.url
    # A Ray of the run's own (no RAY_ADDRESS) so that its workers see MLflow's retries cut to seconds:
    # the outage then outlasts MLflow's own retrying, as a long one would with the defaults.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    cmd = [sys.executable, "-m", "jobs.train", "--config", str(DEMO), f"data.manifest={motion_set}",
           f"train.storage_path={tmp_path / 'ray_results'}", f"tracking.tracking_uri={url}", "train.run_name=outage",
           "optim.epochs=6", "train.val_every_epochs=6", "tracking.log_every_steps=1"]
    log = open(tmp_path / "train.log", "w")
    training = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        client, runs = MlflowClient(url), []
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and training.poll() is None:
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            if runs and client.get_metric_history(runs[0].info.run_id, "train_loss"):
                break
            time.sleep(1)
        assert runs, (tmp_path / "train.log").read_text()[-3000:]
        run_id = runs[0].info.run_id
        server.stop()
        checkpoints = lambda: {p.name for p in (tmp_path / "ray_results" / "outage").glob("checkpoint_*")}  # noqa: E731
        before = checkpoints()
        time.sleep(20)  # outlasts MLflow's own retrying (cut to one retry and 5 s above)
        during = checkpoints()
        server.start()
        assert training.wait(timeout=900) == 0, (tmp_path / "train.log").read_text()[-3000:]
        assert during - before, "no epoch finished while the tracking server was down"
        assert client.get_run(run_id).info.status == "FINISHED"
        steps = {m.step for m in client.get_metric_history(run_id, "train_loss")}
        assert steps == set(range(1, 37))  # every step's metrics, those of the outage included
    finally:
        training.kill()
        server.stop()
        log.close()
