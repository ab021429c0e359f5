"""`uniformer export --model URI --format onnx`: the network as ONNX, checked against PyTorch, logged.

    uniformer export --model models:/uniformer@champion --format onnx
    uniformer export --model runs:/RUN_ID/video_classifier --format onnx --videos clip.mp4 --output work/onnx

BatchNorms folded, batch axis dynamic, clip shape fixed (the training's frames and crop). ONNX Runtime
is checked against the PyTorch model on random clips and on the test views of real videos (--videos,
else --manifest, else the manifest the model is judged on): largest logit difference and top-1
agreement, printed and kept in parity.json. The graph, the preprocessing a server needs
(preprocess.json), the labels and the check go to `onnx/` in the MLflow run of the registered version
(or run) the model came from; the version is tagged with the result. Ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.config import int_at_least, is_override, one_value_per_flag, parse_job_args

FORMATS = ("onnx",)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="uniformer export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, metavar="URI",
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/video_classifier or a checkpoint")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to export to (onnx)")
    parser.add_argument("--videos", action="append", default=[], metavar="FILE",
                        help="videos to check the export on (--videos a.mp4 b.mp4)")
    parser.add_argument("--manifest", default="", metavar="URI",
                        help="check on this manifest's usable --split videos (default: the model's own manifest)")
    parser.add_argument("--split", default="val", help="manifest split to check on (default val)")
    parser.add_argument("--max-videos", type=int_at_least(1), default=4, help="videos to check on (default 4)")
    parser.add_argument("--random-clips", type=int_at_least(1), default=4, help="random clips to check on (default 4)")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest logit difference allowed, times max(1, largest |logit|) (default 1e-4)")
    parser.add_argument("--opset", type=int_at_least(18), default=18,
                        help="ONNX opset (default 18, which TensorRT and older runtimes read; 23 exports attention "
                        "as one Attention op, about 10%% faster in ONNX Runtime 1.32 on CPU for UniFormer-S)")
    parser.add_argument("--output", default="", metavar="DIR", help="also keep the files in this folder")
    parser.add_argument("--no-log", action="store_true", help="log nothing to MLflow (needs --output)")
    # `--videos a.mp4 b.mp4 tracking.tracking_uri=...`: the override ends the list of videos.
    argv = one_value_per_flag(list(sys.argv[1:] if argv is None else argv), "--videos",
                              lambda arg: not arg.startswith("-") and not is_override(arg))
    args, cfg = parse_job_args(parser, argv)
    from pipeline.data.storage import StorageError
    from pipeline.tracking.inference import InferenceError
    from pipeline.tracking.onnx_export import ExportError, export_onnx

    def progress(message: str) -> None:
        print(f"[export] {message}", file=sys.stderr, flush=True)

    try:
        summary = export_onnx(cfg, args.model, videos=args.videos, manifest_uri=args.manifest, split=args.split,
                              max_videos=args.max_videos, random=args.random_clips, atol=args.atol,
                              opset=args.opset, output=args.output, log=not args.no_log, progress=progress)
    except (ExportError, InferenceError, StorageError) as err:
        parser.exit(1, f"{parser.prog}: {err}\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
