"""A trained classifier over the videos of a manifest, at cluster scale: the prediction table.

Decoding runs in Ray Data CPU tasks (`pipeline.data.clips.view_dataset`: `test_clips` x `test_crops`
views per video). The network runs in an actor pool: one actor per GPU of the cluster, or
`data.inference_cpu_actors` actors on CPU when it has none. Each actor builds the network once from
weights put in the object store once (read back with `weights_only=True`) and returns, per view, its
softmax scores; the driver sums them per video (a few floats per view), so it needs no GPU. Every
manifest row of the split becomes one row of the prediction table (`pipeline.tracking.predictions`),
unusable ones with a status and a reason.

The model is `runs:/RUN_ID/video_classifier`, `models:/NAME@alias`, `models:/NAME/VERSION`, a
downloaded model folder, a training checkpoint (a folder with checkpoint.pt, or the file), or an official
checkpoint (a bare state dict, `uniformer_small_k400_16x4.pth`): that one is run under the official test
protocol of the dataset it was trained on (`pipeline.data.official`: which dataset, its views, frames and
label list), and its head answers in the manifest's label order (`align_to_manifest`).
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import Config, DataConfig, config_from_dict
from pipeline.tracking.datasets import labels_from_manifest
from pipeline.tracking.predictions import TOP_K, EvidenceKey, prediction_table, to_parquet_bytes
from pipeline.tracking.runs import client_for

# Data settings that belong to the model (how it was trained); a value set on the command line or
# in the config file (one that differs from the default) still wins.
MODEL_DATA_KEYS = ("sampling", "num_frames", "sampling_rate", "short_side", "crop_size", "mean", "std",
                   "test_clips", "test_crops")


class InferenceError(ValueError):
    """The model and the data cannot be run together; the message says why."""


@dataclass
class LoadedModel:
    state_dict: dict  # the network's weights as trained (BatchNorms not folded)
    preprocess: dict[str, Any]
    labels: list[str] | None  # None: take the names from the manifest (checkpoints carry none)
    source_run_id: str | None  # the training run, when known
    model_uri: str
    model_id: str | None = None  # the MLflow logged model, when known
    official: str | None = None  # an official checkpoint: the dataset it was trained on
    published_top1: float | None = None  # an official checkpoint: the official README's top-1, in %


def version_model_id(version) -> str | None:
    """The logged model of a registry version: MLflow 3.17 stores it but does not read `model_id` back,
    while the source of a version made from a logged model is `models:/<model_id>`."""
    if version.model_id:
        return version.model_id
    source = version.source or ""
    return source[len("models:/"):].split("/", 1)[0] if source.startswith("models:/m-") else None


def _model_source(client, model_uri: str) -> tuple[str | None, str | None]:
    """(training run id, logged model id) of an MLflow model URI, each None when unknown. The model id
    is what promotion looks evaluations up by: a run has two logged models and many checkpoints."""
    try:
        if model_uri.startswith("runs:/"):
            run_id, _, name = model_uri[len("runs:/"):].partition("/")
            run = client.get_run(run_id)
            found = client.search_logged_models([run.info.experiment_id], filter_string=(
                f"source_run_id = '{run_id}' AND name = '{name.strip('/')}'"))
            return run_id, max(found, key=lambda m: m.creation_timestamp).model_id if found else None
        ref = model_uri[len("models:/"):]
        if ref.startswith("m-"):
            model = client.get_logged_model(ref.split("/", 1)[0])
            return model.source_run_id, model.model_id
        name, sep, alias = ref.partition("@")
        if sep:
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = ref.partition("/")
            version = client.get_model_version(name, number)
        return version.run_id, version_model_id(version)
    except Exception:  # noqa: BLE001 - the link is informative; the evaluation goes on without it
        return None, None


def load_model(cfg: Config, model_uri: str, *, dataset: str = "") -> LoadedModel:
    """The weights and preprocessing of an MLflow model URI, a model folder or a checkpoint (`dataset`: what an
    official checkpoint was trained on, when its name and head do not say; see `pipeline.data.official`)."""
    import mlflow.artifacts
    import torch

    from pipeline.data import storage
    from pipeline.tracking import serving

    if model_uri.startswith(("runs:/", "models:/")):
        client = client_for(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp,
                                                        tracking_uri=client.tracking_uri)
            preprocess, labels, state = serving.read_bundle(local)
        run_id, model_id = _model_source(client, model_uri)
        return LoadedModel(state, preprocess, labels, run_id, model_uri, model_id)
    if not storage.is_s3(model_uri) and (Path(storage.local_path(model_uri)) / "MLmodel").is_file():
        preprocess, labels, state = serving.read_bundle(storage.local_path(model_uri))
        return LoadedModel(state, preprocess, labels, None, model_uri)
    target = model_uri if model_uri.endswith((".pt", ".pth")) else storage.join(model_uri, "checkpoint.pt")
    try:  # tensors and plain containers only: a checkpoint is data, and loading it must not run pickled code
        state = torch.load(io.BytesIO(storage.read_bytes(target, storage=cfg.storage)), map_location="cpu",
                           weights_only=True)
    except pickle.UnpicklingError as err:
        raise InferenceError(f"{target} holds objects other than tensors and plain values, which would run "
                             f"code when unpickled ({(str(err).splitlines() or [''])[0][:200]}); save the "
                             "checkpoint's state dicts and config as plain data") from None
    if not isinstance(state, dict) or "config" not in state or "model_state" not in state:
        return official_model(target, state, dataset)
    trained = config_from_dict(state["config"])
    return LoadedModel(state.get("ema_state") or state["model_state"], serving.preprocess_config(trained),
                       training_labels(dataclasses.replace(trained, storage=cfg.storage)), state.get("mlflow_run_id"),
                       model_uri)


def training_labels(trained: Config) -> list[str] | None:
    """The class names of a training checkpoint: its data's labels.json, when it can still be read (else None:
    the evaluated manifest's names are used)."""
    from pipeline.data.storage import StorageError
    from pipeline.tracking.datasets import manifest_labels

    try:
        names = manifest_labels(trained.data.manifest, trained.storage) if trained.data.manifest else None
    except (StorageError, ValueError):
        return None
    n = trained.model.num_classes
    return None if names is None or len(names) > n else names + [f"class_{i}" for i in range(len(names), n)]


