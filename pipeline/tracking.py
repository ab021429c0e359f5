"""MLflow tracking: where runs go, one run per training (resumes continue it), what a run records.

    run_id = find_or_create_run(cfg, manifest=table)      # driver, before fitting
    with system_metrics(cfg, run_id): ...                 # each training worker (one per node logs)
    metrics = MetricQueue(client, run_id); metrics.log({...}, step)   # rank 0, off the step's path
    finish_training_run(cfg, run_id, checkpoint_state, labels)   # driver, after fitting

Nothing from the environment that looks secret (AWS_SECRET_ACCESS_KEY, tokens, passwords) and
no password inside a URL reaches a param, tag or text artifact: everything logged as text goes
through `redact`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import io
import json
import logging
import os
import re
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import mlflow
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pipeline.config import RESUMABLE_KEYS, Config

RUN_NAME_TAG = "uniformer.run_name"
RAY_RUN_TAG = "uniformer.ray_run_name"  # the Ray Train run whose checkpoints this run resumes from
CONFIG_DIGEST_TAG = "uniformer.config_digest"  # config.identity_digest of what the run trains
PYTORCH_MODEL_NAME = "pytorch"  # the name of the logged PyTorch model in a training run
PYFUNC_MODEL_NAME = "video_classifier"  # the name of the logged pyfunc model (what gets registered)
PROJECT_ROOT = Path(__file__).resolve().parents[1]

_log = logging.getLogger(__name__)
_PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a param value
_BATCH_PARAMS = 100  # MLflow's limit on params per log_batch


def work_dir() -> Path:
    """The project's work folder ($UNIFORMER_WORK_DIR, default ./work), read on every call."""
    return Path(os.environ.get("UNIFORMER_WORK_DIR", "work")).resolve()


# ---------------------------------------------------------------------------------------------
# Secrets: what must never be logged


_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSW|PASSPHRASE|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_KEY|SESSION_KEY"
                          r"|(^|_)KEY$|(^|_)AUTH$", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]+:)(?P<password>[^/\s@]+)@")
_MIN_SECRET_LEN = 6  # shorter values ("1", "token") would redact ordinary words
REDACTED = "***"


def _environ_snapshot() -> dict[str, str]:
    """A copy of os.environ. MLflow's telemetry thread sets and deletes variables while others read
    them, and a copy taken meanwhile raises KeyError or RuntimeError: take it again."""
    for _ in range(100):
        try:
            return dict(os.environ)
        except (KeyError, RuntimeError):
            continue
    return dict(os.environ)


def secret_values() -> list[str]:
    """Values of environment variables whose names look secret, longest first."""
    values = {v for k, v in _environ_snapshot().items() if _SECRET_NAME.search(k) and len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with secret environment values and URL passwords (`scheme://user:PASSWORD@host`) masked."""
    text = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}{REDACTED}@", text)
    for value in secret_values():
        text = text.replace(value, REDACTED)
    return text


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = list(value)
    text = redact(str(value))
    return text if len(text) <= _PARAM_VALUE_LIMIT else text[: _PARAM_VALUE_LIMIT - 3] + "..."


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Log params (redacted, in batches of MLflow's limit)."""
    items = [Param(redact(k), _param_value(v)) for k, v in params.items()]
    for start in range(0, len(items), _BATCH_PARAMS):
        client.log_batch(run_id, params=items[start:start + _BATCH_PARAMS])


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, Any]) -> None:
    client.log_batch(run_id, tags=[RunTag(redact(k), _param_value(v)) for k, v in tags.items()])


def log_text(client: MlflowClient, run_id: str, text: str, artifact_file: str) -> None:
    client.log_text(run_id, redact(text), artifact_file)


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


