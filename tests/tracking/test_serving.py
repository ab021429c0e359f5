"""The pyfunc video classifier: the same views as evaluation, bytes or URIs in, one bad video per row."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow.artifacts
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from pipeline import serving
from pipeline.clips import make_clip_rows
from pipeline.config import StorageConfig
from tests.tracking.conftest import LABELS, fake_training, tiny_config


def test_views_are_the_evaluation_views_of_the_data_pipeline(tiny_videos):
    for crops in (1, 3):
        cfg = tiny_config(extra=(f"data.test_crops={crops}", "data.short_side=72"))
        views = serving.video_views(tiny_videos["video"], serving.preprocess_config(cfg))
        rows = make_clip_rows({"path": tiny_videos["video"], "label": 0, "video_id": 0, "status": "ok"},
                              data=cfg.data, storage=StorageConfig(), training=False, seed=0)
        assert views.shape == (2 * crops, 8, 64, 64, 3) and views.dtype == np.uint8
        np.testing.assert_array_equal(views, np.stack([r["clip"] for r in rows]))


def test_uniform_sampling_is_served_too(tiny_videos):
    cfg = tiny_config(extra=("data.sampling=uniform",))
    preprocess = serving.preprocess_config(cfg)
    rows = make_clip_rows({"path": tiny_videos["video"], "label": 0, "video_id": 0, "status": "ok"},
                          data=dataclasses.replace(cfg.data), storage=StorageConfig(), training=False, seed=0)
    np.testing.assert_array_equal(serving.video_views(tiny_videos["video"], preprocess),
                                  np.stack([r["clip"] for r in rows]))


def test_classifier_takes_uris_or_bytes_and_reports_bad_videos(embedded, tiny_videos):
    cfg = tiny_config()
    run_id = fake_training(cfg, val_top1=0.5)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/video_classifier")
    data = open(tiny_videos["video"], "rb").read()
    garbage = str(tiny_videos["root"] / "videos/garbage.mp4")
    out = model.predict(pd.DataFrame({"video": [tiny_videos["video"], data, garbage, "/no/such.mp4"]}),
                        params={"top_k": 3})
    assert list(out.columns) == ["video", "label", "score", "labels", "scores", "error"]
    assert out["error"][0] == "" and out["error"][1] == "" and out["video"][1] == f"<{len(data)} bytes>"
    assert sorted(out["labels"][0]) == sorted(LABELS) and out["labels"][0] == out["labels"][1]
    np.testing.assert_allclose(out["scores"][0], out["scores"][1])
    assert out["label"][0] == out["labels"][0][0] and abs(sum(out["scores"][0]) - 1) < 1e-4
    assert out["error"][2].startswith("DecodeError") and out["labels"][2] == []
    assert "no/such.mp4" in out["error"][3]
    by_bytes = model.predict(pd.DataFrame({"video_bytes": [data]}))
    assert by_bytes["label"][0] == out["label"][0] and len(by_bytes["labels"][0]) == 3  # top 5 of 3 classes


def test_served_network_has_folded_batchnorms_and_the_same_scores(embedded, tiny_videos):
    cfg = tiny_config()
    run_id = fake_training(cfg, val_top1=0.5)
    classifier = mlflow.pyfunc.load_model(f"runs:/{run_id}/video_classifier").unwrap_python_model()
    assert classifier.net.batchnorm_folded
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/video_classifier"))
    state = torch.load(local / "artifacts" / serving.WEIGHTS, map_location="cpu", weights_only=True)
    # Running statistics away from (0, 1), so that folding them in changes the weights.
    state = {k: v + 0.3 if k.endswith(("running_mean", "running_var")) else v for k, v in state.items()}
    plain = serving.build_model(classifier.preprocess, state)
    folded = serving.build_model(classifier.preprocess, state, inference=True)
    views = serving.video_views(tiny_videos["video"], classifier.preprocess)
    cpu = torch.device("cpu")
    np.testing.assert_allclose(serving.score_views(folded, views, classifier.preprocess, cpu),
                               serving.score_views(plain, views, classifier.preprocess, cpu), atol=1e-5)
    assert not plain.batchnorm_folded and plain.state_dict().keys() == state.keys()