def variant_of(state: dict, uri: str) -> str:
    """The variant whose state dict has exactly the keys and shapes of `state` (its head aside)."""
    import torch

    from model import create_uniformer, list_variants

    shapes = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("head.")}
    for name in list_variants():
        with torch.device("meta"):  # shapes only, no memory
            reference = create_uniformer(name, num_classes=1).state_dict()
        if {k: tuple(v.shape) for k, v in reference.items() if not k.startswith("head.")} == shapes:
            return name
    raise InferenceError(f"{uri}: its keys and shapes are those of no UniFormer variant ({', '.join(list_variants())})")


def official_model(uri: str, obj: Any, dataset: str = "") -> LoadedModel:
    """An official checkpoint (a bare state dict) with the test-time input of its dataset's official protocol
    and the dataset's class list; frames and sampling stride from its name (16 and 4 when it says none)."""
    from model import unwrap_state_dict
    from pipeline.data import official

    try:
        state = unwrap_state_dict(obj)
        trained_on = official.checkpoint_dataset(uri, official.head_classes(state), dataset, setting="--dataset")
    except ValueError as err:  # LabelMapError included
        raise InferenceError(f"{uri} is neither a training checkpoint (config, model_state) nor an official one: "
                             f"{err}") from None
    if trained_on not in official.DATASETS:
        raise InferenceError(f"{uri} was not trained on an official video dataset ({trained_on}); name the one it was "
                             f"trained on with --dataset ({', '.join(official.DATASETS)})")
    name = official.parse_checkpoint_name(uri)
    variant = variant_of(state, uri)
    if name.variant and name.variant != variant:
        raise InferenceError(f"{uri}: its name says {name.variant}, its weights are {variant}'s")
    frames, rate = name.num_frames or 16, name.sampling_rate or 4
    preprocess = official.official_preprocess(trained_on, variant=variant, num_frames=frames, sampling_rate=rate)
    return LoadedModel(state, preprocess, official.class_list(trained_on), None, uri, official=trained_on,
                       published_top1=official.published_top1(trained_on, variant, frames, sampling_rate=rate,
                                                              pretrained=name.pretrained))


