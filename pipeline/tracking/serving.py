"""The logged models of a training: the bare network and the pyfunc "video classifier".

The video classifier takes a DataFrame with a `video` column (local path, `file://` or `s3://`
URI, or the video's bytes) or a `video_bytes` column, decodes the test views the training
recipe evaluates with (`test_clips` clips x `test_crops` crops at `short_side`), sums the
softmax scores and returns per row `label`, `score` (top 1), `labels`, `scores` (top k, the
`top_k` param, default 5) and `error` (empty, or why the video could not be scored: the error's type
and a short fixed reason such as "unsupported container", "video too large" or "undecodable video",
never FFmpeg's text or a path; the details go to the server's log). URIs and paths are read only
under the allowed prefixes (UNIFORMER_SERVE_ALLOWED_PREFIXES, or the loader's `model_config`); bytes
always. Every video is opened by `pipeline.data.media.open_media` within the model config's `limits`
(`pipeline.config.MediaLimits`, logged from the training's `data.limits`), which also bound the rows
and video bytes of one request and the time spent on one row.

Both are MLflow "models from code" (`serving_classifier.py`, `serving_network.py`) with the weights
as a state dict loaded `weights_only=True`: loading runs the project's code shipped with the model,
never a pickle. Everything they need travels with them: the weights, the preprocessing config and
the label names as artifacts, and the `model/` package plus the few `pipeline/` modules they use as
code, so `mlflow.pyfunc.load_model("models:/NAME@champion")` works in a fresh process with no
training config. S3 endpoints and credentials come from the usual AWS environment variables.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Sequence

import mlflow
import mlflow.pyfunc
import numpy as np

from pipeline import PROJECT_ROOT
from pipeline.config import MediaLimits

log = logging.getLogger(__name__)

WEIGHTS, PREPROCESS, LABELS = "weights.pt", "preprocess.json", "labels.json"
DEFAULT_TOP_K = 5
_PIP_PACKAGES = ("torch", "numpy", "pandas", "av", "einops", "pyarrow", "boto3", "pyyaml", "mlflow")


def preprocess_config(cfg) -> dict[str, Any]:
    """What the classifier needs from a training config: the network and its test-time input."""
    d = cfg.data
    return {"variant": cfg.model.variant, "num_classes": cfg.model.num_classes, "sampling": d.sampling,
            "num_frames": d.num_frames, "sampling_rate": d.sampling_rate, "short_side": d.short_side,
            "crop_size": d.crop_size, "mean": list(d.mean), "std": list(d.std), "test_clips": d.test_clips,
            "test_crops": d.test_crops}


def pip_requirements() -> list[str]:
    """Pinned to what is installed here (without local version labels such as `+cpu`)."""
    reqs = []
    for name in _PIP_PACKAGES:
        try:
            reqs.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


def build_model(preprocess: dict[str, Any], state_dict: dict | None = None, *, inference: bool = False):
    """The network of `preprocess` in eval mode, with `state_dict` loaded strictly when given.

    `inference`: a copy with its BatchNorms folded into the layers after them (`fold_batchnorm`),
    which only predicts (one pass over the activations fewer per norm).
    """
    from model import create_uniformer, fold_batchnorm

    net = create_uniformer(preprocess["variant"], num_classes=int(preprocess["num_classes"]))
    if state_dict is not None:
        net.load_state_dict(state_dict, strict=True)
    return fold_batchnorm(net) if inference else net.eval()


# ---------------------------------------------------------------------------------------------
# Test views of one video


def sample_indices(num_video_frames: int, preprocess: dict[str, Any], *, clip_index: int, num_clips: int,
                   frame_stride: int = 1) -> np.ndarray:
    """Frame indices of test clip `clip_index` of `num_clips` (as `pipeline.data.clips` evaluates)."""
    from pipeline.data.sampling import dense_indices, uniform_indices

    if preprocess["sampling"] == "uniform":
        return uniform_indices(num_video_frames, num_frames=int(preprocess["num_frames"]), clip_index=clip_index,
                               num_clips=num_clips)
    return dense_indices(num_video_frames, num_frames=int(preprocess["num_frames"]),
                         sampling_rate=int(preprocess["sampling_rate"]), frame_stride=frame_stride,
                         clip_index=clip_index, num_clips=num_clips)


def video_views(src, preprocess: dict[str, Any], *, frame_stride: int = 1, limits: MediaLimits = MediaLimits(),
                deadline_s: float | None = None) -> np.ndarray:
    """uint8 (V, T, crop, crop, 3): the `test_clips` x `test_crops` views of one video, exactly the
    evaluation views of `pipeline.data.clips` (one demux pass, decoded at the short side, then cropped;
    a single centre crop is cut while decoding). `limits` and `deadline_s` bound the work on the video."""
    from pipeline.data.decode import VideoDecoder
    from pipeline.data.transforms import three_crops

    num_clips, num_crops = int(preprocess["test_clips"]), int(preprocess["test_crops"])
    t, crop = int(preprocess["num_frames"]), int(preprocess["crop_size"])
    with VideoDecoder(src, limits=limits, deadline_s=deadline_s) as video:
        windows = [sample_indices(video.num_frames, preprocess, clip_index=c, num_clips=num_clips,
                                  frame_stride=frame_stride) for c in range(num_clips)]
        frames = video.decode(np.concatenate(windows), size=int(preprocess["short_side"]),
                              center_crop=crop if num_crops == 1 else None)
    clips = [frames[c * t:(c + 1) * t] for c in range(num_clips)]
    return np.stack(clips if num_crops == 1 else [view for clip in clips for view in three_crops(clip, size=crop)])


def view_probabilities(net, views_uint8: np.ndarray, *, mean, std, device):
    """Softmax scores (V, num_classes), float32 on `device`, of uint8 views (V, T, H, W, 3) normalised
    with `mean` and `std`; bf16 autocast on CUDA."""
    import torch

    from pipeline.data.transforms import normalize_on_device

    batch = torch.from_numpy(np.ascontiguousarray(views_uint8)).to(device)
    clips = normalize_on_device(batch, tuple(mean), tuple(std))
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return net(clips).float().softmax(dim=-1)


def score_views(net, views_uint8: np.ndarray, preprocess: dict[str, Any], device) -> np.ndarray:
    """Softmax scores (num_classes,) summed over the views of one video, divided by their number."""
    probs = view_probabilities(net, views_uint8, mean=preprocess["mean"], std=preprocess["std"], device=device)
    return (probs.sum(dim=0) / probs.shape[0]).cpu().numpy()


def top_k(scores: np.ndarray, labels: Sequence[str], k: int) -> tuple[list[str], list[float]]:
    order = np.argsort(-scores, kind="stable")[: max(1, min(k, len(scores)))]
    return [labels[i] for i in order], [round(float(scores[i]), 6) for i in order]


# ---------------------------------------------------------------------------------------------
# The pyfunc model


ALLOWED_PREFIXES_ENV = "UNIFORMER_SERVE_ALLOWED_PREFIXES"


def allowed_prefixes_from_env() -> list[str]:
    """Comma-separated URI / path prefixes from UNIFORMER_SERVE_ALLOWED_PREFIXES; empty: none allowed."""
    import os

    return [p.strip() for p in os.environ.get(ALLOWED_PREFIXES_ENV, "").split(",") if p.strip()]


def check_allowed(uri: str, prefixes: Sequence[str]) -> str:
    """Refuse a URI or local path outside `prefixes`: a served model reads with the server's own
    credentials and file system, so a caller must not choose what it reads. A prefix covers itself
    and what lies below it (`s3://bucket/clips` covers `s3://bucket/clips/a.mp4`, not `.../clips2`);
    local paths are compared resolved (no `..` or symbolic-link escape), and a path that FFmpeg would
    read as a protocol (`concat:`, `subfile,`, `file:` ...) is never inside: resolved as a relative
    path it would look like one below the working directory. Returns the URI, or the resolved path,
    which is what must be read (resolving again could follow a link changed in between)."""
    from pipeline.data import storage
    from pipeline.data.media import UnsupportedMedia, check_path

    if storage.is_s3(uri):
        # S3 keys are literal, but some clients normalise dot segments: refuse them outright.
        inside = "/../" not in uri + "/" and "/./" not in uri + "/" and any(
            uri == p.rstrip("/") or uri.startswith(p.rstrip("/") + "/") for p in prefixes if storage.is_s3(p))
        resolved = uri
    else:
        try:
            resolved = str(check_path(storage.local_path(uri)))
        except (UnsupportedMedia, storage.StorageError):
            raise PermissionError(f"{uri} is not a plain local path or S3 URI (FFmpeg would read it as a "
                                  "protocol); send the video's bytes") from None
        roots = [Path(storage.local_path(p)).resolve() for p in prefixes if not storage.is_s3(p)]
        inside = any(Path(resolved) == root or root in Path(resolved).parents for root in roots)
    if not inside:
        raise PermissionError(f"{uri} is outside the allowed prefixes ({', '.join(prefixes) or 'none'}); send "
                              f"the video's bytes, or allow its prefix with {ALLOWED_PREFIXES_ENV}")
    return resolved


class RequestError(ValueError):
    """A row or request the server refuses before reading anything; the message is fixed text."""


def _video_source(value: Any, allowed: Sequence[str], limits: MediaLimits):
    """A resolved local path or the bytes of one `video` / `video_bytes` value; URIs and paths only under
    `allowed`, objects only up to `limits.max_object_mb` (refused from the response's size, unread)."""
    from pipeline.data import storage
    from pipeline.data.media import max_bytes

    if isinstance(value, (bytes, bytearray, memoryview)):
        if not len(value):
            raise RequestError("empty video bytes")
        return value
    if isinstance(value, str) and value:
        target = check_allowed(value, allowed)
        # Local files are decoded in place; objects are fetched whole (one request, then seeks in memory).
        return storage.read_bytes(target, max_bytes=max_bytes(limits)) if storage.is_s3(target) else target
    raise RequestError(f"expected a video URI or bytes, got {type(value).__name__}")


def row_error(err: BaseException) -> str:
    """What a caller is told about a row that could not be scored: the error's type and a short fixed
    reason. Never FFmpeg's text, a path or the server's prefixes (a caller could learn which files exist)."""
    from pipeline.data import storage

    if isinstance(err, PermissionError):
        reason = f"not an allowed video URI; send the video's bytes, or allow its prefix with {ALLOWED_PREFIXES_ENV}"
    elif isinstance(err, RequestError):
        reason = str(err)
    elif isinstance(err, storage.NotFoundError):
        reason = "no such video"
    elif isinstance(err, storage.StorageError) and not isinstance(err, storage.ObjectTooLarge):
        reason = "the video could not be read"
    else:
        reason = getattr(err, "reason", "") or "undecodable video"
    return f"{type(err).__name__}: {reason}"


def request_error(values: list[Any], limits: MediaLimits) -> str:
    """Why a whole request is refused before any row is read ("" when it is not)."""
    if len(values) > limits.max_request_rows:
        return f"RequestError: over data.limits.max_request_rows={limits.max_request_rows} rows in one request"
    sent = sum(len(v) for v in values if isinstance(v, (bytes, bytearray, memoryview)))
    if sent > limits.max_request_mb * 2 ** 20:
        return f"RequestError: over data.limits.max_request_mb={limits.max_request_mb:g} of video bytes in one request"
    return ""


def _row_values(df) -> list[Any]:
    if "video" not in df.columns and "video_bytes" not in df.columns:
        raise ValueError(f"expected a `video` (URI or bytes) or `video_bytes` column, got {list(df.columns)}")
    values = []
    for i in range(len(df)):
        value = df["video_bytes"].iloc[i] if "video_bytes" in df.columns else None
        if value is None or (isinstance(value, float) and np.isnan(value)):
            value = df["video"].iloc[i] if "video" in df.columns else None
        values.append(value)
    return values


with warnings.catch_warnings():
    # MLflow asks for type hints on `predict` for its own validation; the explicit signature does that.
    warnings.simplefilter("ignore", UserWarning)

    class VideoClassifier(mlflow.pyfunc.PythonModel):
        """Video bytes or URIs in, top-k labels with scores out (see the module docstring)."""

        def load_context(self, context) -> None:
            import torch

            self.preprocess, self.labels, state = read_artifacts(context.artifacts)
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self.net = build_model(self.preprocess, state, inference=True).to(self.device)
            # Where URIs may point: the loader's `model_config` (the predict job: the videos it was given),
            # else the server's environment; bytes are always accepted.
            config = context.model_config or {}
            self.allowed = list(config.get("allowed_prefixes") or allowed_prefixes_from_env())
            # Logged from the training's data.limits; a loader (or MLFLOW_PYFUNC_INFERENCE_CONFIG) may
            # override them. Unknown keys are an error, not ignored.
            self.limits = MediaLimits(**(config.get("limits") or {}))

        def predict(self, context, model_input, params: dict[str, Any] | None = None):
            import pandas as pd

            k = int((params or {}).get("top_k") or DEFAULT_TOP_K)
            if not isinstance(model_input, pd.DataFrame):
                model_input = pd.DataFrame({"video": list(model_input)})
            out = []
            values = _row_values(model_input)
            refused = request_error(values, self.limits)
            for value in values:
                name = value if isinstance(value, str) else f"<{len(value) if value is not None else 0} bytes>"
                failed = {"video": name, "label": "", "score": float("nan"), "labels": [], "scores": []}
                if refused:
                    out.append({**failed, "error": refused})
                    continue
                try:
                    views = video_views(_video_source(value, self.allowed, self.limits), self.preprocess,
                                        limits=self.limits, deadline_s=self.limits.row_deadline_s)
                    labels, scores = top_k(score_views(self.net, views, self.preprocess, self.device), self.labels, k)
                    out.append({"video": name, "label": labels[0], "score": scores[0], "labels": labels,
                                "scores": scores, "error": ""})
                except Exception as err:  # noqa: BLE001 - one bad video must not fail the others
                    # The details stay in the server's log; the caller gets a fixed reason.
                    log.warning("video %s not scored: %s: %s", name[:200], type(err).__name__,
                                (str(err).strip().splitlines() or [""])[0][:300])
                    out.append({**failed, "error": row_error(err)})
            return pd.DataFrame(out, columns=["video", "label", "score", "labels", "scores", "error"])

    class Network(mlflow.pyfunc.PythonModel):
        """The bare network: float clips (B, 3, T, H, W), normalised, in; logits (B, num_classes) out."""

        def load_context(self, context) -> None:
            self.preprocess, _, state = read_artifacts(context.artifacts)
            self.net = build_model(self.preprocess, state)

        def predict(self, context, model_input, params: dict[str, Any] | None = None):
            import torch

            with torch.inference_mode():
                return self.net(torch.as_tensor(np.asarray(model_input, dtype=np.float32))).numpy()


# ---------------------------------------------------------------------------------------------
# Logging both models (inside an active run)


def _stage_code(folder: Path) -> list[str]:
    """Copies of the `model` and `pipeline` packages for `code_paths`: the classifier imports a few
    modules of each (directly or not), and a whole package cannot miss one (a few hundred kB)."""
    staged = []
    for package in ("model", "pipeline"):
        shutil.copytree(PROJECT_ROOT / package, folder / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        staged.append(str(folder / package))
    return staged


def pytorch_signature(preprocess: dict[str, Any]):
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    t, c = int(preprocess["num_frames"]), int(preprocess["num_classes"])
    # Height and width are free (any multiple of 32; trained at crop_size); time is the trained clip length.
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, t, -1, -1))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, c))]))


