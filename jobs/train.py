"""`uniformer train --config FILE [key=value ...]`: DDP training on Ray Train, tracked in MLflow."""

import argparse
import json

from pipeline.config import ConfigError, parse_job_args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="uniformer train", description=__doc__)
    parser.add_argument("--init-from", help="official or own checkpoint to start from (sets model.init_from)")
    parser.add_argument("--new-run", action="store_true",
                        help="start a fresh training under train.run_name instead of resuming the one of that name")
    args, cfg = parse_job_args(parser, argv, flag_keys={"init_from": "model.init_from"})
    from pipeline.data.storage import StorageError
    from pipeline.training.driver import run_training

    try:
        summary = run_training(cfg, new_run=args.new_run)
    except (ConfigError, StorageError) as err:
        parser.exit(2, f"{parser.prog}: {err}\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
