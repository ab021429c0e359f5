"""Where runs go and what a training run records: one MLflow run per training, continued on a resume.

    run_id = find_or_create_run(cfg, manifest=table)      # driver, before fitting
    client_for(cfg)                                       # the client (and mlflow's URIs) of cfg

Params, tags and text go through `redaction.redact`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Param, RunTag
from mlflow.tracking import MlflowClient

from pipeline import PROJECT_ROOT
from pipeline.config import RESUMABLE_KEYS, Config
from pipeline.tracking.datasets import dataset_name, log_dataset_input, manifest_params
from pipeline.tracking.redaction import redact

_log = logging.getLogger(__name__)


RUN_NAME_TAG = "uniformer.run_name"


RAY_RUN_TAG = "uniformer.ray_run_name"  # the Ray Train run whose checkpoints this run resumes from


CONFIG_DIGEST_TAG = "uniformer.config_digest"  # config.identity_digest of what the run trains




_PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a param value


_BATCH_PARAMS = 100  # MLflow's limit on params per log_batch


def work_dir() -> Path:
    """The project's work folder ($UNIFORMER_WORK_DIR, default ./work), read on every call."""
    return Path(os.environ.get("UNIFORMER_WORK_DIR", "work")).resolve()


def param_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = list(value)
    text = redact(str(value))
    return text if len(text) <= _PARAM_VALUE_LIMIT else text[: _PARAM_VALUE_LIMIT - 3] + "..."


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Log params (redacted, in batches of MLflow's limit)."""
    items = [Param(redact(k), param_value(v)) for k, v in params.items()]
    for start in range(0, len(items), _BATCH_PARAMS):
        client.log_batch(run_id, params=items[start:start + _BATCH_PARAMS])


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, Any]) -> None:
    client.log_batch(run_id, tags=[RunTag(redact(k), param_value(v)) for k, v in tags.items()])


def log_text(client: MlflowClient, run_id: str, text: str, artifact_file: str) -> None:
    client.log_text(run_id, redact(text), artifact_file)


def tracking_uri(cfg: Config) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else the embedded SQLite file in the work folder."""
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = work_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def with_resolved_tracking(cfg: Config) -> Config:
    """`cfg` with the tracking URI pinned, so that Ray workers (other folders, other machines'
    environments) log to the same place as the driver."""
    return dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, tracking_uri=tracking_uri(cfg)))


def client_for(cfg: Config) -> MlflowClient:
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(uri, registry_uri=uri)


def experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if client.tracking_uri.startswith("sqlite:"):
        # The embedded default keeps artifacts beside the database, not in the current folder.
        db = Path(client.tracking_uri[len("sqlite:///"):])
        artifact_location = (db.parent / "mlartifacts" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:  # created meanwhile by another process
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of this checkout (`+dirty` with uncommitted changes), else the package version."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "--no-optional-locks", "-C", str(PROJECT_ROOT), *args], check=True,
                                  capture_output=True, text=True, timeout=10).stdout.strip()

        sha = git("rev-parse", "HEAD")
        if sha:
            dirty = git("status", "--porcelain", "--untracked-files=no")
            return f"git:{sha}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return f"uniformer-ray=={version('uniformer-ray')}"
    except Exception:  # noqa: BLE001 - not installed as a package either
        return "unknown"


def model_cost(variant: str, num_classes: int, *, num_frames: int, crop_size: int) -> dict[str, float]:
    """Parameter count and G multiply-adds per clip (one view), counted on the meta device (no memory,
    well under a second for UniFormer-B). Matches the paper: S16x224 41.7 G, B16x224 96.6 G."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from model import create_uniformer

    with torch.device("meta"):
        net = create_uniformer(variant, num_classes=num_classes).eval()
        clip = torch.empty(1, 3, num_frames, crop_size, crop_size)
    out: dict[str, float] = {"param_count": sum(p.numel() for p in net.parameters())}
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net(clip)
        out["gmacs_per_clip"] = round(counter.get_total_flops() / 2e9, 3)
    except Exception:  # noqa: BLE001 - the cost is informative only; never block a training on it
        pass
    return out


