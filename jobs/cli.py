"""The `uniformer` console script: `uniformer <job> [args]` runs `jobs.<job>.main(args)`."""

import importlib
import sys

JOBS = ("synth", "prepare", "train", "sweep", "evaluate", "register", "promote", "predict", "export", "demo", "bench",
        "submit")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: uniformer <job> [--config FILE.yaml] [key=value ...]\njobs: {', '.join(JOBS)}")
        raise SystemExit(0 if argv else 2)
    job, rest = argv[0], argv[1:]
    if job not in JOBS:
        raise SystemExit(f"uniformer: unknown job {job!r}; known jobs: {', '.join(JOBS)}")
    importlib.import_module(f"jobs.{job}").main(rest)


if __name__ == "__main__":
    main()