class MetricQueue:
    """A training's metrics on their way to MLflow, off the training step's path.

    `log` only appends to an in-memory queue; a daemon thread sends it in batches. While the
    tracking server is down (MLflow's client gives up after about 4 minutes of its own retries)
    the thread keeps the metrics and tries again, so an outage neither stalls the step nor loses
    metrics. Past `max_pending` metrics the oldest are dropped, counted and warned about.
    `close` waits up to `timeout_s` for the queue to drain and returns what stayed undelivered.
    """

    BATCH = 1000  # MLflow's limit on metrics per log_batch

    def __init__(self, client: MlflowClient, run_id: str, *, max_pending: int = 1_000_000,
                 retry_s: tuple[float, float] = (1.0, 30.0)):
        import collections
        import threading

        self.client, self.run_id = client, run_id
        self.max_pending, self.retry_s = max_pending, retry_s
        self.pending: collections.deque[Metric] = collections.deque()
        self.dropped = 0
        self.cond = threading.Condition()
        self.closing = False
        self.closed = threading.Event()  # wakes a retry wait early at close
        self.thread = threading.Thread(target=self._send_forever, name="mlflow-metrics", daemon=True)
        self.thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        with self.cond:
            self.pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
            overflow = len(self.pending) - self.max_pending
            for _ in range(max(0, overflow)):
                self.pending.popleft()
            self.dropped += max(0, overflow)
            self.cond.notify()

    def _send_forever(self) -> None:
        delay, failing = self.retry_s[0], False
        while True:
            with self.cond:
                while not self.pending and not self.closing:
                    self.cond.wait()
                if not self.pending:
                    return
                batch = [self.pending[i] for i in range(min(self.BATCH, len(self.pending)))]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as err:  # noqa: BLE001 - any failure to deliver: keep the metrics, retry
                if not failing:
                    _log.warning("tracking server unreachable, metrics kept and retried: %s",
                                 redact(str(err)).splitlines()[0][:300])
                failing = True
                self.closed.wait(timeout=delay)
                delay = min(delay * 2, self.retry_s[1])
                continue
            if failing:
                _log.warning("tracking server reachable again; delivering kept metrics")
            delay, failing = self.retry_s[0], False
            with self.cond:
                for _ in batch:
                    self.pending.popleft()
                self.cond.notify_all()

    def close(self, timeout_s: float = 600.0) -> int:
        """Deliver what is queued (waiting at most `timeout_s`); returns the undelivered count."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.closed.set()
        self.thread.join(timeout=timeout_s)
        with self.cond:
            undelivered = len(self.pending) + self.dropped
        if undelivered:
            _log.warning("%d metrics of run %s could not be delivered to the tracking server", undelivered,
                         self.run_id)
        return undelivered


# ---------------------------------------------------------------------------------------------
# Where runs go


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


# ---------------------------------------------------------------------------------------------
# What a training run records when it starts


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


def dataset_name(manifest_uri: str) -> str:
    """A short name for the dataset: the prepared folder's name."""
    path = manifest_uri.rstrip("/")
    if path.endswith(".parquet"):
        path = path.rsplit("/", 1)[0] if "/" in path else ""
    return path.rsplit("/", 1)[-1] or "dataset"


def manifest_file_uri(manifest_uri: str) -> str:
    return manifest_uri if manifest_uri.endswith(".parquet") else manifest_uri.rstrip("/") + "/manifest.parquet"


def manifest_params(manifest_uri: str, table) -> dict[str, Any]:
    """`data.manifest_hash`, `data.manifest_uri`, `data.count.<split>.<status>` and `data.rows`."""
    from collections import Counter

    from pipeline.manifest import manifest_hash

    counts = Counter(zip(table.column("split").to_pylist(), table.column("status").to_pylist()))
    params: dict[str, Any] = {"data.manifest_uri": manifest_file_uri(manifest_uri),
                              "data.manifest_hash": manifest_hash(table), "data.rows": table.num_rows}
    params.update({f"data.count.{split}.{status}": n for (split, status), n in sorted(counts.items())})
    return params


def labels_from_manifest(table, num_classes: int) -> list[str]:
    """Class names in index order from the manifest's `label` / `label_name` columns (`class_<i>` when unseen)."""
    names = [f"class_{i}" for i in range(num_classes)]
    for label, name in zip(table.column("label").to_pylist(), table.column("label_name").to_pylist()):
        if label is not None and 0 <= label < num_classes and name:
            names[label] = name
    return names


