"""Submit a job of this project to a Ray cluster through the Jobs API and follow it.

`uniformer submit train --config infra/configs/k400_uniformer_s16x4.yaml ... --address http://HEAD:8265`
runs `python -m jobs.train --config ...` on the cluster with this checkout as the working
directory. The cluster provides the job's MLflow and S3 settings (pod environment, instance role,
the local stack's head). The submitter's own MLflow and AWS variables travel only when asked
(`--forward-env`, or `--env KEY` one by one): a port-forwarded tracking URI (127.0.0.1) or an
expiring session token baked into a multi-day job breaks it. Forwarded values are never printed
(only names); whoever can read the cluster's job list (the dashboard, with its token) can read
them. Paths in the job's arguments resolve on the cluster, inside the uploaded copy of the
checkout: give data and outputs as s3:// URIs (or absolute paths on a one-machine cluster).

The entrypoint (the job's driver) gets `--num-cpus`, `--num-gpus` and `--memory` from Ray's
scheduler; by default it reserves nothing, which suits `train` (its workers reserve their own) but
not an `evaluate` or `predict` that runs the model in the driver.

Token authentication: a head started by `ray start --head` with a token (`RAY_AUTH_MODE=token`,
the local stack does that) refuses clients without one. The submitter needs
RAY_AUTH_MODE=token and the token in RAY_AUTH_TOKEN, in the file RAY_AUTH_TOKEN_PATH, or in
~/.ray/auth_token. `prepare_auth_env` turns token mode on when a token is given explicitly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, MutableMapping

from pipeline import PROJECT_ROOT


# Forwarded from the submitter's environment with --forward-env, those that are set (MLflow server,
# S3 endpoint and keys).
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
)
# Never forwarded: the cluster sets its own address, and its token must not travel in job metadata.
NOT_FORWARDABLE = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")

# Not uploaded with the working directory (Ray also honours .gitignore).
WORKING_DIR_EXCLUDES = [
    ".venv/", "work/", ".git/", "tests/", ".pytest_cache/", "__pycache__/", "*.egg-info/", "build/", "dist/",
    "*.pth", "*.pt", "*.ckpt", "*.mp4", "*.webm", "*.avi", "*.parquet",
]

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(RuntimeError):
    """A submission problem, explained in one line (the CLI prints it and exits 1)."""


@dataclass(frozen=True)
class Submission:
    job: str
    args: tuple[str, ...] = ()
    address: str = ""
    env_names: tuple[str, ...] = ()  # extra names to forward: KEY (from the environment) or KEY=VALUE
    forward_env: bool = False        # forward the FORWARDED_ENV names that are set here
    include_pip: bool = False
    num_cpus: float | None = None    # reserved for the entrypoint (the job's driver)
    num_gpus: float | None = None
    memory_bytes: int | None = None
    working_dir: Path = PROJECT_ROOT
    submission_id: str = ""
    wait: bool = True


NOT_SUBMITTABLE = ("__init__", "cli", "submit")  # the console script's dispatcher, and submitting itself


def known_jobs(working_dir: Path = PROJECT_ROOT) -> tuple[str, ...]:
    """The jobs a cluster can run: the modules in `working_dir/jobs/` (the checkout Ray uploads)."""
    return tuple(sorted(p.stem for p in (working_dir / "jobs").glob("*.py") if p.stem not in NOT_SUBMITTABLE))


def build_entrypoint(job: str, args: tuple[str, ...] | list[str] = (), working_dir: Path = PROJECT_ROOT) -> str:
    """The shell command Ray runs on the head: `python -m jobs.<job> <args>` (quoted)."""
    jobs = known_jobs(working_dir)
    if job not in jobs:
        raise SubmitError(f"unknown job {job!r}; jobs that can be submitted: {', '.join(jobs) or 'none'} "
                          f"(the modules in {working_dir / 'jobs'})")
    return shlex.join(["python", "-m", f"jobs.{job}", *args])


def project_dependencies(root: Path = PROJECT_ROOT) -> list[str]:
    """`[project] dependencies` of pyproject.toml: what `--pip` installs on the cluster."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    with open(root / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def forwarded_env(extra: tuple[str, ...] | list[str] = (), environ: Mapping[str, str] = os.environ, *,
                  forward_all: bool = False) -> dict[str, str]:
    """Env vars for the job: `extra` (KEY or KEY=VALUE), plus with `forward_all` the FORWARDED_ENV
    names that are set."""
    env = {name: environ[name] for name in FORWARDED_ENV if environ.get(name)} if forward_all else {}
    for item in extra:
        name, sep, value = item.partition("=")
        if not name.isidentifier():
            raise SubmitError(f"--env {name!r} is not an environment variable name; use --env KEY or --env KEY=VALUE")
        if name in NOT_FORWARDABLE:
            raise SubmitError(f"--env {name}: Ray's address and token are not forwarded to jobs; "
                              "the cluster sets its own")
        if sep:
            env[name] = value
        elif name in environ:
            env[name] = environ[name]
        else:
            raise SubmitError(f"--env {name}: not set in this environment; export it or use --env {name}=VALUE")
    return env