def align_to_manifest(cfg: Config, model: LoadedModel, manifest_uri: str, manifest: pa.Table) -> str:
    """An official checkpoint against the manifest's labels (its labels.json, else its rows' names): "official"
    when they are the checkpoint's list, "reordered" when the same names come in another order (the head's rows
    then follow the manifest's order), InferenceError naming the first differing index otherwise. "" for
    other models, whose labels travel with them."""
    import sys

    from pipeline.data import official
    from pipeline.tracking.datasets import manifest_labels

    if not model.official:
        return ""
    labels = manifest_labels(manifest_uri, cfg.storage) or labels_from_manifest(
        manifest, int(model.preprocess["num_classes"]))
    try:
        order = official.label_order(labels, model.official, what=f"the manifest {manifest_uri}", fix="")
    except official.LabelMapError as err:
        raise InferenceError(str(err)) from None
    if order is None:
        return "official"
    model.state_dict, model.labels = official.reorder_head(model.state_dict, order), list(labels)
    moved = sum(1 for j, i in enumerate(order) if i != j)
    print(f"{model.model_uri}: the manifest lists the {official.DATASETS[model.official].title} classes in another "
          f"order: the checkpoint's head was reordered to match ({moved} of {len(order)} classes moved)",
          file=sys.stderr, flush=True)
    return "reordered"


def eval_data_config(cfg: Config, preprocess: dict[str, Any], views: tuple[int, int] | None = None) -> DataConfig:
    """The model's preprocessing, with the data settings the user set explicitly on top."""
    default = DataConfig()
    model_values = {k: tuple(preprocess[k]) if isinstance(preprocess[k], list) else preprocess[k]
                    for k in MODEL_DATA_KEYS if k in preprocess}
    chosen = {k: v for k, v in model_values.items() if getattr(cfg.data, k) == getattr(default, k)}
    data = dataclasses.replace(cfg.data, **chosen)
    if views is not None:
        data = dataclasses.replace(data, test_clips=views[0], test_crops=views[1])
    return data


def class_names(model: LoadedModel, manifest: pa.Table) -> list[str]:
    return model.labels or labels_from_manifest(manifest, int(model.preprocess["num_classes"]))


def _check_labels(rows: pa.Table, labels: list[str]) -> None:
    for label, name in zip(rows.column("label").to_pylist(), rows.column("label_name").to_pylist()):
        if not 0 <= label < len(labels):
            raise InferenceError(f"the manifest has label {label} ({name!r}) but the model has {len(labels)} "
                                 "classes; use data prepared with the model's labels.json")
        if name and labels[label] != name:
            raise InferenceError(f"the manifest calls class {label} {name!r} but the model calls it "
                                 f"{labels[label]!r}; use data prepared with the model's labels.json")


# ---------------------------------------------------------------------------------------------
# The network in an actor pool


class ViewScorer:
    """One inference actor: the network on its device, built once; a batch of views in, per view its
    softmax scores out (zeros for the views of unusable videos, which are not run)."""

    def __init__(self, weights, preprocess: dict[str, Any], mean: tuple[float, ...], std: tuple[float, ...]):
        import ray
        import torch

        from pipeline.tracking.serving import build_model

        state = torch.load(io.BytesIO(ray.get(weights)), map_location="cpu", weights_only=True)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net = build_model(preprocess, state, inference=True).to(self.device)
        self.num_classes = int(preprocess["num_classes"])
        self.mean, self.std = mean, std

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline.tracking.serving import view_probabilities

        valid = np.asarray(batch["valid"], dtype=bool)
        probs = np.zeros((len(valid), self.num_classes), np.float32)
        if valid.any():
            probs[valid] = view_probabilities(self.net, batch["clip"][valid], mean=self.mean, std=self.std,
                                              device=self.device).cpu().numpy()
        return {"video_id": batch["video_id"], "view": batch["view"], "valid": valid, "label": batch["label"],
                "probs": probs}


