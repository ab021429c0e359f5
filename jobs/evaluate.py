"""`uniformer evaluate --model URI --manifest URI [--split val]`: multi-view test of a trained model.

    uniformer evaluate --model models:/uniformer@champion --manifest s3://data/k400-prepared --split val \\
        data.test_clips=4 data.test_crops=1 storage.endpoint_url=http://minio:9000

The model's own preprocessing (frames, sampling, crop, views) is used unless set here. Logged to
MLflow as a run nested under the training run, with one row per video in `predictions.parquet`
(the evidence `promote` pairs) and the metrics as the logged model's; ends with one line of JSON
(eval_top1, eval_top5, eval_mean_class, eval_videos, eval_unusable, eval_run_id, model_id, ...).
"""

from __future__ import annotations

import argparse
import json

from pipeline.config import parse_job_args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="uniformer evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, metavar="URI",
                        help="runs:/RUN_ID/video_classifier, models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint")
    parser.add_argument("--manifest", required=True, metavar="URI", help="prepared folder or its manifest.parquet")
    parser.add_argument("--split", default="val", help="manifest split to evaluate (default: val)")
    parser.add_argument("--no-log", action="store_true", help="do not log the evaluation to MLflow")
    args, cfg = parse_job_args(parser, argv)
    from pipeline.data.storage import StorageError
    from pipeline.tracking.evaluate import evaluate
    from pipeline.tracking.inference import InferenceError

    try:
        result = evaluate(cfg, args.model, args.manifest, split=args.split, log=not args.no_log)
    except (InferenceError, StorageError) as err:
        parser.exit(1, f"{parser.prog}: {err}\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
