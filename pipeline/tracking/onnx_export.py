"""`uniformer export --format onnx`: the network as an ONNX graph for servers outside Python (ONNX
Runtime, TensorRT, Triton Inference Server), checked against the PyTorch model it came from.

    result = export_onnx(cfg, "models:/uniformer@champion", videos=["a.mp4"])   # jobs/export.py
    export_network(net, clip_shape, "model.onnx")                                # also `bench model --onnx`

What is exported: the model's network as the classifier serves it (`serving.build_model(...,
inference=True)`: eval mode, every BatchNorm folded into the layer after it), with PyTorch's depthwise
convolutions (`F.conv3d`; the Triton kernels of `model.dwconv3d` are CUDA-only custom ops that no
exporter knows) in the model's token-major layout, through `torch.onnx.export(dynamo=True)`
(torch.export, then onnxscript). Input `clips`: float32 (batch, 3, T, crop, crop), RGB, normalised
((pixel / 255 - mean) / std); output `logits`: (batch, num_classes). The batch axis is dynamic; the
clip shape is the training's (frames and crop size), fixed.

The check (`parity`): ONNX Runtime (CPU) against the PyTorch network before folding, in fp32, on
random normal clips and on the test views of real decoded videos normalised as the server does.
Recorded: the largest logit difference, its bound (`atol` x max(1, largest |logit|)) and top-1
agreement; it passes when the difference is within the bound and every view's top-1 agrees.

Logged (when it passes) in the run of the registered version it came from, under `onnx/`:
`model.onnx` (the preprocessing and labels also in its metadata_props), `preprocess.json` (what a
server must do to a video: frames, sampling, sampling rate, short side, crop, views, mean/std, the
input and output tensors, label names), `labels.json` and `parity.json`; the version gets tags
`onnx.uri`, `onnx.max_abs_logit_diff`, `onnx.top1_agreement`.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

INPUT, OUTPUT = "clips", "logits"
ARTIFACT_DIR = "onnx"
OPSET = 18


class ExportError(RuntimeError):
    """The model cannot be exported or failed its check; the message says why."""


def export_network(net: torch.nn.Module, clip_shape: tuple[int, int, int, int], path: str | Path, *,
                   metadata: dict[str, str] | None = None, opset: int = OPSET) -> Path:
    """Export `net` (eval; a UniFormer, folded or not) for clips of `clip_shape` (3, T, H, W) with a
    dynamic batch axis to `path` (one file); `metadata` goes to the graph's metadata_props."""
    import onnx

    from model.dwconv3d import set_depthwise_impl

    net = net.eval()
    set_depthwise_impl(net, "torch")  # the exportable path (F.conv3d), whatever device the model was on
    example = torch.zeros(2, *clip_shape)
    batch = torch.export.Dim("batch", min=1, max=4096)
    path = Path(path)
    # The exporter prints its progress on stdout, where a job's last line must be its JSON.
    with contextlib.redirect_stdout(sys.stderr), torch.no_grad():
        program = torch.onnx.export(net, (example,), input_names=[INPUT], output_names=[OUTPUT], dynamo=True,
                                    dynamic_shapes=({0: batch},), opset_version=opset)
    program.save(str(path))
    if metadata:
        graph = onnx.load(str(path))
        for key, value in metadata.items():
            graph.metadata_props.add(key=key, value=value)
        onnx.save(graph, str(path))
    return path


