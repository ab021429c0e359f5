"""A training's start (`model.init_from`) against the data's labels: an official checkpoint's head is kept
only for the list it was trained on (reordered for the same names in another order, refused otherwise),
a new head where the classes differ; checkpoints are read from local files and S3."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import create_uniformer
from pipeline.config import ConfigError, load_config
from pipeline.data import storage as st
from pipeline.data.official import class_list
from pipeline.training.pretrained import check_init, load_initial_weights

ROOT = Path(__file__).resolve().parents[2]


def official_checkpoint(path: Path, num_classes: int, seed: int = 0) -> dict:
    """A bare state dict, as the official files are, of the tiny variant (the layout's keys)."""
    torch.manual_seed(seed)
    state = create_uniformer("uniformer_xs", num_classes=num_classes).state_dict()
    torch.save(state, path)
    return state


def prepared_labels(folder: Path, labels: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.json").write_text(json.dumps(labels))
    return folder


def config(tmp_path, init_from, manifest, *extra):
    return load_config(None, ["model.variant=uniformer_xs", f"model.init_from={init_from}",
                              f"data.manifest={manifest}", *extra])


def test_the_official_list_keeps_the_head(tmp_path):
    ckpt = tmp_path / "uniformer_xs_k400_8x4.pth"
    state = official_checkpoint(ckpt, 400)
    cfg = config(tmp_path, ckpt, prepared_labels(tmp_path / "k400", class_list("k400")), "model.num_classes=400")
    net = create_uniformer("uniformer_xs", num_classes=400)
    line = load_initial_weights(net, cfg)
    assert "head kept (Kinetics-400 checkpoint, labels checked)" in line
    assert torch.equal(net.state_dict()["head.weight"], state["head.weight"])


def test_a_shuffled_list_is_never_used_as_it_is(tmp_path):
    """The same names in another order: the head follows the names (and the log says so). A shuffled list
    whose names are not all the checkpoint's is refused, naming the first index where they differ."""
    ckpt = tmp_path / "uniformer_xs_k400_8x4.pth"
    state = official_checkpoint(ckpt, 400)
    k400 = class_list("k400")
    shuffled = k400[:]
    random.Random(1).shuffle(shuffled)
    cfg = config(tmp_path, ckpt, prepared_labels(tmp_path / "sorted", shuffled), "model.num_classes=400")
    net = create_uniformer("uniformer_xs", num_classes=400)
    line = load_initial_weights(net, cfg)
    assert "the data lists the Kinetics-400 classes in another order: the checkpoint's head was reordered" in line
    got = net.state_dict()
    for j in (0, 7, 399):
        assert torch.equal(got["head.weight"][j], state["head.weight"][k400.index(shuffled[j])])
        assert torch.equal(got["head.bias"][j], state["head.bias"][k400.index(shuffled[j])])

    renamed = [name.replace(" ", "_") for name in shuffled]  # a folder listing's spelling
    cfg = config(tmp_path, ckpt, prepared_labels(tmp_path / "renamed", renamed), "model.num_classes=400")
    first = next(i for i, (a, b) in enumerate(zip(renamed, k400)) if a != b)
    with pytest.raises(ConfigError, match=rf"^model.init_from={ckpt}: the data \({tmp_path / 'renamed'}\) has 400 "
                       rf"labels, the Kinetics-400 checkpoint 400; they differ first at index {first}: "):
        check_init(cfg, renamed)


def test_other_classes_get_a_new_head_and_174_needs_the_dataset_named(tmp_path):
    ckpt = tmp_path / "weights.pth"  # a name that says nothing
    state = official_checkpoint(ckpt, 174)
    own = prepared_labels(tmp_path / "own", ["a", "b", "c"])
    net = create_uniformer("uniformer_xs", num_classes=3)
    line = load_initial_weights(net, config(tmp_path, ckpt, own, "model.num_classes=3", "model.init_dataset=ssv2"))
    assert line.endswith("new head for the data's classes (Something-Something V2 checkpoint)")
    assert torch.equal(net.state_dict()["patch_embed1.proj.weight"], state["patch_embed1.proj.weight"])
    ssv2 = prepared_labels(tmp_path / "ssv2", class_list("ssv2"))
    with pytest.raises(ConfigError, match=r"has a head of 174 classes, Something-Something V1 or V2, and its name "
                       r"does not say which: set model.init_dataset=ssv1 or model.init_dataset=ssv2"):
        check_init(config(tmp_path, ckpt, ssv2, "model.num_classes=174"), class_list("ssv2"))
    ssv1 = class_list("ssv1")
    with pytest.raises(ConfigError, match=r"they differ first at index 2: 'x' where Something-Something V1 has "
                       r"'Bending something so that it deforms'; 1 of its names are not Something-Something V1 "
                       r"classes, e.g. 'x'"):
        check_init(config(tmp_path, ckpt, ssv2, "model.num_classes=174", "model.init_dataset=ssv1"),
                   ssv1[:2] + ["x"] + ssv1[3:])
    # model.new_head: the same class count, but a new classifier (a team's 174 classes of its own).
    cfg = config(tmp_path, ckpt, ssv2, "model.num_classes=174", "model.init_dataset=ssv2", "model.new_head=true")
    assert check_init(cfg, ["x"] * 174).head == "new"


def test_an_own_training_checkpoint_keeps_its_head(tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    state = create_uniformer("uniformer_xs", num_classes=400).state_dict()
    torch.save({"model_state": state, "config": {"model": {}}}, ckpt)
    cfg = config(tmp_path, ckpt, prepared_labels(tmp_path / "own", [f"c{i}" for i in range(400)]),
                 "model.num_classes=400")
    assert check_init(cfg, [f"c{i}" for i in range(400)]).head == "kept"


def test_init_from_s3(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    ckpt = tmp_path / "uniformer_xs_k400_8x4.pth"
    state = official_checkpoint(ckpt, 400, seed=3)
    uri = f"s3://{bucket}/checkpoints/uniformer_xs_k400_8x4.pth"
    st.upload_file(str(ckpt), uri, storage=load_config(None, [f"storage.endpoint_url={endpoint}"]).storage)
    cfg = config(tmp_path, uri, prepared_labels(tmp_path / "k400", class_list("k400")), "model.num_classes=400",
                 f"storage.endpoint_url={endpoint}")
    net = create_uniformer("uniformer_xs", num_classes=400)
    load_initial_weights(net, cfg)
    assert torch.equal(net.state_dict()["head.bias"], state["head.bias"])


def test_train_refuses_a_shuffled_renamed_list_before_any_ray_work(tmp_path):
    """Through `uniformer train`: a prepared set whose labels are not the K400 checkpoint's fails at once."""
    from pipeline.data.manifest import write_manifest

    ckpt = tmp_path / "uniformer_xs_k400_8x4.pth"
    official_checkpoint(ckpt, 400)
    labels = [name.upper() for name in class_list("k400")]
    folder = prepared_labels(tmp_path / "prepared", labels)
    write_manifest([{"index": i, "path": f"/v/{i}.mp4", "label": i, "label_name": labels[i], "split": "train",
                     "status": "ok", "num_frames": 32} for i in range(16)], str(folder))
    cmd = [sys.executable, "-m", "jobs.train", "--config", str(ROOT / "infra/configs/demo.yaml"),
           f"data.manifest={folder}", f"model.init_from={ckpt}", "model.num_classes=0",
           f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})  # any Ray call would hang or fail
    assert proc.returncode == 2, proc.stderr
    assert "train: model.num_classes=400, from the data's labels" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"uniformer train: model.init_from={ckpt}: the data ({folder}) has 400 labels, the Kinetics-400 checkpoint "
        "400; they differ first at index 0: 'RIDING A BIKE' where Kinetics-400 has 'riding a bike'")
