"""The cluster manifests: every YAML under infra/ parses; the Ray cluster launcher config passes Ray's
own schema; KubeRay and MLflow manifests carry the fields that matter; every Ray image is pinned to
the installed Ray version."""

import json
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
ALL_YAML = sorted(p for p in INFRA.rglob("*.y*ml") if p.suffix in (".yaml", ".yml"))
IMAGE_DIR = "/home/ray/uniformer"  # where infra/docker/Dockerfile puts the code


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def image_ray_version(image: str) -> str | None:
    """2.60.0 for rayproject/ray:2.60.0-py311-gpu and for our .../uniformer-ray:ray2.60.0-py311-gpu."""
    match = re.fullmatch(r"(?:rayproject/ray:|[\w./-]*uniformer-ray:ray)(\d+\.\d+\.\d+)[\w.-]*", image)
    return match.group(1) if match else None


def pod_templates(cluster_spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", cluster_spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster_spec["workerGroupSpecs"]]
    return [(name, group["template"]["spec"]) for name, group in groups]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_parses(path):
    docs = load_docs(path)
    assert docs and all(isinstance(doc, dict) for doc in docs)


# --- Ray cluster launcher (AWS) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def aws() -> dict:
    return load_docs(INFRA / "cluster" / "aws.yaml")[0]


def test_aws_passes_rays_schema(aws):
    import jsonschema

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(aws, schema)


def test_aws_node_types(aws):
    types = aws["available_node_types"]
    assert types[aws["head_node_type"]]["resources"]["CPU"] == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    cpu_only = [name for name, t in types.items()
                if name != aws["head_node_type"] and t["resources"].get("CPU", 0) > 0 and not t["resources"].get("GPU")]
    assert gpu and cpu_only
    for t in types.values():  # S3 through the instance role, on every node
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")


def test_aws_image_setup_and_auth(aws):
    assert aws["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert any("pip install" in c and "/home/ray/uniformer" in c for c in aws["setup_commands"])
    assert aws["file_mounts"]["/home/ray/uniformer"] == "."
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token ray start" in c for c in aws[key])
    assert "train.storage_path=s3://" in (INFRA / "cluster" / "aws.yaml").read_text()


# --- KubeRay -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def raycluster() -> dict:
    return load_docs(INFRA / "k8s" / "raycluster.yaml")[0]


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return load_docs(INFRA / "k8s" / "rayjob.yaml")[0]


def check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu_groups, cpu_groups = [], []
    for name, pod in pod_templates(spec):
        shm = {v["name"] for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"}
        for container in pod["containers"]:
            assert image_ray_version(container["image"]) == ray.__version__, container["image"]
            mounts = {m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"}
            assert mounts & shm, f"{name}: /dev/shm is not a memory emptyDir"
            env = env_of(container)
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
            assert "secretKeyRef" in env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]
            if name != "head":
                gpus = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
                (gpu_groups if gpus else cpu_groups).append(name)
    assert gpu_groups and cpu_groups


def test_raycluster(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["kind"] == "RayCluster"
    check_cluster_spec(raycluster["spec"])


def test_rayjob(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    check_cluster_spec(spec["rayClusterSpec"])
    submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
    assert image_ray_version(submitter["image"]) == ray.__version__
    assert env_of(submitter)["RAY_AUTH_MODE"]["value"] == "token"


def test_rayjob_entrypoint_runs_a_recipe(rayjob):
    words = shlex.split(rayjob["spec"]["entrypoint"])
    assert words[:5] == ["python", "-m", "jobs.train", "--config", words[4]]
    config = ROOT / Path(words[4]).relative_to(IMAGE_DIR)
    cfg = load_config(config, words[5:])
    assert cfg.train.storage_path.startswith("s3://") and cfg.data.manifest.startswith("s3://")


def test_mlflow_deployment():
    docs = {doc["kind"]: doc for doc in load_docs(INFRA / "k8s" / "mlflow.yaml")}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    command = " ".join(container.get("command", []) + container.get("args", []))
    assert "mlflow server" in command and "--app-name basic-auth" in command
    assert re.search(r"--artifacts-destination s3://", command)
    assert '--backend-store-uri "$MLFLOW_BACKEND_STORE_URI"' in command
    env = env_of(container)
    for name in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    auth_dir = str(Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"]).parent)
    mounted = {m["name"] for m in container["volumeMounts"] if m["mountPath"] == auth_dir}
    assert any(v["name"] in mounted and "secret" in v for v in pod["volumes"])
    assert "postgresql://" in (INFRA / "k8s" / "mlflow.yaml").read_text()
    service = docs["Service"]["spec"]
    assert service["selector"].items() <= docs["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    import mlflow

    tag = container["image"].rsplit(":", 1)[1].lstrip("v")
    assert tag.split(".")[:2] == mlflow.__version__.split(".")[:2]


def test_dockerfile_pins_the_installed_ray():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(ray.__version__)}$", text, re.M)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-gpu$", text, re.M)
