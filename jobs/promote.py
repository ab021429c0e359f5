"""`uniformer promote --name NAME [--confidence 0.95] [--min-delta D] [--eval-split NAME] [--dry-run]`: the champion gate.

    uniformer promote --name uniformer --confidence 0.95 --min-delta 0.01 --eval-split test

Moves alias `champion` to the `challenger` only when the challenger is better on the videos both
evaluated, on one manifest, split and number of views: a one-sided McNemar exact test on per-video
top-1 correctness with p <= 1 - confidence, and a difference of at least D. Ties never promote. A
missing evaluation of either version is run first (on the challenger's manifest and views, and its
validation split unless --eval-split names a held-out split of that manifest). With no champion the
challenger becomes champion. Each decision is kept as `promotion/decision-<n>.json` in the
challenger's run and summarised as version tags (nothing is written with --dry-run). Promoters
serialise on a lock on the tracking server, decide again when the aliases moved, and move nothing
when they stalled past the lock's ttl and lost it. Ends with one line of JSON; exit status 1 when
refused or the lock was lost.
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
    parser.add_argument("--eval-split", metavar="NAME",
                        help="judge both versions on this split of the challenger's manifest (default: its "
                             "validation split)")
    parser.add_argument("--lock-ttl", type=float, metavar="SECONDS",
                        help="others may break this promoter's lock once it is this old by the tracking server's "
                             "clock (default 120: a promoter holds it for a few writes)")
    parser.add_argument("--dry-run", action="store_true", help="decide and print, write nothing")
    args, cfg = parse_job_args(parser, argv)
    from pipeline.tracking.registry import RegistryError, promote

    lock_ttl = {} if args.lock_ttl is None else {"lock_ttl_s": args.lock_ttl}
    try:
        result = promote(cfg, args.name or cfg.tracking.registered_model, metric=args.metric,
                         confidence=args.confidence, min_delta=args.min_delta, eval_split=args.eval_split,
                         dry_run=args.dry_run, **lock_ttl)
    except RegistryError as err:
        parser.exit(1, f"{parser.prog}: {err}\n")
    print(json.dumps(result), flush=True)
    if result["decision"] in ("refused", "lost_lock"):
        parser.exit(1, f"{parser.prog}: {result['decision']}: {result['reason']}\n")


if __name__ == "__main__":
    main()
