"""infra/README.md as a walk a new user follows: every command block is valid bash, every file it names
exists, every manifest and values file is applied by some step, every IAM policy, ECR repository,
image, Secret and Helm chart the manifests and the cluster config need is made by a step (at the
version the README names and the tests hold), and every `uniformer submit` it shows is one the CLI
accepts with a config that loads."""

import json
import re
import shlex
import subprocess
import textwrap
from pathlib import Path

import mlflow
import pytest
import ray
import yaml

from tests.infra.test_manifests import KUBERAY_MIN, k8s_docs

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
README = INFRA / "README.md"
TEXT = README.read_text()
REGISTRY = "123456789012.dkr.ecr.us-west-2.amazonaws.com"  # the placeholder account and region
# Public images the manifests and the walk pull besides the project's own (Docker Hub official / vendor).
PUBLIC_IMAGES = {"redis:7.4.2", "fluent/fluent-bit:3.1.4", "postgres:15"}


def bash_blocks(text: str = TEXT) -> list[str]:
    return [textwrap.dedent(m.group(1)) for m in re.finditer(r"^ *```bash\n(.*?)^ *```", text, re.S | re.M)]


def commands(text: str = TEXT) -> list[str]:
    """Every command line of the bash blocks, continuations joined, comments dropped."""
    out = []
    for block in bash_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def test_there_is_a_walk():
    assert len(bash_blocks()) >= 15