def build_runtime_env(sub: Submission, environ: Mapping[str, str] = os.environ) -> dict:
    runtime_env: dict = {"working_dir": str(sub.working_dir), "excludes": list(WORKING_DIR_EXCLUDES)}
    env = forwarded_env(sub.env_names, environ, forward_all=sub.forward_env)
    if env:
        runtime_env["env_vars"] = env
    if sub.include_pip:
        runtime_env["pip"] = project_dependencies(sub.working_dir)
    return runtime_env


def describe_runtime_env(runtime_env: dict) -> str:
    """One line for the submitter's output: names only, every value masked."""
    env = runtime_env.get("env_vars", {})
    names = ", ".join(f"{name}=***" for name in sorted(env)) or "none"
    pip = f"{len(runtime_env['pip'])} packages from pyproject.toml" if "pip" in runtime_env else \
        "none (the cluster image provides them; --pip installs pyproject's)"
    return f"working_dir {runtime_env['working_dir']}; pip: {pip}; env: {names}"


def not_forwarded(runtime_env: dict, environ: Mapping[str, str] = os.environ) -> list[str]:
    """FORWARDED_ENV names set here that the job does not get (said once, so nobody wonders)."""
    sent = runtime_env.get("env_vars", {})
    return [name for name in FORWARDED_ENV if environ.get(name) and name not in sent]


