"""The cluster manifests as an API server and a scheduler would take them: every Kubernetes document
validates against the schema of its kind (KubeRay v1.6.0 CRDs, prometheus-operator v0.93.0 CRDs,
Kubernetes v1.35.0; tests/infra/schemas/, made by make_schemas.py there), every pod fits the
allocatable of the instance type it is pinned to, every ServiceAccount and Secret it names is
defined, and the Ray cluster launcher config passes Ray's own schema."""

import json
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml
from jsonschema import Draft7Validator, validators

from pipeline.config import DataConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
SCHEMAS = Path(__file__).parent / "schemas"
ALL_YAML = sorted(p for p in INFRA.rglob("*.y*ml") if p.suffix in (".yaml", ".yml"))
K8S_YAML = sorted(K8S.glob("*.yaml"))
IMAGE_DIR = "/home/ray/uniformer"  # where infra/docker/project.Dockerfile puts the code
KUBERAY_MIN = "v1.6.0"              # authOptions.secretName appeared in v1.6.0 (authOptions itself in v1.5.1)

SCHEMA_FILES = {
    ("ray.io/v1", "RayCluster"): f"kuberay-{KUBERAY_MIN}/raycluster.json",
    ("ray.io/v1", "RayJob"): f"kuberay-{KUBERAY_MIN}/rayjob.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "prometheus-operator-v0.93.0/podmonitor.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "prometheus-operator-v0.93.0/servicemonitor.json",
    ("v1", "ServiceAccount"): "kubernetes-v1.35.0/serviceaccount-v1.json",
    ("v1", "Service"): "kubernetes-v1.35.0/service-v1.json",
    ("v1", "ConfigMap"): "kubernetes-v1.35.0/configmap-v1.json",
    ("v1", "PersistentVolumeClaim"): "kubernetes-v1.35.0/persistentvolumeclaim-v1.json",
    ("apps/v1", "Deployment"): "kubernetes-v1.35.0/deployment-apps-v1.json",
    ("policy/v1", "PodDisruptionBudget"): "kubernetes-v1.35.0/poddisruptionbudget-policy-v1.json",
    ("storage.k8s.io/v1", "StorageClass"): "kubernetes-v1.35.0/storageclass-storage-v1.json",
}


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_docs() -> list[tuple[str, dict]]:
    return [(f"{p.name}:{d['kind']}/{d['metadata']['name']}", d) for p in K8S_YAML for d in load_docs(p)]


def strict_crd(schema):
    """A CRD schema as `kubectl apply` enforces it: kubectl's field validation is Strict by default
    (Kubernetes >= 1.27), so a field the schema does not name is an error, not silently dropped."""
    if isinstance(schema, dict):
        schema = {k: strict_crd(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict_crd(v) for v in schema]
    return schema


def validator_for(doc: dict):
    key = (doc["apiVersion"], doc["kind"])
    assert key in SCHEMA_FILES, f"no schema kept for {key}; add it with tests/infra/schemas/make_schemas.py"
    schema = json.loads((SCHEMAS / SCHEMA_FILES[key]).read_text())
    if "$schema" not in schema:  # the CRD schemas: OpenAPI v3, closest to JSON Schema draft 7
        return Draft7Validator(strict_crd(schema))
    return validators.validator_for(schema)(schema)


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_parses(path):
    docs = load_docs(path)
    assert docs and all(isinstance(doc, dict) for doc in docs)


@pytest.mark.parametrize("name,doc", k8s_docs(), ids=[n for n, _ in k8s_docs()])
def test_manifest_validates_against_its_schema(name, doc):
    errors = sorted(validator_for(doc).iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in errors[:10])


def test_strict_schema_catches_an_unknown_field():
    doc = load_docs(K8S / "rayjob.yaml")[0]
    doc["spec"]["rayClusterSpec"]["authOptions"]["tokenSecret"] = "typo"
    assert any("tokenSecret" in e.message for e in validator_for(doc).iter_errors(doc))


# --- pods: sizes, identities, secrets ------------------------------------------------------------

def pod_templates() -> list[tuple[str, dict, dict]]:
    """(where, pod metadata, pod spec) of every pod the manifests make."""
    pods = []
    for name, doc in k8s_docs():
        spec = doc.get("spec", {})
        if doc["kind"] in ("RayCluster", "RayJob"):
            cluster = spec["rayClusterSpec"] if doc["kind"] == "RayJob" else spec
            groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
            pods += [(f"{name}:{g}", grp["template"].get("metadata", {}), grp["template"]["spec"]) for g, grp in groups]
            if doc["kind"] == "RayJob":
                pods.append((f"{name}:submitter", {}, spec["submitterPodTemplate"]["spec"]))
        elif doc["kind"] == "Deployment":
            pods.append((name, spec["template"].get("metadata", {}), spec["template"]["spec"]))
    return pods


def ray_pods(kind: str) -> dict[str, tuple[dict, dict]]:
    return {where.rsplit(":", 1)[1]: (meta, spec) for where, meta, spec in pod_templates()
            if where.startswith(f"{kind}.yaml:")}


def quantity(value) -> float:
    """A Kubernetes quantity in base units (cores, bytes)."""
    value = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value)


