"""The EKS cluster (infra/eks/cluster.yaml) as eksctl would take it, and as the manifests need it:
the ClusterConfig validates against eksctl v0.230.0's published schema (tests/infra/schemas/), every pod
of infra/k8s/ has a node group of its instance type whose taints it tolerates, the groups the Ray
autoscaler grows start at zero and carry what the Cluster Autoscaler needs to grow them from zero,
the GPU group has EFA in one zone, the IRSA roles match the ServiceAccounts, and the Helm values set
what the walk relies on (infra/eks/helm/)."""

import json
import re
from pathlib import Path

import pytest
import yaml
from jsonschema import validators

from tests.infra.test_manifests import EFA_INTERFACES, K8S, SCHEMAS, k8s_docs, load_docs, pod_templates

ROOT = Path(__file__).resolve().parents[2]
EKS = ROOT / "infra" / "eks"
HELM = EKS / "helm"
EKSCTL_SCHEMA = SCHEMAS / "eksctl-v0.230.0" / "clusterconfig.json"
KUBERNETES_SCHEMAS = "v1.35.0"  # tests/infra/schemas/kubernetes-v1.35.0: the version the cluster runs


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((EKS / "cluster.yaml").read_text())


def groups(cluster: dict) -> dict[str, dict]:
    return {g["name"]: g for g in cluster["managedNodeGroups"]}


def group_instance_types(group: dict) -> list[str]:
    return group.get("instanceTypes") or [group["instanceType"]]


def eksctl_errors(doc: dict) -> list[str]:
    schema = json.loads(EKSCTL_SCHEMA.read_text())
    validator = validators.validator_for(schema)(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(doc)]


def test_cluster_config_passes_eksctls_schema(cluster):
    assert not eksctl_errors(cluster)


def test_the_schema_catches_a_misspelt_field(cluster):
    broken = json.loads(json.dumps(cluster))
    broken["managedNodeGroups"][0]["efaEnable"] = True
    assert any("efaEnable" in e for e in eksctl_errors(broken))


def test_kubernetes_version_is_the_one_the_manifests_are_checked_against(cluster):
    assert f"v{cluster['metadata']['version']}.0" == KUBERNETES_SCHEMAS
    assert (SCHEMAS / f"kubernetes-{KUBERNETES_SCHEMAS}").is_dir()
    # The Cluster Autoscaler's minor version must match the cluster's.
    values = yaml.safe_load((HELM / "cluster-autoscaler.yaml").read_text())
    assert values["image"]["tag"].startswith(f"v{cluster['metadata']['version']}.")


def tolerates(pod: dict, taint: dict) -> bool:
    for t in pod.get("tolerations", []):
        if t.get("key") == taint["key"] and t.get("effect", taint["effect"]) == taint["effect"]:
            if t.get("operator") == "Exists" or t.get("value") == taint.get("value"):
                return True
    return False


@pytest.mark.parametrize("where,meta,pod", pod_templates(), ids=[w for w, _, _ in pod_templates()])
def test_every_pod_has_a_node_group(cluster, where, meta, pod):
    selector = pod.get("nodeSelector", {})
    instance_type = selector.get("node.kubernetes.io/instance-type")
    candidates = [g for g in groups(cluster).values()
                  if (instance_type is None or instance_type in group_instance_types(g))
                  and all(tolerates(pod, t) for t in g.get("taints", []))
                  and (selector.get("eks.amazonaws.com/capacityType") != "SPOT" or g.get("spot"))]
    assert candidates, f"{where}: no node group for instance type {instance_type} whose taints it tolerates"


