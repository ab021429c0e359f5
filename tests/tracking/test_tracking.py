"""Run bookkeeping on the embedded default: what a new run records, resume, secrets, system metrics."""

from __future__ import annotations

import time

import pytest

from pipeline.tracking.datasets import dataset_labels
from pipeline.tracking.metrics import system_metrics
from pipeline.tracking.redaction import redact
from pipeline.tracking.runs import client_for, find_or_create_run, mark_failed, model_cost, ray_run_name, tracking_uri
from tests.tracking.conftest import tiny_config


def test_redact_masks_secret_env_values_and_url_passwords(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "supersecret-xyz")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-pw")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # short, not secret-looking values stay
    text = "key supersecret-xyz at https://alice:hunter2-pw@mlflow.example/ and http://bob:pa55word@h:5000/x token"
    out = redact(text)
    assert "supersecret-xyz" not in out and "hunter2-pw" not in out and "pa55word" not in out
    assert "https://alice:***@mlflow.example/" in out and "http://bob:***@h:5000/x" in out
    assert out.endswith(" token")


def test_model_cost_matches_the_paper():
    cost = model_cost("uniformer_s", 400, num_frames=16, crop_size=224)
    assert round(cost["param_count"] / 1e6, 2) == 21.40
    assert abs(cost["gmacs_per_clip"] - 41.7) < 0.1


def test_new_run_records_config_dataset_model_and_code(embedded, tiny_videos):
    cfg = tiny_config(manifest=tiny_videos["manifest"])
    run_id = find_or_create_run(cfg)
    assert tracking_uri(cfg) == f"sqlite:///{embedded / 'mlflow.db'}"
    client = client_for(cfg)
    run = client.get_run(run_id)
    params, tags = run.data.params, run.data.tags
    assert params["model.variant"] == "uniformer_xs" and params["data.num_frames"] == "8"
    assert len(params["data.manifest_hash"]) == 64
    assert params["data.count.train.ok"] == "6" and params["data.count.val.ok"] == "4"
    assert params["data.count.val.unreadable"] == "1"
    assert params["data.manifest_uri"].endswith("prepared/manifest.parquet")
    assert int(params["model.param_count"]) > 1_000_000 and float(params["model.gmacs_per_clip"]) > 0
    assert params["code.version"].startswith(("git:", "uniformer-ray==")) or params["code.version"] == "unknown"
    assert tags["job"] == "train" and tags["variant"] == "uniformer_xs" and tags["dataset"] == "prepared"
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "prepared"
    assert "prepared/manifest.parquet" in dataset_input.dataset.source
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "train"
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]
    assert run.info.artifact_uri.startswith((embedded / "mlartifacts").as_uri())


def test_a_resumed_training_continues_its_run(embedded):
    cfg = tiny_config(run_name="resumable")
    first = find_or_create_run(cfg)
    assert find_or_create_run(cfg) == first  # a resume (or a restarted driver)
    client = client_for(cfg)
    client.set_terminated(first, "FAILED")  # a crashed driver, then a resume
    assert find_or_create_run(cfg) == first
    assert client.get_run(first).info.status == "RUNNING"
    client.set_terminated(first, "FINISHED")  # then trained further under the same name
    assert find_or_create_run(cfg) == first
    assert client.get_run(first).info.status == "RUNNING"
    assert find_or_create_run(tiny_config(run_name="other")) != first


def test_a_resume_with_another_config_or_dataset_is_refused(embedded, tiny_videos, tmp_path):
    import shutil

    from pipeline.config import ConfigError
    from pipeline.data.manifest import read_manifest, write_manifest

    cfg = tiny_config(run_name="guarded", manifest=tiny_videos["manifest"])
    first = find_or_create_run(cfg)
    longer = tiny_config(run_name="guarded", manifest=tiny_videos["manifest"], extra=("optim.epochs=5",))
    assert find_or_create_run(longer) == first  # more epochs: the allowed kind of change
    client = client_for(cfg)
    assert client.get_run(first).data.tags["resumed.optim.epochs"] == "5"
    assert client.get_run(first).data.params["optim.epochs"] == "2"  # params say what the run started as
    with pytest.raises(ConfigError, match=r"continues MLflow run \w+, which trained with other values of "
                                          r"optim\.weight_decay, train\.seed; keep them, pass --new-run"):
        find_or_create_run(tiny_config(run_name="guarded", manifest=tiny_videos["manifest"],
                                                extra=("optim.weight_decay=0.1", "train.seed=3")))
    changed = tmp_path / "prepared"  # the same folder name, other rows: the manifest hash tells
    shutil.copytree(tiny_videos["manifest"], changed)
    table = read_manifest(str(changed))
    write_manifest(table.slice(1), str(changed))
    moved = tiny_config(run_name="guarded", manifest=str(changed))
    with pytest.raises(ConfigError, match=r"other values of data\.manifest, data\.manifest_hash"):
        find_or_create_run(moved)

    fresh = find_or_create_run(moved, new_run=True)
    assert fresh != first
    assert ray_run_name(moved, first) == "guarded"
    assert ray_run_name(moved, fresh) == f"guarded-{fresh[:8]}"  # Ray must not resume the old one
    assert find_or_create_run(moved) == fresh  # the newest run of the name is the one resumed