# Instance types the manifests pin pods to: (vCPUs, memory GiB, max ENIs, IPv4 addresses per ENI), from
# EC2's instance type pages and awslabs/amazon-eks-ami nodeadm/internal/kubelet/instance-info.jsonl.
INSTANCES = {
    "m7i.4xlarge": (16, 64, 8, 30),
    "c7i.12xlarge": (48, 96, 8, 30),
    "p4d.24xlarge": (96, 1152, 15, 50),
}
MiB, GiB = 2**20, 2**30
# Not in the node's allocatable but taken from it all the same: DaemonSet pods on every node (VPC CNI,
# kube-proxy, EBS CSI node, NVIDIA device plugin and dcgm-exporter, node exporter); a budget.
DAEMONSETS_CPU, DAEMONSETS_MEMORY = 1.0, 2 * GiB
# Memory the kernel reports is below the nominal size; Karpenter's default VM_MEMORY_OVERHEAD_PERCENT.
VM_MEMORY_OVERHEAD = 0.075


def allocatable(instance_type: str) -> tuple[float, float]:
    """(CPU cores, memory bytes) a pod can request on an EKS AL2023 node of this type, minus DaemonSets.

    EKS's nodeadm (awslabs/amazon-eks-ami, nodeadm/internal/kubelet/config.go) sets
    kube-reserved cpu = 6% of the first core + 1% of the second + 0.5% of the next two + 0.25% of the
    rest, kube-reserved memory = 11 MiB x maxPods + 255 MiB with maxPods = ENIs x (IPs per ENI - 1) + 2
    (eni_max_pods.go), and evictionHard memory.available = 100Mi. Allocatable = capacity - both.
    """
    vcpus, memory_gib, enis, ips = INSTANCES[instance_type]
    millicores, reserved = vcpus * 1000, 0
    for start, end, per_10k in ((0, 1000, 600), (1000, 2000, 100), (2000, 4000, 50), (4000, millicores, 25)):
        if millicores > start:
            reserved += (min(millicores, end) - start) * per_10k // 10000
    max_pods = enis * (ips - 1) + 2
    memory = memory_gib * GiB * (1 - VM_MEMORY_OVERHEAD) - (11 * max_pods + 255) * MiB - 100 * MiB
    return (millicores - reserved) / 1000 - DAEMONSETS_CPU, memory - DAEMONSETS_MEMORY


def test_allocatable_matches_the_eks_formula():
    # c7i.12xlarge: 48000m - (60 + 10 + 10 + 44000 x 0.25%) = 47810m; maxPods 8 x 29 + 2 = 234
    cpu, memory = allocatable("c7i.12xlarge")
    assert cpu == pytest.approx(47.81 - DAEMONSETS_CPU)
    assert memory == pytest.approx(96 * GiB * 0.925 - (11 * 234 + 255 + 100) * MiB - DAEMONSETS_MEMORY)
    assert allocatable("c7i.12xlarge")[0] < 48 and allocatable("c7i.12xlarge")[1] < 96 * GiB


def pod_requests(pod: dict) -> tuple[float, float]:
    cpu = memory = 0.0
    for container in pod["containers"]:
        requests = container.get("resources", {}).get("requests", {})
        cpu += quantity(requests.get("cpu", 0))
        memory += quantity(requests.get("memory", 0))
    return cpu, memory


