"""Multi-view evaluation on Ray Data (CPU), its MLflow run and prediction table, and promotion gates that
need it: both versions evaluated on the challenger's manifest (a dry run logging nothing), and a refusal
when that manifest has changed."""

from __future__ import annotations

import json

import pytest
import torch

from jobs import evaluate as evaluate_job
from jobs import promote as promote_job
from pipeline.data.manifest import manifest_hash, read_manifest, write_manifest
from pipeline.tracking import predictions, registry
from pipeline.tracking.evaluate import evaluate
from pipeline.tracking.inference import InferenceError
from pipeline.tracking.runs import client_for
from tests.tracking.conftest import fake_training, tiny_config


def _manifest_variant(tiny_videos, folder, extra_rows: int) -> str:
    """The same val split with `extra_rows` more train rows: another manifest hash."""
    rows = list(tiny_videos["rows"])
    for i in range(extra_rows):
        rows.append({**rows[0], "index": len(rows), "split": "train"})
    write_manifest(rows, str(folder))
    return str(folder)


def test_evaluate_register_and_promote_against_an_evaluated_champion(ray_local, embedded, tiny_videos, tmp_path,
                                                                     capsys):
    name = "uniformer-eval"
    cfg = tiny_config(manifest=tiny_videos["manifest"])
    run_a = fake_training(cfg, val_top1=0.5, seed=0)

    # The CLI: multi-view test of the logged classifier, one JSON line at the end.
    evaluate_job.main(["--model", f"runs:/{run_a}/video_classifier", "--manifest", tiny_videos["manifest"],
                       "--split", "val"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["eval_videos"] == 3 and result["eval_unusable"] == 2  # never replaced by other videos
    assert result["eval_views"] == 2 and result["test_clips"] == 2 and result["source_run_id"] == run_a
    assert 0 <= result["eval_top1"] <= result["eval_top5"] <= 1 and 0 <= result["eval_mean_class"] <= 1
    client = client_for(cfg)
    eval_run = client.get_run(result["eval_run_id"])
    assert eval_run.data.tags["mlflow.parentRunId"] == run_a and eval_run.data.tags["job"] == "evaluate"
    assert eval_run.data.params["eval.manifest_hash"] == result["manifest_hash"]
    assert eval_run.data.metrics["eval_top1"] == result["eval_top1"]
    artifacts = {a.path for a in client.list_artifacts(eval_run.info.run_id)}
    assert artifacts == {"eval_confusion_matrix.png", "eval_per_class_accuracy.csv", "eval_unusable.csv",
                         "predictions.parquet"}
    unusable = open(client.download_artifacts(eval_run.info.run_id, "eval_unusable.csv")).read()
    assert "broken.mp4,unreadable,moov atom not found" in unusable
    assert "garbage.mp4,undecodable,no view could be decoded" in unusable

    # The same weights from a training checkpoint give the same scores.
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    torch.manual_seed(0)
    from model import create_uniformer

    state = {"model_state": create_uniformer("uniformer_xs", num_classes=3).state_dict(), "ema_state": None,
             "config": cfg.to_dict(), "mlflow_run_id": run_a}
    torch.save(state, checkpoint / "checkpoint.pt")
    from_checkpoint = evaluate(cfg, str(checkpoint), tiny_videos["manifest"], split="val", log=False)
    assert from_checkpoint["eval_top1"] == result["eval_top1"]

    first = registry.register(cfg, run_a, name)
    evaluated = [m for m in first["model_metrics"] if m["key"] == "eval_top1"]
    assert evaluated == [{"key": "eval_top1", "value": result["eval_top1"], "dataset": "prepared/val/2x1",
                          "run_id": result["eval_run_id"]}]  # the evaluation is the version's model metric
    assert registry.promote(cfg, name)["decision"] == "promoted"
    table = predictions.read(client.download_artifacts(eval_run.info.run_id, predictions.ARTIFACT, str(tmp_path)))
    assert table.num_rows == 5 and table.column("status").to_pylist().count("ok") == 3
    assert sum(table.column("correct").to_pylist()[:3]) / 3 == result["eval_top1"]

    # A challenger trained on another manifest, evaluated by nobody: promote evaluates both versions on
    # it with the challenger's views; a dry run of that first, which writes nothing.
    manifest_b = _manifest_variant(tiny_videos, tmp_path / "prepared_b", extra_rows=1)
    cfg_b = tiny_config(manifest=manifest_b)
    registry.register(cfg_b, fake_training(cfg_b, val_top1=1.0, seed=1), name)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs_before = len(client.search_runs(experiments))
    files_before = sorted((embedded / "mlartifacts").rglob("*"))
    dry = registry.promote(cfg_b, name, dry_run=True)
    assert dry["challenger"]["evaluated_now"] and dry["champion"]["evaluated_now"] and dry["test"]
    assert len(client.search_runs(experiments)) == runs_before
    assert sorted((embedded / "mlartifacts").rglob("*")) == files_before
    decision = registry.promote(cfg_b, name)
    assert decision["decision"] == "rejected" and decision["views"] == "2x1", decision  # 3 videos prove nothing
    assert decision["test"]["paired_videos"] == 3 and decision["test"] == dry["test"]
    digest = manifest_hash(read_manifest(manifest_b))
    assert registry.find_evidence(client, client.get_model_version(name, "1"), digest, "val", (2, 1)) is not None
    again = registry.promote(cfg_b, name)  # the evaluations are now logged evidence: nothing evaluated again
    assert "evaluated_now" not in again["champion"] and again["test"] == decision["test"]

    # A challenger whose manifest changed after it was measured: refused, champion kept.
    manifest_c = _manifest_variant(tiny_videos, tmp_path / "prepared_c", extra_rows=2)
    cfg_c = tiny_config(manifest=manifest_c)
    registry.register(cfg_c, fake_training(cfg_c, val_top1=1.0, seed=2), name)
    _manifest_variant(tiny_videos, tmp_path / "prepared_c", extra_rows=3)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:  # `uniformer promote`: the JSON line, then exit status 1
        promote_job.main(["--name", name])
    assert exited.value.code == 1
    refused = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert refused["decision"] == "refused" and "has changed" in refused["reason"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert client.get_model_version(name, "3").tags["promotion.decision"] == "refused"


def test_evaluate_refuses_a_manifest_with_other_labels(embedded, tiny_videos, tmp_path):
    cfg = tiny_config(manifest=tiny_videos["manifest"])
    checkpoint = tmp_path / "checkpoint.pt"
    from model import create_uniformer

    torch.save({"model_state": create_uniformer("uniformer_xs", num_classes=2).state_dict(),
                "config": tiny_config(extra=("model.num_classes=2",)).to_dict()}, checkpoint)
    with pytest.raises(InferenceError, match="the model has 2 classes"):
        evaluate(cfg, str(checkpoint), tiny_videos["manifest"], split="val", log=False)
    with pytest.raises(InferenceError, match="no 'test' rows; splits: train, val"):
        evaluate(cfg, str(checkpoint), tiny_videos["manifest"], split="test", log=False)


class _Payload:
    """An arbitrary class instance: unpickling it imports and rebuilds it (a malicious one would run code
    there), which `weights_only` loading refuses."""


def test_evaluate_refuses_a_checkpoint_that_would_run_pickled_code(embedded, tiny_videos, tmp_path):
    from model import create_uniformer

    cfg = tiny_config(manifest=tiny_videos["manifest"])
    torch.save({"model_state": create_uniformer("uniformer_xs", num_classes=3).state_dict(), "config": cfg.to_dict(),
                "extra": _Payload()}, tmp_path / "checkpoint.pt")
    with pytest.raises(InferenceError, match=r"checkpoint.pt holds objects other than tensors and plain values, "
                                              r"which would run code when unpickled \(Weights only load failed"):
        evaluate(cfg, str(tmp_path / "checkpoint.pt"), tiny_videos["manifest"], split="val", log=False)
