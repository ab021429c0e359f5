"""The pyfunc video classifier: the same views as evaluation, bytes or URIs in (URIs only under allowed
prefixes), one bad video per row, and MLflow's own model server answering requests."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow.artifacts
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import StorageConfig
from pipeline.data.clips import make_clip_rows
from pipeline.tracking import serving
from tests.conftest import free_port, wait_for_http
from tests.tracking.conftest import LABELS, fake_training, tiny_config

NOT_ALLOWED = ("PermissionError: not an allowed video URI; send the video's bytes, or allow its prefix with "
               f"{serving.ALLOWED_PREFIXES_ENV}")


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


def test_classifier_takes_uris_or_bytes_and_reports_bad_videos(embedded, tiny_videos, monkeypatch):
    cfg = tiny_config()
    run_id = fake_training(cfg, val_top1=0.5)
    videos = tiny_videos["root"] / "videos"
    monkeypatch.setenv(serving.ALLOWED_PREFIXES_ENV, f"s3://other-bucket/clips, {videos}")
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/video_classifier")
    data = open(tiny_videos["video"], "rb").read()
    garbage = str(videos / "garbage.mp4")
    out = model.predict(pd.DataFrame({"video": [tiny_videos["video"], data, garbage, str(videos / "no/such.mp4")]}),
                        params={"top_k": 3})
    assert list(out.columns) == ["video", "label", "score", "labels", "scores", "error"]
    assert out["error"][0] == "" and out["error"][1] == "" and out["video"][1] == f"<{len(data)} bytes>"
    assert sorted(out["labels"][0]) == sorted(LABELS) and out["labels"][0] == out["labels"][1]
    np.testing.assert_allclose(out["scores"][0], out["scores"][1])
    assert out["label"][0] == out["labels"][0][0] and abs(sum(out["scores"][0]) - 1) < 1e-4
    # Fixed reasons: never FFmpeg's text or a path.
    assert out["error"][2] == "DecodeError: undecodable video" and out["labels"][2] == []
    assert out["error"][3] == "NoSuchFile: no such video"

    # Outside the allowed prefixes: refused per row, before anything is read.
    outside = [str(tiny_videos["root"] / "train.txt"), f"{videos}/../train.txt", f"{videos}2/x.mp4",
               "s3://other-bucket/clips2/a.mp4", "s3://other-bucket/clips/../secret.mp4", "s3://bucket/clips/a.mp4"]
    refused = model.predict(pd.DataFrame({"video": outside}))
    assert list(refused["error"]) == [NOT_ALLOWED] * len(outside)
    monkeypatch.delenv(serving.ALLOWED_PREFIXES_ENV)
    closed = mlflow.pyfunc.load_model(f"runs:/{run_id}/video_classifier")
    assert closed.predict(pd.DataFrame({"video": [tiny_videos["video"]]}))["error"][0] == NOT_ALLOWED
    own = mlflow.pyfunc.load_model(f"runs:/{run_id}/video_classifier",
                                   model_config={"allowed_prefixes": [tiny_videos["video"]]})
    assert own.predict(pd.DataFrame({"video": [tiny_videos["video"]]}))["error"][0] == ""
    by_bytes = model.predict(pd.DataFrame({"video_bytes": [data]}))
    assert by_bytes["label"][0] == out["label"][0] and len(by_bytes["labels"][0]) == 3  # top 5 of 3 classes


def test_allowed_prefixes_refuse_what_ffmpeg_reads_as_a_protocol(tmp_path, monkeypatch):
    """Resolved as relative paths, `concat:` and `subfile,` names would lie below the working directory;
    FFmpeg would then read the files named inside them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "link.mp4").symlink_to(tmp_path / "a.mp4")
    for uri in ("concat:a.mp4|a.mp4", f"concat:{tmp_path}/a.mp4", "subfile,,start,0,end,0,,:a.mp4", "file:a.mp4",
                "data:video/mp4;base64,AAAA", "pipe:0", "http:a.mp4"):
        with pytest.raises(PermissionError, match="not a plain local path or S3 URI"):
            serving.check_allowed(uri, [str(tmp_path)])
    # What passes is handed on resolved: absolute, links followed.
    assert serving.check_allowed("link.mp4", [str(tmp_path)]) == str(tmp_path / "a.mp4")
    assert serving.check_allowed(f"file://{tmp_path}/a.mp4", [str(tmp_path)]) == str(tmp_path / "a.mp4")


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


