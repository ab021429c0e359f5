"""`uniformer train --config FILE [key=value ...]`: DDP training on Ray Train, tracked in MLflow."""

import argparse
import json

from pipeline.config import ConfigError, parse_job_args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="uniformer train", description=__doc__)
    parser.add_argument("--init-from", help="official or own checkpoint to start from (sets model.init_from)")
    _, cfg = parse_job_args(parser, argv, flag_keys={"init_from": "model.init_from"})
    from pipeline.storage import StorageError
    from pipeline.train import run_training

    try:
        summary = run_training(cfg)
    except (ConfigError, StorageError) as err:
        parser.exit(2, f"{parser.prog}: {err}\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