@pytest.mark.parametrize("where,meta,pod", pod_templates(), ids=[w for w, _, _ in pod_templates()])
def test_pod_fits_its_instance_type(where, meta, pod):
    instance_type = pod.get("nodeSelector", {}).get("node.kubernetes.io/instance-type")
    if instance_type is None:
        assert "mlflow" in where, f"{where}: pin it to an instance type (nodeSelector) so its size can be checked"
        return
    cpu, memory = pod_requests(pod)
    cpu_free, memory_free = allocatable(instance_type)
    assert cpu <= cpu_free, f"{where}: requests {cpu} CPU, {instance_type} allocates {cpu_free:.2f}"
    assert memory <= memory_free, \
        f"{where}: requests {memory / GiB:.1f} GiB, {instance_type} allocates {memory_free / GiB:.1f} GiB"
    for container in pod["containers"]:
        resources = container.get("resources", {})
        assert resources.get("requests") and resources.get("limits"), f"{where}/{container['name']}: no resources"
        # A memory-backed /dev/shm counts against the container's memory limit.
        limit = quantity(resources["limits"].get("memory", 0))
        mounted = {m["name"] for m in container.get("volumeMounts", [])}
        shm = sum(quantity(v["emptyDir"].get("sizeLimit", 0)) for v in pod.get("volumes", [])
                  if v["name"] in mounted and v.get("emptyDir", {}).get("medium") == "Memory")
        assert shm < limit or not shm, f"{where}/{container['name']}: /dev/shm {shm / GiB} GiB >= memory limit"


# EFA interfaces per instance type (EC2's instance type pages): what the EFA device plugin hands out.
EFA_INTERFACES = {"p4d.24xlarge": 4, "p5.48xlarge": 32}


def gpu_pods() -> list[tuple[str, dict, dict]]:
    return [(where, meta, pod) for where, meta, pod in pod_templates()
            if "nvidia.com/gpu" in pod["containers"][0].get("resources", {}).get("limits", {})]


@pytest.mark.parametrize("where,meta,pod", gpu_pods(), ids=[w for w, _, _ in gpu_pods()])
def test_gpu_pods_talk_nccl_over_efa(where, meta, pod):
    instance_type = pod["nodeSelector"]["node.kubernetes.io/instance-type"]
    ray_container = pod["containers"][0]
    resources = ray_container["resources"]
    efa = str(EFA_INTERFACES[instance_type])  # all of the node's interfaces: one GPU pod per node
    assert resources["limits"]["vpc.amazonaws.com/efa"] == resources["requests"]["vpc.amazonaws.com/efa"] == efa
    env = {e["name"]: e.get("value") for e in ray_container["env"]}
    assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert "IPC_LOCK" in ray_container["securityContext"]["capabilities"]["add"]  # EFA pins registered memory


def test_there_are_gpu_pods_to_check():
    assert {w.split(":")[0] for w, _, _ in gpu_pods()} == {"raycluster.yaml", "rayjob.yaml", "rayjob-promote.yaml"}


def defined(kind: str) -> set[str]:
    names = {d["metadata"]["name"] for _, d in k8s_docs() if d["kind"] == kind}
    if kind == "Secret":  # Secrets are made by secrets.sh (their values never live in git)
        names |= set(re.findall(r"^create ([\w-]+)", (K8S / "secrets.sh").read_text(), re.M))
    return names


def referenced(node, kind: str) -> set[str]:
    """ServiceAccount / Secret / ConfigMap names a manifest refers to, wherever they are."""
    found = set()
    if isinstance(node, dict):
        if kind == "ServiceAccount" and "serviceAccountName" in node:
            found.add(node["serviceAccountName"])
        if kind == "Secret":
            found |= {node[k]["name"] for k in ("secretKeyRef",) if k in node}
            if isinstance(node.get("secret"), dict):
                found.add(node["secret"]["secretName"])
            if isinstance(node.get("secretName"), str):
                found.add(node["secretName"])
        if kind == "ConfigMap":
            found |= {node[k]["name"] for k in ("configMapKeyRef", "configMap") if k in node}
        for value in node.values():
            found |= referenced(value, kind)
    elif isinstance(node, list):
        for value in node:
            found |= referenced(value, kind)
    return found


