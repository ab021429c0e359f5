"""`uniformer synth`: write a labelled synthetic motion dataset (H.264 mp4 + lists + labels.json).

    uniformer synth --output work/synth --classes 6 --videos-per-class 40 --seed 0

Classes differ only in motion (right, left, down, up, grow, shrink, rotate_cw, rotate_ccw, then
diagonals and combinations); see `pipeline.data.synth`. Writes `<output>/videos/...`, `train.txt`
and `val.txt` (`relative/path label_name` lines, what `uniformer prepare --annotations` reads)
and `labels.json`, to a local folder or s3://. Ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.config import int_at_least, parse_job_args
from pipeline.data.storage import StorageError
from pipeline.data.synth import MOTIONS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uniformer synth", description="Write a synthetic motion video dataset.")
    p.add_argument("--output", required=True, metavar="URI", help="local folder or s3://bucket/prefix")
    p.add_argument("--classes", type=int_at_least(2), default=6, help=f"2 to {len(MOTIONS)} (default 6)")
    p.add_argument("--videos-per-class", type=int_at_least(1), default=40, help="default 40")
    p.add_argument("--seed", type=int, default=0, help="the same seed writes the same files (default 0)")
    p.add_argument("--frames", type=int_at_least(2), default=32, help="frames per video (default 32)")
    p.add_argument("--size", type=int_at_least(16), default=96, help="width = height, even (default 96)")
    p.add_argument("--val-fraction", type=float, default=0.25, help="share of each class in val (default 0.25)")
    p.add_argument("--fps", type=float, default=30.0, help="frame rate (default 30)")
    return p


def main(argv: list[str] | None = None) -> dict:
    from pipeline.data.synth import synth_dataset

    parser = build_parser()
    args, cfg = parse_job_args(parser, argv)
    start = time.perf_counter()
    try:
        with Progress(TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("videos", total=args.classes * args.videos_per_class)
            summary = synth_dataset(args.output, num_classes=args.classes, videos_per_class=args.videos_per_class,
                                    seed=args.seed, num_frames=args.frames, size=args.size,
                                    val_fraction=args.val_fraction, fps=args.fps, storage=cfg.storage,
                                    progress=lambda done, total: bar.update(task, completed=done))
    except ValueError as err:
        parser.error(str(err))
    except StorageError as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    summary["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
