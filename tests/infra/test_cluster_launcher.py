"""The Ray cluster launcher path (infra/cluster/): resolve-amis.sh run against a fake `aws` on PATH
(the AMI ids come from AWS's public SSM parameters, the copy passes Ray's schema), the head's MLflow
server and the tracking URI every node's Ray starts with, ECR logins and the roles that allow them,
and the example `uniformer submit` in aws.yaml's header parsed by the real CLI."""

import json
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "infra" / "cluster"
AWS_YAML = CLUSTER / "aws.yaml"
RESOLVE = CLUSTER / "resolve-amis.sh"
FAKE_AMI = "ami-0123456789abcdef0"
# AWS's public SSM parameter of the current "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04)"
# (the DLAMI guide's /aws/service/deeplearning/ami/$architecture/$ami_type/latest/ami-id scheme).
DLAMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"

FAKE_AWS = r"""#!/usr/bin/env python3
# A stand-in for the AWS CLI: answers `aws ssm get-parameter` for one public parameter, logs every call.
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_AWS_LOG"], "a") as log:
    log.write(json.dumps(args) + "\n")
if args[:2] == ["ssm", "get-parameter"] and args[args.index("--name") + 1] == os.environ["FAKE_AWS_PARAMETER"] \
        and args[args.index("--region") + 1] == "us-west-2" and "--query" in args:
    print(os.environ["FAKE_AWS_ANSWER"])
    sys.exit(0)
print("An error occurred (ParameterNotFound) when calling the GetParameter operation", file=sys.stderr)
sys.exit(254)
"""


@pytest.fixture
def fake_aws(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    aws = bin_dir / "aws"
    aws.write_text(FAKE_AWS)
    aws.chmod(aws.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "aws.log"

    def run(answer: str = FAKE_AMI, parameter: str = DLAMI_PARAMETER, out: Path = tmp_path / "work" / "aws.yaml"):
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_AWS_LOG": str(log),
               "FAKE_AWS_PARAMETER": parameter, "FAKE_AWS_ANSWER": answer}
        result = subprocess.run(["bash", str(RESOLVE), str(AWS_YAML), str(out)], capture_output=True, text=True,
                                env=env, timeout=60, cwd=tmp_path)
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return result, out, calls

    return run


def test_aws_yaml_names_the_public_parameter():
    source = yaml.safe_load(AWS_YAML.read_text())
    assert {t["node_config"]["ImageId"] for t in source["available_node_types"].values()} == \
        {f"resolve:ssm:{DLAMI_PARAMETER}"}


def test_resolve_amis_writes_a_copy_with_the_parameters_ami(fake_aws):
    result, out, calls = fake_aws()
    assert result.returncode == 0, result.stderr
    source, resolved = yaml.safe_load(AWS_YAML.read_text()), yaml.safe_load(out.read_text())
    types = resolved["available_node_types"]
    assert {t["node_config"]["ImageId"] for t in types.values()} == {FAKE_AMI}
    for name, node_type in source["available_node_types"].items():  # nothing else changed
        node_type["node_config"]["ImageId"] = FAKE_AMI
    assert resolved == source
    assert calls == [["ssm", "get-parameter", "--region", "us-west-2", "--name", DLAMI_PARAMETER,
                      "--query", "Parameter.Value", "--output", "text"]]  # once per distinct parameter
    import jsonschema

    jsonschema.validate(resolved, json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text()))
    assert "resolve:ssm:" in AWS_YAML.read_text()  # the source stays as it was


@pytest.mark.parametrize("answer,parameter", [("ami-0123456789abcdef0", "/some/other/parameter"),
                                              ("None", DLAMI_PARAMETER)])
def test_resolve_amis_writes_nothing_when_aws_gives_no_ami(fake_aws, answer, parameter):
    result, out, _ = fake_aws(answer=answer, parameter=parameter)
    assert result.returncode != 0 and not out.exists()
    assert "ParameterNotFound" in result.stderr or "not an AMI id" in result.stderr


