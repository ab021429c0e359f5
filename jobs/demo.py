"""`uniformer demo [--config FILE] [key=value ...]`: the whole mission on this machine, embedded defaults.

Synthetic motion videos -> prepare (Ray Data) -> train (Ray Train, 2 CPU workers) -> evaluate ->
register -> promote -> predict through models:/NAME@champion. Ends with one JSON line.
"""

import argparse
import json
from pathlib import Path

from pipeline.config import parse_job_args

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "infra" / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="uniformer demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=6, help="motion classes (default 6)")
    parser.add_argument("--videos-per-class", type=int, default=100, help="default 100")
    args, cfg = parse_job_args(parser, argv, default_config=DEMO_CONFIG)
    from pipeline.demo import run_demo

    print(json.dumps(run_demo(cfg, classes=args.classes, videos_per_class=args.videos_per_class)))


if __name__ == "__main__":
    main()