def actor_pool(data: DataConfig) -> dict[str, Any]:
    """`map_batches` arguments of the inference actors: one per GPU the cluster has now, else
    `data.inference_cpu_actors` on CPU; each reserves `data.inference_actor_cpus`. Refuses a pool that
    leaves no room for a decode task: the actors would wait for views forever."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    actors = gpus or data.inference_cpu_actors
    needed = actors * data.inference_actor_cpus + data.decode_cpus
    if needed > resources.get("CPU", 0):
        raise InferenceError(f"{actors} inference actor(s) of data.inference_actor_cpus={data.inference_actor_cpus} "
                             f"and a decode task of data.decode_cpus={data.decode_cpus} need {needed:g} CPUs; the "
                             f"cluster has {resources.get('CPU', 0):g}: lower data.inference_actor_cpus, "
                             "data.inference_cpu_actors or data.decode_cpus")
    pool = {"compute": ray.data.ActorPoolStrategy(size=actors), "num_cpus": data.inference_actor_cpus}
    return {**pool, "num_gpus": 1} if gpus else pool


def score_videos(cfg: Config, model: LoadedModel, manifest: pa.Table, *, split: str | None,
                 data: DataConfig) -> dict[int, dict]:
    """{video_id: {"scores": softmax summed over the video's decoded views (C,), "views": n}} for every row
    of `split` (of the manifest when None) with at least one decodable view; `video_id` is the row's
    position in `manifest`."""
    import ray
    import torch

    from pipeline.cluster.connect import init_ray
    from pipeline.data.clips import view_dataset

    init_ray()
    # Positions, as the prediction table numbers its rows (a manifest's `index` column should agree).
    rows = manifest.append_column("video_id", pa.array(np.arange(manifest.num_rows, dtype=np.int64)))
    buf = io.BytesIO()
    torch.save(model.state_dict, buf)
    weights = ray.put(buf.getvalue())  # once in the object store, whatever the number of actors
    scored = view_dataset(rows, split=split, data=data, storage=cfg.storage).map_batches(
        ViewScorer, batch_size=data.inference_batch_size, batch_format="numpy",
        fn_constructor_kwargs={"weights": weights, "preprocess": model.preprocess, "mean": data.mean,
                               "std": data.std}, **actor_pool(data))
    videos: dict[int, dict] = {}
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        for video_id, valid, probs in zip(batch["video_id"].tolist(), batch["valid"], batch["probs"]):
            if valid:
                entry = videos.setdefault(video_id, {"scores": np.zeros(len(probs), np.float64), "views": 0})
                entry["scores"] += probs
                entry["views"] += 1
    return videos


def run_inference(cfg: Config, model: LoadedModel, manifest: pa.Table, *, split: str | None, data: DataConfig,
                  top_k: int = TOP_K) -> pa.Table:
    """The prediction table of `split` (of every row when None): one row per manifest row."""
    from pipeline.data.manifest import manifest_hash

    splits = manifest.column("split").to_pylist()
    in_split = np.asarray([split is None or s == split for s in splits], dtype=bool)
    if not in_split.any():
        raise InferenceError(f"the manifest has no {split!r} rows; splits: {', '.join(sorted(set(splits) - {None}))}"
                             if split is not None else "the manifest has no rows")
    labels = class_names(model, manifest)
    ok = in_split & np.asarray([s == "ok" for s in manifest.column("status").to_pylist()], dtype=bool)
    _check_labels(manifest.filter(ok), labels)
    videos = score_videos(cfg, model, manifest, split=split, data=data)
    key = EvidenceKey(manifest_hash(manifest), split, data.test_clips, data.test_crops)
    return prediction_table(manifest, videos, key=key, labels=labels, top_k=top_k)


def predict_manifest(cfg: Config, model_uri: str, manifest_uri: str, output_uri: str, *, split: str | None = None,
                     top_k: int = TOP_K) -> dict[str, Any]:
    """`uniformer predict --manifest`: the prediction table of `split` (every split when None) written as
    Parquet to `output_uri` (local or s3://); returns the job's summary."""
    from pipeline.data import storage
    from pipeline.data.manifest import read_manifest

    t0 = time.perf_counter()
    manifest = read_manifest(manifest_uri, storage=cfg.storage)
    model = load_model(cfg, model_uri)
    align_to_manifest(cfg, model, manifest_uri, manifest)
    data = eval_data_config(cfg, model.preprocess)
    table = run_inference(cfg, model, manifest, split=split, data=data, top_k=top_k)
    storage.write_bytes(output_uri, to_parquet_bytes(table), storage=cfg.storage)
    statuses = Counter(table.column("status").to_pylist())
    return {"model_uri": model_uri, "manifest": manifest_uri, "output": output_uri, "split": split,
            "videos": table.num_rows, "ok": statuses["ok"], "unusable": table.num_rows - statuses["ok"],
            "statuses": dict(statuses), "test_clips": data.test_clips, "test_crops": data.test_crops,
            "seconds": round(time.perf_counter() - t0, 1)}
