"""`uniformer export --format onnx`: UniFormer-S and -B exports against PyTorch, and the job end to end
on a registered model (artifacts in the version's run, tags on the version)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model import create_uniformer, fold_batchnorm
from pipeline.tracking.onnx_export import (INPUT, OUTPUT, decoded_clips, export_network, ort_session, parity,
                                           random_clips)
from tests.tracking.conftest import LABELS, fake_training, tiny_config


def trained_like(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights with what training gives and initialisation does not: BatchNorm statistics and
    affine maps away from identity (folding must carry them), and logits of a trained model's size
    (several units, not the initial head's hundredths), so that a difference of 1e-4 means something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_((torch.rand(n, generator=gen) - 0.5) * 0.4)
        net.head.weight.normal_(0, 0.2, generator=gen)
    return net.eval()


def preprocess_for(variant: str, *, frames: int, size: int, classes: int = 400) -> dict:
    return {"variant": variant, "num_classes": classes, "sampling": "dense", "num_frames": frames, "sampling_rate": 1,
            "short_side": size, "crop_size": size, "mean": [0.45] * 3, "std": [0.225] * 3, "test_clips": 2,
            "test_crops": 1}


# UniFormer-S at the K400 recipe's clip (16x224x224); UniFormer-B, its 40 blocks and the same graph, at
# 8x128x128 to keep the 2-core CI machine's time down (at 16x224 it passes the same way, measured: largest
# logit difference 6.7e-6 on decoded clips, logits up to 16).
@pytest.mark.parametrize("variant, frames, size", [("uniformer_s", 16, 224), ("uniformer_b", 8, 128)])
def test_onnx_export_matches_pytorch_on_random_and_decoded_clips(tmp_path, tiny_videos, variant, frames, size):
    net = trained_like(create_uniformer(variant, num_classes=400))
    preprocess = preprocess_for(variant, frames=frames, size=size)
    path = export_network(fold_batchnorm(net), (3, frames, size, size), tmp_path / "model.onnx",
                          metadata={"uniformer.labels": "[]"})
    session = ort_session(path)
    videos = [(r["path"], 1) for r in tiny_videos["rows"] if r["status"] == "ok"][:2]
    decoded, skipped = decoded_clips(preprocess, videos)  # the demo's synthetic motion videos, decoded as served
    assert decoded.shape == (4, 3, frames, size, size) and skipped == 0
    result = parity(net, session, {"random": random_clips(preprocess, 2), "decoded": decoded}, atol=1e-4)
    for name in ("random", "decoded"):
        assert result[name]["max_abs_logit"] > 1.0  # logits of a trained model's size
        assert result[name]["max_abs_logit_diff"] < 1e-4, result  # within 1e-4, not only within the bound
    assert result["decoded"]["top1_agreement"] == 1.0 and result["passed"], result
    # One graph for any batch; the clip shape is fixed.
    for batch in (1, 3):
        out = session.run([OUTPUT], {INPUT: random_clips(preprocess, batch, seed=batch)})[0]
        assert out.shape == (batch, 400)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        session.run([OUTPUT], {INPUT: np.zeros((1, 3, frames, size + 32, size), np.float32)})


def test_parity_fails_when_the_graph_computes_something_else(tmp_path):
    net = trained_like(create_uniformer("uniformer_xs", num_classes=6))
    preprocess = preprocess_for("uniformer_xs", frames=4, size=64, classes=6)
    other = trained_like(create_uniformer("uniformer_xs", num_classes=6), seed=1)
    session = ort_session(export_network(fold_batchnorm(other), (3, 4, 64, 64), tmp_path / "other.onnx"))
    result = parity(net, session, {"random": random_clips(preprocess, 2)})
    assert not result["passed"] and result["random"]["max_abs_logit_diff"] > result["random"]["bound"]


def test_export_job_logs_the_graph_the_server_description_and_the_check_in_the_versions_run(
        tmp_path, tiny_videos, capsys):
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    import jobs.export
    from pipeline.tracking.registry import register

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_config(uri, manifest=tiny_videos["manifest"])
    run_id = fake_training(cfg, val_top1=0.5)
    register(cfg, run_id, "onnx-demo")
    jobs.export.main(["--model", "models:/onnx-demo@challenger", "--format", "onnx", f"tracking.tracking_uri={uri}"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["passed"] and summary["top1_agreement"] == 1.0 and summary["max_abs_logit_diff"] < 1e-4
    assert (summary["name"], summary["version"], summary["run_id"]) == ("onnx-demo", 1, run_id)
    # Checked on the val videos of the manifest the version is judged on; the undecodable one is skipped.
    parity_record = summary["parity"]
    assert tiny_videos["manifest"] in parity_record["checked_on"] and parity_record["undecodable_videos"] == 1
    assert parity_record["decoded"]["views"] == 3 * 2  # 3 decodable val videos x 2 test clips

    client = MlflowClient(uri, registry_uri=uri)  # not the registry an earlier test set in this process
    assert {a.path for a in client.list_artifacts(run_id, "onnx")} == {
        "onnx/model.onnx", "onnx/preprocess.json", "onnx/labels.json", "onnx/parity.json"}
    version = client.get_model_version("onnx-demo", "1")
    assert version.tags["onnx.uri"] == f"runs:/{run_id}/onnx/model.onnx" == summary["onnx_uri"]
    assert float(version.tags["onnx.top1_agreement"]) == 1.0
    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/onnx", dst_path=str(tmp_path / "dl"),
                                                      tracking_uri=uri))
    description = json.loads((folder / "preprocess.json").read_text())
    assert description["labels"] == LABELS and description["input"]["shape"] == ["batch", 3, 8, 64, 64]
    assert (description["num_frames"], description["sampling_rate"], description["crop_size"]) == (8, 2, 64)
    assert description["mean"] == [0.45] * 3 and description["std"] == [0.225] * 3
    session = ort_session(folder / "model.onnx")
    assert json.loads(session.get_modelmeta().custom_metadata_map["uniformer.labels"]) == LABELS
    assert session.run([OUTPUT], {INPUT: np.zeros((3, 3, 8, 64, 64), np.float32)})[0].shape == (3, len(LABELS))


def test_export_job_errors_say_what_to_do(tmp_path, tiny_videos, capsys):
    import jobs.export

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_config(uri, manifest=tiny_videos["manifest"])
    run_id = fake_training(cfg, val_top1=0.5)
    model = f"runs:/{run_id}/video_classifier"
    for argv, message in [
        (["--no-log"], "--no-log keeps nothing without --output DIR"),
        (["--videos", str(tmp_path / "nothing.mp4")], "none of the 1 videos to check the export on could be decoded"),
        (["--atol", "0"], "does not match the PyTorch model"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            jobs.export.main(["--model", model, "--format", "onnx", *argv, f"tracking.tracking_uri={uri}"])
        assert exit_info.value.code == 1
        assert message in capsys.readouterr().err
