"""`uniformer prepare` on the layouts users bring, through its CLI: Something-Something V1 as distributed
(JPEG frame folders, `id;label` CSVs; local, tar shards, S3) and a team's class folders (split drawn or
laid out). Every bad folder keeps its row, with a status and a reason."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from jobs.prepare import main
from pipeline.config import StorageConfig
from pipeline.data import manifest as mf
from pipeline.data import storage as st
from pipeline.data.annotations import read_labels
from pipeline.data.decode import decode_frames
from pipeline.data.folders import draw_split
from pipeline.data.official import class_list
from tests.data.datasets import CLASSES, SSV1_FRAMES, class_folders, ssv1_dataset, tar_shards, write_frames


def run_cli(capsys, *args: str) -> dict:
    summary = main(list(args))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    return summary


def add_bad_folders(root) -> dict[str, tuple[str, str]]:
    """Broken frame folders annotated in the training CSV: id -> (status, reason start)."""
    frames, names = root / SSV1_FRAMES, class_list("ssv1")
    still = np.full((20, 100, 132, 3), 90, np.uint8)
    write_frames(frames / "901", still)
    (frames / "901" / "00007.jpg").unlink()
    write_frames(frames / "902", still)
    (frames / "902" / "00003.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    write_frames(frames / "903", still)
    Image.fromarray(np.zeros((100, 120, 3), np.uint8)).save(frames / "903" / "00011.jpg")
    write_frames(frames / "904", still[:5])
    expected = {"901": ("unreadable", "1 missing frame(s): numbers 7 of 1-20"),
                "902": ("unreadable", "00003.jpg: "), "903": ("unreadable", "00011.jpg is 120x100, 00001.jpg 132x100"),
                "904": ("too_short", "5 frames is below the minimum 16"),
                "905": ("missing", "")}
    with open(root / "something-something-v1-train.csv", "a") as f:
        f.writelines(f"{vid};{names[1]}\n" for vid in expected)
    return expected


def check_ssv1(table, data, bad, *, cfg=StorageConfig()) -> None:
    rows = {r["source_path"].rsplit("/", 1)[-1].rsplit("#", 1)[-1]: r for r in table.to_pylist()}
    names = class_list("ssv1")
    assert table.num_rows == len(data["ids"]) + len(bad)
    for vid in data["ids"]:
        row = rows[vid]
        assert (row["status"], row["reason"], row["transcoded"]) == ("ok", "", True), row
        assert (row["num_frames"], row["fps"], row["width"], row["height"], row["codec"]) == (20, 12.0, 132, 100, "h264")
        assert (row["source_codec"], row["source_num_frames"], row["frame_stride"]) == ("jpeg", 20, 1)
        assert row["split"] == ("val" if vid.endswith("2") else "train")
        assert names[row["label"]] == row["label_name"] == data["classes"][int(vid) // 100 - 1]
        assert "/prepared/videos/" in row["path"] and row["path"].endswith(f"/{vid}.mp4")
        assert st.stat_size(row["path"], storage=cfg) == row["bytes"]
    for vid, (status, reason) in bad.items():
        assert rows[vid]["status"] == status and rows[vid]["reason"].startswith(reason), rows[vid]
        assert not rows[vid]["transcoded"]


def test_ssv1_frame_folders_prepare_as_videos(tmp_path, capsys):
    data = ssv1_dataset(tmp_path)
    bad = add_bad_folders(tmp_path)
    out = tmp_path / "prepared"
    args = [*[a for path in data["annotations"] for a in ("--annotations", str(path))], "--labels", "ssv1",
            "--videos", str(data["frames"]), "--output", str(out), "--short-side", "0", "--executor", "inline"]
    first = run_cli(capsys, *args)
    table = mf.read_manifest(str(out))
    check_ssv1(table, data, bad)
    assert first["status"] == {"ok": 6, "missing": 1, "unreadable": 3, "too_short": 1}
    assert read_labels(str(out / "labels.json")) == class_list("ssv1")
    # The copy holds the frames: frame 7 of video 100 decodes to (nearly) its JPEG.
    row = next(r for r in table.to_pylist() if r["source_path"].endswith("/100"))
    decoded = decode_frames(row["path"], [6])[0].astype(int)
    jpeg = np.asarray(Image.open(data["frames"] / "100" / "00007.jpg").convert("RGB")).astype(int)
    assert np.abs(decoded - jpeg).mean() < 8
    assert run_cli(capsys, *args)["processed"] == 0  # nothing changed: nothing is redone
    write_frames(data["frames"] / "901", np.full((1, 100, 132, 3), 90, np.uint8), start=7)  # the gap filled
    third = run_cli(capsys, *args)
    assert third["processed"] == 1 and third["status"]["ok"] == 7


def test_ssv1_tar_shards_are_read_once_and_reused(tmp_path, capsys):
    data = ssv1_dataset(tmp_path)
    bad = add_bad_folders(tmp_path)
    shards = tar_shards(data["frames"], tmp_path / "shards", [*data["ids"], "901", "902", "903", "904"],
                        per_shard=4, prefix=f"{SSV1_FRAMES}/")
    out = tmp_path / "prepared"
    args = [*[a for path in data["annotations"] for a in ("--annotations", str(path))], "--labels", "ssv1",
            "--videos", str(tmp_path / "shards"), "--output", str(out), "--short-side", "0", "--executor", "inline"]
    first = run_cli(capsys, *args)
    assert first["processed"] == len(shards) == 3
    table = mf.read_manifest(str(out))
    check_ssv1(table, data, bad)
    ok = next(r for r in table.to_pylist() if r["status"] == "ok")
    assert ok["source_path"] == f"{shards[0]}#{SSV1_FRAMES}/100"
    assert ok["path"] == str(out / "videos" / "part-000.tar" / SSV1_FRAMES / "100.mp4")
    assert len(list((out / "_shards").glob("*.parquet"))) == 3
    second = run_cli(capsys, *args)
    assert second["processed"] == 0 and second["manifest_hash"] == first["manifest_hash"]
    shards[1].write_bytes(shards[1].read_bytes())  # touched: that shard is read again, the others are not
    assert run_cli(capsys, *args)["processed"] == 1


@pytest.mark.parametrize("executor", ["ray"])
def test_ssv1_on_s3_folders_and_a_shard(ray_local, s3_bucket, tmp_path, capsys, executor):
    endpoint, bucket = s3_bucket
    cfg = StorageConfig(endpoint_url=endpoint)
    data = ssv1_dataset(tmp_path)
    base = f"s3://{bucket}/ssv1-test"
    # Two videos as a tar shard, the rest as frame folders, side by side under one prefix.
    shard = tar_shards(data["frames"], tmp_path / "shards", data["ids"][:2], per_shard=2)[0]
    shutil.rmtree(data["frames"] / data["ids"][0]), shutil.rmtree(data["frames"] / data["ids"][1])
    for path in sorted(tmp_path.rglob("*")):
        if path.is_file() and path != shard:
            st.upload_file(str(path), st.join(base, path.relative_to(tmp_path).as_posix()), storage=cfg)
    st.upload_file(str(shard), st.join(base, SSV1_FRAMES, "shard-0.tar"), storage=cfg)
    out = st.join(base, "prepared")
    args = ["--annotations", st.join(base, "something-something-v1-train.csv"), "--annotations",
            st.join(base, "something-something-v1-validation.csv"), "--labels", "ssv1", "--videos",
            st.join(base, SSV1_FRAMES), "--output", out, "--short-side", "0", "--executor", executor,
            "--concurrency", "2", f"storage.endpoint_url={endpoint}"]
    summary = run_cli(capsys, *args)
    table = mf.read_manifest(out, storage=cfg)
    check_ssv1(table, data, {}, cfg=cfg)
    assert summary["processed"] == len(data["ids"]) - 2 + 1  # four folders and the shard
    assert run_cli(capsys, *args)["processed"] == 0


def test_class_folders_get_a_deterministic_stratified_split(tmp_path, capsys):
    videos = class_folders(tmp_path / "videos", videos_per_class=5)
    (videos / "stray.mp4").write_bytes((videos / "left" / "left_0.mp4").read_bytes())
    (videos / "notes.txt").write_text("not a video")
    write_frames(videos / "up" / "frames_clip", np.full((20, 64, 64, 3), 80, np.uint8))  # a frame folder is a video
    out = tmp_path / "prepared"
    summary = run_cli(capsys, "--videos", str(videos), "--output", str(out), "--short-side", "0", "--executor",
                      "inline")
    assert summary["splits_from"] == "drawn" and summary["labels"] == 3
    assert summary["status"] == {"ok": 16, "bad_annotation": 1}
    assert summary["ok"] == {"train": 13, "val": 3}  # round(5 x 0.2) = 1 of each class, round(6 x 0.2) = 1 of up
    rows = mf.read_manifest(str(out)).to_pylist()
    assert read_labels(str(out / "labels.json")) == sorted(CLASSES)
    stray = next(r for r in rows if r["status"] != "ok")
    assert stray["source_path"].endswith("/stray.mp4") and stray["reason"] == "not inside a class folder " \
                                                                               "(DIR/<class>/<video>)"
    for row in (r for r in rows if r["status"] == "ok"):
        assert row["label_name"] == row["source_path"].split("/videos/")[1].split("/")[0]
    frames_row = next(r for r in rows if r["source_path"].endswith("/up/frames_clip"))
    assert frames_row["status"] == "ok" and frames_row["num_frames"] == 20
    val = sorted(r["source_path"] for r in rows if r["split"] == "val")

    # The same folder, listed again or copied elsewhere, splits the same way; a larger share draws more.
    shutil.copytree(videos, tmp_path / "copy")
    again = run_cli(capsys, "--videos", str(tmp_path / "copy"), "--output", str(tmp_path / "again"),
                    "--short-side", "0", "--executor", "inline")
    assert sorted(r["source_path"].replace("/copy/", "/videos/") for r in mf.read_manifest(str(tmp_path / "again"))
                  .to_pylist() if r["split"] == "val") == val and again["ok"] == summary["ok"]
    more = run_cli(capsys, "--videos", str(videos), "--output", str(tmp_path / "more"), "--val-fraction", "0.4",
                   "--short-side", "0", "--executor", "inline")
    assert more["ok"] == {"train": 10, "val": 6}


def test_class_folders_with_split_folders(tmp_path, capsys):
    videos = class_folders(tmp_path / "videos", videos_per_class=3, split_folders=True)
    (videos / "train" / "lost.mp4").write_bytes((videos / "train" / "up" / "up_0.mp4").read_bytes())
    summary = run_cli(capsys, "--videos", str(videos), "--output", str(tmp_path / "out"), "--short-side", "0",
                      "--labels", str(write_labels(tmp_path / "labels.txt", ["up", "left", "right"])),
                      "--executor", "inline")
    assert summary["splits_from"] == "folders" and summary["ok"] == {"train": 6, "val": 3}
    rows = mf.read_manifest(str(tmp_path / "out")).to_pylist()
    assert {(r["label_name"], r["label"]) for r in rows if r["status"] == "ok"} == {("up", 0), ("left", 1), ("right", 2)}
    lost = next(r for r in rows if r["status"] == "bad_annotation")
    assert lost["reason"] == "not inside a class folder (DIR/<split>/<class>/<video>)" and lost["split"] == "train"


def write_labels(path, names):
    path.write_text("\n".join(names) + "\n")
    return path


def test_draw_split_is_stratified_and_independent_of_listing_order():
    by_class = {"a": [f"a/{i}.mp4" for i in range(10)], "b": [f"b/{i}.mp4" for i in range(3)]}
    split = draw_split(by_class, 0.2)
    assert sum(v == "val" for p, v in split.items() if p.startswith("a/")) == 2
    assert sum(v == "val" for p, v in split.items() if p.startswith("b/")) == 1
    assert draw_split({k: v[::-1] for k, v in by_class.items()}, 0.2) == split
    assert set(draw_split(by_class, 0.0).values()) == {"train"}
    with pytest.raises(ValueError, match=r"^val_fraction=1.0 must be in \[0, 1\)$"):
        draw_split(by_class, 1.0)


def test_layout_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as info:
        main(["--videos", str(tmp_path / "empty"), "--output", str(tmp_path / "out"), "--executor", "inline"])
    assert info.value.code == 1
    assert capsys.readouterr().err.strip() == (
        f"uniformer prepare: error: {tmp_path / 'empty'}: no videos (.mp4, .m4v, .mov, .webm, .mkv, .avi, .mpg, "
        ".mpeg, .ts, .flv, .3gp) or frame folders found; expected DIR/<class>/<video> or DIR/train/<class>/<video> "
        "and DIR/val/<class>/<video>")
    with pytest.raises(SystemExit):
        main(["--annotations", "a.txt", "--videos", "v", "--output", "o", "--val-fraction", "0.3"])
    assert "--val-fraction splits class folders; annotation files name their own splits" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--videos", "v", "--output", "o", "--val-fraction", "1"])
    assert "--val-fraction 1.0 must be in [0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--videos", "v", "--output", "o", "--frames-fps", "0"])
    assert "frames_fps=0.0 must be in (0, 1000]" in capsys.readouterr().err
