"""`uniformer prepare` end to end through its CLI: local and S3, re-runs, restarts after a kill."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest

from jobs.prepare import main
from pipeline.config import StorageConfig
from pipeline.data import manifest as mf
from pipeline.data import storage as st
from pipeline.data.annotations import read_labels
from tests.data.videos import KINDS, make_frames, write_kind, write_video

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["--short-side", "32", "--frame-stride", "2", "--keyframe-interval", "8", "--min-frames", "16",
         "--min-side", "32"]


def build_dataset(folder: Path) -> dict[str, str]:
    """Videos of every kind plus a list file; returns annotation line -> expected status."""
    expected = {}
    for i, kind in enumerate(KINDS):
        write_kind(folder / "videos" / "clips", kind)
        expected[f"clips/{KINDS[kind][0]} {'walk' if i % 2 else 'run'}"] = KINDS[kind][1]
    expected["clips/missing.mp4 run"] = "missing"
    expected["clips/good.mp4 walk val"] = "ok"  # the same video in a second split: prepared once
    expected["clips/only-a-path.mp4"] = "bad_annotation"
    expected["clips/good.mp4 run train extra"] = "bad_annotation"
    (folder / "train.txt").write_text("# path label [split]\n" + "\n".join(expected) + "\n")
    return expected


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prepare-data")
    return folder, build_dataset(folder)


def run_cli(capsys, *args: str) -> dict:
    summary = main(list(args))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == summary  # the closing line of JSON
    return summary


def check_manifest(table, expected: dict[str, str], output: str, cfg: StorageConfig = StorageConfig()) -> None:
    rows = table.to_pylist()
    assert len(rows) == len(expected)
    assert [r["index"] for r in rows] == list(range(len(expected)))  # every row exactly once, in order
    for row, (line, status) in zip(rows, expected.items()):
        assert row["status"] == status, (line, row["status"], row["reason"])
        assert (row["reason"] == "") == (status == "ok"), (line, row["reason"])
        assert row["source_path"].endswith(line.split()[0]) or status == "bad_annotation"
        if status == "ok":
            assert row["transcoded"] and row["path"].startswith(st.join(output, "videos/clips/"))
            assert row["path"].endswith(".mp4") and st.stat_size(row["path"], storage=cfg) == row["bytes"]
            assert row["frame_stride"] == 2 and row["codec"] == "h264" and row["keyframe_interval"] == 8
            assert row["num_frames"] == (row["source_num_frames"] + 1) // 2
            assert row["width"] % 2 == 0 and min(row["width"], row["height"]) == 32
            assert row["label"] in (0, 1) and row["label_name"] in ("run", "walk")
        else:
            assert not row["transcoded"] and row["path"] == row["source_path"]
    by_source = {r["source_path"].rsplit("/", 1)[-1]: r["path"] for r in rows if r["status"] == "ok"}
    assert by_source["good.mp4"].endswith("/clips/good.mp4")  # a.mp4 keeps its name ...
    assert by_source["good.webm"].endswith("/clips/good.webm.mp4")  # ... a.webm does not take it
    splits = {r["split"] for r in rows if r["status"] == "ok"}
    assert splits == {"train", "val"}


def test_prepare_local_end_to_end_and_rerun(ray_local, dataset, tmp_path, capsys):
    folder, expected = dataset
    out = str(tmp_path / "prepared")
    args = ["--annotations", str(folder / "train.txt"), "--videos", str(folder / "videos"), "--output", out,
            *FLAGS, "--concurrency", "2", "--batch-size", "4"]
    first = run_cli(capsys, *args)
    table = mf.read_manifest(out)
    check_manifest(table, expected, out)
    n_ok = sum(1 for s in expected.values() if s == "ok")
    assert first["rows"] == len(expected) and first["status"]["ok"] == n_ok
    assert first["transcoded"] == n_ok - 1  # good.mp4 is annotated twice, prepared once
    assert first["status"]["bad_annotation"] == 2 and first["status"]["missing"] == 1
    assert first["split"] == {"train": len(expected) - 1, "val": 1} and first["ok"] == {"train": n_ok - 1, "val": 1}
    assert json.loads((tmp_path / "prepared/summary.json").read_text())["status"] == first["status"]
    assert read_labels(st.join(out, "labels.json")) == ["run", "walk"]
    assert not (tmp_path / "prepared/_parts").exists()

    second = run_cli(capsys, *args)  # nothing changed: nothing is redone
    assert second["processed"] == 0 and second["transcoded"] == 0
    assert second["manifest_hash"] == first["manifest_hash"] == mf.manifest_hash(mf.read_manifest(out))

    write_video(folder / "videos/clips/good.webm", make_frames(30, seed=9), codec="libvpx")  # a changed source
    third = run_cli(capsys, *args, "--executor", "inline")
    assert third["processed"] == 1 and third["transcoded"] == 1
    assert third["status"] == first["status"]


def test_restart_from_part_files(dataset, tmp_path, capsys):
    """Results saved by batches of a killed run are reused; duplicates among them do not duplicate rows."""
    folder, expected = dataset
    out = str(tmp_path / "prepared")
    args = ["--annotations", str(folder / "train.txt"), "--videos", str(folder / "videos"), "--output", out,
            *FLAGS, "--executor", "inline"]
    full = run_cli(capsys, *args)
    table = mf.read_manifest(out)
    results = [r for r in table.to_pylist() if r["work_key"]]
    unique = {r["work_key"]: r for r in results}
    assert len(unique) == full["processed"]  # every work item's result is cacheable here
    # As if killed after three batches, two of which overlapped (a retried task), before the manifest.
    keys = sorted(unique, key=lambda k: (not unique[k]["transcoded"], k))
    (tmp_path / "prepared/_parts").mkdir()
    for name, chunk in (("a", keys[:5]), ("b", keys[3:7]), ("c", keys[7:8])):
        st.write_bytes(st.join(out, "_parts", f"part-{name}.parquet"),
                       mf.table_bytes(mf.to_table([unique[k] for k in chunk])))
    os.remove(st.join(out, "manifest.parquet"))
    lost_copy = next(unique[k]["path"] for k in keys[:8] if unique[k]["transcoded"])
    os.remove(lost_copy)  # a prepared copy that vanished is made again

    again = run_cli(capsys, *args)
    assert again["processed"] == len(unique) - 8 + 1  # the rest, and the one whose copy vanished
    check_manifest(mf.read_manifest(out), expected, out)
    assert again["manifest_hash"] == full["manifest_hash"]
    assert not (tmp_path / "prepared/_parts").exists()


def test_killed_run_restarts_with_every_row_once(tmp_path):
    folder = tmp_path / "data"
    write_kind(folder / "videos", "good")
    for i in range(16):
        shutil.copy(folder / "videos/good.mp4", folder / f"videos/copy{i:02d}.mp4")
    lines = [f"copy{i:02d}.mp4 c{i % 3}" for i in range(16)] + ["good.mp4 c0", "nowhere.mp4 c1"]
    (folder / "list.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "prepared"
    cmd = [sys.executable, "-m", "jobs.prepare", "--annotations", str(folder / "list.txt"), "--videos",
           str(folder / "videos"), "--output", str(out), *FLAGS, "--executor", "inline", "--batch-size", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not any((out / "_parts").glob("part-*.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before writing a part"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.parquet").exists()
    done = len(list((out / "_parts").glob("part-*.parquet")))  # not a temporary file cut short

    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["processed"] == 17 - done
    rows = mf.read_manifest(str(out)).to_pylist()
    assert [r["index"] for r in rows] == list(range(18))
    assert [r["status"] for r in rows] == ["ok"] * 17 + ["missing"]
    assert len({r["path"] for r in rows[:17]}) == 17


def test_prepare_on_s3(ray_local, s3_bucket, dataset, capsys):
    endpoint, bucket = s3_bucket
    cfg = StorageConfig(endpoint_url=endpoint)
    folder, expected = dataset
    base = f"s3://{bucket}/prepare-test"
    for path in sorted(folder.rglob("*")):
        if path.is_file() and "prepared" not in path.parts:
            st.upload_file(str(path), st.join(base, path.relative_to(folder).as_posix()), storage=cfg)
    out = st.join(base, "prepared")
    args = ["--annotations", st.join(base, "train.txt"), "--videos", st.join(base, "videos"), "--output", out,
            *FLAGS, "--concurrency", "2", f"storage.endpoint_url={endpoint}"]
    first = run_cli(capsys, *args)
    table = mf.read_manifest(out, storage=cfg)
    check_manifest(table, expected, out, cfg)
    assert read_labels(st.join(out, "labels.json"), storage=cfg) == ["run", "walk"]
    assert st.list_files(st.join(out, "_parts"), storage=cfg) == []
    assert json.loads(st.read_bytes(st.join(out, "summary.json"), storage=cfg))["rows"] == len(expected)

    row = next(r for r in table.to_pylist() if r["status"] == "ok")
    with st.open_input(row["path"], storage=cfg) as f, av.open(f) as container:  # streamed, range reads
        assert sum(1 for _ in container.decode(video=0)) == row["num_frames"]

    second = run_cli(capsys, *args)
    assert second["processed"] == 0 and second["manifest_hash"] == first["manifest_hash"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--annotations", str(tmp_path / "nope.txt"), "--videos", str(tmp_path), "--output",
              str(tmp_path / "out"), "--executor", "inline"])
    assert info.value.code == 1
    assert capsys.readouterr().err.strip() == f"uniformer prepare: error: {tmp_path / 'nope.txt'}: no such file"
    with pytest.raises(SystemExit):
        main(["--annotations", "a", "--videos", "v", "--output", "o", "--frame-stride", "4", "--no-transcode"])
    assert "frame_stride=4 needs transcoding" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--annotations", "a", "--videos", "v", "--output", "o", "--frame-stride", "0"])
    assert "0 must be at least 1" in capsys.readouterr().err


def test_no_transcode_points_at_originals(dataset, tmp_path, capsys, monkeypatch):
    folder, expected = dataset
    out = str(tmp_path / "probed")
    monkeypatch.chdir(tmp_path)  # relative folders in, absolute paths in the manifest (workers run elsewhere)
    summary = run_cli(capsys, "--annotations", str(folder / "train.txt"), "--videos",
                      os.path.relpath(folder / "videos"), "--output", "probed", "--no-transcode",
                      "--executor", "inline")
    rows = mf.read_manifest(out).to_pylist()
    assert [r["status"] for r in rows] == list(expected.values())
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["path"] == r["source_path"] and r["frame_stride"] == 1 and not r["transcoded"] for r in ok)
    assert all(os.path.isabs(r["path"]) and os.path.exists(r["path"]) for r in ok)
    assert summary["transcoded"] == 0 and not (tmp_path / "probed/videos").exists()


def test_a_surprise_in_one_video_is_recorded_then_retried(dataset, tmp_path, capsys, monkeypatch):
    import pipeline.data.prepare as prepare_module

    folder, expected = dataset
    real_probe = prepare_module.probe_video

    def probe(data, **kwargs):
        if data[:4] == b"\x1a\x45\xdf\xa3":  # WebM: good.webm and truncated_webm.webm
            raise RuntimeError("boom\nsecond line")
        return real_probe(data, **kwargs)

    monkeypatch.setattr(prepare_module, "probe_video", probe)
    out = str(tmp_path / "prepared")
    args = ["--annotations", str(folder / "train.txt"), "--videos", str(folder / "videos"), "--output", out,
            *FLAGS, "--executor", "inline"]
    run_cli(capsys, *args)
    webm = [r for r in mf.read_manifest(out).to_pylist() if r["source_path"].endswith(".webm")]
    assert [(r["status"], r["reason"], r["work_key"]) for r in webm] == [
        ("unreadable", "unexpected RuntimeError: boom", "")] * 2
    monkeypatch.setattr(prepare_module, "probe_video", real_probe)
    assert run_cli(capsys, *args)["processed"] == 2  # only the failed ones are tried again
    check_manifest(mf.read_manifest(out), expected, out)