_MEMORY_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                 "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_memory(text: str) -> int:
    """'8Gi', '512M', '2G' or plain bytes -> bytes (Kubernetes' units: Gi = 2**30, G = 10**9)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?)?B?\s*", text, re.I)
    if not match or float(match.group(1)) <= 0:
        raise SubmitError(f"--memory {text!r}: give bytes or a size such as 8Gi, 16G, 512Mi")
    return int(float(match.group(1)) * _MEMORY_UNITS[(match.group(2) or "").upper()])


def check_resources(sub: Submission) -> None:
    for flag, value in (("--num-cpus", sub.num_cpus), ("--num-gpus", sub.num_gpus)):
        if value is not None and value < 0:
            raise SubmitError(f"{flag} {value}: must be 0 or more")


def resolve_address(address: str, environ: Mapping[str, str] = os.environ) -> str:
    address = address or environ.get("RAY_API_SERVER_ADDRESS") or environ.get("RAY_ADDRESS") or ""
    if not address:
        raise SubmitError("no Ray head: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS "
                          "(the local stack's env file sets it)")
    return address.rstrip("/")


def prepare_auth_env(environ: MutableMapping[str, str] = os.environ) -> None:
    """Token given but mode unset: turn token mode on for this process (before Ray reads it)."""
    if not environ.get("RAY_AUTH_MODE") and (environ.get("RAY_AUTH_TOKEN") or environ.get("RAY_AUTH_TOKEN_PATH")):
        environ["RAY_AUTH_MODE"] = "token"


def _quiet_ray_client_logs() -> None:
    """Ray's client logs every packaging step at INFO, and warns that .git/.venv are skipped
    (which we want): keep its warnings, drop that noise."""
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)  # the SDK modules set INFO on import
    logging.getLogger("ray._private.runtime_env.working_dir").addFilter(
        lambda record: "is now ignored by default" not in record.getMessage())


def connect(address: str):
    """A JobSubmissionClient for exactly `address`; failures become one-line SubmitErrors."""
    # JobSubmissionClient prefers RAY_API_SERVER_ADDRESS / RAY_ADDRESS over its argument.
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        os.environ.pop(name, None)
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    _quiet_ray_client_logs()

    try:
        return JobSubmissionClient(address)
    except AuthenticationError as err:
        first = str(err).strip().splitlines()[0]
        mode = os.environ.get("RAY_AUTH_MODE", "unset")
        raise SubmitError(f"the Ray head at {address} refused the request ({first}); it has token "
                          f"authentication on: set RAY_AUTH_MODE=token (now {mode}) and the cluster's token in "
                          "RAY_AUTH_TOKEN or the file RAY_AUTH_TOKEN_PATH (local stack: source "
                          "work/local-stack/env)") from None
    except ConnectionError as err:
        raise SubmitError(f"cannot reach the Ray Jobs API at {address} ({err}); is the head running and is "
                          "this its dashboard address (http://HEAD:8265)?") from None
    except Exception as err:  # noqa: BLE001 - Ray raises plain RuntimeErrors, ValueErrors, ...
        raise SubmitError(f"cannot use the Ray head at {address}: {type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from None


def _stream_logs(client, submission_id: str, write: Callable[[str], None], poll_s: float = 1.0) -> None:
    """Follow the job's logs until it ends: websocket tail, falling back to polling. The tail's
    chunks are pieces of the same text that `get_job_logs` returns whole, so counting what the tail
    wrote tells the poll where to go on: nothing is lost or printed twice at the switch."""
    printed = 0

    async def tail() -> None:
        nonlocal printed
        async for chunk in client.tail_job_logs(submission_id):
            write(chunk)
            printed += len(chunk)

    try:
        asyncio.run(tail())
        return
    except Exception as err:  # noqa: BLE001 - a broken websocket must not lose the job's status
        print(f"log tail interrupted ({type(err).__name__}); polling instead", file=sys.stderr)
    while True:
        status = str(client.get_job_status(submission_id))
        logs = client.get_job_logs(submission_id)
        write(logs[printed:])
        printed = max(printed, len(logs))
        if status.split(".")[-1] in TERMINAL:
            return
        time.sleep(poll_s)


def submit(sub: Submission, *, write: Callable[[str], None] = sys.stdout.write,
           info: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> dict:
    """Submit, follow the logs (unless `wait` is false) and return the closing summary."""
    entrypoint = build_entrypoint(sub.job, sub.args, sub.working_dir)
    check_resources(sub)
    runtime_env = build_runtime_env(sub)
    address = resolve_address(sub.address)
    prepare_auth_env()
    client = connect(address)
    submission_id = sub.submission_id or f"uniformer-{sub.job}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    info(f"submitting to {address}: {entrypoint}")
    info(f"runtime env: {describe_runtime_env(runtime_env)}")
    left = not_forwarded(runtime_env)
    if left:
        info(f"not forwarded (the cluster provides its own; --forward-env or --env KEY to send): {', '.join(left)}")
    resources = {"entrypoint_num_cpus": sub.num_cpus, "entrypoint_num_gpus": sub.num_gpus,
                 "entrypoint_memory": sub.memory_bytes}
    resources = {k: v for k, v in resources.items() if v is not None}
    if resources:
        info("entrypoint reserves: " + ", ".join(f"{k.removeprefix('entrypoint_')}={v}" for k, v in resources.items()))
    start = time.monotonic()
    try:
        client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                          metadata={"job": sub.job, "submitted_by": "uniformer submit"}, **resources)
    except Exception as err:  # noqa: BLE001 - the message of Ray's RuntimeError is the useful part
        text = str(err).strip().splitlines()
        raise SubmitError(f"the Ray head at {address} refused the job: {text[0] if text else type(err).__name__}") \
            from None
    info(f"submitted {submission_id}; dashboard: {address}/#/jobs/{submission_id}")
    status = "PENDING"
    if sub.wait:
        try:
            _stream_logs(client, submission_id, write)
        except KeyboardInterrupt:
            info(f"stopped following; the job keeps running (stop it: ray job stop --address {address} "
                 f"{submission_id})")
            return {"job": sub.job, "submission_id": submission_id, "status": "RUNNING",
                    "seconds": round(time.monotonic() - start, 1), "address": address}
        status = str(client.get_job_status(submission_id)).split(".")[-1]
        if status not in TERMINAL:  # the tail can end a moment before the status is final
            deadline = time.monotonic() + 30
            while status not in TERMINAL and time.monotonic() < deadline:
                time.sleep(0.5)
                status = str(client.get_job_status(submission_id)).split(".")[-1]
        if status != "SUCCEEDED":
            message = client.get_job_info(submission_id).message
            if message:
                info(f"job {status}: {message.strip().splitlines()[0]}")
    return {"job": sub.job, "submission_id": submission_id, "status": status,
            "seconds": round(time.monotonic() - start, 1), "address": address}
