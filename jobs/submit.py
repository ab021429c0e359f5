"""`uniformer submit JOB [job args ...] --address http://HEAD:8265 [--num-cpus N] [--num-gpus N]
[--memory SIZE] [--forward-env] [--env KEY ...] [--pip] [--no-wait]`

Runs `python -m jobs.JOB [job args ...]` on a Ray cluster through its Jobs API, with this checkout
as the working directory, streams the job's logs and exits with its status (0 SUCCEEDED, 1
otherwise). Ends with one JSON line. The cluster provides MLflow and S3 settings; this shell's are
sent only with --forward-env or --env KEY (names printed, values never).

  uniformer submit train --config infra/configs/k400_uniformer_s16x4.yaml \\
      data.manifest=s3://bucket/k400/prepared model.init_from=s3://bucket/checkpoints/uniformer_small_in1k.pth \\
      --address http://head:8265
  uniformer submit predict --num-gpus 1 --model models:/uniformer@champion s3://bucket/clip.mp4 \
      --address http://head:8265

evaluate and predict --manifest need no --num-gpus: the network runs in an actor pool sized to the
cluster's GPUs, and a GPU held by the driver would leave one actor that cannot be placed.

Options of submit may stand anywhere; everything else (and everything after `--`) goes to the job.
The head's token: RAY_AUTH_MODE=token plus RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.cluster.submit import FORWARDED_ENV, Submission, SubmitError, known_jobs, parse_memory, submit


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uniformer submit", description=__doc__.split("\n\n")[0],
                                epilog=f"--forward-env sends those of these that are set: {', '.join(FORWARDED_ENV)}",
                                allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", choices=known_jobs(), metavar="JOB", help=f"one of {', '.join(known_jobs())}")
    p.add_argument("--address", default="", help="the head's Jobs API, http://HEAD:8265 "
                   "(default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS)")
    p.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                   help="forward one variable (repeatable); its value is never printed")
    p.add_argument("--forward-env", action="store_true",
                   help="forward this shell's MLflow and AWS variables (off by default: a local port-forward "
                   "URI or an expiring session token would break a long job)")
    p.add_argument("--num-cpus", type=float, default=None, metavar="N",
                   help="CPUs reserved for the entrypoint (the job's driver; default 0)")
    p.add_argument("--num-gpus", type=float, default=None, metavar="N",
                   help="GPUs reserved for the entrypoint, e.g. 1 for predict of one video on a GPU (not for "
                   "evaluate or predict --manifest, whose actors take every GPU of the cluster)")
    p.add_argument("--memory", default=None, metavar="SIZE", help="memory reserved for the entrypoint: 8Gi, 16G, bytes")
    p.add_argument("--pip", action="store_true",
                   help="install pyproject.toml's dependencies in the job's runtime env (default: the "
                   "cluster image has them)")
    p.add_argument("--no-wait", action="store_true", help="return after submitting; do not follow the logs")
    p.add_argument("--submission-id", default="", help="job id (default: uniformer-JOB-<time>-<random>)")
    return p


def split_argv(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Submit's own options (anywhere) and the job's arguments (the rest, in order)."""
    parser = build_parser()
    head, tail = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args, job_args = parser.parse_known_args(head)
    return args, [*job_args, *tail]


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args, job_args = split_argv(argv)
    try:
        sub = Submission(job=args.job, args=tuple(job_args), address=args.address, env_names=tuple(args.env),
                         forward_env=args.forward_env, include_pip=args.pip, submission_id=args.submission_id,
                         wait=not args.no_wait, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                         memory_bytes=parse_memory(args.memory) if args.memory is not None else None)
        summary = submit(sub)
    except SubmitError as err:
        print(f"uniformer submit: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(summary), flush=True)
    if summary["status"] == "RUNNING":  # Ctrl-C while following: the job goes on
        raise SystemExit(130)
    if summary["status"] != ("PENDING" if args.no_wait else "SUCCEEDED"):
        raise SystemExit(1)
    return summary


if __name__ == "__main__":
    main()