@pytest.mark.parametrize("kind", ["ServiceAccount", "Secret", "ConfigMap"])
def test_every_referenced_object_is_defined(kind):
    used = set().union(*(referenced(doc, kind) for _, doc in k8s_docs()))
    assert used, kind
    assert used <= defined(kind), f"{kind} used but never defined: {sorted(used - defined(kind))}"


def test_ray_service_account_has_an_irsa_role():
    account = next(d for _, d in k8s_docs() if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == "uniformer-ray")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


def node_label(labels: dict[str, str]) -> str:
    """A one-label dict as `key=value`, the form of `data.decode_nodes`."""
    (key, value), = labels.items()
    return f"{key}={value}"


# --- KubeRay: auth, fault tolerance, disruptions, images -------------------------------------------

def image_ray_version(image: str) -> str | None:
    """2.60.0 for rayproject/ray:2.60.0-py311-gpu and for our .../uniformer-ray:ray2.60.0-py311-cpu."""
    match = re.fullmatch(r"(?:rayproject/ray:|[\w./-]*uniformer-ray:ray)(\d+\.\d+\.\d+)[\w.-]*", image)
    return match.group(1) if match else None


def cluster_specs() -> dict[str, dict]:
    job = load_docs(K8S / "rayjob.yaml")[0]
    return {"raycluster": load_docs(K8S / "raycluster.yaml")[0]["spec"], "rayjob": job["spec"]["rayClusterSpec"]}


@pytest.mark.parametrize("kind", ["raycluster", "rayjob"])
def test_token_auth_through_kuberay(kind):
    spec = cluster_specs()[kind]
    assert spec["authOptions"] == {"mode": "token", "secretName": "uniformer-ray-auth"}
    # Set by hand, these would shadow what KubeRay injects (it adds them only where absent).
    for where, _, pod in pod_templates():
        for container in pod["containers"]:
            names = {e["name"] for e in container.get("env", [])}
            assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, f"{where}/{container['name']}"


