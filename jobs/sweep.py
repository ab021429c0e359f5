"""`uniformer sweep --search KEY=KIND:ARGS ... --trials N`: a Ray Tune search of trainings on Ray Train.

    uniformer sweep --config infra/configs/demo.yaml data.manifest=work/demo/prepared train.run_name=lr-sweep \\
        --search optim.lr_per_32_videos=loguniform:1e-3:1e-2 data.rand_augment=choice:,rand-m7-n4-mstd0.5-inc1 \\
        --trials 8

Each trial is one training as `uniformer train` runs it, with the sampled values set; weak trials are
stopped early by ASHA on the validation metric; in MLflow the sweep is one parent run (named
`train.run_name`) with a child run per trial, and the best completed trial's classifier is
registered as the challenger. The same command again continues a stopped sweep. Ends with one line
of JSON. Kinds: loguniform:LOW:HIGH, uniform:LOW:HIGH, randint:LOW:HIGH, choice:A,B,..., grid:A,B,...
(see pipeline/training/search_space.py).
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from pipeline.config import ConfigError, int_at_least, one_value_per_flag, parse_job_args
from pipeline.training.search_space import KINDS

_SEARCH_TEXT = re.compile(rf"[\w.]+=(?:{'|'.join(KINDS)}):.*", re.DOTALL)  # KEY=KIND:ARGS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="uniformer sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--search", action="append", default=[], metavar="KEY=KIND:ARGS",  # see one_value_per_flag
                        help="searched config keys, e.g. optim.lr_per_32_videos=loguniform:1e-5:1e-3 "
                        "data.rand_augment=choice:,rand-m7-n4-mstd0.5-inc1")
    parser.add_argument("--search-space", metavar="FILE.yaml", help="searched keys from a YAML file (KEY: KIND:ARGS)")
    parser.add_argument("--trials", type=int_at_least(1), default=8,
                        help="the trial budget (default 8; a multiple of the grid's combinations)")
    parser.add_argument("--metric", default="", help="validation metric to compare trials on "
                        "(default train.checkpoint_metric; val_loss is minimised, the others maximised)")
    parser.add_argument("--grace-epochs", type=int_at_least(0), default=0,
                        help="epochs every trial trains before ASHA may stop it (default train.val_every_epochs)")
    parser.add_argument("--reduction-factor", type=int_at_least(2), default=3,
                        help="ASHA keeps the best 1/N of the trials at each rung (default 3)")
    parser.add_argument("--max-concurrent", type=int_at_least(0), default=0,
                        help="trials in flight at once (default: as many as the cluster's GPUs, or CPUs, hold)")
    parser.add_argument("--trial-cpus", type=float, default=0.25,
                        help="CPUs each trial's driver actor reserves besides its workers (default 0.25)")
    parser.add_argument("--register-as", default="", metavar="NAME",
                        help="registered model for the best trial (default tracking.registered_model)")
    parser.add_argument("--seed", type=int, default=0, help="the random search's seed (default 0)")
    argv = one_value_per_flag(list(sys.argv[1:] if argv is None else argv), "--search", _SEARCH_TEXT.fullmatch)
    args, cfg = parse_job_args(parser, argv)
    from pipeline.data.storage import StorageError
    from pipeline.tracking.sweeps import SweepError
    from pipeline.training.search_space import load_search_space, parse_search
    from pipeline.training.sweep import SweepOptions, run_sweep

    try:
        space = (load_search_space(args.search_space, args.search) if args.search_space
                 else parse_search(args.search))
        options = SweepOptions(trials=args.trials, metric=args.metric, grace_epochs=args.grace_epochs,
                               reduction_factor=args.reduction_factor, max_concurrent=args.max_concurrent,
                               trial_cpus=args.trial_cpus, register_as=args.register_as, seed=args.seed)
        summary = run_sweep(cfg, space, options)
    except (ConfigError, StorageError) as err:
        parser.exit(2, f"{parser.prog}: {err}\n")
    except SweepError as err:
        parser.exit(1, f"{parser.prog}: {err}\n")
    print(json.dumps(summary, default=str))
    if summary.get("interrupted"):
        parser.exit(1, f"{parser.prog}: sweep {summary['sweep']!r} stopped with {summary['trials_undecided']} trial(s) "
                    "undecided; run the same command again to continue it\n")


if __name__ == "__main__":
    main()
