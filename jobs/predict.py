"""`uniformer predict`: top-k labels of one video, or the prediction table of a whole manifest.

    uniformer predict --model models:/uniformer@champion s3://data/clips/abc.mp4 --top-k 5
    uniformer predict --model models:/uniformer@champion --manifest s3://data/prepared \\
        --output s3://data/predictions/champion.parquet [--split val] [--top-k 5]

One video goes through the pyfunc video classifier, exactly as a served model would; the video is a
local path, file:// or s3:// URI; prints one line of JSON: video, model, top_k [{label, score}, ...].

A manifest (`--manifest`, with `--output`) runs on the Ray cluster (pipeline.tracking.inference:
decode in Ray Data tasks, the network in an actor pool, one actor per GPU) and writes one row per
manifest row (of `--split`, else of every split) as Parquet to `--output` (local path or s3:// URI):
video_id, path, label, top_labels, top_scores, views, status and reason for unusable videos. Ends
with one line of JSON: output, videos, ok, unusable, statuses, seconds.
"""

from __future__ import annotations

import argparse
import json
import os

from pipeline.config import parse_job_args


def _predict_video(parser: argparse.ArgumentParser, args: argparse.Namespace, cfg) -> None:
    from pipeline.tracking.runs import client_for
    from pipeline.tracking.serving import predict_videos

    client_for(cfg)  # sets the tracking and registry URIs that models:/ resolves against
    if cfg.storage.endpoint_url:  # the classifier reads S3 with the standard AWS environment
        os.environ["AWS_ENDPOINT_URL_S3"] = cfg.storage.endpoint_url
    if cfg.storage.region:
        os.environ.setdefault("AWS_REGION", cfg.storage.region)
    try:
        row = predict_videos(args.model, [args.video], top_k=args.top_k)[0]
    except Exception as err:  # noqa: BLE001 - one line for the user
        parser.exit(1, f"{parser.prog}: cannot load {args.model}: {type(err).__name__}: "
                       f"{(str(err).splitlines() or [''])[0][:300]}\n")
    if row["error"]:
        parser.exit(1, f"{parser.prog}: {args.video}: {row['error']}\n")
    print(json.dumps({"video": args.video, "model": args.model,
                      "top_k": [{"label": l, "score": s} for l, s in zip(row["labels"], row["scores"])]}))


def _predict_manifest(parser: argparse.ArgumentParser, args: argparse.Namespace, cfg) -> None:
    from pipeline.data.storage import StorageError
    from pipeline.tracking.inference import InferenceError, predict_manifest

    try:
        result = predict_manifest(cfg, args.model, args.manifest, args.output, split=args.split, top_k=args.top_k)
    except (InferenceError, StorageError) as err:
        parser.exit(1, f"{parser.prog}: {err}\n")
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="uniformer predict", description=__doc__.split("\n\n")[0],
        usage="uniformer predict --model URI (VIDEO_URI | --manifest URI --output URI [--split SPLIT]) "
              "[--top-k K] [--config FILE.yaml] [key=value ...]")
    parser.add_argument("--model", required=True, metavar="URI", help="models:/NAME@champion, runs:/... or a folder")
    parser.add_argument("video", nargs="?", metavar="VIDEO_URI", help="local path, file:// or s3:// URI of a video")
    parser.add_argument("--manifest", metavar="URI", help="prepared folder or its manifest.parquet: predict its videos")
    parser.add_argument("--output", metavar="URI", help="where the prediction table goes (.parquet, local or s3://)")
    parser.add_argument("--split", help="only this split of the manifest (default: every row)")
    parser.add_argument("--top-k", type=int, default=5, help="how many labels (default 5)")
    args, cfg = parse_job_args(parser, argv, optional_positional="video")
    if args.top_k < 1:
        parser.exit(2, f"{parser.prog}: --top-k must be at least 1, got {args.top_k}\n")
    if (args.video is None) == (args.manifest is None):
        parser.exit(2, f"{parser.prog}: give one video (VIDEO_URI) or --manifest URI, "
                       f"{'not both' if args.video else 'got neither'}\n")
    if args.manifest is None and (args.output or args.split):
        parser.exit(2, f"{parser.prog}: --output and --split go with --manifest; one video prints its labels\n")
    if args.manifest is not None and not args.output:
        parser.exit(2, f"{parser.prog}: --manifest needs --output URI, where the prediction table is written\n")
    if args.video is not None:
        _predict_video(parser, args, cfg)
    else:
        _predict_manifest(parser, args, cfg)


if __name__ == "__main__":
    main()
