"""How the schema files beside this script were made (run by hand, not by the tests).

    python tests/infra/schemas/make_schemas.py KUBERAY_CHECKOUT KUBERNETES_VALIDATE_WHEEL PROM_OPERATOR_CHECKOUT \
        EKSCTL_CHECKOUT

- kuberay-v1.6.0/*.json: the `v1` openAPIV3Schema of ray-operator/config/crd/bases/ray.io_rayclusters.yaml
  and ray.io_rayjobs.yaml at KubeRay tag v1.6.0 (the first release with `authOptions.secretName`),
  without descriptions and without `status` (what the API server validates on apply).
- prometheus-operator-v0.93.0/*.json: the same for monitoring.coreos.com PodMonitor and ServiceMonitor
  (example/prometheus-operator-crd/ at prometheus-operator tag v0.93.0; kube-prometheus-stack installs them).
- kubernetes-v1.35.0/*.json: the "local-strict" JSON schemas of Kubernetes v1.35.0 as shipped in the
  PyPI package kubernetes-validate 1.37.0, each made self-contained (only the definitions it
  reaches), without descriptions.
- eksctl-v0.230.0/clusterconfig.json: eksctl's published JSON schema of its ClusterConfig file
  (pkg/apis/eksctl.io/v1alpha5/assets/schema.json at tag v0.230.0 of github.com/eksctl-io/eksctl,
  draft-07, what `eksctl utils schema` prints), without its description strings.
"""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

HERE = Path(__file__).parent
KUBERAY_TAG = "v1.6.0"
K8S_VERSION = "v1.35.0"
PROM_TAG = "v0.93.0"
EKSCTL_TAG = "v0.230.0"
K8S_KINDS = ["serviceaccount-v1", "service-v1", "configmap-v1", "persistentvolumeclaim-v1",
             "deployment-apps-v1", "poddisruptionbudget-policy-v1", "storageclass-storage-v1"]


def strip(node):
    """Without documentation strings (a property that is itself called "description" stays)."""
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items()
                if not (k in ("description", "x-intellij-html-description") and isinstance(v, str))}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def write(path: Path, schema: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")


def crd_schema(checkout: Path, tag: str, path: str) -> dict:
    text = subprocess.run(["git", "-C", str(checkout), "show", f"{tag}:{path}"],
                          check=True, capture_output=True, text=True).stdout
    crd = yaml.safe_load(text)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = strip(version["schema"]["openAPIV3Schema"])
    schema["properties"].pop("status", None)
    return schema


def kuberay(checkout: Path) -> None:
    for plural, name in (("rayclusters", "raycluster"), ("rayjobs", "rayjob")):
        schema = crd_schema(checkout, KUBERAY_TAG, f"ray-operator/config/crd/bases/ray.io_{plural}.yaml")
        write(HERE / f"kuberay-{KUBERAY_TAG}" / f"{name}.json", schema)


def prometheus_operator(checkout: Path) -> None:
    for plural, name in (("podmonitors", "podmonitor"), ("servicemonitors", "servicemonitor")):
        schema = crd_schema(checkout, PROM_TAG, f"example/prometheus-operator-crd/monitoring.coreos.com_{plural}.yaml")
        write(HERE / f"prometheus-operator-{PROM_TAG}" / f"{name}.json", schema)


def kubernetes(wheel: Path) -> None:
    prefix = f"kubernetes_validate/kubernetes-json-schema/{K8S_VERSION}-local-strict/"
    with zipfile.ZipFile(wheel) as zf:
        defs = json.loads(zf.read(prefix + "_definitions.json"))["$defs"]
        for kind in K8S_KINDS:
            schema = json.loads(zf.read(prefix + kind + ".json"))
            needed, todo = {}, [schema]
            while todo:  # collect the definitions this kind reaches, rewriting refs to local ones
                node = todo.pop()
                stack = [node]
                while stack:
                    item = stack.pop()
                    if isinstance(item, dict):
                        ref = item.get("$ref")
                        if isinstance(ref, str) and "#/$defs/" in ref:
                            name = ref.split("#/$defs/")[1]
                            item["$ref"] = "#/$defs/" + name
                            if name not in needed:
                                needed[name] = defs[name]
                                todo.append(defs[name])
                        stack.extend(item.values())
                    elif isinstance(item, list):
                        stack.extend(item)
            schema = strip(schema)
            schema["$defs"] = strip(needed)
            write(HERE / f"kubernetes-{K8S_VERSION}" / f"{kind}.json", schema)


def eksctl(checkout: Path) -> None:
    text = subprocess.run(["git", "-C", str(checkout), "show",
                           f"{EKSCTL_TAG}:pkg/apis/eksctl.io/v1alpha5/assets/schema.json"],
                          check=True, capture_output=True, text=True).stdout
    write(HERE / f"eksctl-{EKSCTL_TAG}" / "clusterconfig.json", strip(json.loads(text)))


if __name__ == "__main__":
    kuberay(Path(sys.argv[1]))
    kubernetes(Path(sys.argv[2]))
    prometheus_operator(Path(sys.argv[3]))
    eksctl(Path(sys.argv[4]))
