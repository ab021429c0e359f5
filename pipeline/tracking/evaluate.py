"""Multi-view evaluation of a trained classifier on one split of a manifest, logged to MLflow.

Every video of the split is scored on `data.test_clips` x `data.test_crops` views (softmax scores
summed); top-1, top-5, mean-class accuracy and the confusion matrix are over the videos that
could be scored. Videos that could not (a manifest status other than ok, or no decodable view)
are counted as unusable and listed, never replaced by other videos. The evaluation is an MLflow
run nested under the training run it measures (tags `source_run_id`, `mlflow.parentRunId`).

The model is `runs:/RUN_ID/video_classifier`, `models:/NAME@alias`, `models:/NAME/VERSION`, a
downloaded model folder, or a training checkpoint (a folder with checkpoint.pt, or the file).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import pickle
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from pipeline.config import Config, DataConfig, config_from_dict
from pipeline.tracking.datasets import dataset_name, labels_from_manifest, log_dataset_input, manifest_file_uri
from pipeline.tracking.metrics import log_metrics, log_model_metrics
from pipeline.tracking.plots import log_confusion
from pipeline.tracking.runs import param_value, client_for, code_version, experiment_id, log_params, log_text

# Data settings that belong to the model (how it was trained); a value set on the command line or
# in the config file (one that differs from the default) still wins.
MODEL_DATA_KEYS = ("sampling", "num_frames", "sampling_rate", "short_side", "crop_size", "mean", "std",
                   "test_clips", "test_crops")


class EvaluationError(ValueError):
    """The model and the data cannot be evaluated together; the message says why."""


@dataclass
class LoadedModel:
    net: Any  # torch.nn.Module in eval mode
    preprocess: dict[str, Any]
    labels: list[str] | None  # None: take the names from the manifest (checkpoints carry none)
    source_run_id: str | None  # the training run, when known
    model_uri: str
    model_id: str | None = None  # the MLflow logged model, when known


def version_model_id(version) -> str | None:
    """The logged model of a registry version: MLflow 3.17 stores it but does not read `model_id` back,
    while the source of a version made from a logged model is `models:/<model_id>`."""
    if version.model_id:
        return version.model_id
    source = version.source or ""
    return source[len("models:/"):].split("/", 1)[0] if source.startswith("models:/m-") else None


def _model_source(client, model_uri: str) -> tuple[str | None, str | None]:
    """(training run id, logged model id) of an MLflow model URI, each None when unknown. The model id
    is what promotion looks evaluations up by: a run has two logged models and many checkpoints."""
    try:
        if model_uri.startswith("runs:/"):
            run_id, _, name = model_uri[len("runs:/"):].partition("/")
            run = client.get_run(run_id)
            found = client.search_logged_models([run.info.experiment_id], filter_string=(
                f"source_run_id = '{run_id}' AND name = '{name.strip('/')}'"))
            return run_id, max(found, key=lambda m: m.creation_timestamp).model_id if found else None
        ref = model_uri[len("models:/"):]
        if ref.startswith("m-"):
            model = client.get_logged_model(ref.split("/", 1)[0])
            return model.source_run_id, model.model_id
        name, sep, alias = ref.partition("@")
        if sep:
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = ref.partition("/")
            version = client.get_model_version(name, number)
        return version.run_id, version_model_id(version)
    except Exception:  # noqa: BLE001 - the link is informative; the evaluation goes on without it
        return None, None


def load_model(cfg: Config, model_uri: str) -> LoadedModel:
    """The network and its preprocessing from an MLflow model URI, a model folder or a checkpoint."""
    import mlflow.artifacts
    import torch

    from pipeline.data import storage
    from pipeline.tracking import serving

    if model_uri.startswith(("runs:/", "models:/")):
        client = client_for(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp,
                                                        tracking_uri=client.tracking_uri)
            net, preprocess, labels = serving.load_bundle(local)
        run_id, model_id = _model_source(client, model_uri)
        return LoadedModel(net, preprocess, labels, run_id, model_uri, model_id)
    if not storage.is_s3(model_uri) and (Path(storage.local_path(model_uri)) / "MLmodel").is_file():
        net, preprocess, labels = serving.load_bundle(storage.local_path(model_uri))
        return LoadedModel(net, preprocess, labels, None, model_uri)
    target = model_uri if model_uri.endswith((".pt", ".pth")) else storage.join(model_uri, "checkpoint.pt")
    try:  # tensors and plain containers only: a checkpoint is data, and loading it must not run pickled code
        state = torch.load(io.BytesIO(storage.read_bytes(target, storage=cfg.storage)), map_location="cpu",
                           weights_only=True)
    except pickle.UnpicklingError as err:
        raise EvaluationError(f"{target} holds objects other than tensors and plain values, which would run "
                              f"code when unpickled ({(str(err).splitlines() or [''])[0][:200]}); save the "
                              "checkpoint's state dicts and config as plain data") from None
    if not isinstance(state, dict) or "config" not in state or "model_state" not in state:
        raise EvaluationError(f"{target} is not a training checkpoint (no config/model_state); pass runs:/..., "
                              "models:/NAME@alias or a checkpoint folder written by `uniformer train`")
    preprocess = serving.preprocess_config(config_from_dict(state["config"]))
    net = serving.build_model(preprocess, state.get("ema_state") or state["model_state"], inference=True)
    return LoadedModel(net, preprocess, None, state.get("mlflow_run_id"), model_uri)


def eval_data_config(cfg: Config, preprocess: dict[str, Any], views: tuple[int, int] | None = None) -> DataConfig:
    """The model's preprocessing, with the data settings the user set explicitly on top."""
    default = DataConfig()
    model_values = {k: tuple(preprocess[k]) if isinstance(preprocess[k], list) else preprocess[k]
                    for k in MODEL_DATA_KEYS if k in preprocess}
    chosen = {k: v for k, v in model_values.items() if getattr(cfg.data, k) == getattr(default, k)}
    data = dataclasses.replace(cfg.data, **chosen)
    if views is not None:
        data = dataclasses.replace(data, test_clips=views[0], test_crops=views[1])
    return data