def dataset_labels(cfg: Config, manifest=None) -> list[str]:
    """The class names of `cfg.data.manifest`: `labels.json` beside it (what `prepare` writes), else the
    manifest's own label names; padded to `model.num_classes` when the data has fewer classes."""
    from pipeline import storage
    from pipeline.annotations import read_labels

    uri = manifest_file_uri(cfg.data.manifest)
    labels_uri = uri.rsplit("/", 1)[0] + "/labels.json" if "/" in uri else "labels.json"
    n = cfg.model.num_classes
    if storage.exists(labels_uri, storage=cfg.storage):
        names = read_labels(labels_uri, storage=cfg.storage)
        if len(names) > n:
            raise ValueError(f"{labels_uri} names {len(names)} classes but model.num_classes={n}; set "
                             f"model.num_classes={len(names)}")
        return names + [f"class_{i}" for i in range(len(names), n)]
    if manifest is None:
        from pipeline.manifest import read_manifest

        manifest = read_manifest(cfg.data.manifest, storage=cfg.storage)
    return labels_from_manifest(manifest, n)


def log_dataset_input(client: MlflowClient, run_id: str, table, *, manifest_uri: str, digest: str,
                      context: str, name: str | None = None) -> None:
    """The manifest as a run input (MLflow's Datasets tab), its source the manifest's URI; `name`
    defaults to the dataset's folder name."""
    import mlflow.data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # schema hints and "source interpreted in multiple ways"
        dataset = mlflow.data.from_pandas(table.to_pandas(), source=redact(manifest_file_uri(manifest_uri)),
                                          name=name or dataset_name(manifest_uri), targets="label",
                                         digest=digest[:16])
        entity = dataset._to_mlflow_entity()
    client.log_inputs(run_id, [DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])])


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
    from pipeline.manifest import manifest_hash

    client = client_for(cfg)
    exp_id = experiment_id(client, cfg.tracking.experiment)
    if manifest is None and cfg.data.manifest:
        from pipeline.manifest import read_manifest

        manifest = read_manifest(cfg.data.manifest, storage=cfg.storage)
    identity = training_identity(cfg, manifest_hash(manifest) if manifest is not None else "")
    name = cfg.train.run_name.replace("'", "\\'")
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found and not new_run:  # the same run name is the same training, which Ray Train resumes
        run = found[0]
        logged = {k: _param_value(v) for k, v in identity.items()}
        changed = changed_keys(run.data.params, logged)
        if changed:
            raise ConfigError(f"train.run_name={cfg.train.run_name!r} continues MLflow run {run.info.run_id}, which "
                              f"trained with other values of {', '.join(changed)}; keep them, pass --new-run to "
                              f"start a fresh run under this name, or choose another train.run_name")
        resumed = {f"resumed.{k}": v for k, v in cfg.to_flat_dict().items()
                   if k in RESUMABLE_KEYS and run.data.params.get(k) not in (None, _param_value(v))}
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
                            tags={redact(k): _param_value(v) for k, v in run_tags.items()})
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


# ---------------------------------------------------------------------------------------------
# System metrics from the training workers


@contextlib.contextmanager
def system_metrics(cfg: Config, run_id: str, *, local_rank: int | None = None,
                   node_rank: int | None = None, sampling_interval_s: float = 10.0) -> Iterator[None]:
    """CPU, memory, disk, network (and GPU with `nvidia-ml-py`) metrics of this node into the run,
    as `system/node_<rank>/...`, from the process with local rank 0 only; a no-op when
    `tracking.system_metrics` is false or there is no run. Ranks come from the Ray Train context when not given."""
    if not cfg.tracking.system_metrics or not run_id:
        yield
        return
    if local_rank is None or node_rank is None:
        try:
            import ray.train

            ctx = ray.train.get_context()
            local_rank = ctx.get_local_rank() if local_rank is None else local_rank
            node_rank = ctx.get_node_rank() if node_rank is None else node_rank
        except Exception:  # noqa: BLE001 - outside Ray Train: a single process
            local_rank = 0 if local_rank is None else local_rank
            node_rank = 0 if node_rank is None else node_rank
    if local_rank != 0:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_interval_s, resume_logging=True,
                                   node_id=f"node_{node_rank}", tracking_uri=tracking_uri(cfg))
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


# ---------------------------------------------------------------------------------------------
# Confusion matrix and per-class accuracy (training validation and evaluation)


