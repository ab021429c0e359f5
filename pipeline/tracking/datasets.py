"""The dataset of a run: the manifest's name, params and counts, its labels, and the manifest as an
MLflow dataset input (the Datasets tab)."""

from __future__ import annotations

import warnings
from typing import Any

from mlflow.entities import DatasetInput, InputTag
from mlflow.tracking import MlflowClient

from pipeline.config import Config
from pipeline.tracking.redaction import redact


def dataset_name(manifest_uri: str) -> str:
    """A short name for the dataset: the prepared folder's name."""
    path = manifest_uri.rstrip("/")
    if path.endswith(".parquet"):
        path = path.rsplit("/", 1)[0] if "/" in path else ""
    return path.rsplit("/", 1)[-1] or "dataset"


def manifest_file_uri(manifest_uri: str) -> str:
    return manifest_uri if manifest_uri.endswith(".parquet") else manifest_uri.rstrip("/") + "/manifest.parquet"


def manifest_params(manifest_uri: str, table) -> dict[str, Any]:
    """`data.manifest_hash`, `data.manifest_uri`, `data.count.<split>.<status>` and `data.rows`."""
    from collections import Counter

    from pipeline.data.manifest import manifest_hash

    counts = Counter(zip(table.column("split").to_pylist(), table.column("status").to_pylist()))
    params: dict[str, Any] = {"data.manifest_uri": manifest_file_uri(manifest_uri),
                              "data.manifest_hash": manifest_hash(table), "data.rows": table.num_rows}
    params.update({f"data.count.{split}.{status}": n for (split, status), n in sorted(counts.items())})
    return params


def labels_from_manifest(table, num_classes: int) -> list[str]:
    """Class names in index order from the manifest's `label` / `label_name` columns (`class_<i>` when unseen)."""
    names = [f"class_{i}" for i in range(num_classes)]
    for label, name in zip(table.column("label").to_pylist(), table.column("label_name").to_pylist()):
        if label is not None and 0 <= label < num_classes and name:
            names[label] = name
    return names


def manifest_labels(manifest_uri: str, storage_config) -> list[str] | None:
    """The class names of a prepared dataset in index order: its `labels.json` (what `prepare` writes beside
    the manifest), or None when it has none."""
    from pipeline.data import storage
    from pipeline.data.annotations import read_labels

    uri = manifest_file_uri(manifest_uri)
    labels_uri = uri.rsplit("/", 1)[0] + "/labels.json" if "/" in uri else "labels.json"
    return read_labels(labels_uri, storage=storage_config) if storage.exists(labels_uri, storage=storage_config) \
        else None


def dataset_labels(cfg: Config, manifest=None) -> list[str]:
    """The class names of `cfg.data.manifest`: `labels.json` beside it (what `prepare` writes), else the
    manifest's own label names; padded to `model.num_classes` when the data has fewer classes."""
    n = cfg.model.num_classes
    names = manifest_labels(cfg.data.manifest, cfg.storage)
    if names is not None:
        labels_uri = manifest_file_uri(cfg.data.manifest).rsplit("/", 1)[0] + "/labels.json"
        if len(names) > n:
            raise ValueError(f"{labels_uri} names {len(names)} classes but model.num_classes={n}; set "
                             f"model.num_classes={len(names)}")
        return names + [f"class_{i}" for i in range(len(names), n)]
    if manifest is None:
        from pipeline.data.manifest import read_manifest

        manifest = read_manifest(cfg.data.manifest, storage=cfg.storage)
    return labels_from_manifest(manifest, n)


def log_dataset_input(client: MlflowClient, run_id: str, table, *, manifest_uri: str, digest: str,
                      context: str, name: str | None = None) -> None:
    """The manifest as a run input (MLflow's Datasets tab), its source the manifest's URI; `name`
    defaults to the dataset's folder name."""
    import mlflow.data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # schema hints and "source interpreted in multiple ways"
        dataset = mlflow.data.from_pandas(table.to_pandas(), source=redact(manifest_file_uri(manifest_uri)),
                                          name=name or dataset_name(manifest_uri), targets="label",
                                         digest=digest[:16])
        entity = dataset._to_mlflow_entity()
    client.log_inputs(run_id, [DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])])