def test_a_failed_training_marks_its_run_failed(embedded, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the unreachable server below fails at once
    cfg = tiny_config(run_name="doomed")
    run_id = find_or_create_run(cfg)
    mark_failed(cfg, run_id)
    assert client_for(cfg).get_run(run_id).info.status == "FAILED"
    unreachable = tiny_config(run_name="doomed", extra=("tracking.tracking_uri=http://127.0.0.1:1",))
    mark_failed(unreachable, run_id)  # warns, never raises over the training's own error


@pytest.fixture
def fitted(embedded, monkeypatch):
    """`run_training` on the embedded default with Ray Train's part faked: fit() returns at once with a
    checkpoint on S3 as Ray gives it (a path without scheme, and its pyarrow filesystem); returns
    the run ids run_training opened."""
    from types import SimpleNamespace

    from pyarrow import fs as pafs

    from pipeline.training import driver

    s3 = pafs.S3FileSystem(region="us-east-1", endpoint_override="127.0.0.1:1", scheme="http")  # never contacted
    result = SimpleNamespace(checkpoint=SimpleNamespace(path="bucket/ray_results/run/checkpoint_000002", filesystem=s3))
    monkeypatch.setattr("pipeline.cluster.connect.init_ray", lambda: False)
    monkeypatch.setattr(driver, "make_trainer", lambda *args, **kwargs: SimpleNamespace(fit=lambda: result))
    monkeypatch.setattr(driver, "load_checkpoint_state",
                        lambda checkpoint: {"epoch": 2, "step": 4, "last_val": {"val_top1": 0.5}})
    monkeypatch.setattr(driver, "finish_training_run", lambda cfg, run_id, state, labels: {"run_id": run_id})
    run_ids = []

    def find_or_create_run(*args, **kwargs):
        run_ids.append(find_or_create_run.real(*args, **kwargs))
        return run_ids[-1]

    find_or_create_run.real = driver.find_or_create_run
    monkeypatch.setattr(driver, "find_or_create_run", find_or_create_run)
    return run_ids


@pytest.mark.parametrize("failing", ["finish_training_run", "load_checkpoint_state"])
def test_a_failure_after_fit_marks_the_run_failed(fitted, tiny_videos, monkeypatch, failing):
    from pipeline.training import driver

    def unreachable(*args, **kwargs):
        raise ConnectionError("tracking server or storage unreachable")

    monkeypatch.setattr(driver, failing, unreachable)
    cfg = tiny_config(manifest=tiny_videos["manifest"])
    with pytest.raises(ConnectionError):
        driver.run_training(cfg)
    assert client_for(cfg).get_run(fitted[0]).info.status == "FAILED"


def test_the_train_result_names_an_s3_checkpoint_by_its_uri(fitted, tiny_videos):
    from pipeline.training import driver

    result = driver.run_training(tiny_config(manifest=tiny_videos["manifest"]))
    assert result["checkpoint"] == "s3://bucket/ray_results/run/checkpoint_000002"
    assert result["run_id"] == fitted[0] and result["steps"] == 4


def test_system_metrics_come_from_local_rank_zero_only(embedded):
    cfg = tiny_config(run_name="sysmetrics", extra=("tracking.system_metrics=true",))
    run_id = find_or_create_run(cfg)
    with system_metrics(cfg, run_id, local_rank=1, node_rank=0, sampling_interval_s=0.2):
        time.sleep(0.6)
    with system_metrics(tiny_config(run_name="sysmetrics"), run_id, local_rank=0, node_rank=0,
                                 sampling_interval_s=0.2):
        time.sleep(0.6)
    client = client_for(cfg)
    assert not [k for k in client.get_run(run_id).data.metrics if k.startswith("system/")]
    with system_metrics(cfg, run_id, local_rank=0, node_rank=1, sampling_interval_s=0.2):
        time.sleep(1.5)
    keys = [k for k in client.get_run(run_id).data.metrics if k.startswith("system/")]
    assert "system/node_1/cpu_utilization_percentage" in keys
    assert all(k.startswith("system/node_1/") for k in keys)


def test_dataset_labels_come_from_labels_json_else_the_manifest(tiny_videos, tmp_path):
    import json
    import shutil

    cfg = tiny_config(manifest=tiny_videos["manifest"])
    assert dataset_labels(cfg) == tiny_videos["labels"]
    folder = tmp_path / "prepared"
    shutil.copytree(tiny_videos["manifest"], folder)
    (folder / "labels.json").write_text(json.dumps(["a", "b"]))
    assert dataset_labels(tiny_config(manifest=str(folder))) == ["a", "b", "class_2"]
    (folder / "labels.json").write_text(json.dumps(["a", "b", "c", "d"]))
    with pytest.raises(ValueError, match="names 4 classes but model.num_classes=3; set model.num_classes=4"):
        dataset_labels(tiny_config(manifest=str(folder)))
