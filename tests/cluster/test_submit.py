"""`uniformer submit`: argument handling and the runtime env on their own, then real submissions
to a Ray head of this test's own (infra/local/up.sh with only Ray, free ports, fresh temp dir,
token auth on), stopped after with down.sh."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.submit import split_argv
from pipeline.cluster.submit import (FORWARDED_ENV, Submission, SubmitError, _stream_logs, build_entrypoint, known_jobs,
                                     build_runtime_env, check_resources, describe_runtime_env, forwarded_env,
                                     not_forwarded, parse_memory, project_dependencies, resolve_address)
from tests.conftest import free_port
from tests.infra.test_local_stack import DOWN, UP, clean_env, stack_env

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-value-that-must-never-print"


# --- without Ray ---------------------------------------------------------------------------------

def test_submit_options_anywhere_the_rest_goes_to_the_job():
    args, job_args = split_argv(["train", "--config", "c.yaml", "optim.epochs=3", "--address", "http://h:8265",
                                 "--env", "FOO", "--no-wait", "--num-gpus", "1", "--memory", "8Gi", "--", "--pip"])
    assert (args.job, args.address, args.env, args.no_wait, args.pip) == ("train", "http://h:8265", ["FOO"], True,
                                                                            False)
    assert (args.num_gpus, args.num_cpus, args.memory, args.forward_env) == (1.0, None, "8Gi", False)
    assert job_args == ["--config", "c.yaml", "optim.epochs=3", "--pip"]


def test_memory_sizes():
    assert parse_memory("8Gi") == 8 * 2**30 and parse_memory("16G") == 16 * 10**9
    assert parse_memory("512Mi") == 512 * 2**20 and parse_memory("1000") == 1000
    with pytest.raises(SubmitError, match="--memory 'lots': give bytes or a size such as 8Gi"):
        parse_memory("lots")
    with pytest.raises(SubmitError, match="--num-gpus -1: must be 0 or more"):
        check_resources(Submission(job="evaluate", num_gpus=-1))


class FlakyTailClient:
    """A job client whose websocket tail breaks after two chunks while the job keeps logging."""

    def __init__(self):
        self.lines = [f"line {i}\n" for i in range(6)]
        self.polls = 0

    async def tail_job_logs(self, submission_id):
        yield self.lines[0]
        yield self.lines[1] + self.lines[2][:3]   # a chunk may end mid-line
        raise ConnectionError("websocket closed")

    def get_job_status(self, submission_id):
        self.polls += 1
        return "RUNNING" if self.polls < 2 else "SUCCEEDED"

    def get_job_logs(self, submission_id):
        return "".join(self.lines[: 4 + self.polls])


def test_no_log_line_lost_or_doubled_when_the_tail_breaks(capsys):
    client, written = FlakyTailClient(), []
    _stream_logs(client, "job", written.append, poll_s=0)
    assert "".join(written) == "".join(client.lines)
    assert "log tail interrupted (ConnectionError); polling instead" in capsys.readouterr().err


def test_entrypoint_is_quoted_and_checked():
    assert build_entrypoint("train", ["--config", "a b.yaml", "x.y=1"]) == \
        "python -m jobs.train --config 'a b.yaml' x.y=1"
    with pytest.raises(SubmitError, match="unknown job 'nope'; jobs that can be submitted: .*train"):
        build_entrypoint("nope")
    with pytest.raises(SubmitError, match="unknown job 'submit'"):
        build_entrypoint("submit")


def test_submittable_jobs_are_the_modules_in_jobs(tmp_path):
    from jobs.cli import JOBS

    assert set(known_jobs()) == set(JOBS) - {"submit"}
    (tmp_path / "jobs").mkdir()
    for name in ("__init__", "cli", "submit", "train", "export"):
        (tmp_path / "jobs" / f"{name}.py").write_text("")
    assert known_jobs(tmp_path) == ("export", "train")
    assert build_entrypoint("export", [], working_dir=tmp_path) == "python -m jobs.export"
    with pytest.raises(SubmitError, match="unknown job 'evaluate'"):
        build_entrypoint("evaluate", [], working_dir=tmp_path)


def test_forwarded_env_names_values_and_refusals():
    environ = {"MLFLOW_TRACKING_URI": "http://m:5000", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "",
               "HOME": "/root", "EXTRA": "x"}
    # By default only what is asked for: a local tracking URI or session token must not reach a long job.
    assert forwarded_env(["EXTRA", "OTHER=y"], environ) == {"EXTRA": "x", "OTHER": "y"}
    env = forwarded_env(["EXTRA", "OTHER=y"], environ, forward_all=True)
    assert env == {"MLFLOW_TRACKING_URI": "http://m:5000", "AWS_SECRET_ACCESS_KEY": SECRET, "EXTRA": "x", "OTHER": "y"}
    assert not_forwarded({"env_vars": {"EXTRA": "x"}}, environ) == ["MLFLOW_TRACKING_URI", "AWS_SECRET_ACCESS_KEY"]
    assert set(FORWARDED_ENV) >= {"MLFLOW_TRACKING_URI", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"}
    with pytest.raises(SubmitError, match="--env RAY_AUTH_TOKEN: Ray's address and token are not forwarded"):
        forwarded_env(["RAY_AUTH_TOKEN"], {"RAY_AUTH_TOKEN": "t"})
    with pytest.raises(SubmitError, match="--env MISSING: not set in this environment; export it or use"):
        forwarded_env(["MISSING"], {})
    with pytest.raises(SubmitError, match="'1BAD' is not an environment variable name"):
        forwarded_env(["1BAD=x"], {})


def test_runtime_env_and_its_description(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    assert "env_vars" not in build_runtime_env(Submission(job="train"))
    runtime_env = build_runtime_env(Submission(job="train", forward_env=True))
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
                        "--env", "MY_TOKEN", "--forward-env", "--num-cpus", "0.5", "--memory", "256Mi",
                        "--submission-id", "uniformer-test-ok")
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


def test_local_settings_stay_local_unless_asked(ray_head):
    env = {**clean_env(), **ray_head, "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "AWS_SESSION_TOKEN": SECRET}
    result = run_submit(env, "train", "--no-wait", "--submission-id", "uniformer-test-local", "--", "--help")
    assert result.returncode == 0, result.stderr
    assert "env: none" in result.stderr
    assert "not forwarded (the cluster provides its own; --forward-env or --env KEY to send): " \
           "MLFLOW_TRACKING_URI, AWS_SESSION_TOKEN" in result.stderr
    assert SECRET not in result.stdout + result.stderr


def test_entrypoint_gpus_reach_the_scheduler(ray_head):
    """A driver that asks for a GPU waits for one: on this CPU-only head the job stays pending."""
    env = {**clean_env(), **ray_head}
    result = run_submit(env, "evaluate", "--num-gpus", "1", "--no-wait", "--submission-id", "uniformer-test-gpu",
                        "--", "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "entrypoint reserves: num_gpus=1.0" in result.stderr
    check = ("import os, time; from ray.job_submission import JobSubmissionClient as C; "
             "c = C(os.environ['RAY_API_SERVER_ADDRESS']); time.sleep(8); "
             "print(str(c.get_job_status('uniformer-test-gpu')).split('.')[-1]); c.stop_job('uniformer-test-gpu')")
    got = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120)
    assert got.stdout.strip() == "PENDING", got.stdout + got.stderr[-2000:]


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
