"""`uniformer register --run RUN_ID --name NAME`: a new model version with alias `challenger`.

    uniformer register --run 0123abcd... --name uniformer tracking.tracking_uri=http://mlflow:5000

The version is the run's video classifier (pyfunc), tagged with the run id, the code version, the
variant and where it is to be judged (its training's manifest hash and URI, and validation split); no
metric tags: the version shows its training's validation metrics as MLflow model metrics. Ends with
one line of JSON.
"""

from __future__ import annotations

import argparse
import json

from pipeline.config import parse_job_args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="uniformer register", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, metavar="RUN_ID", help="the training run (printed by `uniformer train`)")
    parser.add_argument("--name", help="registered model name (default: tracking.registered_model)")
    args, cfg = parse_job_args(parser, argv)
    from pipeline.tracking.registry import RegistryError, register

    try:
        result = register(cfg, args.run, args.name or cfg.tracking.registered_model)
    except RegistryError as err:
        parser.exit(1, f"{parser.prog}: {err}\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