@pytest.mark.parametrize("index", range(len(bash_blocks())))
def test_every_block_is_valid_bash(index):
    result = subprocess.run(["bash", "-n"], input=bash_blocks()[index], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + bash_blocks()[index]


def test_every_file_the_readme_names_exists():
    named = set(re.findall(r"(?<![\w/.-])((?:infra|tests|jobs|pipeline|model)/[\w./*-]*[\w*/])", TEXT))
    assert len(named) > 30
    missing = []
    for path in sorted(named):
        path = path.split("::")[0]
        if "*" in path:
            if not list(ROOT.glob(path)):
                missing.append(path)
        elif not (ROOT / path).exists():
            missing.append(path)
    assert not missing, missing
    for path in re.findall(r"file://(\S+)", TEXT):
        if "$" not in path:
            assert (ROOT / path).exists(), path


def test_every_manifest_and_values_file_is_used_by_a_step():
    used = " ".join(commands())
    for path in sorted((INFRA / "k8s").iterdir()) + sorted((INFRA / "eks").rglob("*.*")):
        assert str(path.relative_to(ROOT)) in used, f"no step of infra/README.md uses {path.relative_to(ROOT)}"
    # The namespaced manifests go to the namespace the IRSA roles trust and the service names use.
    cluster = yaml.safe_load((INFRA / "eks" / "cluster.yaml").read_text())
    namespaces = {sa["metadata"]["namespace"] for sa in cluster["iam"]["serviceAccounts"]} - {"kube-system"}
    assert namespaces == {"uniformer"} and "kubectl create namespace uniformer" in commands()
    assert all(" -n uniformer " in c or " -n uniformer" in c for c in commands() if "infra/k8s/ray" in c
               and "apply" in c)


def test_iam_policies_the_cluster_attaches_are_created_from_files():
    created = {}
    for command in commands():
        if command.startswith("aws iam create-policy"):
            words = shlex.split(command)
            created[words[words.index("--policy-name") + 1]] = words[words.index("--policy-document") + 1]
    cluster = yaml.safe_load((INFRA / "eks" / "cluster.yaml").read_text())
    attached = {arn.rsplit("/", 1)[1] for sa in cluster["iam"]["serviceAccounts"]
                for arn in sa.get("attachPolicyARNs", []) if ":aws:policy/" not in arn}
    assert attached and attached <= set(created)
    for document in created.values():
        assert json.loads((ROOT / document.removeprefix("file://")).read_text())["Statement"]


def manifest_images() -> set[str]:
    images = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("image"), str):
                images.add(node["image"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for _, doc in k8s_docs():
        walk(doc)
    aws = yaml.safe_load((INFRA / "cluster" / "aws.yaml").read_text())
    images.add(aws["docker"]["image"])
    images |= {t["docker"]["worker_image"] for t in aws["available_node_types"].values() if "docker" in t}
    return images


def test_every_image_is_built_and_pushed_by_the_walk_or_public():
    build = (INFRA / "docker" / "build.sh").read_text()
    built = set(re.findall(r'^build "\$REGISTRY/([\w.:-]+)"', build, re.M))
    assert len(built) == 3
    repositories = {shlex.split(c)[shlex.split(c).index("--repository-name") + 1]
                    for c in commands() if c.startswith("aws ecr create-repository")}
    assert {image.split(":")[0] for image in built} == repositories
    assert "PUSH=1 infra/docker/build.sh $REGISTRY" in commands()
    assert f"export REGISTRY=$ACCOUNT.dkr.ecr.$AWS_REGION.amazonaws.com" in commands()
    for image in manifest_images():
        if image.startswith(REGISTRY + "/"):
            assert image.removeprefix(REGISTRY + "/") in built, image
        else:
            assert image in PUBLIC_IMAGES, f"{image}: neither built by build.sh nor a known public image"
    for command in commands():
        for image in re.findall(r"--image=(\S+)", command):
            assert image in PUBLIC_IMAGES, image
    assert not [i for i in manifest_images() | PUBLIC_IMAGES if i.endswith(":latest") or ":" not in i]


def test_secrets_the_walk_reads_are_the_ones_secrets_sh_makes():
    made = set(re.findall(r"^create ([\w-]+)", (INFRA / "k8s" / "secrets.sh").read_text(), re.M))
    read = set(re.findall(r"get secret ([\w-]+)", " ".join(commands())))
    read |= set(re.findall(r'secret ([\w-]+) [A-Z_]+\)', " ".join(commands())))  # the walk's secret() helper
    assert read and read <= made, read - made


def helm_installs() -> dict[str, list[str]]:
    return {shlex.split(c)[2]: shlex.split(c) for c in commands() if c.startswith("helm install ")}


def test_helm_charts_are_installed_at_the_versions_the_readme_and_values_name():
    installs = helm_installs()
    assert set(installs) == {"cluster-autoscaler", "kuberay-operator", "prometheus", "dcgm-exporter"}
    versions = {}
    for name, words in installs.items():
        versions[name] = words[words.index("--version") + 1]
        if "-f" in words:
            values = INFRA.parent / words[words.index("-f") + 1]
            header = "\n".join(line for line in values.read_text().splitlines() if line.startswith("#"))
            assert f"--version {versions[name]}" in header.replace("\\\n#", " "), values.name  # its own header
    assert f"v{versions['kuberay-operator']}" == KUBERAY_MIN  # the CRDs the tests validate against
    assert "88.3.0" == versions["prometheus"]  # ships prometheus-operator v0.93.0, the CRDs the tests hold
    repos = {shlex.split(c)[3]: shlex.split(c)[4] for c in commands() if c.startswith("helm repo add ")}
    for words in installs.values():
        assert words[3].split("/")[0] in repos, words[3]


def test_the_readme_names_the_versions():
    cluster = yaml.safe_load((INFRA / "eks" / "cluster.yaml").read_text())
    table = TEXT[:TEXT.index("## The pieces")]
    for version in (f"**{cluster['metadata']['version']}**", "**0.230.0**", f"**{KUBERAY_MIN.lstrip('v')}**",
                    f"**{ray.__version__}**", f"**{mlflow.__version__}**", "**v0.93.0**"):
        assert version in table, version
    assert (ROOT / "tests" / "infra" / "schemas" / "eksctl-v0.230.0").is_dir()


def test_quota_step_names_the_p_instance_quota():
    assert re.search(r"--quota-code L-417A185B .*# Running On-Demand P instances", " ".join(
        line for line in bash_blocks()[1].splitlines()))
    assert any("request-service-quota-increase" in c and "L-417A185B" in c for c in commands())


def test_the_readme_does_not_call_tags_pins():
    lock = (INFRA / "docker" / "base-images.lock").read_text()
    if all("@sha256:" in line for line in lock.splitlines() if line.strip() and not line.startswith("#")):
        return
    for line in TEXT.splitlines():
        if "base image" in line.lower() or "base-images.lock" in line:
            assert not re.search(r"\bpinned\b|\bpins\b", line), line


def submit_commands() -> list[tuple[str, list[str]]]:
    found = [("infra/README.md", shlex.split(c)) for c in commands() if c.startswith("uniformer submit ")]
    for header in ("infra/k8s/raycluster.yaml", "infra/cluster/aws.yaml"):
        lines = "\n".join(line[1:].strip() for line in (ROOT / header).read_text().splitlines()
                          if line.startswith("#")).replace("\\\n", " ")
        found += [(header, shlex.split(line)) for line in lines.splitlines() if line.startswith("uniformer submit ")]
    return found


@pytest.mark.parametrize("where,words", submit_commands(), ids=[f"{w}:{c[2]}" for w, c in submit_commands()])
def test_submit_commands_are_ones_the_cli_accepts(where, words):
    from jobs.submit import split_argv
    from pipeline.config import load_config

    args, job_args = split_argv(words[2:])
    assert args.address == "http://127.0.0.1:8265" and not args.forward_env, where
    if args.job == "train":
        i = job_args.index("--config")
        overrides = job_args[:i] + job_args[i + 2:]
        assert all("=" in o for o in overrides), overrides  # a bare name would be a broken override
        cfg = load_config(ROOT / job_args[i + 1], overrides)
        assert cfg.train.run_name == "k400-s16x4" and cfg.data.manifest == "s3://BUCKET/k400/prepared"
    elif args.job == "prepare":
        from jobs.prepare import build_parser

        build_parser().parse_args(job_args)
    else:
        assert args.job in ("register", "evaluate", "promote"), args.job


def test_run_id_placeholder_is_filled_by_the_walk():
    assert "RUN_ID" in (INFRA / "k8s" / "rayjob-promote.yaml").read_text()
    assert any(c.startswith('sed "s/RUN_ID/$RUN_ID/" infra/k8s/rayjob-promote.yaml | kubectl -n uniformer apply -f -')
               for c in commands())