def _check_labels(rows, labels: list[str]) -> None:
    for label, name in zip(rows.column("label").to_pylist(), rows.column("label_name").to_pylist()):
        if not 0 <= label < len(labels):
            raise EvaluationError(f"the manifest has label {label} ({name!r}) but the model has {len(labels)} "
                                  "classes; evaluate on data prepared with the model's labels.json")
        if name and labels[label] != name:
            raise EvaluationError(f"the manifest calls class {label} {name!r} but the model calls it "
                                  f"{labels[label]!r}; evaluate on data prepared with the model's labels.json")


def score_videos(net, table, *, split: str, data: DataConfig, cfg: Config, batch_size: int) -> dict[int, dict]:
    """{video_id: {"scores": summed softmax (C,), "views": n, "label": int}} for every video of the split
    with at least one decodable view; `video_id` is the row's index in `table`."""
    import torch

    from pipeline.cluster.connect import init_ray
    from pipeline.data.clips import view_dataset
    from pipeline.data.transforms import normalize_on_device

    init_ray()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = net.to(device).eval()
    ds = view_dataset(table, split=split, data=data, storage=cfg.storage)
    videos: dict[int, dict] = {}
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        valid = np.asarray(batch["valid"], dtype=bool)
        if not valid.any():
            continue
        clips = torch.from_numpy(np.ascontiguousarray(batch["clip"][valid])).to(device)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            probs = net(normalize_on_device(clips, data.mean, data.std)).float().softmax(dim=-1).cpu().numpy()
        for video_id, label, p in zip(batch["video_id"][valid].tolist(), batch["label"][valid].tolist(), probs):
            entry = videos.setdefault(video_id, {"scores": np.zeros(p.shape, np.float64), "views": 0,
                                                 "label": int(label)})
            entry["scores"] += p
            entry["views"] += 1
    return videos


def metrics_from_scores(videos: dict[Any, dict], num_classes: int) -> tuple[dict[str, float], list[list[int]]]:
    """top-1, top-5, mean-class accuracy and the confusion matrix (rows: true class)."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    top1 = top5 = 0
    k = min(5, num_classes)
    for entry in videos.values():
        order = np.argsort(-entry["scores"], kind="stable")
        label = entry["label"]
        confusion[label, order[0]] += 1
        top1 += int(order[0] == label)
        top5 += int(label in order[:k])
    n = max(len(videos), 1)
    totals = confusion.sum(axis=1)
    seen = totals > 0
    mean_class = float((confusion.diagonal()[seen] / totals[seen]).mean()) if seen.any() else 0.0
    return {"eval_top1": top1 / n, "eval_top5": top5 / n, "eval_mean_class": mean_class}, confusion.tolist()


@dataclass
class Evaluation:
    """One evaluation: the JSON-able `result` and what is logged beside it."""

    result: dict[str, Any]
    predictions: Any  # pyarrow.Table, `pipeline.tracking.predictions.SCHEMA`
    table: Any  # the manifest
    data: DataConfig
    labels: list[str]
    confusion: list[list[int]]


def run_evaluation(cfg: Config, model_uri: str, manifest_uri: str, *, split: str = "val",
                   views: tuple[int, int] | None = None, manifest=None,
                   batch_size: int | None = None) -> Evaluation:
    """Evaluate `model_uri` on `split` of the manifest; nothing is logged."""
    import torch

    from pipeline.data.manifest import manifest_hash, read_manifest
    from pipeline.tracking.predictions import EvidenceKey, prediction_table

    loaded = load_model(cfg, model_uri)
    table = manifest if manifest is not None else read_manifest(manifest_uri, storage=cfg.storage)
    in_split = np.asarray([s == split for s in table.column("split").to_pylist()])
    if not in_split.any():
        splits = sorted(set(table.column("split").to_pylist()))
        raise EvaluationError(f"{manifest_uri} has no {split!r} rows; splits: {', '.join(splits)}")
    num_classes = int(loaded.preprocess["num_classes"])
    labels = loaded.labels or labels_from_manifest(table, num_classes)
    ok = in_split & np.asarray([s == "ok" for s in table.column("status").to_pylist()])
    _check_labels(table.filter(ok), labels)
    data = eval_data_config(cfg, loaded.preprocess, views)

    videos = score_videos(loaded.net, table, split=split, data=data, cfg=cfg,
                          batch_size=batch_size or (32 if torch.cuda.is_available() else 8))
    unusable = [i for i in np.flatnonzero(in_split).tolist() if i not in videos]
    metrics, confusion = metrics_from_scores(videos, num_classes)
    metrics.update({"eval_videos": len(videos), "eval_unusable": len(unusable),
                    "eval_views": data.test_clips * data.test_crops})
    key = EvidenceKey(manifest_hash(table), split, data.test_clips, data.test_crops)
    result: dict[str, Any] = {**metrics, "model_uri": model_uri, "manifest": manifest_uri,
                              "manifest_hash": key.manifest_hash, "split": split, "test_clips": data.test_clips,
                              "test_crops": data.test_crops, "source_run_id": loaded.source_run_id,
                              "model_id": loaded.model_id}
    return Evaluation(result, prediction_table(table, videos, key=key, labels=labels), table, data, labels,
                      confusion)


def evaluate(cfg: Config, model_uri: str, manifest_uri: str, *, split: str = "val",
             views: tuple[int, int] | None = None, manifest=None, log: bool = True,
             batch_size: int | None = None) -> dict[str, Any]:
    """Evaluate `model_uri` on `split` of the manifest; log it as an MLflow run when `log`."""
    t0 = time.perf_counter()
    evaluation = run_evaluation(cfg, model_uri, manifest_uri, split=split, views=views, manifest=manifest,
                                batch_size=batch_size)
    result = evaluation.result
    if log:
        result["eval_run_id"] = log_evaluation(cfg, evaluation, manifest_uri=manifest_uri)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def unusable_csv(predictions) -> str:
    """path, status, reason of each unusable video of a prediction table."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "status", "reason"])
    for row in predictions.filter(pc.not_equal(predictions["status"], "ok")).to_pylist():
        writer.writerow([row["path"], row["status"], row["reason"]])
    return buf.getvalue()


