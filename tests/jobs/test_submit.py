"""`uniformer submit`: argument handling and the runtime env on their own, then real submissions
to a Ray head of this test's own (infra/local/up.sh with only Ray, free ports, fresh temp dir,
token auth on), stopped after with down.sh."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.submit import split_argv
from pipeline.submit import (FORWARDED_ENV, Submission, SubmitError, build_entrypoint, build_runtime_env,
                             describe_runtime_env, forwarded_env, project_dependencies, resolve_address)
from tests.conftest import free_port
from tests.infra.test_local_stack import DOWN, UP, clean_env, stack_env

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-value-that-must-never-print"


# --- without Ray ---------------------------------------------------------------------------------

def test_submit_options_anywhere_the_rest_goes_to_the_job():
    args, job_args = split_argv(["train", "--config", "c.yaml", "optim.epochs=3", "--address", "http://h:8265",
                                 "--env", "FOO", "--no-wait", "--", "--pip"])
    assert (args.job, args.address, args.env, args.no_wait, args.pip) == ("train", "http://h:8265", ["FOO"], True,
                                                                            False)
    assert job_args == ["--config", "c.yaml", "optim.epochs=3", "--pip"]


def test_entrypoint_is_quoted_and_checked():
    assert build_entrypoint("train", ["--config", "a b.yaml", "x.y=1"]) == \
        "python -m jobs.train --config 'a b.yaml' x.y=1"
    with pytest.raises(SubmitError, match="unknown job 'nope'; jobs that can be submitted: .*train"):
        build_entrypoint("nope")
    with pytest.raises(SubmitError, match="unknown job 'submit'"):
        build_entrypoint("submit")


def test_forwarded_env_names_values_and_refusals():
    environ = {"MLFLOW_TRACKING_URI": "http://m:5000", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "",
               "HOME": "/root", "EXTRA": "x"}
    env = forwarded_env(["EXTRA", "OTHER=y"], environ)
    assert env == {"MLFLOW_TRACKING_URI": "http://m:5000", "AWS_SECRET_ACCESS_KEY": SECRET, "EXTRA": "x", "OTHER": "y"}
    assert set(FORWARDED_ENV) >= {"MLFLOW_TRACKING_URI", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"}
    with pytest.raises(SubmitError, match="--env RAY_AUTH_TOKEN: Ray's address and token are not forwarded"):
        forwarded_env(["RAY_AUTH_TOKEN"], {"RAY_AUTH_TOKEN": "t"})
    with pytest.raises(SubmitError, match="--env MISSING: not set in this environment; export it or use"):
        forwarded_env(["MISSING"], {})
    with pytest.raises(SubmitError, match="'1BAD' is not an environment variable name"):
        forwarded_env(["1BAD=x"], {})


def test_runtime_env_and_its_description(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    runtime_env = build_runtime_env(Submission(job="train"))
    assert runtime_env["working_dir"] == str(ROOT) and "pip" not in runtime_env
    assert {".venv/", "work/", ".git/", "tests/"} <= set(runtime_env["excludes"])
    line = describe_runtime_env(runtime_env)
    assert "AWS_SECRET_ACCESS_KEY=***" in line and SECRET not in line
    with_pip = build_runtime_env(Submission(job="train", include_pip=True))
    assert with_pip["pip"] == project_dependencies() and any(d.startswith("mlflow") for d in with_pip["pip"])


def test_address_comes_from_the_flag_then_the_environment():
    assert resolve_address("http://a:8265/", {"RAY_API_SERVER_ADDRESS": "http://b:8265"}) == "http://a:8265"
    assert resolve_address("", {"RAY_API_SERVER_ADDRESS": "http://b:8265", "RAY_ADDRESS": "c:6379"}) == "http://b:8265"
    with pytest.raises(SubmitError, match="no Ray head: pass --address http://HEAD:8265"):
        resolve_address("", {})


# --- against a real Ray head ---------------------------------------------------------------------

def run_submit(env: dict, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", "submit", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def closing_json(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_unreachable_head_is_one_line():
    result = run_submit(clean_env(), "train", "--address", f"http://127.0.0.1:{free_port()}", "--", "--help",
                        timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "cannot reach the Ray Jobs API at http://127.0.0.1:" in result.stderr


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A token-protected Ray head of this module's own; yields its client exports."""
    stack = tmp_path_factory.mktemp("ray-head")
    env = clean_env(LOCAL_STACK_DIR=str(stack), LOCAL_STACK_SERVICES="ray", LOCAL_RAY_PORT=str(free_port()),
                    LOCAL_RAY_DASHBOARD_PORT=str(free_port()), LOCAL_RAY_CLIENT_PORT=str(free_port()),
                    LOCAL_STACK_STOP_GRACE="3")
    up = subprocess.run(["bash", str(UP)], capture_output=True, text=True, timeout=480, env=env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield stack_env(stack)
    finally:
        down = subprocess.run(["bash", str(DOWN)], capture_output=True, text=True, timeout=120, env=env)
        assert down.returncode == 0, down.stdout + down.stderr


def test_job_succeeds_streams_logs_and_never_prints_secrets(ray_head, tmp_path):
    env = {**clean_env(), **ray_head, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": "key-id",
           "MLFLOW_TRACKING_URI": "http://mlflow.invalid:5000", "MY_TOKEN": SECRET + "-2"}
    # A real job, small: two synthetic videos. The output path is absolute: relative paths would
    # resolve inside the job's uploaded copy of the checkout.
    out = tmp_path / "synth"
    result = run_submit(env, "synth", "--output", str(out), "--classes", "2", "--videos-per-class", "1",
                        "--env", "MY_TOKEN", "--submission-id", "uniformer-test-ok")
    assert result.returncode == 0, result.stdout + result.stderr
    job_summary = json.loads(result.stdout.strip().splitlines()[-2])  # the job's own closing line, streamed
    assert job_summary["videos"] == 2 and (out / "labels.json").is_file()
    summary = closing_json(result)
    assert summary["status"] == "SUCCEEDED" and summary["submission_id"] == "uniformer-test-ok"
    assert summary["seconds"] > 0
    assert SECRET not in result.stdout + result.stderr
    assert "AWS_SECRET_ACCESS_KEY=***" in result.stderr and "MY_TOKEN=***" in result.stderr

    # The values did reach the job (checked in a client process that prints only the verdict).
    check = ("import os, sys; from ray.job_submission import JobSubmissionClient as C; "
             "e = C(os.environ['RAY_API_SERVER_ADDRESS']).get_job_info('uniformer-test-ok').runtime_env['env_vars']; "
             f"print(e['AWS_SECRET_ACCESS_KEY'] == {SECRET!r} and e['MY_TOKEN'] == {SECRET + '-2'!r})")
    got = subprocess.run([sys.executable, "-c", check], env={**clean_env(), **ray_head}, capture_output=True,
                         text=True, timeout=120)
    assert got.stdout.strip() == "True", got.stderr[-2000:]


def test_failing_job_exits_1(ray_head):
    result = run_submit({**clean_env(), **ray_head}, "train", "--config", "/nonexistent/recipe.yaml")
    assert result.returncode == 1
    assert "config file /nonexistent/recipe.yaml does not exist" in result.stdout
    assert closing_json(result)["status"] == "FAILED"


def test_no_wait_returns_after_submitting(ray_head):
    result = run_submit({**clean_env(), **ray_head}, "train", "--no-wait", "--", "--help")
    assert result.returncode == 0, result.stderr
    assert closing_json(result)["status"] == "PENDING"


def test_missing_token_is_one_clear_line(ray_head):
    env = {**clean_env(), **{k: v for k, v in ray_head.items() if not k.startswith("RAY_AUTH")}}
    result = run_submit(env, "train", "--", "--help", timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "Missing authentication token" in result.stderr and "set RAY_AUTH_MODE=token" in result.stderr


def test_token_without_mode_is_enough(ray_head):
    token = Path(ray_head["RAY_AUTH_TOKEN_PATH"]).read_text()
    env = {**clean_env(), **{k: v for k, v in ray_head.items() if not k.startswith("RAY_AUTH")},
           "RAY_AUTH_TOKEN": token}
    result = run_submit(env, "train", "--no-wait", "--", "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    assert token not in result.stdout + result.stderr
