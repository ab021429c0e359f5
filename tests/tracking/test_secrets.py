"""No secret from the environment (nor a password inside a URL in the config) reaches a param, tag,
metric or artifact: everything a run, its models and its registered version hold is downloaded and
scanned, and so are the server's database and every object it wrote to S3."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow.artifacts

from pipeline.tracking import registry
from pipeline.tracking.redaction import secret_values
from pipeline.tracking.runs import client_for
from tests.tracking.conftest import fake_training, tiny_config

SECRETS = {"AWS_SECRET_ACCESS_KEY": "supersecret-xyz", "MLFLOW_TRACKING_PASSWORD": "hunter2-tracking",
           "HF_TOKEN": "hf_tok_abcdef123"}
URL_PASSWORD = "url-pass-123"


def _texts_of(client, run_id: str, dst: Path) -> list[tuple[str, bytes]]:
    run = client.get_run(run_id)
    found = [("params", repr(run.data.params).encode()), ("tags", repr(run.data.tags).encode()),
             ("metrics", repr(run.data.metrics).encode()),
             ("inputs", repr(run.inputs).encode())]
    folder = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(dst / run_id),
                                                      tracking_uri=client.tracking_uri))
    for model in client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"):
        found.append((f"model {model.name}", repr((model.params, model.tags, model.metrics)).encode()))
        mlflow.artifacts.download_artifacts(artifact_uri=model.model_uri, dst_path=str(dst / model.model_id),
                                            tracking_uri=client.tracking_uri)
    for path in [*folder.rglob("*"), *dst.rglob("*")]:
        if path.is_file():
            found.append((str(path), path.read_bytes()))
    return found


def test_no_secret_reaches_params_tags_metrics_or_artifacts(mlflow_server, s3_bucket, tiny_videos, monkeypatch,
                                                            tmp_path):
    import boto3

    server_secret = os.environ["AWS_SECRET_ACCESS_KEY"]  # the moto fixture's, the server's
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    cfg = tiny_config(mlflow_server, manifest=tiny_videos["manifest"], extra=(
        f"model.init_from=https://someone:{URL_PASSWORD}@weights.example.com/w.pth",
        f"train.storage_path=s3://bucket/{SECRETS['AWS_SECRET_ACCESS_KEY']}/ray"))
    run_id = fake_training(cfg, val_top1=0.5)
    version = registry.register(cfg, run_id, "secret-check")["version"]
    client = client_for(cfg)
    assert client.get_run(run_id).data.params["model.init_from"] == "https://someone:***@weights.example.com/w.pth"

    texts = _texts_of(client, run_id, tmp_path / "downloaded")
    texts.append(("version tags", repr(client.get_model_version("secret-check", str(version)).tags).encode()))
    endpoint, bucket = s3_bucket
    s3 = boto3.client("s3", endpoint_url=endpoint)
    for obj in s3.list_objects_v2(Bucket=bucket, Prefix="mlflow/").get("Contents", []):
        texts.append((obj["Key"], s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()))
    texts += [(str(p), p.read_bytes()) for p in tmp_path.parent.glob("mlflow_server*/mlflow.db")]
    assert len(texts) > 20  # params, tags, config.yaml, labels, PNG, CSV, both models' files, S3 objects
    for secret in [*SECRETS.values(), URL_PASSWORD, server_secret]:
        leaks = [where for where, data in texts if secret.encode() in data]
        assert not leaks, f"{secret!r} leaked into {leaks}"


def test_secret_values_survive_a_thread_that_edits_the_environment(monkeypatch):
    import os
    import threading

    monkeypatch.setenv("SOME_API_TOKEN", "token-value-123")
    stop = threading.Event()

    def churn():  # what MLflow's telemetry thread does to os.environ
        while not stop.is_set():
            os.environ["_CHURN_VARIABLE"] = "x"
            os.environ.pop("_CHURN_VARIABLE", None)

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        for _ in range(2000):
            assert "token-value-123" in secret_values()
    finally:
        stop.set()
        thread.join()
