"""Inference on Ray (CPU): the actor pool's scores against the network run directly, `uniformer predict
--manifest` writing one row per manifest row (unusable ones with their status) to S3, evaluation
metrics from the prediction table, and the predict job's one-line refusals."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from jobs import predict as predict_job
from model import create_uniformer
from pipeline.data import storage
from pipeline.data.clips import make_clip_rows, select_rows
from pipeline.data.manifest import read_manifest, write_manifest
from pipeline.tracking import predictions
from pipeline.tracking.evaluate import run_evaluation
from pipeline.tracking.inference import InferenceError, LoadedModel, eval_data_config, score_videos
from pipeline.tracking.serving import build_model, preprocess_config
from tests.tracking.conftest import LABELS, tiny_config

# One CPU actor of half a CPU: the decode tasks of the 2-CPU test cluster keep the rest.
SMALL = ("data.inference_actor_cpus=0.5", "data.inference_batch_size=3")


def _checkpoint(cfg, folder) -> str:
    """A training checkpoint of a freshly initialised network (seeded)."""
    torch.manual_seed(0)
    folder.mkdir(exist_ok=True)
    torch.save({"model_state": create_uniformer("uniformer_xs", num_classes=len(LABELS)).state_dict(),
                "config": cfg.to_dict()}, folder / "checkpoint.pt")
    return str(folder / "checkpoint.pt")


def test_actor_pool_scores_equal_the_network_run_directly(ray_local, tiny_videos):
    cfg = tiny_config(manifest=tiny_videos["manifest"], extra=SMALL)
    torch.manual_seed(0)
    state = create_uniformer("uniformer_xs", num_classes=len(LABELS)).state_dict()
    model = LoadedModel(state, preprocess_config(cfg), LABELS, None, "test")
    data = eval_data_config(cfg, model.preprocess)
    manifest = read_manifest(tiny_videos["manifest"])

    videos = score_videos(cfg, model, manifest, split="val", data=data)

    # The reference: the same views decoded in this process, the network (BatchNorms not folded) on CPU.
    net = build_model(model.preprocess, state)
    expected = {}
    for row in select_rows(manifest, split="val", training=False).to_pylist():
        views = [r["clip"] for r in make_clip_rows(row, data=data, storage=cfg.storage, training=False, seed=0)
                 if r["valid"]]
        if views:
            clips = (torch.from_numpy(np.stack(views)).float() / 255 - 0.45) / 0.225
            with torch.inference_mode():
                expected[row["video_id"]] = net(clips.permute(0, 4, 1, 2, 3)).softmax(dim=-1).sum(dim=0).numpy()
    assert sorted(videos) == sorted(expected) and len(expected) == 3  # the 2 unusable val videos: no scores
    for video_id, scores in expected.items():
        assert videos[video_id]["views"] == 2
        np.testing.assert_allclose(videos[video_id]["scores"], scores, rtol=0, atol=1e-5)

    # A pool that would take every CPU of the cluster leaves the decode tasks none: refused, not a hang.
    greedy = dataclasses.replace(data, inference_actor_cpus=2.0)
    with pytest.raises(InferenceError, match=r"1 inference actor\(s\) of data.inference_actor_cpus=2.0 and a decode "
                                             r"task of data.decode_cpus=1.0 need 3 CPUs; the cluster has 2"):
        score_videos(cfg, model, manifest, split="val", data=greedy)


def test_predict_a_manifest_writes_one_row_per_manifest_row(ray_local, embedded, tiny_videos, s3_bucket, tmp_path,
                                                             capsys):
    endpoint, bucket = s3_bucket
    rows = list(tiny_videos["rows"])
    rows.append({**rows[0], "index": len(rows), "path": str(tiny_videos["root"] / "videos/gone.mp4")})
    write_manifest(rows, str(tmp_path / "prepared"))
    cfg = tiny_config(manifest=str(tmp_path / "prepared"))
    checkpoint = _checkpoint(cfg, tmp_path / "checkpoint")
    output = f"s3://{bucket}/predictions/tiny.parquet"

    predict_job.main(["--model", checkpoint, "--manifest", str(tmp_path / "prepared"), "--output", output,
                      "--top-k", "2", *SMALL, f"storage.endpoint_url={endpoint}"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    table = predictions.read(storage.read_bytes(output, storage=tiny_config(
        extra=(f"storage.endpoint_url={endpoint}",)).storage))
    assert table.num_rows == result["videos"] == len(rows)  # every split, every row, once
    assert table.column("video_id").to_pylist() == list(range(len(rows)))
    status = {r["path"].rsplit("/", 1)[-1]: (r["status"], r["reason"]) for r in table.to_pylist()}
    assert status["broken.mp4"] == ("unreadable", "moov atom not found")  # the manifest's own status
    assert status["garbage.mp4"] == status["gone.mp4"] == ("undecodable", "no view could be decoded")
    assert result["ok"] == 9 and result["unusable"] == 3
    assert result["statuses"] == {"ok": 9, "unreadable": 1, "undecodable": 2}
    for row in table.to_pylist():
        if row["status"] == "ok":
            assert row["views"] == 2 and len(row["top_labels"]) == len(row["top_scores"]) == 2
            assert row["top_labels"][0] == LABELS[row["prediction"]] and row["top_scores"][0] >= row["top_scores"][1]
        else:
            assert row["views"] == 0 and row["prediction"] is None and row["top_labels"] == []
    assert predictions.key_of(table).split is None


def test_evaluate_metrics_are_those_of_its_prediction_table(ray_local, tiny_videos, tmp_path):
    cfg = tiny_config(manifest=tiny_videos["manifest"], extra=SMALL)
    evaluation = run_evaluation(cfg, _checkpoint(cfg, tmp_path / "checkpoint"), tiny_videos["manifest"], split="val")
    table = evaluation.predictions
    scored = [r for r in table.to_pylist() if r["status"] == "ok"]
    result = evaluation.result
    assert table.num_rows == 5 and result["eval_videos"] == len(scored) == 3 and result["eval_unusable"] == 2
    assert result["eval_top1"] == sum(r["prediction"] == r["label"] for r in scored) / 3
    assert result["eval_top5"] == 1.0  # 3 classes: the label is always among the top 5
    per_class = {}
    for r in scored:
        per_class.setdefault(r["label"], []).append(r["prediction"] == r["label"])
    assert result["eval_mean_class"] == pytest.approx(np.mean([np.mean(v) for v in per_class.values()]))
    confusion = np.zeros((3, 3), int)
    for r in scored:
        confusion[r["label"], r["prediction"]] += 1
    assert evaluation.confusion == confusion.tolist()


@pytest.mark.parametrize("args, message", [
    (["--manifest", "M"], "--manifest needs --output URI, where the prediction table is written"),
    (["v.mp4", "--manifest", "M", "--output", "o.parquet"], "give one video (VIDEO_URI) or --manifest URI, not both"),
    ([], "give one video (VIDEO_URI) or --manifest URI, got neither"),
    (["v.mp4", "--output", "o.parquet"], "--output and --split go with --manifest; one video prints its labels"),
    (["--manifest", "M", "--output", "o.parquet", "data.inference_cpu_actors=0"],  # an override, not a video
     "config error: data.inference_cpu_actors must be at least 1, got 0"),
])
def test_predict_refuses_bad_arguments_in_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exited:
        predict_job.main(["--model", "m.pt", *args])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err == f"uniformer predict: {message}\n"


def test_predict_names_a_missing_manifest_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        predict_job.main(["--model", "m.pt", "--manifest", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("uniformer predict: ") and "nope/manifest.parquet" in err and err.count("\n") == 1


_GPU_POOL_SCRIPT = """
import json, ray
from ray.cluster_utils import Cluster
from pipeline.config import load_config
from pipeline.tracking.inference import actor_pool

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=3, num_gpus=2)  # a "GPU node": Ray only counts the GPUs
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)
try:
    pool = actor_pool(load_config(None, ["data.decode_cpus=0.5"]).data)
    free_gpus = ray.available_resources().get("GPU", 0)  # what the driver left to the actors

    @ray.remote
    class Actor:
        def gpu(self):
            return ray.get_gpu_ids()

    actors = [Actor.options(num_gpus=pool["num_gpus"], num_cpus=pool["num_cpus"]).remote()
              for _ in range(pool["compute"].max_size)]
    placed = ray.get([a.gpu.remote() for a in actors], timeout=120)
    print(json.dumps({"size": pool["compute"].max_size, "num_gpus": pool["num_gpus"],
                      "free_gpus": free_gpus, "placed": placed}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_the_actor_pool_takes_every_gpu_of_a_simulated_cluster_and_the_driver_none():
    """One actor per GPU of the cluster, each placed, and the driver (as evaluate runs it) holds no
    GPU: a driver submitted with `--num-gpus 1` would leave one actor unplaceable (README, Inference)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _GPU_POOL_SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["size"] == 2 and result["num_gpus"] == 1
    assert result["free_gpus"] == 2
    assert sorted(len(ids) for ids in result["placed"]) == [1, 1]
