"""Multi-view evaluation of a trained classifier on one split of a manifest, logged to MLflow.

Every video of the split is scored on `data.test_clips` x `data.test_crops` views (softmax scores
summed) by `pipeline.tracking.inference` (decode in Ray Data tasks, the network in an actor pool on
the cluster's GPUs); top-1, top-5, mean-class accuracy and the confusion matrix come from its
prediction table, over the videos that could be scored. Videos that could not (a manifest status
other than ok, or no decodable view) are counted as unusable and listed, never replaced by other
videos. The evaluation is an MLflow run nested under the training run it measures (tags
`source_run_id`, `mlflow.parentRunId`).
"""

from __future__ import annotations

import csv
import io
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import Config, DataConfig
from pipeline.tracking.datasets import dataset_name, log_dataset_input, manifest_file_uri
from pipeline.tracking.inference import (MODEL_DATA_KEYS, align_to_manifest, class_names, eval_data_config, load_model,
                                        run_inference)
from pipeline.tracking.metrics import log_metrics, log_model_metrics
from pipeline.tracking.plots import log_confusion
from pipeline.tracking.runs import client_for, code_version, experiment_id, log_params, log_text, param_value


def metrics_from_predictions(predictions: pa.Table, num_classes: int) -> tuple[dict[str, float], list[list[int]]]:
    """top-1, top-5, mean-class accuracy over the scored (`ok`) videos of a prediction table, their count
    and that of the unusable ones, and the confusion matrix (rows: true class)."""
    scored = predictions.filter(pc.equal(predictions["status"], "ok"))
    labels = np.asarray(scored.column("label").to_pylist(), dtype=np.int64)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, np.asarray(scored.column("prediction").to_pylist(), dtype=np.int64)), 1)
    n = max(scored.num_rows, 1)
    totals = confusion.sum(axis=1)
    seen = totals > 0
    mean_class = float((confusion.diagonal()[seen] / totals[seen]).mean()) if seen.any() else 0.0
    return {"eval_top1": sum(scored.column("correct").to_pylist()) / n,
            "eval_top5": sum(scored.column("top5_correct").to_pylist()) / n, "eval_mean_class": mean_class,
            "eval_videos": scored.num_rows, "eval_unusable": predictions.num_rows - scored.num_rows}, confusion.tolist()


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
                   views: tuple[int, int] | None = None, manifest=None, dataset: str = "") -> Evaluation:
    """Evaluate `model_uri` on `split` of the manifest; nothing is logged. An official checkpoint runs under
    its dataset's official protocol (unless the config sets views, frames or sizes) with its head in the
    manifest's label order, and the result names the official README's top-1 beside the measured one."""
    from pipeline.data.manifest import read_manifest
    from pipeline.tracking.predictions import key_of

    model = load_model(cfg, model_uri, dataset=dataset)
    table = manifest if manifest is not None else read_manifest(manifest_uri, storage=cfg.storage)
    label_order = align_to_manifest(cfg, model, manifest_uri, table)
    data = eval_data_config(cfg, model.preprocess, views)
    predictions = run_inference(cfg, model, table, split=split, data=data)
    metrics, confusion = metrics_from_predictions(predictions, int(model.preprocess["num_classes"]))
    metrics["eval_views"] = data.test_clips * data.test_crops
    key = key_of(predictions)
    result: dict[str, Any] = {**metrics, "model_uri": model_uri, "manifest": manifest_uri,
                              "manifest_hash": key.manifest_hash, "split": split, "test_clips": data.test_clips,
                              "test_crops": data.test_crops, "source_run_id": model.source_run_id,
                              "model_id": model.model_id}
    if model.official:
        result.update(dataset=model.official, variant=model.preprocess["variant"], num_frames=data.num_frames,
                      published_top1=None if model.published_top1 is None else round(model.published_top1 / 100, 4),
                      label_order=label_order)
    return Evaluation(result, predictions, table, data, class_names(model, table), confusion)


def evaluate(cfg: Config, model_uri: str, manifest_uri: str, *, split: str = "val",
             views: tuple[int, int] | None = None, manifest=None, log: bool = True, dataset: str = "") -> dict[str, Any]:
    """Evaluate `model_uri` on `split` of the manifest; log it as an MLflow run when `log`."""
    t0 = time.perf_counter()
    evaluation = run_evaluation(cfg, model_uri, manifest_uri, split=split, views=views, manifest=manifest,
                                dataset=dataset)
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
            **{f"data.{k}": getattr(data, k) for k in MODEL_DATA_KEYS if k not in ("test_clips", "test_crops")},
            **({"eval.official_dataset": result["dataset"], "eval.published_top1": result["published_top1"]}
               if "dataset" in result else {})})
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