def _log_from_code(code_file: str, state_dict: dict, preprocess: dict[str, Any], labels: Sequence[str], *,
                   name: str, signature, input_example, metadata: dict[str, Any],
                   model_config: dict[str, Any] | None = None):
    """A pyfunc logged as MLflow "models from code": loading it runs `code_file` (shipped with it) and
    reads the weights with `weights_only=True`; nothing is pickled, so nothing unpickled runs code."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, folder / WEIGHTS)
        (folder / PREPROCESS).write_text(json.dumps(preprocess, indent=1) + "\n")
        (folder / LABELS).write_text(json.dumps(list(labels), indent=1) + "\n")
        code = _stage_code(folder / "code")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "add type hints to predict": the signature covers it
            return mlflow.pyfunc.log_model(
                name=name, python_model=str(Path(__file__).with_name(code_file)), code_paths=code,
                signature=signature, input_example=input_example, pip_requirements=pip_requirements(),
                model_config=model_config,
                artifacts={"weights": str(folder / WEIGHTS), "preprocess": str(folder / PREPROCESS),
                           "labels": str(folder / LABELS)},
                metadata={"preprocess": preprocess, **metadata})


def log_pytorch_model(state_dict: dict, preprocess: dict[str, Any], labels: Sequence[str], *, name: str):
    """The bare network (`Network`): weights only plus the preprocessing config that rebuilds it
    (`build_model`), a tensor signature (B, 3, T, H, W) -> (B, num_classes) and a small input example (a
    mid-grey clip at the smallest legal size: one at the full crop would be tens of MB of JSON)."""
    example = np.zeros((1, 3, int(preprocess["num_frames"]), 32, 32), dtype=np.float32)
    return _log_from_code("serving_network.py", state_dict, preprocess, labels, name=name,
                          signature=pytorch_signature(preprocess), input_example=example,
                          metadata={"labels": list(labels)})


def pyfunc_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "video", required=False),
                       ColSpec(DataType.binary, "video_bytes", required=False)]),
        outputs=Schema([ColSpec(DataType.string, "video"), ColSpec(DataType.string, "label"),
                        ColSpec(DataType.double, "score"), ColSpec(Array(DataType.string), "labels"),
                        ColSpec(Array(DataType.double), "scores"), ColSpec(DataType.string, "error")]),
        params=ParamSchema([ParamSpec("top_k", DataType.long, DEFAULT_TOP_K)]))


def example_video(preprocess: dict[str, Any]) -> bytes:
    """A tiny mid-grey H.264 clip of one test window: the input example, which every reader of the model
    can decode (a URI would point where the reader may not reach)."""
    from pipeline.data.synth import encode_h264

    frames = int(preprocess["num_frames"]) * (int(preprocess["sampling_rate"]) if preprocess["sampling"] == "dense"
                                               else 1)
    return encode_h264(np.full((frames, 32, 32, 3), 128, dtype=np.uint8), crf=40)


def log_pyfunc_model(state_dict: dict, preprocess: dict[str, Any], labels: Sequence[str], *, name: str,
                     metadata: dict[str, Any] | None = None, limits: MediaLimits = MediaLimits()):
    """The video classifier (`VideoClassifier`) with its weights, preprocessing config and label names,
    and a tiny video's bytes as input example (base64 in the serving example); `limits` (the training's
    data.limits) go to its model config, where a loader may override them."""
    import pandas as pd

    return _log_from_code("serving_classifier.py", state_dict, preprocess, labels, name=name,
                          signature=pyfunc_signature(),
                          input_example=pd.DataFrame({"video_bytes": [example_video(preprocess)]}),
                          metadata=metadata or {},
                          # Declared so that a loader may set it; empty: UNIFORMER_SERVE_ALLOWED_PREFIXES decides.
                          model_config={"allowed_prefixes": [], "limits": dataclasses.asdict(limits)})


# ---------------------------------------------------------------------------------------------
# Reading a logged classifier back without the pyfunc machinery (evaluation)


def read_artifacts(artifacts: dict[str, str]) -> tuple[dict[str, Any], list[str], dict]:
    """(preprocess, labels, state dict) from the model's artifact files. The weights are loaded with
    `weights_only=True`: tensors only, no pickled code runs."""
    import torch

    preprocess = json.loads(Path(artifacts["preprocess"]).read_text())
    labels = json.loads(Path(artifacts["labels"]).read_text())
    return preprocess, labels, torch.load(artifacts["weights"], map_location="cpu", weights_only=True)


def read_bundle(model_dir: str | Path) -> tuple[dict[str, Any], list[str], dict]:
    """(preprocess, labels, state dict) from a downloaded video-classifier model folder."""
    folder = Path(model_dir) / "artifacts"
    if not (folder / PREPROCESS).is_file():
        raise ValueError(f"{model_dir} is not a video-classifier model (no artifacts/{PREPROCESS}); "
                         "pass the pyfunc model logged by training (…/video_classifier) or a checkpoint")
    return read_artifacts({"preprocess": str(folder / PREPROCESS), "labels": str(folder / LABELS),
                           "weights": str(folder / WEIGHTS)})


def predict_videos(model_uri: str, videos: Sequence[str], *, top_k: int = DEFAULT_TOP_K) -> list[dict[str, Any]]:
    """Load `model_uri` as the pyfunc video classifier (as a server would) and classify `videos`;
    one dict per video with `label`, `score`, `labels`, `scores` and `error` ("" when fine)."""
    import pandas as pd

    model = mlflow.pyfunc.load_model(model_uri, model_config={"allowed_prefixes": list(videos)})
    frame = model.predict(pd.DataFrame({"video": list(videos)}), params={"top_k": top_k})
    return frame.to_dict(orient="records")