@pytest.fixture(scope="module")
def aws() -> dict:
    return yaml.safe_load(AWS_YAML.read_text())


def test_head_runs_mlflow_on_postgresql_with_s3_artifacts(aws):
    head = " ".join(aws["head_start_ray_commands"])
    server = next(c for c in aws["head_start_ray_commands"] if c.startswith("nohup mlflow server"))
    assert '--backend-store-uri "$(cat ~/.mlflow-backend-uri)"' in server
    assert re.search(r"--artifacts-destination s3://BUCKET/mlflow\b", server)
    assert "--allowed-hosts" not in server  # MLflow's default list; see the next test
    # The URI comes from the SSM parameter the head's role may read.
    assert any("/uniformer/mlflow-backend-uri" in c for c in aws["head_setup_commands"])
    head_policy = json.loads((CLUSTER / "iam" / "head-policy.json").read_text())
    readable = {r for s in head_policy["Statement"] if s["Action"] == "ssm:GetParameter"
                for r in ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])}
    assert "arn:aws:ssm:us-west-2:123456789012:parameter/uniformer/mlflow-backend-uri" in readable
    # Every node's Ray (and so every job) has the head's address as its tracking URI.
    assert "export MLFLOW_TRACKING_URI=http://$(hostname -I | cut -d' ' -f1):5000" in head
    assert any("export MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in c for c in aws["worker_start_ray_commands"])
    # The CPU image (the head's) has the PostgreSQL driver, hash-locked.
    assert re.search(r"^psycopg==3\.", (ROOT / "infra" / "docker" / "cpu-requirements.lock").read_text(), re.M)


def test_mlflow_default_hosts_admit_the_nodes_addresses():
    """The launcher's nodes live in the default VPC (172.31.0.0/16); MLflow's default allowed hosts
    (used when --allowed-hosts is not given) must admit a request addressed to the head's private IP."""
    from mlflow.server.security_utils import get_default_allowed_hosts, is_allowed_host_header

    hosts = get_default_allowed_hosts()
    for address in ("172.31.0.10:5000", "172.31.255.254:5000", "10.0.3.7:5000", "localhost:5000"):
        assert is_allowed_host_header(hosts, address), address
    assert not is_allowed_host_header(hosts, "mlflow.example.com:5000")  # the guard is still on


def test_nodes_log_in_to_ecr_before_the_pull(aws):
    registry = aws["docker"]["image"].split("/")[0]
    assert re.fullmatch(r"\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com", registry)
    assert any(f"docker login --username AWS --password-stdin {registry}" in c for c in aws["initialization_commands"])
    for role in ("head", "worker"):
        policy = json.loads((CLUSTER / "iam" / f"{role}-policy.json").read_text())
        actions = {a for s in policy["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
        assert {"ecr:GetAuthorizationToken", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"} <= actions, role


def header_commands(text: str, program: str) -> list[list[str]]:
    """The commands of a YAML file's comment header that start with `program`, continuations joined."""
    lines = [line[1:].strip() for line in text.splitlines() if line.startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.startswith(program + " ")]


def test_header_submit_command_parses_as_the_cli_reads_it():
    """`--forward-env` is a flag of submit: a name after it would become a training override. The
    example must be one the CLI accepts, its overrides a valid config."""
    from jobs.submit import split_argv
    from pipeline.config import load_config

    (command,) = header_commands(AWS_YAML.read_text(), "uniformer submit")
    args, job_args = split_argv(command[2:])
    assert args.job == "train" and not args.forward_env and args.address == "http://127.0.0.1:8265"
    assert job_args[0] == "--config"
    overrides = job_args[2:]
    assert all("=" in o for o in overrides), overrides
    cfg = load_config(ROOT / job_args[1], overrides)
    assert cfg.data.manifest.startswith("s3://") and cfg.train.run_name != "uniformer"
