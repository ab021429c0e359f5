"""The MLflow server exactly as infra/k8s/mlflow.yaml starts it (its command, its environment, the
basic-auth config that infra/k8s/secrets.sh writes, the driver string secrets.sh puts in the backend
URI), against a real PostgreSQL and an S3 endpoint: a run logged with the admin's credentials is
read back through MlflowClient, the rows are in PostgreSQL, and /metrics answers Prometheus the way
Prometheus asks in the cluster: through the pod's own IP (here a non-loopback address of this
machine, given to the server as POD_IP like the pod's downward API does), not through 127.0.0.1."""

import os
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, moto_server, wait_for_http
from tests.infra.postgres import postgres_server

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
ADMIN_PASSWORD = "admin-password-for-this-test"

CLIENT = r"""
import json, os, tempfile
from mlflow import MlflowClient

client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
experiment = client.create_experiment("pg-test")
run = client.create_run(experiment)
client.log_param(run.info.run_id, "variant", "uniformer_s")
for step, value in enumerate([0.5, 0.25]):
    client.log_metric(run.info.run_id, "loss", value, step=step)
with tempfile.TemporaryDirectory() as tmp:
    with open(os.path.join(tmp, "note.txt"), "w") as f:
        f.write("artifact body")
    client.log_artifact(run.info.run_id, os.path.join(tmp, "note.txt"))
client.set_terminated(run.info.run_id)
back = client.get_run(run.info.run_id)
history = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
with tempfile.TemporaryDirectory() as tmp:
    body = open(client.download_artifacts(run.info.run_id, "note.txt", tmp)).read()
print(json.dumps({"run_id": run.info.run_id, "param": back.data.params["variant"], "status": back.info.status,
                  "history": history, "artifact": body}))
"""


def server_command() -> str:
    """The container's shell command from mlflow.yaml."""
    docs = {d["kind"]: d for d in yaml.safe_load_all((K8S / "mlflow.yaml").read_text()) if d}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/sh", "-c"]
    return container["args"][0]


def auth_ini(pg_uri: str) -> str:
    """basic_auth.ini as infra/k8s/secrets.sh writes it."""
    text = (K8S / "secrets.sh").read_text()
    body = re.search(r'cat > "\$ini" <<INI\n(.*?)\nINI\n', text, re.S).group(1)
    return body.replace("$PG_URI", pg_uri)


def backend_uri(pg_uri: str) -> str:
    """MLFLOW_BACKEND_STORE_URI as infra/k8s/secrets.sh makes it from PG_URI."""
    template = re.search(r'MLFLOW_BACKEND_STORE_URI="([^"]+)"', (K8S / "secrets.sh").read_text()).group(1)
    return template.replace("$PG_URI", pg_uri)


def non_loopback_ipv4() -> str | None:
    """An IPv4 address of this machine other than 127.x (what a pod IP is to a scraper)."""
    import socket

    import psutil

    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


def test_secrets_script_names_the_psycopg3_driver():
    example = re.search(r"PG_URI='([^']+)'", (K8S / "secrets.sh").read_text()).group(1)
    assert example.startswith("postgresql+psycopg://")


def test_mlflow_server_on_postgresql(tmp_path):
    port = free_port()
    command = server_command()
    pod_ip = non_loopback_ipv4()
    if pod_ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address to scrape /metrics through")
    # One worker instead of the pod's two: each imports all of MLflow, and this machine has 2 cores.
    # The pod's --host 0.0.0.0 stays: the server must answer on the pod's IP.
    command = command.replace("--host 0.0.0.0 --port 5000 --workers 2", f"--host 0.0.0.0 --port {port} --workers 1")
    command = re.sub(r"--artifacts-destination s3://BUCKET/", "--artifacts-destination s3://mlflow-test/", command)
    command = command.replace("--expose-prometheus /tmp/mlflow-metrics",
                              f"--expose-prometheus {shlex.quote(str(tmp_path / 'metrics'))}")
    assert f"--port {port}" in command and "s3://mlflow-test/" in command and str(tmp_path) in command
    start = time.monotonic()
    with postgres_server(databases=("mlflow", "mlflow_auth")) as pg_uri, moto_server() as s3_url:
        import boto3

        boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1").create_bucket(Bucket="mlflow-test")
        ini = tmp_path / "basic_auth.ini"
        ini.write_text(auth_ini(pg_uri))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", MLFLOW_BACKEND_STORE_URI=backend_uri(pg_uri),
                   MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD,
                   MLFLOW_FLASK_SERVER_SECRET_KEY="flask-secret-for-this-test", MLFLOW_S3_ENDPOINT_URL=s3_url,
                   MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", POD_IP=pod_ip)
        log = open(tmp_path / "server.log", "w")
        server = subprocess.Popen(["/bin/sh", "-c", command], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 240
            while True:  # until /health answers, or the server exits (its log says why)
                try:
                    wait_for_http(f"{url}/health", timeout_s=2)
                    break
                except RuntimeError:
                    died = "Child process" in (tmp_path / "server.log").read_text()  # a uvicorn worker failed
                    if server.poll() is not None or died or time.monotonic() > deadline:
                        pytest.fail("MLflow did not start:\n" + (tmp_path / "server.log").read_text()[-4000:])
            up_s = time.monotonic() - start

            with pytest.raises(urllib.error.HTTPError) as refused:  # basic auth is on
                urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
            assert refused.value.code == 401

            client_env = {**env, "MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": "admin",
                          "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD}
            result = subprocess.run([sys.executable, "-c", CLIENT], env=client_env, capture_output=True, text=True,
                                    timeout=180)
            assert result.returncode == 0, result.stderr[-3000:]
            import json

            out = json.loads(result.stdout.strip().splitlines()[-1])
            assert out["param"] == "uniformer_s" and out["status"] == "FINISHED"
            assert out["history"] == [0.5, 0.25] and out["artifact"] == "artifact body"

            import psycopg

            with psycopg.connect(pg_uri.replace("+psycopg", "") + "/mlflow") as conn:
                assert conn.execute("SELECT status FROM runs WHERE run_uuid = %s", (out["run_id"],)).fetchone() \
                    == ("FINISHED",)
            with psycopg.connect(pg_uri.replace("+psycopg", "") + "/mlflow_auth") as conn:
                assert conn.execute("SELECT username FROM users").fetchall() == [("admin",)]
            keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1")
                    .list_objects_v2(Bucket="mlflow-test").get("Contents", [])]
            assert any(k.endswith(f"{out['run_id']}/artifacts/note.txt") for k in keys), keys

            # /metrics sits behind basic auth too (monitoring.yaml gives Prometheus credentials), and
            # Prometheus reaches the pod by its IP: that is the Host header MLflow's host check sees.
            import base64

            basic = {"Authorization": "Basic " + base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()}
            request = urllib.request.Request(f"http://{pod_ip}:{port}/metrics", headers=basic)
            metrics = urllib.request.urlopen(request, timeout=10).read().decode()
            assert "mlflow_http_request_total" in metrics or "http_request" in metrics, metrics[:500]
            # The host check itself stays on: a name the server does not answer to is refused.
            with pytest.raises(urllib.error.HTTPError) as foreign:
                urllib.request.urlopen(urllib.request.Request(
                    f"http://{pod_ip}:{port}/metrics", headers={**basic, "Host": f"attacker.example:{port}"}),
                    timeout=10)
            assert foreign.value.code == 403
        finally:
            os.killpg(server.pid, 15)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
                server.wait(timeout=30)
            log.close()
    print(f"PostgreSQL + MLflow up in {up_s:.0f} s; whole test {time.monotonic() - start:.0f} s")
