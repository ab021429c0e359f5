"""`uniformer evaluate --model CHECKPOINT.pth`: an official checkpoint (a bare state dict, saved here from the
model code in the official layout) under the official test protocol of its dataset, with its head in the
manifest's label order, and the published figure printed beside the measured one.

The checkpoints' heads answer one class whatever the clip (zero weights, one large bias), so the measured
top-1 says which label order the evaluation used: the share of videos of that class when the head's rows
follow the manifest's labels, 0 when they do not."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jobs import evaluate as evaluate_job
from model import create_uniformer
from pipeline.config import load_config
from pipeline.data import official
from pipeline.data.prepare import PrepareOptions, prepare
from pipeline.data.synth import MOTIONS, encode_h264, render_video
from pipeline.tracking.evaluate import run_evaluation


def checkpoint(path, num_classes: int, answer: int):
    """A uniformer_xs state dict with the official keys whose head always answers class `answer`."""
    state = create_uniformer("uniformer_xs", num_classes=num_classes).state_dict()
    state["head.weight"] = torch.zeros_like(state["head.weight"])
    state["head.bias"] = torch.full_like(state["head.bias"], -10.0)
    state["head.bias"][answer] = 10.0
    torch.save(state, path)
    return path


def prepared(root, labels_of_videos: list[str], labels: str) -> str:
    """Synthetic val videos (32 frames, 64 pixels) labelled `labels_of_videos`, prepared with `--labels labels`."""
    lines = []
    for k, name in enumerate(labels_of_videos):
        video = render_video(np.random.default_rng(k), MOTIONS[k % 4], num_frames=32, height=64, width=64)
        (root / "videos").mkdir(parents=True, exist_ok=True)
        (root / "videos" / f"v{k}.mp4").write_bytes(encode_h264(video))
        lines.append(f"v{k}.mp4\t{name}\tval")
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    prepare([str(root / "val.txt")], str(root / "videos"), str(root / "prepared"), labels_uri=labels,
            options=PrepareOptions(transcode=False), executor="inline")
    return str(root / "prepared")


def run_cli(capsys, *args):
    evaluate_job.main([*args, "--no-log", "data.inference_batch_size=4"])
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


def test_a_kinetics_checkpoint_runs_4_clips_x_1_crop_in_the_manifests_label_order(ray_local, tmp_path, capsys,
                                                                                   monkeypatch):
    k400 = official.class_list("k400")
    ckpt = checkpoint(tmp_path / "uniformer_xs_k400_8x4.pth", 400, k400.index("abseiling"))
    videos = ["abseiling", "abseiling", "riding a bike"]
    monkeypatch.setitem(official.PUBLISHED, ("k400", "uniformer_xs", 8, "x4"), 66.0)  # no figure for xs: one here

    manifest = prepared(tmp_path / "official", videos, "k400")
    result, err = run_cli(capsys, "--model", str(ckpt), "--manifest", manifest)
    assert (result["dataset"], result["variant"], result["num_frames"]) == ("k400", "uniformer_xs", 8)
    assert (result["test_clips"], result["test_crops"], result["eval_views"]) == (4, 1, 4)
    assert result["eval_top1"] == pytest.approx(2 / 3) and result["label_order"] == "official"
    assert result["published_top1"] == 0.66
    assert "uniformer evaluate: top-1 66.7% measured, 66.0% published (k400, uniformer_xs, 8 frames, 4 clip(s) x " \
           "1 crop(s), 3 videos)" in err

    # The same videos prepared with the names sorted (as a folder listing or a plain preparation gives them):
    # the head follows the names, and the log says so.
    (tmp_path / "sorted.txt").write_text("\n".join(sorted(k400)) + "\n")
    manifest = prepared(tmp_path / "sorted", videos, str(tmp_path / "sorted.txt"))
    result, err = run_cli(capsys, "--model", str(ckpt), "--manifest", manifest)
    assert result["eval_top1"] == pytest.approx(2 / 3) and result["label_order"] == "reordered"
    assert "the manifest lists the Kinetics-400 classes in another order: the checkpoint's head was reordered" in err

    # Labels that are not the checkpoint's: refused, naming the first index where they differ.
    renamed = [name.replace("riding a bike", "cycling") for name in k400]
    (tmp_path / "renamed.txt").write_text("\n".join(renamed) + "\n")
    manifest = prepared(tmp_path / "renamed", ["abseiling", "cycling"], str(tmp_path / "renamed.txt"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        evaluate_job.main(["--model", str(ckpt), "--manifest", manifest, "--no-log"])
    assert info.value.code == 1
    assert capsys.readouterr().err.strip() == (
        f"uniformer evaluate: the manifest {manifest} has 400 labels, the Kinetics-400 checkpoint 400; they differ "
        "first at index 0: 'cycling' where Kinetics-400 has 'riding a bike'; 1 of its names are not Kinetics-400 "
        "classes, e.g. 'cycling'. Prepare the data with `--labels k400` (the official list)")


def test_a_something_something_checkpoint_runs_1_clip_x_3_crops(ray_local, embedded, tmp_path, capsys):
    ssv2 = official.class_list("ssv2")
    answer = ssv2.index("Pushing something from left to right")
    videos = ["Pushing something from left to right", "Pushing something from right to left"]
    manifest = prepared(tmp_path / "ssv2", videos, "ssv2")
    ckpt = checkpoint(tmp_path / "uniformer_xs_sthv2_8_prek400.pth", 174, answer)
    cfg = load_config(None, ["data.inference_batch_size=3"])  # data settings at their defaults: the protocol's
    evaluation = run_evaluation(cfg, str(ckpt), manifest)
    assert (evaluation.data.sampling, evaluation.data.num_frames) == ("uniform", 8)
    assert (evaluation.data.test_clips, evaluation.data.test_crops, evaluation.data.crop_size) == (1, 3, 224)
    assert evaluation.result["eval_views"] == 3 and evaluation.result["eval_top1"] == 0.5
    assert evaluation.result["published_top1"] is None  # the README lists no uniformer_xs
    rows = evaluation.predictions.to_pylist()
    assert [r["views"] for r in rows] == [3, 3]
    assert all(r["top_labels"][0] == "Pushing something from left to right" for r in rows)  # names, not indices

    # A name that says nothing: 174 classes are SSv1 or SSv2, which --dataset tells.
    anonymous = tmp_path / "weights.pth"
    anonymous.write_bytes(ckpt.read_bytes())
    with pytest.raises(SystemExit):
        evaluate_job.main(["--model", str(anonymous), "--manifest", manifest, "--no-log"])
    assert "has a head of 174 classes, Something-Something V1 or V2, and its name does not say which: set " \
           "--dataset=ssv1 or --dataset=ssv2" in capsys.readouterr().err
    evaluate_job.main(["--model", str(anonymous), "--manifest", manifest, "--dataset", "ssv2",
                       "data.inference_batch_size=3"])
    logged = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert logged["eval_top1"] == 0.5 and logged["dataset"] == "ssv2" and logged["eval_run_id"]
    from pipeline.tracking.runs import client_for

    params = client_for(cfg).get_run(logged["eval_run_id"]).data.params
    assert params["eval.official_dataset"] == "ssv2" and params["eval.test_crops"] == "3"

