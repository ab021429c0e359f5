"""`uniformer evaluate --model URI --manifest URI [--split val]`: multi-view test of a trained model.

    uniformer evaluate --model models:/uniformer@champion --manifest s3://data/k400-prepared --split val \\
        data.test_clips=4 data.test_crops=1 storage.endpoint_url=http://minio:9000
    uniformer evaluate --model s3://data/checkpoints/uniformer_small_k400_16x4.pth --manifest s3://data/k400-prepared

The model's own preprocessing (frames, sampling, crop, views) is used unless set here. An official checkpoint
(a bare state dict, as released) runs under the official test protocol of the dataset it was trained on
(Kinetics: 4 clips x 1 crop, Something-Something: 1 clip x 3 crops; short side 224, 224 crops; frames and
stride from its file name), with its head in the manifest's label order (an error names the first label that
differs); the closing JSON then holds `published_top1`, the official README's figure, beside `eval_top1`. Logged to
MLflow as a run nested under the training run, with one row per video in `predictions.parquet`
(the evidence `promote` pairs) and the metrics as the logged model's; ends with one line of JSON
(eval_top1, eval_top5, eval_mean_class, eval_videos, eval_unusable, eval_run_id, model_id, ...).
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.config import parse_job_args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="uniformer evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, metavar="URI",
                        help="runs:/RUN_ID/video_classifier, models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint")
    parser.add_argument("--manifest", required=True, metavar="URI", help="prepared folder or its manifest.parquet")
    parser.add_argument("--split", default="val", help="manifest split to evaluate (default: val)")
    parser.add_argument("--no-log", action="store_true", help="do not log the evaluation to MLflow")
    parser.add_argument("--dataset", choices=("k400", "k600", "ssv1", "ssv2"),
                        help="an official checkpoint: the dataset it was trained on, when its file name and head do "
                        "not say (174 classes: ssv1 or ssv2)")
    args, cfg = parse_job_args(parser, argv)
    from pipeline.data.storage import StorageError
    from pipeline.tracking.evaluate import evaluate
    from pipeline.tracking.inference import InferenceError

    try:
        result = evaluate(cfg, args.model, args.manifest, split=args.split, log=not args.no_log,
                          dataset=args.dataset or "")
    except (InferenceError, StorageError) as err:
        parser.exit(1, f"{parser.prog}: {err}\n")
    if "dataset" in result:
        published = "none listed" if result["published_top1"] is None else f"{100 * result['published_top1']:.1f}%"
        print(f"{parser.prog}: top-1 {100 * result['eval_top1']:.1f}% measured, {published} published "
              f"({result['dataset']}, {result['variant']}, {result['num_frames']} frames, {result['test_clips']} "
              f"clip(s) x {result['test_crops']} crop(s), {result['eval_videos']} videos)", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