def log_evaluation(cfg: Config, evaluation: Evaluation, *, manifest_uri: str) -> str:
    """One FINISHED run, nested under the training run when known, in that run's experiment, with the
    prediction table as `predictions.parquet`. With a known logged model, the metrics are that model's
    too (MLflow 3 model metrics, keyed by a dataset named after the manifest, split and views)."""
    from pipeline.tracking import predictions as pred

    result, data = evaluation.result, evaluation.data
    client = client_for(cfg)
    source = result["source_run_id"]
    exp_id, source_name = None, ""
    if source:
        try:
            source_run = client.get_run(source)
            exp_id, source_name = source_run.info.experiment_id, source_run.info.run_name
        except Exception:  # noqa: BLE001 - a run of another server: log unlinked
            source = None
    exp_id = exp_id or experiment_id(client, cfg.tracking.experiment)
    key = pred.key_of(evaluation.predictions)
    dataset = f"{dataset_name(manifest_uri)}/{key.split}/{key.views}"
    tags = {"job": "evaluate", "dataset": dataset_name(manifest_uri), "model_uri": result["model_uri"],
            "code_version": code_version()}
    if source:
        tags.update({"source_run_id": source, "mlflow.parentRunId": source})
    if result["model_id"]:
        tags["model_id"] = result["model_id"]
    run = client.create_run(exp_id, run_name=f"evaluate-{source_name or 'model'}-{result['split']}",
                            tags={k: param_value(v) for k, v in tags.items()})
    run_id = run.info.run_id
    try:
        log_params(client, run_id, {
            "model_uri": result["model_uri"], "eval.manifest_uri": manifest_file_uri(manifest_uri),
            "eval.manifest_hash": result["manifest_hash"], "eval.split": result["split"],
            "eval.test_clips": data.test_clips, "eval.test_crops": data.test_crops,
            **{f"data.{k}": getattr(data, k) for k in MODEL_DATA_KEYS if k not in ("test_clips", "test_crops")}})
        metrics = {k: v for k, v in result.items() if k.startswith("eval_") and isinstance(v, (int, float))}
        log_dataset_input(client, run_id, evaluation.table, manifest_uri=manifest_uri,
                                   digest=result["manifest_hash"], context="eval", name=dataset)
        if result["model_id"]:
            log_model_metrics(client, run_id, result["model_id"], metrics, dataset_name=dataset,
                                       dataset_digest=result["manifest_hash"][:16])
        else:
            log_metrics(client, run_id, metrics, 0)
        log_confusion(client, run_id, evaluation.confusion, evaluation.labels, prefix="eval_",
                               title=f"{result['split']}: {data.test_clips} clips x {data.test_crops} crops")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / pred.ARTIFACT
            path.write_bytes(pred.to_parquet_bytes(evaluation.predictions))
            client.log_artifact(run_id, str(path))
        if result["eval_unusable"]:
            log_text(client, run_id, unusable_csv(evaluation.predictions), "eval_unusable.csv")
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