@pytest.mark.parametrize("kind", ["raycluster", "rayjob"])
def test_cluster_layout(kind):
    spec = cluster_specs()[kind]
    assert spec["rayVersion"] == ray.__version__ and spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    if kind == "raycluster":  # the long-lived cluster keeps its state through a head restart
        assert "secretKeyRef" in spec["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]
        assert spec["gcsFaultToleranceOptions"]["redisAddress"].startswith("redis.")
    else:  # a RayJob's driver dies with its head whatever the GCS keeps: backoffLimit recovers it
        assert "gcsFaultToleranceOptions" not in spec
    pods = {name: pod for name, pod in ray_pods(kind).items() if name != "submitter"}
    head_meta, head = pods["head"]
    gpu_meta, gpu = pods["gpu"]
    decode_meta, decode = pods["decode"]
    for meta in (head_meta, gpu_meta):  # no eviction of a running training's head or GPU workers
        assert meta["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
        assert meta["annotations"]["karpenter.sh/do-not-disrupt"] == "true"
    assert decode["nodeSelector"]["eks.amazonaws.com/capacityType"] == "SPOT"
    assert "annotations" not in decode_meta
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert node_label(groups["decode"]["labels"]) == DataConfig().decode_nodes  # where decode tasks go
    assert node_label(groups["gpu"]["labels"]) != DataConfig().decode_nodes
    images = {name: pod["containers"][0]["image"] for name, (_, pod) in pods.items()}
    assert images["gpu"].endswith("-gpu") and images["head"].endswith("-cpu") and images["decode"].endswith("-cpu")
    for name, (_, pod) in pods.items():
        assert pod["serviceAccountName"] == "uniformer-ray"
        ray_container = pod["containers"][0]  # KubeRay treats the first container as Ray's
        assert image_ray_version(ray_container["image"]) == ray.__version__, ray_container["image"]
        assert "metrics" in {p["name"] for p in ray_container["ports"]}
        mounts = {m["mountPath"]: m["name"] for m in ray_container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert "/tmp/ray" in mounts and any(c["name"] == "log-shipper" for c in pod["containers"])
        assert "secretKeyRef" in {e["name"]: e for e in ray_container["env"]}["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]
    head_env = {e["name"] for e in head["containers"][0]["env"]}
    assert {"RAY_PROMETHEUS_HOST", "RAY_GRAFANA_HOST", "RAY_GRAFANA_IFRAME_HOST"} <= head_env
    # KubeRay (utils/validation.go) refuses these next to gcsFaultToleranceOptions.
    assert not head_env & {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD", "REDIS_USERNAME", "RAY_external_storage_namespace"}
    assert not {"redis-password", "redis-username"} & set(spec["headGroupSpec"]["rayStartParams"])


def test_pdb_covers_head_and_gpu_pods():
    budgets = [d for _, d in k8s_docs() if d["kind"] == "PodDisruptionBudget"]
    for kind in ("raycluster", "rayjob"):
        for group in ("head", "gpu"):
            labels = ray_pods(kind)[group][0]["labels"]
            covering = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()
                        and all(labels.get(e["key"]) in e["values"] for e in b["spec"]["selector"].get("matchExpressions", []))]
            assert covering and all(b["spec"]["maxUnavailable"] == 0 for b in covering), (kind, group)


def test_rayjob_retries_and_resumes():
    spec = load_docs(K8S / "rayjob.yaml")[0]["spec"]
    assert spec["backoffLimit"] > 0 and spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] >= 7 * 24 * 3600
    words = shlex.split(spec["entrypoint"])
    assert words[:5] == ["python", "-m", "jobs.train", "--config", words[4]]
    cfg = load_config(ROOT / Path(words[4]).relative_to(IMAGE_DIR), words[5:])
    assert cfg.train.storage_path.startswith("s3://") and cfg.data.manifest.startswith("s3://")
    assert cfg.train.run_name != "uniformer"  # a fixed, job-specific name: a retry resumes that run
    submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
    assert image_ray_version(submitter["image"]) == ray.__version__ and submitter["image"].endswith("-cpu")


RESUME_TEST = "tests/training/test_train.py::test_resume_on_fewer_workers_continues_at_the_checkpoints_step_and_epoch"


def test_the_resume_a_rayjob_retry_relies_on_is_tested():
    """A retry (backoffLimit) is a new cluster running the same entrypoint: a second `jobs.train` process
    with the same run name and storage path, which must resume from the checkpoint and continue the same
    MLflow run. That is what the named test does; the manifest and the README point at it."""
    path, name = RESUME_TEST.split("::")
    test_source = (ROOT / path).read_text()
    assert re.search(rf"^def {name}\(", test_source, re.M), f"{RESUME_TEST} is gone"
    body = test_source[test_source.index(f"def {name}("):].split("\ndef ", 1)[0]
    assert body.count("run_train(") == 2 and "train.run_name=resume" in body and 'resumed["run_id"]' in body
    assert RESUME_TEST in (K8S / "rayjob.yaml").read_text()
    assert RESUME_TEST in (INFRA / "README.md").read_text()


def test_monitors_select_the_ray_and_mlflow_pods():
    docs = {d["kind"]: d for _, d in k8s_docs() if d["apiVersion"].startswith("monitoring.coreos.com")}
    ray_labels = ray_pods("rayjob")["head"][0]["labels"]
    assert docs["PodMonitor"]["spec"]["selector"]["matchLabels"].items() <= ray_labels.items()
    assert {e["port"] for e in docs["PodMonitor"]["spec"]["podMetricsEndpoints"]} >= {"metrics"}
    mlflow_service = next(d for _, d in k8s_docs() if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow")
    assert docs["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items() <= mlflow_service["metadata"]["labels"].items()


# --- MLflow server ---------------------------------------------------------------------------------

def test_mlflow_deployment():
    docs = {doc["kind"]: doc for doc in load_docs(K8S / "mlflow.yaml")}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    command = " ".join(container.get("command", []) + container.get("args", []))
    assert "pip install" not in command  # the image has its dependencies; the pod needs no internet
    assert "mlflow server" in command and "--app-name basic-auth" in command and "--expose-prometheus" in command
    assert re.search(r"--artifacts-destination s3://", command)
    assert '--backend-store-uri "$MLFLOW_BACKEND_STORE_URI"' in command
    assert container["image"].split("/")[-1].startswith("uniformer-mlflow:")
    env = {e["name"]: e for e in container["env"]}
    for name in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    auth_dir = str(Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"]).parent)
    mounted = {m["name"] for m in container["volumeMounts"] if m["mountPath"] == auth_dir}
    assert any(v["name"] in mounted and "secret" in v for v in pod["volumes"])
    assert "postgresql+psycopg://" in (K8S / "secrets.sh").read_text()
    service = docs["Service"]["spec"]
    assert service["selector"].items() <= docs["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    import mlflow

    tag = container["image"].rsplit(":", 1)[1].lstrip("v")
    assert tag == mlflow.__version__


# --- images ----------------------------------------------------------------------------------------

DOCKER = INFRA / "docker"


def lock_pins(path: Path) -> dict[str, str]:
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r"^([\w.-]+)==(\S+) \\\n\s+--hash=sha256:[0-9a-f]{64}$",
                                                                 path.read_text(), re.M)}


def test_images_install_from_hash_locks():
    project, server = lock_pins(DOCKER / "requirements.lock"), lock_pins(DOCKER / "mlflow-requirements.lock")
    import mlflow
    import torch

    assert project["ray"] == ray.__version__
    assert project["mlflow"] == server["mlflow"] == mlflow.__version__
    assert "torch" not in project and not any(n.startswith("nvidia-") for n in project)
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(torch.__version__.split('+')[0])}$",
                     (DOCKER / "project.Dockerfile").read_text(), re.M)
    assert server["psycopg"].startswith("3.") and "psycopg-binary" in server
    # The GPU image adds NVML's bindings (GPU figures in the system metrics), hash-locked like the rest.
    gpu = lock_pins(DOCKER / "gpu-requirements.lock")
    assert "nvidia-ml-py" in gpu and "-r /tmp/gpu-requirements.lock" in (DOCKER / "project.Dockerfile").read_text()
    for dockerfile in ("project.Dockerfile", "mlflow.Dockerfile"):
        text = (DOCKER / dockerfile).read_text()
        assert "--require-hashes" in text and re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M), dockerfile


def requirement_names(lines) -> set[str]:
    return {re.split(r"[\[<>=~!; ]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")
            for line in lines if line.strip() and not line.lstrip().startswith("#")}


def test_locks_cover_their_inputs():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = requirement_names((DOCKER / "requirements.in").read_text().splitlines())
    assert requirement_names(project) - {"torch"} <= wanted, "pyproject.toml and requirements.in disagree"
    for lock, source in (("requirements.lock", "requirements.in"), ("mlflow-requirements.lock", "mlflow-requirements.in"),
                         ("gpu-requirements.lock", "gpu-requirements.in")):
        pinned = {name.replace("_", "-") for name in lock_pins(DOCKER / lock)}
        missing = requirement_names((DOCKER / source).read_text().splitlines()) - pinned
        assert not missing, f"{lock} lacks {sorted(missing)}: rerun infra/docker/lock.py"


def test_base_images_and_build_script():
    bases = dict(line.split() for line in (DOCKER / "base-images.lock").read_text().splitlines()
                 if line.strip() and not line.startswith("#"))
    assert bases["gpu"].split("@")[0] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert bases["cpu"].split("@")[0] == f"rayproject/ray:{ray.__version__}-py311"
    build = (DOCKER / "build.sh").read_text()
    assert "not pinned by digest" in build  # build.sh refuses a base without @sha256:
    for flavour in ("gpu", "cpu"):
        assert f"uniformer-ray:ray{ray.__version__}-py311-{flavour}" in build


def test_dockerignore_keeps_local_state_out_of_the_context():
    rules = (ROOT / ".dockerignore").read_text().splitlines()
    assert rules[rules.index("*")] == "*"  # everything out, then the image's inputs back in
    assert {"!model/", "!pipeline/", "!jobs/", "!infra/configs/", "!pyproject.toml"} <= set(rules)
    assert not any(r.startswith("!") and (".venv" in r or "work" in r) for r in rules)


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
    head = types[aws["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    decode = [t for name, t in types.items() if t is not head and not t["resources"].get("GPU")]
    assert gpu and decode
    assert all(t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for t in decode)
    assert all(node_label(t["labels"]) == DataConfig().decode_nodes and t["min_workers"] >= 1 for t in decode)
    assert all(node_label(t["labels"]) != DataConfig().decode_nodes for t in gpu)
    for t in types.values():  # AWS's public parameter, resolved by resolve-amis.sh (test_cluster_launcher.py)
        assert t["node_config"]["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/"), \
            "latest_dlami is Ubuntu 18.04 (EOL); a placeholder id makes `ray up` fail"
    # Split roles: only the head (Ray's autoscaler) may launch instances.
    assert head["node_config"]["IamInstanceProfile"]["Arn"].endswith("/uniformer-ray-head")
    for t in gpu + decode:
        assert t["node_config"]["IamInstanceProfile"]["Arn"].endswith("/uniformer-ray-worker")
    assert all(t["docker"]["worker_image"].endswith("-gpu") for t in gpu)


def test_aws_iam_policies():
    head = json.loads((INFRA / "cluster" / "iam" / "head-policy.json").read_text())
    worker = json.loads((INFRA / "cluster" / "iam" / "worker-policy.json").read_text())

    def actions(policy):
        out = set()
        for statement in policy["Statement"]:
            acts = statement["Action"]
            out |= {acts} if isinstance(acts, str) else set(acts)
        return out

    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:DescribeInstances", "ec2:CreateTags",
            "iam:PassRole"} <= actions(head)
    assert not {a for a in actions(worker) if a.startswith(("ec2:", "iam:"))}
    passrole = next(s for s in head["Statement"] if s["Action"] == "iam:PassRole")
    assert passrole["Resource"].endswith(":role/uniformer-ray-worker")


def test_aws_image_and_auth(aws):
    assert image_ray_version(aws["docker"]["image"]) == ray.__version__ and aws["docker"]["image"].endswith("-cpu")
    assert not any("pip install" in c for c in aws.get("setup_commands", []))
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token ray start" in c and "--metrics-export-port" in c for c in aws[key])


# --- capacity: the recipes on the cluster files ------------------------------------------------

TARGET_GPU_NODES = 8  # the K400 runs are planned on 8 nodes x 8 GPUs (issue 23)
GPU_RECIPES = [p for p in sorted((INFRA / "configs").rglob("*.yaml"))
               if (yaml.safe_load(p.read_text()).get("train") or {}).get("use_gpu")]


def gpu_capacity() -> dict[str, tuple[int, int, float]]:
    """(most GPU nodes, GPUs per node, CPUs per node) of the GPU workers of each cluster file."""
    aws = load_docs(INFRA / "cluster" / "aws.yaml")[0]
    types = aws["available_node_types"]
    name, gpu = next((n, t) for n, t in types.items() if t["resources"].get("GPU", 0) > 0)
    # The launcher's max_workers caps all worker nodes together; the other types' minimum stays up.
    others = sum(t.get("min_workers", 0) for n, t in types.items() if n not in (name, aws["head_node_type"]))
    out = {"aws": (min(gpu["max_workers"], aws["max_workers"] - others), gpu["resources"]["GPU"],
                   gpu["resources"]["CPU"])}
    for kind, spec in cluster_specs().items():
        group = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
        limits = ray_pods(kind)["gpu"][1]["containers"][0]["resources"]["limits"]
        out[kind] = (group["maxReplicas"], int(limits["nvidia.com/gpu"]), quantity(limits["cpu"]))
    return out


def test_gpu_recipes_are_found():
    assert {"k400_uniformer_s16x4.yaml", "ssv2_uniformer_b16.yaml"} <= {p.name for p in GPU_RECIPES}


@pytest.mark.parametrize("cluster", ["aws", "raycluster", "rayjob"])
def test_gpu_capacity_holds_the_recipes(cluster):
    nodes, gpus, cpus = gpu_capacity()[cluster]
    assert nodes >= TARGET_GPU_NODES, f"{cluster}: GPU nodes capped at {nodes}, below the {TARGET_GPU_NODES} planned"
    for path in GPU_RECIPES:
        cfg = load_config(path, ["model.require_init=false"])
        assert cfg.train.num_workers <= nodes * gpus, f"{path.name} on {cluster}: {nodes} x {gpus} GPUs"
        # One worker per GPU: a full node's workers get their CPUs with some left for decoding.
        assert gpus * cfg.train.cpus_per_worker < cpus, f"{path.name} on {cluster}: {cpus} CPUs per node"


# --- the other RayJobs: prepare before the training, register/evaluate/promote after it -------------

def entrypoint_commands(name: str) -> list[list[str]]:
    """A RayJob's entrypoint (a shell line) as its `&&`-separated commands, each split into words."""
    words = shlex.split(load_docs(K8S / name)[0]["spec"]["entrypoint"])
    commands, current = [], []
    for word in words + ["&&"]:
        if word == "&&":
            commands.append(current)
            current = []
        else:
            current.append(word)
    return commands


def training() -> tuple[str, "object"]:
    """(recipe path, resolved config) of rayjob.yaml's training."""
    words = shlex.split(load_docs(K8S / "rayjob.yaml")[0]["spec"]["entrypoint"])
    recipe = ROOT / Path(words[4]).relative_to(IMAGE_DIR)
    return recipe, load_config(recipe, words[5:])


def recipe_prepare_args(recipe: Path) -> list[str]:
    """The `uniformer prepare` arguments the recipe's header gives."""
    header = "\n".join(line[1:].strip() for line in recipe.read_text().splitlines() if line.startswith("#"))
    command = re.search(r"uniformer prepare (.*?)(?:\n[A-Z]|\Z)", header.replace("\\\n", " "), re.S).group(1)
    return shlex.split(command)


def test_prepare_rayjob_prepares_what_the_training_reads():
    from jobs.prepare import build_parser

    (command,) = entrypoint_commands("rayjob-prepare.yaml")
    assert command[:3] == ["python", "-m", "jobs.prepare"]
    args = build_parser().parse_args(command[3:])  # the real CLI's parser: a bad flag fails here
    recipe, cfg = training()
    assert args.output == cfg.data.manifest and args.output.startswith("s3://")
    official = build_parser().parse_args(recipe_prepare_args(recipe))
    for flag in ("short_side", "frame_stride", "kinetics_layout", "keyframe_interval", "crf"):
        assert getattr(args, flag) == getattr(official, flag), flag  # the recipe's preparation
    assert {a.rsplit("/", 1)[1] for a in args.annotations} == {"train.csv", "val.csv"}  # CVDF's file names
    spec = load_docs(K8S / "rayjob-prepare.yaml")[0]["spec"]["rayClusterSpec"]
    assert [g["groupName"] for g in spec["workerGroupSpecs"]] == ["decode"]  # no GPUs for decoding


def test_promote_rayjob_registers_evaluates_and_promotes_the_training(monkeypatch, capsys):
    """The entrypoint's three commands through the jobs' real CLIs (the MLflow work replaced)."""
    import jobs.evaluate
    import jobs.promote
    import jobs.register

    seen = {}
    monkeypatch.setattr("pipeline.tracking.registry.register",
                        lambda cfg, run, name: seen.setdefault("register", (run, name)) and {})
    monkeypatch.setattr("pipeline.tracking.evaluate.evaluate",
                        lambda cfg, model, manifest, split, log, **kw: seen.setdefault("evaluate", (model, manifest, split))
                        and {})
    monkeypatch.setattr("pipeline.tracking.registry.promote",
                        lambda cfg, name, **kw: seen.setdefault("promote", name) and {"decision": "promoted"})
    mains = {"jobs.register": jobs.register.main, "jobs.evaluate": jobs.evaluate.main, "jobs.promote": jobs.promote.main}
    commands = entrypoint_commands("rayjob-promote.yaml")
    assert [c[2] for c in commands] == ["jobs.register", "jobs.evaluate", "jobs.promote"]
    for command in commands:
        assert command[:2] == ["python", "-m"]
        mains[command[2]](command[3:])
    _, cfg = training()
    name = cfg.tracking.registered_model
    assert seen["register"] == ("RUN_ID", name)  # the walk replaces RUN_ID with the training's run id
    assert seen["evaluate"] == (f"models:/{name}@challenger", cfg.data.manifest, "val")
    assert seen["promote"] == name
    assert load_docs(K8S / "rayjob-promote.yaml")[0]["spec"]["backoffLimit"] == 0  # register is not idempotent