def test_autoscaled_groups_start_at_zero_and_can_grow_from_it(cluster):
    ng = groups(cluster)
    for name in ("gpu", "decode"):
        group = ng[name]
        assert group["minSize"] == 0 and group["maxSize"] > 0, name
        tags = group.get("tags", {})
        # Auto-discovery by the chart's default tags; the tags reach the ASG only when propagated.
        assert {"k8s.io/cluster-autoscaler/enabled", "k8s.io/cluster-autoscaler/uniformer"} <= set(tags), name
        assert group.get("propagateASGTags") is True, name
    # From zero the autoscaler cannot read a node's EFA devices or spot label; the tags say them.
    gpu_tags, decode_tags = ng["gpu"]["tags"], ng["decode"]["tags"]
    assert gpu_tags["k8s.io/cluster-autoscaler/node-template/resources/vpc.amazonaws.com/efa"] == \
        str(EFA_INTERFACES[ng["gpu"]["instanceType"]])
    assert decode_tags["k8s.io/cluster-autoscaler/node-template/label/eks.amazonaws.com/capacityType"] == "SPOT"
    assert cluster["metadata"]["name"] in yaml.safe_load((HELM / "cluster-autoscaler.yaml").read_text())[
        "autoDiscovery"]["clusterName"]


def test_node_groups_hold_the_ray_groups_at_their_largest(cluster):
    ng = groups(cluster)
    for path in sorted(K8S.glob("ray*.yaml")):
        doc = load_docs(path)[0]
        spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        for group in spec["workerGroupSpecs"]:
            assert group["maxReplicas"] <= ng[group["groupName"]]["maxSize"], (path.name, group["groupName"])


def test_gpu_group_has_efa_in_one_zone(cluster):
    gpu = groups(cluster)["gpu"]
    assert gpu["efaEnabled"] is True
    # eksctl refuses EFA across zones; with no `placement` it makes a cluster placement group itself.
    assert len(gpu["availabilityZones"]) == 1 and gpu["availabilityZones"][0] in cluster["availabilityZones"]
    assert "placement" not in gpu or gpu["placement"].get("groupName")
    assert gpu["instanceType"] in EFA_INTERFACES
    assert gpu.get("amiFamily", "AmazonLinux2023") == "AmazonLinux2023"  # EKS's NVIDIA AMI: driver on the node


def test_nodes_can_pull_from_ecr(cluster):
    for group in cluster["managedNodeGroups"]:
        assert "arn:aws:iam::aws:policy/AmazonEC2ContainerRegistryReadOnly" in group["iam"]["attachPolicyARNs"], \
            group["name"]


def test_irsa_roles_match_the_service_accounts(cluster):
    """Every ServiceAccount annotated with a role has that role made by eksctl, trusted for exactly that
    namespace/name, with a policy the walk creates from a file in infra/eks/iam/."""
    roles = {(sa["metadata"]["namespace"], sa["metadata"]["name"]): sa for sa in cluster["iam"]["serviceAccounts"]}
    annotated = [d for _, d in k8s_docs() if d["kind"] == "ServiceAccount"
                 and "eks.amazonaws.com/role-arn" in d["metadata"].get("annotations", {})]
    assert {d["metadata"]["name"] for d in annotated} == {"uniformer-ray", "mlflow"}
    for account in annotated:
        role = roles[("uniformer", account["metadata"]["name"])]
        assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith(f":role/{role['roleName']}")
        assert role["roleOnly"] is True  # the ServiceAccount itself comes from the manifest
        for arn in role["attachPolicyARNs"]:
            name = arn.rsplit("/", 1)[1]
            assert (EKS / "iam" / f"{name.removeprefix('uniformer-')}-policy.json").exists(), name
    assert cluster["iam"]["withOIDC"] is True
    assert roles[("kube-system", "cluster-autoscaler")]["wellKnownPolicies"] == {"autoScaler": True}
    autoscaler = yaml.safe_load((HELM / "cluster-autoscaler.yaml").read_text())["rbac"]["serviceAccount"]
    assert autoscaler == {"create": False, "name": "cluster-autoscaler"}


def statements(policy: dict) -> list[dict]:
    return policy["Statement"]


