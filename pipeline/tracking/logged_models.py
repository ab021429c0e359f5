"""The end of a training run: labels, validation plots, the two logged models, FINISHED."""

from __future__ import annotations

import json

import mlflow

from pipeline.config import Config
from pipeline.tracking.datasets import dataset_name
from pipeline.tracking.metrics import log_model_metrics
from pipeline.tracking.plots import log_confusion
from pipeline.tracking.runs import client_for, code_version, log_text

PYTORCH_MODEL_NAME = "pytorch"  # the name of the logged PyTorch model in a training run


PYFUNC_MODEL_NAME = "video_classifier"  # the name of the logged pyfunc model (what gets registered)


def finish_training_run(cfg: Config, run_id: str, checkpoint_state: dict, labels: list[str]) -> dict[str, str]:
    """Log labels, the validation confusion matrix and per-class accuracy, the PyTorch model and the
    pyfunc video classifier (both from the checkpoint's weights; the EMA weights when the training
    kept an EMA, since those are the ones it validated), then mark the run FINISHED.

    Returns the models' URIs: `pytorch_model_uri`, `model_uri` (the pyfunc, what `register` uses).
    """
    from pipeline.tracking import serving

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
                                               limits=cfg.data.limits,
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

