"""MLflow tracking: where runs go, one run per training (resumes continue it), rank-0 logging."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pipeline.config import Config

RUN_NAME_TAG = "uniformer.run_name"
WORK_DIR = Path(os.environ.get("UNIFORMER_WORK_DIR", "work")).resolve()


def tracking_uri(cfg: Config) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else the embedded SQLite file in the work folder."""
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{WORK_DIR / 'mlflow.db'}"


def client_for(cfg: Config) -> MlflowClient:
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if client.tracking_uri.startswith("sqlite:"):
        # The embedded default keeps artifacts beside the database, not in the current folder.
        artifact_location = (WORK_DIR / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def find_or_create_run(cfg: Config, tags: dict[str, str] | None = None) -> str:
    """The run of this training: an unfinished run with the same run name is continued."""
    client = client_for(cfg)
    exp_id = experiment_id(client, cfg.tracking.experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{cfg.train.run_name}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found and found[0].info.status != "FINISHED":
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=cfg.train.run_name,
                            tags={RUN_NAME_TAG: cfg.train.run_name, "job": "train", **(tags or {})})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in cfg.to_flat_dict().items()])
    client.log_text(run.info.run_id, cfg.to_yaml(), "config.yaml")
    return run.info.run_id


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    import time

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
