"""`uniformer promote --name NAME [--confidence 0.95] [--min-delta D] [--dry-run]`: the champion gate.

    uniformer promote --name uniformer --confidence 0.95 --min-delta 0.01

Moves alias `champion` to the `challenger` only when the challenger is better on the videos both
evaluated, on one manifest, split and number of views: a one-sided McNemar exact test on per-video
top-1 correctness with p <= 1 - confidence, and a difference of at least D. Ties never promote. A
missing evaluation of either version is run first (on the challenger's manifest and views). With
no champion the challenger becomes champion. The decision, test, p-value and both figures are
recorded as version tags (nothing is written with --dry-run). Two promotes at once serialise on a
lock and decide again when the aliases moved. Ends with one line of JSON; exit status 1 when refused.
"""

from __future__ import annotations

import argparse
import json

from pipeline.config import parse_job_args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="uniformer promote", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", help="registered model name (default: tracking.registered_model)")
    parser.add_argument("--metric", default="eval_top1", choices=("eval_top1", "eval_top5"),
                        help="per-video correctness the paired test compares (default eval_top1)")
    parser.add_argument("--confidence", type=float, default=0.95,
                        help="promote only when the one-sided p-value is at most 1 - confidence (default 0.95)")
    parser.add_argument("--min-delta", type=float, default=0.0,
                        help="and the challenger is better by at least this much on the paired videos")
    parser.add_argument("--dry-run", action="store_true", help="decide and print, write nothing")
    args, cfg = parse_job_args(parser, argv)
    from pipeline.tracking.registry import RegistryError, promote

    try:
        result = promote(cfg, args.name or cfg.tracking.registered_model, metric=args.metric,
                         confidence=args.confidence, min_delta=args.min_delta, dry_run=args.dry_run)
    except RegistryError as err:
        parser.exit(1, f"{parser.prog}: {err}\n")
    print(json.dumps(result))
    if result["decision"] == "refused":
        raise SystemExit(1)


if __name__ == "__main__":
    main()