def test_s3_policies():
    ray = json.loads((EKS / "iam" / "ray-s3-policy.json").read_text())
    mlflow = json.loads((EKS / "iam" / "mlflow-s3-policy.json").read_text())
    ray_resources = {r for s in statements(ray) for r in ([s["Resource"]] if isinstance(s["Resource"], str)
                                                          else s["Resource"])}
    assert ray_resources == {"arn:aws:s3:::BUCKET", "arn:aws:s3:::BUCKET/*"}
    objects = next(s for s in statements(mlflow) if "s3:PutObject" in s["Action"])
    assert objects["Resource"] == "arn:aws:s3:::BUCKET/mlflow/*"  # MLflow's artifacts, nothing else
    mlflow_yaml = (K8S / "mlflow.yaml").read_text()
    assert "--artifacts-destination s3://BUCKET/mlflow" in mlflow_yaml
    for policy in (ray, mlflow):
        assert not [s for s in statements(policy) if s["Effect"] != "Allow" or s["Action"] == "*"]


def test_ebs_csi_driver_and_the_storage_class_redis_claims(cluster):
    addons = {a["name"]: a for a in cluster["addons"]}
    assert addons["aws-ebs-csi-driver"]["wellKnownPolicies"] == {"ebsCSIController": True}
    classes = {d["metadata"]["name"]: d for _, d in k8s_docs() if d["kind"] == "StorageClass"}
    claims = [d for _, d in k8s_docs() if d["kind"] == "PersistentVolumeClaim"]
    assert claims
    for claim in claims:
        storage_class = classes[claim["spec"]["storageClassName"]]
        assert storage_class["provisioner"] == "ebs.csi.aws.com" and storage_class["parameters"]["type"] == "gp3"
        assert storage_class["volumeBindingMode"] == "WaitForFirstConsumer"


def test_no_gpu_operator_but_the_metrics_exporter():
    """EKS's NVIDIA AMI has the driver and container toolkit; eksctl installs the device plugin. The
    exporter runs on the GPU nodes (tolerating their taint) and is scraped by kube-prometheus-stack."""
    values = yaml.safe_load((HELM / "dcgm-exporter.yaml").read_text())
    gpu_pod = next(pod for where, _, pod in pod_templates() if where == "rayjob.yaml:RayJob/uniformer-train-k400-s16x4:gpu")
    assert values["nodeSelector"] == {"node.kubernetes.io/instance-type":
                                      gpu_pod["nodeSelector"]["node.kubernetes.io/instance-type"]}
    assert all(tolerates(values, taint) for taint in
               next(g for g in yaml.safe_load((EKS / "cluster.yaml").read_text())["managedNodeGroups"]
                    if g["name"] == "gpu")["taints"])
    assert values["serviceMonitor"]["enabled"] is True
    assert values["serviceMonitor"]["additionalLabels"]["release"] == "prometheus"
    assert not list(HELM.glob("gpu-operator*"))


def test_grafana_can_be_embedded_in_the_ray_dashboard():
    grafana = yaml.safe_load((HELM / "kube-prometheus-stack.yaml").read_text())["grafana"]
    ini = grafana["grafana.ini"]
    assert ini["security"]["allow_embedding"] is True
    assert ini["auth.anonymous"] == {"enabled": True, "org_role": "Viewer"}
    dashboards = grafana["sidecar"]["dashboards"]
    script = (K8S / "grafana-dashboards.sh").read_text()
    assert dashboards["enabled"] is True and f"{dashboards['label']}={dashboards['labelValue']}" in script
    # The head's iframe address is the Grafana port-forward the walk opens.
    head_env = {e["name"]: e.get("value") for e in next(
        pod for where, _, pod in pod_templates() if where.endswith(":head") and "rayjob.yaml" in where)
        ["containers"][0]["env"]}
    assert head_env["RAY_GRAFANA_HOST"].startswith("http://prometheus-grafana.prometheus-system.svc")
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", head_env["RAY_GRAFANA_IFRAME_HOST"])
