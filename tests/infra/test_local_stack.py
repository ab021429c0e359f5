"""infra/local/up.sh and down.sh, the way people use them: the whole stack on free loopback ports,
S3 round trip, MLflow run whose artifact lands in the S3 bucket, Ray's Jobs API behind its token,
Ray's metrics in Prometheus and the dashboard's metrics tab wired to it, then everything stopped. The clients run in a subprocess with the stack's env file, as a user's
shell would (and so this test process keeps no Ray or MLflow state)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
UP, DOWN = ROOT / "infra" / "local" / "up.sh", ROOT / "infra" / "local" / "down.sh"

CLIENT = r"""
import json, os, tempfile
import boto3, mlflow
from ray.job_submission import JobSubmissionClient

out = {}
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
s3.put_object(Bucket="uniformer", Key="probe/hello.txt", Body=b"hello")
out["s3_get"] = s3.get_object(Bucket="uniformer", Key="probe/hello.txt")["Body"].read().decode()

mlflow.set_experiment("local-stack-test")
with mlflow.start_run() as run:
    mlflow.log_param("answer", 42)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "note.txt"), "w") as f:
            f.write("artifact body")
        mlflow.log_artifact(os.path.join(tmp, "note.txt"))
out["param"] = mlflow.get_run(run.info.run_id).data.params["answer"]
out["artifact_uri"] = mlflow.get_run(run.info.run_id).info.artifact_uri
keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow-artifacts").get("Contents", [])]
out["artifact_keys"] = keys
out["artifact_body"] = s3.get_object(Bucket="mlflow-artifacts", Key=keys[0])["Body"].read().decode() if keys else ""
out["run_id"] = run.info.run_id

out["ray_jobs"] = len(JobSubmissionClient(os.environ["RAY_API_SERVER_ADDRESS"]).list_jobs())

# Ray's metrics in Prometheus (scraped every 10 s from the service-discovery file Ray writes), and the
# dashboard's own check that its metrics tab can reach that Prometheus.
import time, urllib.parse, urllib.request
query = urllib.parse.quote('count({__name__=~"ray_.+"})')
deadline, series = time.monotonic() + 120, 0
while time.monotonic() < deadline and not series:
    answer = json.load(urllib.request.urlopen(f"{os.environ['LOCAL_PROMETHEUS_URL']}/api/v1/query?query={query}"))
    series = int(answer["data"]["result"][0]["value"][1]) if answer["data"]["result"] else 0
    if not series:
        time.sleep(2)
out["ray_series"] = series
token = open(os.environ["RAY_AUTH_TOKEN_PATH"]).read().strip()
request = urllib.request.Request(f"{os.environ['RAY_API_SERVER_ADDRESS']}/api/prometheus_health",
                                 headers={"Authorization": f"Bearer {token}"})
out["prometheus_health"] = json.load(urllib.request.urlopen(request, timeout=30))
print(json.dumps(out))
"""



def clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that points clients at some other service."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "AWS_", "MLFLOW_", "LOCAL_")) and k != "PYTEST_CURRENT_TEST"}
    return {**env, "PYTHON": sys.executable, **extra}


def stack_env(stack_dir: Path) -> dict[str, str]:
    """The exports of the env file up.sh writes (what `source work/local-stack/env` gives)."""
    pairs = [line.removeprefix("export ").split("=", 1) for line in (stack_dir / "env").read_text().splitlines()
             if line.startswith("export ")]
    return dict(pairs)


def session_ids(stack_dir: Path) -> dict[str, str]:
    return {f.stem: f.read_text().strip() for f in (stack_dir / "pids").glob("*.sid")}


def live_processes(sid: str) -> list[str]:
    """Live (not zombie) processes of a session, as down.sh finds them."""
    ps = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True, check=True).stdout
    return [f[0] for f in map(str.split, ps.splitlines()) if f[1] == sid and not f[2].startswith("Z")]


def test_busy_port_is_named(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(["bash", str(UP)], capture_output=True, text=True, timeout=60,
                                env=clean_env(LOCAL_STACK_DIR=str(tmp_path), LOCAL_S3_PORT=str(port),
                                              LOCAL_MLFLOW_PORT=str(free_port())))
    assert result.returncode != 0
    assert f"port {port} is busy" in result.stderr and "LOCAL_S3_PORT" in result.stderr


def test_up_use_down(tmp_path):
    stack = tmp_path / "stack"
    env = clean_env(LOCAL_STACK_DIR=str(stack), LOCAL_S3_PORT=str(free_port()), LOCAL_MLFLOW_PORT=str(free_port()),
                    LOCAL_RAY_PORT=str(free_port()), LOCAL_RAY_DASHBOARD_PORT=str(free_port()),
                    LOCAL_RAY_CLIENT_PORT=str(free_port()), LOCAL_PROMETHEUS_PORT=str(free_port()),
                    LOCAL_STACK_STOP_GRACE="3")
    start = time.monotonic()
    up = subprocess.run(["bash", str(UP)], capture_output=True, text=True, timeout=480, env=env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        up_s = time.monotonic() - start
        exports = stack_env(stack)
        for name in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS",
                     "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "LOCAL_PROMETHEUS_URL"):
            assert f"export {name}=" in up.stdout, name  # printed for the user as well
        assert oct((stack / "ray_auth_token").stat().st_mode & 0o777) == "0o600"

        again = subprocess.run(["bash", str(UP)], capture_output=True, text=True, timeout=60, env=env)
        assert again.returncode != 0 and "already running" in again.stderr

        t_client = time.monotonic()
        client = subprocess.run([sys.executable, "-c", CLIENT], capture_output=True, text=True, timeout=300,
                                cwd=tmp_path, env={**clean_env(), **exports})
        assert client.returncode == 0, client.stderr[-3000:]
        client_s = time.monotonic() - t_client
        out = json.loads(client.stdout.strip().splitlines()[-1])
        assert out["s3_get"] == "hello" and out["param"] == "42"
        assert out["artifact_uri"].startswith("mlflow-artifacts:/")  # proxied: clients hold no S3 config
        assert any(k.endswith(f"{out['run_id']}/artifacts/note.txt") for k in out["artifact_keys"])
        assert out["artifact_body"] == "artifact body"
        assert out["ray_jobs"] == 0
        assert out["ray_series"] > 0, "no ray_* metric in Prometheus"
        assert out["prometheus_health"]["result"] is True, out["prometheus_health"]

        # The Jobs API without the token (what a JobSubmissionClient without RAY_AUTH_MODE=token sends).
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{exports['RAY_API_SERVER_ADDRESS']}/api/jobs/", timeout=10)
        assert refused.value.code == 401
    finally:
        sessions = session_ids(stack) if (stack / "pids").exists() else {}
        running = {name: live_processes(sid) for name, sid in sessions.items()}
        t_down = time.monotonic()
        down = subprocess.run(["bash", str(DOWN)], capture_output=True, text=True, timeout=120, env=env)
        down_s = time.monotonic() - t_down
    assert down.returncode == 0, down.stdout + down.stderr
    assert set(running) == {"s3", "mlflow", "ray", "prometheus"} and all(running.values())
    assert {name: live_processes(sid) for name, sid in sessions.items()} == {name: [] for name in sessions}
    for name in ("s3", "mlflow", "ray", "prometheus"):
        assert f"{name}: stopped" in down.stdout
    print(f"up.sh {up_s:.0f} s, clients {client_s:.0f} s, down.sh {down_s:.0f} s; "
          f"whole test {time.monotonic() - start:.0f} s")