def per_class_rows(confusion: Sequence[Sequence[float]], labels: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for i, row in enumerate(confusion):
        total = int(sum(row))
        correct = int(row[i]) if i < len(row) else 0
        rows.append({"class": i, "label": labels[i] if i < len(labels) else str(i), "videos": total,
                     "correct": correct, "accuracy": round(correct / total, 6) if total else ""})
    return rows


def per_class_csv(confusion: Sequence[Sequence[float]], labels: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["class", "label", "videos", "correct", "accuracy"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(per_class_rows(confusion, labels))
    return buf.getvalue()


def confusion_png(confusion: Sequence[Sequence[float]], labels: Sequence[str], *, title: str) -> bytes:
    """The confusion matrix as a PNG, rows normalised to recall; labels shown up to 40 classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(confusion, dtype=np.float64)
    n = counts.shape[0]
    recall = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.3 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size * 0.85), dpi=100)
    image = ax.imshow(recall, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 40:
        names = [labels[i] if i < len(labels) else str(i) for i in range(n)]
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
        if n <= 15:
            for i in range(n):
                for j in range(n):
                    if counts[i, j]:
                        ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if recall[i, j] > 0.5 else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def log_confusion(client: MlflowClient, run_id: str, confusion: Sequence[Sequence[float]], labels: Sequence[str],
                  *, prefix: str, title: str) -> None:
    """`<prefix>confusion_matrix.png` and `<prefix>per_class_accuracy.csv` as run artifacts."""
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / f"{prefix}confusion_matrix.png"
        png.write_bytes(confusion_png(confusion, labels, title=redact(title)))
        client.log_artifact(run_id, str(png))
    log_text(client, run_id, per_class_csv(confusion, labels), f"{prefix}per_class_accuracy.csv")


# ---------------------------------------------------------------------------------------------
# The end of a training: artifacts, the two logged models, FINISHED


def finish_training_run(cfg: Config, run_id: str, checkpoint_state: dict, labels: list[str]) -> dict[str, str]:
    """Log labels, the validation confusion matrix and per-class accuracy, the PyTorch model and the
    pyfunc video classifier (both from the checkpoint's weights; the EMA weights when the training
    kept an EMA, since those are the ones it validated), then mark the run FINISHED.

    Returns the models' URIs: `pytorch_model_uri`, `model_uri` (the pyfunc, what `register` uses).
    """
    from pipeline import serving

    if len(labels) != cfg.model.num_classes:
        raise ValueError(f"{len(labels)} labels for a model of model.num_classes={cfg.model.num_classes}; "
                         "pass the dataset's labels.json in class-index order")
    client = client_for(cfg)
    last_val = checkpoint_state.get("last_val") or {}
    state_dict = checkpoint_state.get("ema_state") or checkpoint_state["model_state"]

    log_text(client, run_id, json.dumps(list(labels), indent=1) + "\n", "labels.json")
    if last_val.get("confusion"):
        log_confusion(client, run_id, last_val["confusion"], labels, prefix="val_",
                      title=f"{cfg.train.run_name}: validation, epoch {checkpoint_state.get('epoch', '?')}")

    preprocess = serving.preprocess_config(cfg)
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        pytorch_info = serving.log_pytorch_model(state_dict, preprocess, labels, name=PYTORCH_MODEL_NAME)
        pyfunc_info = serving.log_pyfunc_model(state_dict, preprocess, labels, name=PYFUNC_MODEL_NAME,
                                               metadata={"pytorch_model_uri": pytorch_info.model_uri,
                                                         "code_version": code_version()})
    manifest_hash = client.get_run(run_id).data.params.get("data.manifest_hash")
    val_metrics = {k: v for k, v in last_val.items() if k.startswith("val_") and isinstance(v, (int, float))}
    if manifest_hash and val_metrics:  # training validates 1 clip x 1 crop per video
        log_model_metrics(client, run_id, pyfunc_info.model_id, val_metrics, step=checkpoint_state.get("step", 0),
                          dataset_name=f"{dataset_name(cfg.data.manifest)}/{cfg.data.val_split}/1x1",
                          dataset_digest=manifest_hash[:16])
    client.set_terminated(run_id, "FINISHED")
    return {"run_id": run_id, "pytorch_model_uri": pytorch_info.model_uri, "model_uri": pyfunc_info.model_uri}


def log_model_metrics(client: MlflowClient, run_id: str, model_id: str, metrics: dict[str, float], *,
                      dataset_name: str, dataset_digest: str, step: int = 0) -> None:
    """Metrics of the run that are also the logged model's (MLflow 3 model metrics): the registry shows
    them on every version of that model, keyed by the dataset, rather than as version tags."""
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step, model_id=model_id, dataset_name=dataset_name,
                                             dataset_digest=dataset_digest) for k, v in metrics.items()])
