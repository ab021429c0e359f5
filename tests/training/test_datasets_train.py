"""The layouts users bring, end to end through the real CLI on a Ray cluster of this machine: Something-Something
V1 as distributed (JPEG frame folders) and a team's class folders (the README's fine-tuning walk: prepare, train
from a K400 checkpoint with a new head, evaluate, register, promote, predict). Tiny: uniformer_xs, one epoch of
two steps; what is checked is the path, not the accuracy."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from model import create_uniformer
from pipeline.data.official import class_list
from pipeline.data.prepare import PrepareOptions, prepare
from tests.data.datasets import CLASSES, class_folders, ssv1_dataset

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "infra" / "configs"
# One epoch of two steps of 4 clips on one CPU worker, with room for the decode tasks on 2 CPUs.
TINY = ["model.variant=uniformer_xs", "data.num_frames=8", "data.crop_size=64", "data.short_side=64",
        "data.test_clips=2", "data.test_crops=1", "data.decode_cpus=0.5", "data.decode_concurrency=2",
        "train.num_workers=1", "train.cpus_per_worker=0.5", "train.batch_size=4", "train.use_gpu=false",
        "train.precision=fp32", "optim.epochs=1", "train.max_steps_per_epoch=2", "optim.warmup_epochs=0",
        "tracking.system_metrics=false"]


def job(tmp_path: Path, address: str, name: str, *args: str, timeout_s: int = 900) -> tuple[dict, str]:
    """`python -m jobs.<name> ...` against the cluster and the test's MLflow; its closing JSON and its output."""
    cmd = [sys.executable, "-m", f"jobs.{name}", *args, f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "RAY_ADDRESS": address}, capture_output=True, text=True,
                          timeout=timeout_s)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr


def logged_labels(tmp_path: Path, model_uri: str) -> list[str]:
    """The labels.json the logged model carries."""
    import mlflow

    from pipeline.tracking.serving import read_bundle

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(tmp_path / "downloaded"))
    return read_bundle(local)[1]


def test_ssv1_frame_folders_prepare_train_and_evaluate(tmp_path, two_cpu_cluster):
    data = ssv1_dataset(tmp_path / "ssv1", videos_per_class=3)  # 4 training and 2 validation videos
    prepared = tmp_path / "prepared"
    summary = prepare([str(p) for p in data["annotations"]], str(data["frames"]), str(prepared), labels_uri="ssv1",
                      options=PrepareOptions(short_side=0), executor="inline")
    assert summary["ok"] == {"train": 4, "val": 2}

    trained, log = job(tmp_path, two_cpu_cluster, "train", "--config", str(CONFIGS / "demo.yaml"), *TINY,
                       f"data.manifest={prepared}", "data.sampling=uniform", "model.num_classes=0",
                       f"train.storage_path={tmp_path / 'ray_results'}", "train.run_name=ssv1")
    assert "train: model.num_classes=174, from the data's labels" in log
    assert (trained["epochs"], trained["steps"], trained["val_videos"]) == (1, 2, 2)
    assert logged_labels(tmp_path, trained["model_uri"]) == class_list("ssv1")  # the labels travel with the model

    result, _ = job(tmp_path, two_cpu_cluster, "evaluate", "--model", trained["model_uri"], "--manifest", str(prepared))
    assert result["eval_videos"] == 2 and result["eval_unusable"] == 0 and result["test_clips"] == 2


def readme_walk() -> list[list[str]]:
    """The commands of the README's "Your own videos to a promoted model" block, as argument lists."""
    text = (ROOT / "README.md").read_text().split("## Your own videos to a promoted model", 1)[1]
    block = text.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [shlex.split(line.split("#", 1)[0]) for line in block.splitlines() if line.strip()]


def test_the_fine_tuning_walk_on_class_folders_runs_as_the_readme_writes_it(tmp_path, two_cpu_cluster):
    """README, "Your own videos": a folder per class -> prepare -> fine-tune the K400 checkpoint (its head
    replaced) -> evaluate -> register -> promote -> predict: the README's commands, with its placeholders
    filled in and, for train, the CPU-sized overrides of TINY."""
    videos = class_folders(tmp_path / "my-videos", videos_per_class=4, num_frames=32)  # 8 frames at stride 4
    checkpoint = tmp_path / "uniformer_xs_k400_8x4.pth"
    torch.save(create_uniformer("uniformer_xs", num_classes=400).state_dict(), checkpoint)
    walk = readme_walk()
    assert [argv[:2] for argv in walk] == [["uniformer", job] for job in
                                           ("prepare", "train", "evaluate", "register", "promote", "predict")]
    places = {"DIR": str(videos), "work/mine": str(tmp_path / "my-prepared"),
              "checkpoints/uniformer_small_k400_16x4.pth": str(checkpoint),
              "DIR/some_class/some_video.mp4": str(videos / "left" / "left_0.mp4")}
    outputs: dict[str, dict] = {}
    for argv in walk:
        name, args = argv[1], [places.get(arg, arg) for arg in argv[2:]]
        args = [arg.replace("model.init_from=checkpoints/uniformer_small_k400_16x4.pth", f"model.init_from={checkpoint}")
                .replace("data.manifest=work/mine", f"data.manifest={tmp_path / 'my-prepared'}")
                .replace("RUN_ID", outputs.get("train", {}).get("run_id", "RUN_ID")) for arg in args]
        if name == "train":
            args += [f"train.storage_path={tmp_path / 'ray_results'}", *TINY]
        outputs[name], log = job(tmp_path, two_cpu_cluster, name, *args)
        if name == "train":
            assert "train: model.num_classes=3, from the data's labels" in log
            assert "new head for the data's classes (k400" in log.replace("Kinetics-400", "k400")
    assert outputs["prepare"]["splits_from"] == "drawn" and outputs["prepare"]["ok"] == {"train": 9, "val": 3}
    assert logged_labels(tmp_path, outputs["train"]["model_uri"]) == sorted(CLASSES)
    assert outputs["evaluate"]["eval_videos"] == 3
    assert outputs["register"]["version"] == 1 and outputs["promote"]["decision"] == "promoted"
    labels = [p["label"] for p in outputs["predict"]["top_k"]]
    assert labels and set(labels) <= set(CLASSES)
