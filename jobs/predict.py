"""`uniformer predict --model URI VIDEO_URI [--top-k K]`: top-k labels of one video, as JSON.

    uniformer predict --model models:/uniformer@champion s3://data/clips/abc.mp4 --top-k 5

Goes through the pyfunc video classifier, exactly as a served model would; the video is a local
path, file:// or s3:// URI. Prints one line of JSON: video, model, top_k [{label, score}, ...].
"""

from __future__ import annotations

import argparse
import json
import os

from pipeline.config import parse_job_args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="uniformer predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, metavar="URI", help="models:/NAME@champion, runs:/... or a folder")
    parser.add_argument("video", metavar="VIDEO_URI", help="local path, file:// or s3:// URI of a video")
    parser.add_argument("--top-k", type=int, default=5, help="how many labels (default 5)")
    args, cfg = parse_job_args(parser, argv)
    if args.top_k < 1:
        parser.exit(2, f"{parser.prog}: --top-k must be at least 1, got {args.top_k}\n")
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


if __name__ == "__main__":
    main()