@contextlib.contextmanager
def served(cfg, name: str, folder: Path, env: dict[str, str]):
    """`mlflow models serve -m models:/NAME@champion --env-manager local` in its own process, working
    directory `folder`; yields `invoke(body) -> predictions` and the server's process id."""
    from pipeline.tracking.runs import tracking_uri

    port = free_port()
    # The server runs `uvicorn` from PATH: this interpreter's environment's.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(cfg),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **env}
    log_path = folder / "serve.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion",
                             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                wait_for_http(f"http://127.0.0.1:{port}/ping", timeout_s=2)
                break
            except RuntimeError:
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]

        def invoke(body: dict) -> list[dict]:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.loads(response.read())["predictions"]

        yield invoke, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_mlflow_models_serve_answers_bytes_and_allowed_uris(embedded, tiny_videos, tmp_path):
    """`mlflow models serve -m models:/NAME@champion --env-manager local` in its own process: a request with
    the video's bytes (base64), one with an allowed path, one with a path it must not read; and the model's
    own serving input example works as a request."""
    from pipeline.tracking import registry

    cfg = tiny_config(manifest=tiny_videos["manifest"])
    name = "uniformer-served"
    registry.register(cfg, fake_training(cfg, val_top1=0.5), name)
    registry.promote(cfg, name)
    videos = tiny_videos["root"] / "videos"
    with served(cfg, name, tmp_path, {serving.ALLOWED_PREFIXES_ENV: str(videos / "right")}) as (invoke, _):
        data = open(tiny_videos["video"], "rb").read()
        by_bytes = invoke({"dataframe_split": {"columns": ["video_bytes"],
                                               "data": [[base64.b64encode(data).decode()]]}, "params": {"top_k": 2}})
        assert by_bytes[0]["error"] == "" and len(by_bytes[0]["labels"]) == 2
        by_uri = invoke({"dataframe_records": [{"video": tiny_videos["video"]},
                                               {"video": str(videos / "left" / "left_0000.mp4")}]})
        assert by_uri[0]["error"] == "" and by_uri[0]["labels"] == [*by_bytes[0]["labels"], *by_uri[0]["labels"][2:]]
        assert by_uri[1]["error"] == NOT_ALLOWED

        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path / "m")))
        example = json.loads((local / "serving_input_example.json").read_text())
        assert list(example) == ["dataframe_split"] and example["dataframe_split"]["columns"] == ["video_bytes"]
        assert invoke(example)[0]["error"] == ""


def test_mlflow_models_serve_answers_the_hostile_corpus_with_fixed_reasons(embedded, tiny_videos, tmp_path):
    """The hostile corpus (tests/data/hostile.py) against a real server whose working directory holds the
    corpus and is its allowed prefix: every row gets its short fixed reason (never a path or FFmpeg's
    text), requests over the row and byte limits are refused whole, the server's memory stays bounded,
    and a real video sent afterwards gets the answer it got before."""
    import psutil

    from pipeline.tracking import registry
    from tests.data.hostile import MULTI_GB, PRIVATE, REFUSED, write_corpus

    cfg = tiny_config(manifest=tiny_videos["manifest"])
    name = "uniformer-hostile"
    registry.register(cfg, fake_training(cfg, val_top1=0.5), name)
    registry.promote(cfg, name)
    folder = tmp_path / "corpus"
    cases = write_corpus(folder)
    # Request limits lowered through MLflow's own override of the logged model config.
    env = {serving.ALLOWED_PREFIXES_ENV: str(folder),
           "MLFLOW_PYFUNC_INFERENCE_CONFIG": json.dumps({"limits": {"max_request_rows": 20, "max_request_mb": 1}})}

    def as_bytes(blobs: list[bytes]) -> dict:
        return {"dataframe_split": {"columns": ["video_bytes"], "data": [[base64.b64encode(b).decode()] for b in blobs]}}

    with served(cfg, name, folder, env) as (invoke, pid):
        real = open(tiny_videos["video"], "rb").read()
        before = invoke(as_bytes([real]))[0]
        assert before["error"] == ""
        server = psutil.Process(pid)

        def rss() -> int:
            return sum(p.memory_info().rss for p in [server, *server.children(recursive=True)])

        baseline = rss()
        sent = {k: c for k, c in cases.items() if c.is_file and os.path.getsize(c.source) < MULTI_GB}
        answers = invoke(as_bytes([Path(c.source).read_bytes() for c in sent.values()]))
        assert {k: a["error"] for k, a in zip(sent, answers)} == {k: c.server_error for k, c in sent.items()}
        assert all(a["labels"] == [] for a in answers)

        # The same cases as paths below the allowed prefix; protocol paths are not paths at all, even
        # relative ones that would resolve below the working directory.
        paths = {**{k: c.source for k, c in cases.items()}, "relative_concat": f"concat:{PRIVATE}|{PRIVATE}"}
        expected = {k: c.server_error if c.is_file or k == "image2_pattern" else NOT_ALLOWED for k, c in cases.items()}
        expected["relative_concat"] = NOT_ALLOWED
        answers = invoke({"dataframe_records": [{"video": p} for p in paths.values()]})
        assert {k: a["error"] for k, a in zip(paths, answers)} == expected
        assert expected["image2_pattern"] == REFUSED

        rows = invoke(as_bytes([b"x"] * 21))
        assert [r["error"] for r in rows] == ["RequestError: over data.limits.max_request_rows=20 rows in one request"] * 21
        big = invoke(as_bytes([real, bytes(1_200_000)]))
        assert [r["error"] for r in big] == ["RequestError: over data.limits.max_request_mb=1 of video bytes in one "
                                             "request"] * 2

        # Before the limits, the 16384x2 clip alone grew a server by 2.1 GiB.
        assert rss() - baseline < 300 * 2 ** 20, (baseline, rss())
        after = invoke(as_bytes([real]))[0]
        assert after["error"] == "" and after["labels"] == before["labels"]
        np.testing.assert_allclose(after["scores"], before["scores"], atol=1e-6)
