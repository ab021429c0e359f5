"""The one-command demo: synthetic videos -> prepare -> train on Ray -> evaluate -> register ->
promote -> predict, on the embedded defaults (local folder, local Ray, MLflow in SQLite)."""

from __future__ import annotations

import dataclasses
import time

from rich.console import Console

from pipeline.config import Config
from pipeline.tracking.runs import tracking_uri, with_resolved_tracking, work_dir

console = Console(stderr=True)


def stage(number: int, text: str) -> None:
    console.rule(f"[bold]{number}/7 {text}")


def run_demo(cfg: Config, *, classes: int = 6, videos_per_class: int = 100, seed: int = 0) -> dict:
    from pipeline.cluster.connect import init_ray
    from pipeline.data.prepare import PrepareOptions, prepare
    from pipeline.data.synth import synth_dataset
    from pipeline.tracking.evaluate import evaluate
    from pipeline.tracking.registry import promote, register
    from pipeline.tracking.serving import predict_videos
    from pipeline.training.driver import run_training

    t0 = time.perf_counter()
    root = work_dir() / "demo"
    raw, prepared = root / "raw", root / "prepared"
    run_name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"  # every demo is a new training and version
    cfg = dataclasses.replace(
        with_resolved_tracking(cfg),
        data=dataclasses.replace(cfg.data, manifest=str(prepared)),
        train=dataclasses.replace(cfg.train, run_name=run_name,
                                  storage_path=str(work_dir() / "ray_results")))
    init_ray()

    stage(1, f"synth: {classes} motion classes x {videos_per_class} videos -> {raw}")
    synth_dataset(str(raw), num_classes=classes, videos_per_class=videos_per_class, seed=seed)

    # The synthetic videos are already small and short, so prepare validates them without transcoding.
    stage(2, f"prepare (probe and validate) on Ray Data -> {prepared}")
    summary = prepare([str(raw / "train.txt"), str(raw / "val.txt")], str(raw), str(prepared),
                      labels_uri=str(raw / "labels.json"), options=PrepareOptions(transcode=False))
    console.print(f"manifest: {summary['status']} in splits {summary['split']}")

    stage(3, f"train {cfg.model.variant} on Ray Train, {cfg.train.num_workers} workers, run {run_name}")
    trained = run_training(cfg)

    stage(4, "evaluate (multi-view) on the validation split")
    evaluation = evaluate(cfg, trained["model_uri"], str(prepared), split=cfg.data.val_split)

    name = cfg.tracking.registered_model
    stage(5, f"register a new version of {name} as challenger")
    registered = register(cfg, trained["run_id"], name)

    stage(6, "promote challenger -> champion if a paired test says it is better (the first one: no champion yet)")
    decision = promote(cfg, name)

    model_uri = f"models:/{name}@champion"
    video = next(iter(sorted((raw / "videos").rglob("*.mp4"))))
    stage(7, f"predict {video.name} through {model_uri}")
    prediction = predict_videos(model_uri, [str(video)], top_k=3)[0]
    console.print(prediction)

    uri = tracking_uri(cfg)
    console.print(f"MLflow UI: .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000, then open "
                  "http://127.0.0.1:5000\nRay dashboard: start the local stack (infra/local/up.sh) and open "
                  "http://127.0.0.1:8265 while jobs run there")
    return {"val_top1": trained["val_top1"], "eval_top1": evaluation["eval_top1"], "tracking_uri": uri,
            "model_uri": model_uri, "run_id": trained["run_id"], "model_version": registered["version"],
            "promotion": decision["decision"], "prediction": prediction["label"], "video": str(video),
            "seconds": round(time.perf_counter() - t0, 1)}
