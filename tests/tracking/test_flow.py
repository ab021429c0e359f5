"""Training run -> logged models -> evaluations -> register -> promote (a promotion and a rejection) -> predict through
`models:/NAME@champion` in another process; once against a real `mlflow server` with S3 artifacts on
moto, once on the embedded default (SQLite + local files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow.artifacts
import mlflow.pyfunc
import numpy as np
import yaml

from pipeline.tracking import registry
from pipeline.tracking.logged_models import PYFUNC_MODEL_NAME, PYTORCH_MODEL_NAME
from pipeline.tracking.runs import client_for
from tests.tracking.conftest import LABELS, ROOT, fake_evaluation, fake_training, tiny_config

PREDICT_IN_FRESH_PROCESS = """
import json, sys
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame({"video": [sys.argv[2]]}), params={"top_k": 2}).iloc[0]
import model as network, pipeline.tracking.serving
print(json.dumps({"labels": list(out["labels"]), "scores": [float(s) for s in out["scores"]],
                  "error": out["error"], "serving_file": pipeline.tracking.serving.__file__, "model_file": network.__file__}))
"""


def check_training_run(cfg, run_id: str) -> None:
    client = client_for(cfg)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["val_top1"] > 0 and "train_loss" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "labels.json", "val_confusion_matrix.png", "val_per_class_accuracy.csv"} <= artifacts
    assert json.loads(open(client.download_artifacts(run_id, "labels.json")).read()) == LABELS
    csv_text = open(client.download_artifacts(run_id, "val_per_class_accuracy.csv")).read()
    assert csv_text.splitlines()[0] == "class,label,videos,correct,accuracy" and "right" in csv_text
    png = open(client.download_artifacts(run_id, "val_confusion_matrix.png"), "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert sorted(m.name for m in models) == sorted([PYFUNC_MODEL_NAME, PYTORCH_MODEL_NAME])
    for model in models:  # models from code with weights only: nothing that unpickles
        files = [f.path for f in client.list_logged_model_artifacts(model.model_id)]
        assert "MLmodel" in files and not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
        flavor = yaml.safe_load(mlflow.artifacts.load_text(f"{model.artifact_location}/MLmodel"))["flavors"]
        assert set(flavor) == {"python_function"} and flavor["python_function"]["model_code_path"].endswith(".py")
        assert "python_model" not in flavor["python_function"]  # the key of a pickled (cloudpickle) model
    network = mlflow.pyfunc.load_model(f"runs:/{run_id}/{PYTORCH_MODEL_NAME}")
    assert network.predict(np.zeros((2, 3, 8, 32, 32), np.float32)).shape == (2, len(LABELS))


def library_calls():
    return (lambda cfg, run_id, name: registry.register(cfg, run_id, name),
            lambda cfg, name, **kw: registry.promote(cfg, name, **kw))


def cli_calls(capsys):
    """`uniformer register` / `uniformer promote` in-process: config from the defaults (the embedded store)."""
    from jobs import promote as promote_job
    from jobs import register as register_job

    def last_json(main, argv):
        main(argv)
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    def promote(cfg, name, min_delta=0.0, dry_run=False):
        return last_json(promote_job.main, ["--name", name, "--min-delta", str(min_delta),
                                            *(["--dry-run"] if dry_run else [])])

    return (lambda cfg, run_id, name: last_json(register_job.main, ["--run", run_id, "--name", name]), promote)


def registry_flow(make_cfg, manifest: str, name: str, calls) -> None:
    """Version 1 becomes champion; version 2, evaluated on the same 30 videos, is rejected on a tie
    and promoted once a newer evaluation shows it clearly better (a dry run first)."""
    register, promote = calls
    cfg_a = make_cfg()
    run_a = fake_training(cfg_a, val_top1=0.5, seed=0)
    check_training_run(cfg_a, run_a)
    client = client_for(cfg_a)
    fake_evaluation(cfg_a, run_a, manifest, [True, False] * 15)

    first = register(cfg_a, run_a, name)
    assert first["version"] == 1 and first["val_top1"] == 0.5
    version = client.get_model_version(name, "1")
    assert version.tags["run_id"] == run_a and len(version.tags["eval_manifest_hash"]) == 64
    assert version.tags["code_version"] and "val_top1" not in version.tags
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "1"
    decision = promote(cfg_a, name)
    assert decision["decision"] == "promoted" and decision["reason"] == "no champion yet"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"

    cfg_b = make_cfg()
    run_b = fake_training(cfg_b, val_top1=0.55, seed=1)
    fake_evaluation(cfg_b, run_b, manifest, [False, True] * 15)  # as good, on other videos
    assert register(cfg_b, run_b, name)["version"] == 2
    rejected = promote(cfg_b, name)
    assert rejected["decision"] == "rejected" and "not better" in rejected["reason"]
    assert rejected["challenger"]["eval_top1"] == 0.5 == rejected["champion"]["eval_top1"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    tags = client.get_model_version(name, "2").tags
    assert tags["promotion.decision"] == "rejected" and tags["promotion.champion_version"] == "1"
    assert float(tags["promotion.p_value"]) > 0.5 and tags["promotion.test"] == "mcnemar_exact_one_sided"

    fake_evaluation(cfg_b, run_b, manifest, [True] * 28 + [False] * 2)
    dry = promote(cfg_b, name, min_delta=0.01, dry_run=True)
    assert dry["decision"] == "promoted" and dry["dry_run"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    promoted = promote(cfg_b, name, min_delta=0.01)
    assert promoted["decision"] == "promoted" and promoted["test"]["p_value"] < 0.05
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    assert client.get_model_version(name, "1").tags["promotion.replaced_by"] == "2"
    assert client.get_model_version(name, "2").tags["promotion.decision"] == "promoted"
    assert not [mv for mv in client.search_model_versions(f"name = '{name}'") if mv.current_stage != "None"]


def test_flow_against_mlflow_server_with_s3_artifacts(mlflow_server, s3_bucket, tiny_videos, paired_manifest,
                                                      tmp_path):
    import boto3

    endpoint, bucket = s3_bucket
    registry_flow(lambda: tiny_config(mlflow_server, manifest=paired_manifest), paired_manifest, "uniformer-server",
                  library_calls())
    # The artifacts really are in S3, under the server's --artifacts-destination.
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=endpoint).list_objects_v2(
        Bucket=bucket, Prefix="mlflow/")["Contents"]]
    assert any(k.endswith("/artifacts/weights.pt") for k in keys)
    assert any(k.endswith("/val_confusion_matrix.png") for k in keys)

    video = f"s3://{bucket}/videos/clip.mp4"
    boto3.client("s3", endpoint_url=endpoint).upload_file(tiny_videos["video"], bucket, "videos/clip.mp4")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MLFLOW_TRACKING_URI=mlflow_server, AWS_ENDPOINT_URL_S3=endpoint,
               UNIFORMER_SERVE_ALLOWED_PREFIXES=f"s3://{bucket}/videos")
    # A bare interpreter outside the project: the classifier's code must come with the model.
    proc = subprocess.run([sys.executable, "-c", PREDICT_IN_FRESH_PROCESS, "models:/uniformer-server@champion", video],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["error"] == "" and len(out["labels"]) == 2 and set(out["labels"]) <= set(LABELS)
    assert 0 < out["scores"][1] <= out["scores"][0] <= 1
    assert not out["serving_file"].startswith(str(ROOT)) and not out["model_file"].startswith(str(ROOT))


def test_flow_on_the_embedded_default(embedded, tiny_videos, paired_manifest, capsys):
    registry_flow(lambda: tiny_config(manifest=paired_manifest), paired_manifest, "uniformer-embedded",
                  cli_calls(capsys))
    assert (embedded / "mlflow.db").is_file() and (embedded / "mlartifacts").is_dir()
    proc = subprocess.run([sys.executable, "-m", "jobs.predict", "--model", "models:/uniformer-embedded@champion",
                           tiny_videos["video"], "--top-k", "3"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["video"] == tiny_videos["video"] and [t["label"] for t in out["top_k"]] and len(out["top_k"]) == 3
    assert abs(sum(t["score"] for t in out["top_k"]) - 1) < 1e-3