def find_or_create_run(cfg: Config, tags: dict[str, str] | None = None, *, manifest=None,
                       new_run: bool = False) -> str:
    """The run of this training: the newest run with the same run name is continued (a resume);
    otherwise, or with `new_run`, a new run records the config, dataset, model and code version.

    A resume whose config or manifest differs from what the run trained with (beyond
    config.RESUMABLE_KEYS) is refused with a ConfigError naming the changed keys; the allowed
    changes are recorded as `resumed.<key>` tags, since params cannot change. `manifest` is the
    manifest table when the caller has already read it (else it is read here).
    """
    from pipeline.config import ConfigError, changed_keys, identity_digest, training_identity
    from pipeline.data.manifest import manifest_hash

    client = client_for(cfg)
    exp_id = experiment_id(client, cfg.tracking.experiment)
    if manifest is None and cfg.data.manifest:
        from pipeline.data.manifest import read_manifest

        manifest = read_manifest(cfg.data.manifest, storage=cfg.storage)
    identity = training_identity(cfg, manifest_hash(manifest) if manifest is not None else "")
    name = cfg.train.run_name.replace("'", "\\'")
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found and not new_run:  # the same run name is the same training, which Ray Train resumes
        run = found[0]
        logged = {k: param_value(v) for k, v in identity.items()}
        changed = changed_keys(run.data.params, logged)
        if changed:
            raise ConfigError(f"train.run_name={cfg.train.run_name!r} continues MLflow run {run.info.run_id}, which "
                              f"trained with other values of {', '.join(changed)}; keep them, pass --new-run to "
                              f"start a fresh run under this name, or choose another train.run_name")
        resumed = {f"resumed.{k}": v for k, v in cfg.to_flat_dict().items()
                   if k in RESUMABLE_KEYS and run.data.params.get(k) not in (None, param_value(v))}
        if resumed:
            set_tags(client, run.info.run_id, resumed)
        if run.info.status != "RUNNING":  # stopped, failed, or finished and now trained further
            client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id

    params: dict[str, Any] = dict(cfg.to_flat_dict())
    run_tags = {RUN_NAME_TAG: cfg.train.run_name, "job": "train", "variant": cfg.model.variant,
                CONFIG_DIGEST_TAG: identity_digest(identity)}
    if manifest is not None:
        params.update(manifest_params(cfg.data.manifest, manifest))
        run_tags["dataset"] = dataset_name(cfg.data.manifest)
    cost = model_cost(cfg.model.variant, cfg.model.num_classes, num_frames=cfg.data.num_frames,
                      crop_size=cfg.data.crop_size)
    params.update({f"model.{k}": v for k, v in cost.items()})
    params["code.version"] = code_version()
    run_tags["code_version"] = params["code.version"]
    run_tags.update(tags or {})

    run = client.create_run(exp_id, run_name=cfg.train.run_name,
                            tags={redact(k): param_value(v) for k, v in run_tags.items()})
    run_id = run.info.run_id
    # A fresh run under a name used before gets a Ray run of its own: Ray resumes by run name.
    set_tags(client, run_id, {RAY_RUN_TAG: f"{cfg.train.run_name}-{run_id[:8]}" if found else cfg.train.run_name})
    log_params(client, run_id, params)
    log_text(client, run_id, cfg.to_yaml(), "config.yaml")
    if manifest is not None:
        log_dataset_input(client, run_id, manifest, manifest_uri=cfg.data.manifest,
                          digest=params["data.manifest_hash"], context="train")
    return run_id


def ray_run_name(cfg: Config, run_id: str) -> str:
    """The Ray Train run (checkpoint folder) of the MLflow run `run_id`."""
    return client_for(cfg).get_run(run_id).data.tags.get(RAY_RUN_TAG, cfg.train.run_name)


def mark_failed(cfg: Config, run_id: str) -> None:
    """Mark the run FAILED after a failed training; a tracking outage must not hide the training's error."""
    try:
        client_for(cfg).set_terminated(run_id, "FAILED")
    except Exception as err:  # noqa: BLE001
        _log.warning("could not mark run %s FAILED: %s", run_id, redact(str(err)).splitlines()[0][:300])

