import json

import numpy as np
import pytest

from jobs import synth as synth_job
from pipeline.data.decode import count_frames, decode_frames
from pipeline.data.synth import MOTIONS, class_names, encode_h264, render_video, synth_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = synth_dataset(str(out), num_classes=6, videos_per_class=8, seed=3, num_frames=16, size=64)
    return out, summary


def test_format(dataset):
    out, summary = dataset
    labels = json.loads((out / "labels.json").read_text())
    assert labels == ["right", "left", "down", "up", "grow", "shrink"] == summary["labels"]
    train = (out / "train.txt").read_text().splitlines()
    val = (out / "val.txt").read_text().splitlines()
    assert len(train) == 6 * 6 and len(val) == 6 * 2  # round(8 * 0.25) = 2 per class in val
    for line in train + val:
        path, name = line.split(" ")
        assert name in labels and path.startswith(f"videos/{name}/") and path.endswith(".mp4")
        assert (out / path).is_file()
    path = out / train[0].split(" ")[0]
    assert count_frames(path) == 16
    assert decode_frames(path, [0]).shape == (1, 64, 64, 3)
    assert summary["videos"] == 48 and summary["train"] == 36 and summary["val"] == 12


def test_deterministic_per_seed(dataset, tmp_path):
    out, _ = dataset
    again = synth_dataset(str(tmp_path), num_classes=6, videos_per_class=8, seed=3, num_frames=16, size=64)
    assert again["labels"] == dataset[1]["labels"]
    for rel in ("videos/grow/grow_0003.mp4", "videos/left/left_0007.mp4", "train.txt", "labels.json"):
        assert (tmp_path / rel).read_bytes() == (out / rel).read_bytes()
    other = render_video(np.random.default_rng([4, 0, 0]), MOTIONS[0], num_frames=4, height=32, width=32)
    assert not np.array_equal(other, render_video(np.random.default_rng([3, 0, 0]), MOTIONS[0], num_frames=4,
                                                  height=32, width=32))


def test_frames_are_textured_and_move():
    video = render_video(np.random.default_rng(0), MOTIONS[0], num_frames=8, height=64, width=64).astype(int)
    # texture: neighbouring pixels differ (flat colours do not train, DESIGN.md "Pitfalls")
    assert np.abs(np.diff(video[0], axis=1)).mean() > 8
    # motion: consecutive frames differ, locally
    assert (np.abs(video[1] - video[0]).sum(-1) > 30).mean() > 0.01


def test_first_frame_does_not_tell_the_class():
    """Simple frame statistics of the first frame are spread alike in every class."""
    names = class_names(6)
    stats = {c: [] for c in range(6)}
    for c in range(6):
        for k in range(24):
            frame = render_video(np.random.default_rng([11, c, k]), MOTIONS[c], num_frames=2, height=48,
                                 width=48)[0].astype(float)
            stats[c].append([frame.mean(), frame.std(), np.abs(np.diff(frame, axis=1)).mean()])
    means = np.array([np.mean(stats[c], axis=0) for c in range(6)])  # (classes, stats)
    within = np.array([np.std(stats[c], axis=0) for c in range(6)]).mean(axis=0)
    # class means lie within a fraction of the spread inside one class: no separating statistic
    assert (means.std(axis=0) < 0.5 * within).all(), (names, means, within)


def test_all_motions_render():
    assert len({m.name for m in MOTIONS}) == len(MOTIONS) >= 12
    for motion in MOTIONS:
        video = render_video(np.random.default_rng(0), motion, num_frames=3, height=32, width=48)
        assert video.shape == (3, 32, 48, 3) and video.dtype == np.uint8


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_classes=1), "num_classes=1 is not supported; use 2 to"),
    (dict(num_classes=99), "num_classes=99"),
    (dict(videos_per_class=0), "videos_per_class=0"),
    (dict(size=33), "size=33 must be an even"),
    (dict(val_fraction=1.0), r"val_fraction=1.0 must be in \[0, 1\)"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    args = dict(num_classes=2, videos_per_class=1, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        synth_dataset(str(tmp_path), **args)


def test_encode_h264_checks():
    with pytest.raises(ValueError, match="even size"):
        encode_h264(np.zeros((2, 15, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="strictly increasing"):
        encode_h264(np.zeros((2, 16, 16, 3), np.uint8), pts=[0, 0])


def test_job_writes_and_prints_json(tmp_path, capsys):
    summary = synth_job.main(["--output", str(tmp_path / "out"), "--classes", "3", "--videos-per-class", "2",
                              "--seed", "1", "--frames", "8", "--size", "32"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line)["videos"] == 6 == summary["videos"]
    assert (tmp_path / "out" / "labels.json").is_file()


def test_job_writes_to_s3(s3_bucket):
    from pipeline.data import storage

    endpoint, bucket = s3_bucket
    uri = f"s3://{bucket}/synth"
    synth_job.main(["--output", uri, "--classes", "2", "--videos-per-class", "2", "--frames", "8", "--size", "32",
                    f"storage.endpoint_url={endpoint}"])
    cfg = storage.StorageConfig(endpoint_url=endpoint)
    assert json.loads(storage.read_bytes(f"{uri}/labels.json", storage=cfg)) == ["right", "left"]
    line = storage.read_bytes(f"{uri}/train.txt", storage=cfg).decode().splitlines()[0]
    assert count_frames(storage.read_bytes(f"{uri}/{line.split()[0]}", storage=cfg)) == 8
