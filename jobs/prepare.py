"""`uniformer prepare`: raw videos + annotations -> validated (and transcoded) videos + manifest.

    uniformer prepare --annotations s3://data/k400/train.csv --annotations s3://data/k400/validate.csv \\
        --videos s3://data/k400/videos --output s3://data/k400-prepared --frame-stride 4 \\
        storage.endpoint_url=http://minio:9000
    uniformer prepare --videos s3://data/my-videos --output s3://data/my-prepared   # DIR/<class>/<video>

Without --annotations the videos are one folder per class (DIR/<class>/<video>, or DIR/train/<class>/...
and DIR/val/<class>/...), split as the folders say or drawn per class with --val-fraction. Frame folders
(<id>/00001.jpg ..., Something-Something V1) and tar shards of them are prepared as videos at --frames-fps.

Runs on the Ray cluster at $RAY_ADDRESS (else a local one); prints Ray Data's progress and ends
with one line of JSON: rows, counts per status and split, output, seconds.
"""

from __future__ import annotations

import argparse
import json

from pipeline.config import int_at_least, parse_job_args
from pipeline.data.annotations import FORMATS, LAYOUTS, AnnotationError
from pipeline.data.folders import NoVideosError
from pipeline.data.prepare import PrepareOptions, prepare
from pipeline.data.storage import StorageError

_D = PrepareOptions()


class _DefaultsFormatter(argparse.HelpFormatter):
    """Shows `(default: x)` for options that have a default other than None/False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uniformer prepare", description="Raw videos + annotations -> validated "
                                "(and transcoded) videos + manifest.parquet, on Ray Data.",
                                formatter_class=_DefaultsFormatter)
    p.add_argument("--annotations", action="append", metavar="URI",
                   help="annotation file; repeat for several (e.g. train and val): labels are shared. Without it, "
                   "--videos holds one folder per class")
    p.add_argument("--videos", required=True, metavar="URI", help="folder the annotation paths are relative to "
                   "(or of the class folders)")
    p.add_argument("--val-fraction", type=float, metavar="F",
                   help="class folders without train/ and val/: the share of each class drawn for val "
                   "(deterministic; default 0.2)")
    p.add_argument("--output", required=True, metavar="URI", help="folder for manifest.parquet, labels.json, "
                   "summary.json and videos/")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="annotation format; auto: .csv kinetics (ssv1 for 'id;label' lines), .json ssv2, else a "
                   "'path label [split]' list")
    p.add_argument("--labels", metavar="URI", help="labels file fixing the class indices (JSON list, "
                   "JSON name->index, or one name per line), or k400, k600, ssv1, ssv2 for the official "
                   "checkpoints' lists; default: sorted label names")
    p.add_argument("--split", help="split of rows that name none (default: from the file name, else train)")
    p.add_argument("--kinetics-layout", choices=LAYOUTS, default="flat",
                   help="where a Kinetics clip lies under --videos: flat <clip>.mp4, split/<clip>.mp4 "
                   "or label/<clip>.mp4")
    p.add_argument("--short-side", type=int_at_least(0), default=_D.short_side,
                   help="scale prepared copies down to this short side (0 keeps the size; never upscales)")
    p.add_argument("--frame-stride", type=int_at_least(1), default=_D.frame_stride,
                   help="keep every n-th frame (4 for a 16x4 recipe: a clip decodes 1.64x faster in "
                   "`uniformer bench data --videos 8 --workers 2 --frames 16 --rate 4 --clips 128`)")
    p.add_argument("--keyframe-interval", type=int_at_least(1), default=_D.keyframe_interval,
                   help="keyframe every n frames of the prepared copy")
    p.add_argument("--crf", type=int_at_least(0), default=_D.crf, help="H.264 quality (lower is better)")
    p.add_argument("--frames-fps", type=float, default=_D.frames_fps,
                   help="frame rate of frame folders (Something-Something V1: 12)")
    p.add_argument("--min-frames", type=int_at_least(1), default=_D.min_frames,
                   help="fewer frames in the original -> too_short")
    p.add_argument("--min-side", type=int_at_least(1), default=_D.min_side,
                   help="a smaller width or height -> too_small")
    p.add_argument("--no-transcode", action="store_true",
                   help="probe only; the manifest points at the original videos")
    p.add_argument("--probe-decode", choices=("ends", "all"), default=_D.probe_decode,
                   help="decode the first frame and last GOP, or every frame, when probing")
    p.add_argument("--batch-size", type=int_at_least(1), default=8,
                   help="videos per Ray task (and per restart checkpoint)")
    p.add_argument("--concurrency", type=int_at_least(0), default=0, help="Ray tasks at most (0: as many as fit)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs each Ray task reserves")
    p.add_argument("--executor", choices=("ray", "inline"), default="ray",
                   help="inline runs in this process without Ray (debugging)")
    return p


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args, cfg = parse_job_args(parser, argv)
    try:
        options = PrepareOptions(transcode=not args.no_transcode, short_side=args.short_side,
                                 frame_stride=args.frame_stride, keyframe_interval=args.keyframe_interval,
                                 crf=args.crf, min_frames=args.min_frames, min_side=args.min_side,
                                 probe_decode=args.probe_decode, limits=cfg.data.limits, frames_fps=args.frames_fps)
    except ValueError as err:
        parser.error(str(err))
    if args.val_fraction is not None and args.annotations:
        parser.error("--val-fraction splits class folders; annotation files name their own splits")
    if args.val_fraction is not None and not 0 <= args.val_fraction < 1:
        parser.error(f"--val-fraction {args.val_fraction} must be in [0, 1)")
    if args.num_cpus <= 0:
        parser.error(f"--num-cpus {args.num_cpus} must be > 0")
    try:
        summary = prepare(args.annotations, args.videos, args.output, format=args.format, labels_uri=args.labels,
                          split=args.split, layout=args.kinetics_layout, options=options, storage=cfg.storage,
                          batch_size=args.batch_size, concurrency=args.concurrency, num_cpus=args.num_cpus,
                          executor=args.executor, val_fraction=args.val_fraction)
    except (StorageError, AnnotationError, NoVideosError) as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
