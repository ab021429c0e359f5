"""`uniformer promote --name NAME [--metric val_top1] [--min-delta D] [--dry-run]`: the champion gate.

    uniformer promote --name uniformer --metric val_top1 --min-delta 0.005

Moves alias `champion` to the `challenger` only when challenger >= champion + D on the same
evaluation manifest (the champion is evaluated on the challenger's manifest when it has no such
metric; the promotion is refused when the manifests cannot be reconciled). With no champion the
challenger becomes champion. The decision, both metrics and the previous champion are recorded as
version tags (not with --dry-run). Ends with one line of JSON; exit status 1 when refused.
"""

from __future__ import annotations

import argparse
import json

from pipeline.config import parse_job_args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="uniformer promote", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", help="registered model name (default: tracking.registered_model)")
    parser.add_argument("--metric", default="val_top1",
                        help="val_top1 | val_top5 | val_mean_class (training validation, 1 view) or "
                        "eval_top1 | eval_top5 | eval_mean_class (multi-view); default val_top1")
    parser.add_argument("--min-delta", type=float, default=0.0, help="how much better the challenger must be")
    parser.add_argument("--dry-run", action="store_true", help="decide and print, change nothing")
    args, cfg = parse_job_args(parser, argv)
    from pipeline.registry import RegistryError, promote

    try:
        result = promote(cfg, args.name or cfg.tracking.registered_model, metric=args.metric,
                         min_delta=args.min_delta, dry_run=args.dry_run)
    except RegistryError as err:
        parser.exit(1, f"{parser.prog}: {err}\n")
    print(json.dumps(result))
    if result["decision"] == "refused":
        raise SystemExit(1)


if __name__ == "__main__":
    main()