def ort_session(path: str | Path, *, threads: int | None = None):
    """An ONNX Runtime CPU session of `path` with `threads` intra-op threads (default: torch's count)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare_logits(reference: np.ndarray, exported: np.ndarray) -> dict[str, Any]:
    """Largest |difference| of two (N, classes) logit arrays, the largest |logit| and top-1 agreement."""
    return {"views": int(reference.shape[0]), "max_abs_logit_diff": float(np.abs(reference - exported).max()),
            "max_abs_logit": float(np.abs(reference).max()),
            "top1_agreement": float((reference.argmax(1) == exported.argmax(1)).mean())}


def parity(net: torch.nn.Module, session, clips: dict[str, np.ndarray], *, atol: float = 1e-4,
           batch: int = 4) -> dict[str, Any]:
    """`session` against `net` (fp32, eval) on each named set of normalised clips (N, 3, T, H, W); a set
    named `decoded` must also agree on every top-1. Batches of `batch` (the graph's batch is dynamic)."""
    net = net.eval()
    out: dict[str, Any] = {"atol": atol}
    passed = True
    for name, data in clips.items():
        ref, got = [], []
        for start in range(0, len(data), batch):
            chunk = np.ascontiguousarray(data[start:start + batch], dtype=np.float32)
            with torch.no_grad():
                ref.append(net(torch.from_numpy(chunk)).float().numpy())
            got.append(session.run([OUTPUT], {INPUT: chunk})[0])
        result = compare_logits(np.concatenate(ref), np.concatenate(got))
        result["bound"] = atol * max(1.0, result["max_abs_logit"])
        result["passed"] = result["max_abs_logit_diff"] <= result["bound"] and (
            name != "decoded" or result["top1_agreement"] == 1.0)
        passed &= result["passed"]
        out[name] = result
    out["passed"] = passed
    return out


def random_clips(preprocess: dict[str, Any], count: int, seed: int = 0) -> np.ndarray:
    t, crop = int(preprocess["num_frames"]), int(preprocess["crop_size"])
    return np.random.default_rng(seed).standard_normal((count, 3, t, crop, crop), dtype=np.float32)


def decoded_clips(preprocess: dict[str, Any], videos: Sequence[tuple[Any, int]], *, max_views: int = 16,
                  storage=None) -> tuple[np.ndarray, int]:
    """The test views of `videos` ((source, frame_stride) pairs: a local path, an S3 URI or the video's
    bytes) as the classifier decodes them (`serving.video_views`), normalised as the server does:
    (N, 3, T, crop, crop) float32, and how many videos could not be read or decoded (skipped)."""
    from pipeline.config import StorageConfig
    from pipeline.data import storage as store
    from pipeline.data.transforms import normalize_on_device
    from pipeline.tracking.serving import video_views

    views, skipped = [], 0
    for source, stride in videos:
        try:
            if isinstance(source, str) and store.is_s3(source):
                source = store.read_bytes(source, storage=storage or StorageConfig())
            views.extend(video_views(source, preprocess, frame_stride=stride))
        except Exception:  # noqa: BLE001 - an undecodable video checks nothing; the others still do
            skipped += 1
        if len(views) >= max_views:
            break
    if not views:
        raise ExportError(f"none of the {len(videos)} videos to check the export on could be decoded")
    batch = torch.from_numpy(np.stack(views[:max_views]))
    return normalize_on_device(batch, tuple(preprocess["mean"]), tuple(preprocess["std"])).numpy(), skipped


def server_description(preprocess: dict[str, Any], labels: Sequence[str]) -> dict[str, Any]:
    """What a server must do to a video to feed the graph, and how to read its output."""
    t, crop = int(preprocess["num_frames"]), int(preprocess["crop_size"])
    dense = preprocess["sampling"] == "dense"
    return {
        **preprocess, "labels": list(labels),
        "input": {"name": INPUT, "dtype": "float32", "shape": ["batch", 3, t, crop, crop],
                  "layout": "(batch, RGB channel, time, height, width)",
                  "value": "(pixel / 255 - mean[c]) / std[c] per RGB channel c"},
        "output": {"name": OUTPUT, "dtype": "float32", "shape": ["batch", int(preprocess["num_classes"])],
                   "meaning": "class logits in the order of `labels`"},
        "views": (f"per video, {preprocess['test_clips']} clip(s) x {preprocess['test_crops']} crop(s): "
                  f"{'dense' if dense else 'uniform (one frame per segment)'} sampling of {t} frames"
                  + (f" every {preprocess['sampling_rate']} frames" if dense else "")
                  + ", clips spread evenly over the video; frames scaled to a short "
                  f"side of {preprocess['short_side']}, then a centre crop (1 crop) or three along the long side "
                  f"(3: start, centre, end) of {crop}x{crop}; softmax per view, averaged over the views"),
        "reference": "pipeline.tracking.serving.video_views and score_views do exactly this in Python",
    }


# ---------------------------------------------------------------------------------------------
# The job


def _version_of(client, model_uri: str):
    """The registry version a `models:/NAME@ALIAS` or `models:/NAME/VERSION` URI names, else None."""
    if not model_uri.startswith("models:/") or model_uri[len("models:/"):].startswith("m-"):
        return None
    ref = model_uri[len("models:/"):]
    name, sep, alias = ref.partition("@")
    if sep:
        return client.get_model_version_by_alias(name, alias)
    name, _, number = ref.partition("/")
    return client.get_model_version(name, number)


def _check_videos(cfg, loaded, version, videos: Sequence[str], manifest_uri: str, split: str,
                  max_videos: int) -> tuple[list[tuple[Any, int]], str]:
    """(source, frame_stride) of the videos to check on and where they came from: `videos`, else the usable
    rows of `split` of `manifest_uri`, else of the manifest the model was trained (or is judged) on."""
    import pyarrow.compute as pc

    from pipeline.data.manifest import read_manifest
    from pipeline.tracking.runs import client_for

    if videos:
        return [(v, 1) for v in videos[:max_videos]], f"{len(videos[:max_videos])} given videos"
    if not manifest_uri:
        if version is not None:
            manifest_uri = version.tags.get("eval_manifest_uri", "")
        if not manifest_uri and loaded.source_run_id:
            params = client_for(cfg).get_run(loaded.source_run_id).data.params
            manifest_uri = params.get("data.manifest_uri", params.get("data.manifest", ""))
    if not manifest_uri:
        raise ExportError("no videos to check the export on: pass --videos FILE ... or --manifest URI (the model "
                          "names no manifest of its own)")
    table = read_manifest(manifest_uri, storage=cfg.storage)
    usable = table.filter(pc.and_(pc.equal(table["split"], split), pc.equal(table["status"], "ok")))
    rows = usable.slice(0, max_videos).to_pylist()
    if not rows:
        raise ExportError(f"the manifest {manifest_uri} has no usable {split!r} videos to check the export on; "
                          "pass --split or --videos")
    return [(r["path"], int(r.get("frame_stride") or 1)) for r in rows], f"{manifest_uri} ({split}, {len(rows)} videos)"


def export_onnx(cfg, model_uri: str, *, videos: Sequence[str] = (), manifest_uri: str = "", split: str = "val",
                max_videos: int = 4, random: int = 4, atol: float = 1e-4, opset: int = OPSET, output: str = "",
                log: bool = True,
                progress=lambda message: None) -> dict[str, Any]:
    """Export `model_uri` (see the module docstring), check it, keep it in `output` when given and log
    it in the version's (or run's) MLflow run unless `log` is false. Raises ExportError when the check
    fails (nothing is logged then) or there is nowhere to put the result."""
    from pipeline.tracking.inference import load_model
    from pipeline.tracking.runs import client_for
    from pipeline.tracking.serving import build_model

    client = client_for(cfg)
    loaded = load_model(cfg, model_uri)
    version = _version_of(client, model_uri)
    labels = loaded.labels or [str(i) for i in range(int(loaded.preprocess["num_classes"]))]
    run_id = version.run_id if version is not None else loaded.source_run_id
    if log and not run_id:
        raise ExportError(f"{model_uri} belongs to no MLflow run to log the export in; pass --no-log --output DIR")
    if not log and not output:
        raise ExportError("--no-log keeps nothing without --output DIR")
    preprocess = loaded.preprocess
    clip_shape = (3, int(preprocess["num_frames"]), int(preprocess["crop_size"]), int(preprocess["crop_size"]))
    description = server_description(preprocess, labels)
    check_on, source = _check_videos(cfg, loaded, version, videos, manifest_uri, split, max_videos)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(output) if output else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "model.onnx"
        progress(f"exporting {preprocess['variant']} at {clip_shape} (batch dynamic)")
        export_network(build_model(preprocess, loaded.state_dict, inference=True), clip_shape, path,
                       metadata={"uniformer.preprocess": json.dumps(preprocess), "uniformer.labels": json.dumps(labels),
                                 "uniformer.source": model_uri}, opset=opset)
        progress("checking ONNX Runtime against PyTorch")
        decoded, skipped = decoded_clips(preprocess, check_on, storage=cfg.storage)
        result = parity(build_model(preprocess, loaded.state_dict), ort_session(path),
                        {"random": random_clips(preprocess, random), "decoded": decoded}, atol=atol)
        result.update(checked_on=source, undecodable_videos=skipped, model_uri=model_uri, opset=opset,
                      exporter="torch.onnx.export(dynamo=True)", torch=torch.__version__,
                      onnxruntime=__import__("onnxruntime").__version__)
        (folder / "preprocess.json").write_text(json.dumps(description, indent=1) + "\n")
        (folder / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")
        (folder / "parity.json").write_text(json.dumps(result, indent=1) + "\n")
        summary = {"model_uri": model_uri, "format": "onnx", "passed": result["passed"],
                   "max_abs_logit_diff": max(result["random"]["max_abs_logit_diff"],
                                             result["decoded"]["max_abs_logit_diff"]),
                   "top1_agreement": result["decoded"]["top1_agreement"], "parity": result,
                   "bytes": path.stat().st_size, "output": str(folder) if output else None}
        if not result["passed"]:
            raise ExportError(f"the ONNX graph of {model_uri} does not match the PyTorch model: {json.dumps(summary)}")
        if log:
            client.log_artifacts(run_id, str(folder), ARTIFACT_DIR)
            summary.update(run_id=run_id, onnx_uri=f"runs:/{run_id}/{ARTIFACT_DIR}/model.onnx")
            if version is not None:
                for key, value in (("onnx.uri", summary["onnx_uri"]),
                                   ("onnx.max_abs_logit_diff", f"{summary['max_abs_logit_diff']:.3g}"),
                                   ("onnx.top1_agreement", summary["top1_agreement"])):
                    client.set_model_version_tag(version.name, version.version, key, str(value))
                summary.update(name=version.name, version=int(version.version))
    return summary
