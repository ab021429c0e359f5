"""Frame folders (Something-Something V1's JPEGs): their checks, tar shards of them, and how far their
H.264 copy decodes from the JPEGs.

The figure of the README: `.venv/bin/python -m pytest -q -s tests/data/test_frames.py -k jpegs` prints
the difference between the decoded copy and the JPEGs' own RGB for the crf values it checks."""

import io
import tarfile

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from pipeline.config import MediaLimits
from pipeline.data.decode import decode_frames
from pipeline.data.frames import (FramesError, checked_frames, frame_folders, order_frames, rgb_frames,
                                  tar_folders)
from pipeline.data.synth import MOTIONS, render_video
from pipeline.data.video import encode_rgb_frames, probe_video


def jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def named(frames: list[bytes], start: int = 1) -> list[tuple[str, bytes]]:
    return [(f"{start + i:05d}.jpg", data) for i, data in enumerate(frames)]


def test_frames_are_ordered_by_the_number_in_their_names():
    assert order_frames(["00010.jpg", "00009.jpg", "img_00011.JPG"]) == ["00009.jpg", "00010.jpg", "img_00011.JPG"]
    assert frame_folders(["v/1/00001.jpg", "v/1/notes.txt", "v/2/00001.png", "v/a.mp4"]) == {
        "v/1": ["v/1/00001.jpg"], "v/2": ["v/2/00001.png"]}
    with pytest.raises(FramesError, match=r"^2 missing frame\(s\): numbers 3, 5 of 1-6$"):
        order_frames([f"{i:05d}.jpg" for i in (1, 2, 4, 6)])
    with pytest.raises(FramesError, match=r"^frames 00002.jpg and 2.jpg have the same number 2$"):
        order_frames(["00001.jpg", "00002.jpg", "2.jpg"])
    with pytest.raises(FramesError, match=r"^frame 'cover.jpg' has no number at the end of its name"):
        order_frames(["00001.jpg", "cover.jpg"])


def test_a_bad_folder_gets_a_status_and_a_reason():
    good = [jpeg(np.full((40, 48, 3), 100, np.uint8))] * 16
    info = checked_frames(named(good), min_frames=16, min_side=32)
    assert (info["num_frames"], info["width"], info["height"], info["codec"]) == (16, 48, 40, "jpeg")

    def status(frames, **kw):
        with pytest.raises(FramesError) as err:
            args = {"min_frames": 16, "min_side": 32, **kw}
            checked_frames(frames, **args)
            list(rgb_frames(frames))
        return err.value.status, str(err.value)

    assert status(named(good[:15])) == ("too_short", "15 frames is below the minimum 16")
    assert status(named(good), min_side=41) == ("too_small", "48x40 is below the minimum side 41")
    assert status(named([b""] + good[1:])) == ("unreadable", "00001.jpg: zero-byte file")
    assert status(named([b"not a jpeg"] + good[1:])) == ("unreadable", "00001.jpg: not a JPEG or PNG image "
                                                                        "(UnidentifiedImageError)")
    textured = jpeg(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    truncated = good[:5] + [textured[:len(textured) // 2]] + good[6:]
    got = status(named(truncated))
    assert got[0] == "unreadable" and got[1].startswith("00006.jpg: the image does not decode")
    resized = good[:3] + [jpeg(np.zeros((40, 50, 3), np.uint8))] + good[4:]
    assert status(named(resized)) == ("unreadable", "00004.jpg is 50x40, 00001.jpg 48x40: the frames of a video "
                                                    "share one size")
    assert status(named(good), limits=MediaLimits(max_pixels=48 * 40 - 1))[0] == "too_large"
    gif = io.BytesIO()
    Image.new("RGB", (48, 40)).save(gif, "GIF")
    assert status(named([gif.getvalue()] + good[1:]))[0] == "unreadable"  # only JPEG and PNG are opened


def test_tar_shards_are_read_as_a_stream_of_folders(tmp_path):
    frame = jpeg(np.zeros((40, 48, 3), np.uint8))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add(name, data=frame):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("data/a/00001.jpg"), add("data/a/00002.jpg"), add("data/a/notes.txt", b"x")
        add("data/b/00001.jpg"), add("data/a/00003.jpg")  # a's frames again, after b's
        add("../evil/00001.jpg"), add("top.jpg")
        link = tarfile.TarInfo("data/c/00001.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    buf.seek(0)
    got = [(folder, [name for name, _ in files], error) for folder, files, error in
           tar_folders(buf, max_member_bytes=10 ** 6)]
    assert got[0] == ("data/a", ["00001.jpg", "00002.jpg"], "")
    assert got[1] == ("data/b", ["00001.jpg"], "")
    assert got[2][0] == "data/a" and "do not lie together" in got[2][2]
    assert got[3][0] == "../evil" and "not inside a frame folder" in got[3][2] and got[3][1] == []
    assert got[4][0] == "" and "not inside a frame folder" in got[4][2]
    assert len(got) == 5  # the symbolic link is never read


def roundtrip(videos: list[np.ndarray], crf: int, tmp_path) -> dict:
    """Encode each video's JPEG frames as prepare does and compare the decoded copy with the JPEGs' RGB."""
    diffs, size, frames = [], 0, 0
    for i, video in enumerate(videos):
        files = named([jpeg(f) for f in video])
        truth = np.stack(list(rgb_frames(files)))
        meta = encode_rgb_frames(rgb_frames(files), tmp_path / f"{crf}-{i}.mp4", fps=12, crf=crf)
        assert probe_video(tmp_path / f"{crf}-{i}.mp4")["fps"] == 12 and meta["num_frames"] == len(video)
        decoded = decode_frames(tmp_path / f"{crf}-{i}.mp4", list(range(len(video))))
        diffs.append(decoded.astype(np.float64) - truth)
        size, frames = size + meta["bytes"], frames + len(video)
    d = np.concatenate(diffs)
    return {"mae": float(np.abs(d).mean()), "psnr": float(10 * np.log10(255 ** 2 / (d ** 2).mean())),
            "bias": float(d.mean()), "kib_per_frame": size / frames / 1024}


def test_a_prepared_copy_decodes_close_to_the_jpegs(tmp_path):
    textured = [render_video(np.random.default_rng([7, k]), MOTIONS[k % 8], num_frames=36, height=100, width=176)
                for k in range(4)]  # SSv1's size: 100 pixels high
    # Natural frames have far less colour detail per pixel than the synthetic textures' grain.
    smooth = [np.clip(gaussian_filter(v.astype(np.float64), (0, 1, 1, 0)), 0, 255).astype(np.uint8) for v in textured]
    figures = {(name, crf): roundtrip(videos, crf, tmp_path)
               for name, videos in (("textured", textured), ("smoothed", smooth)) for crf in (0, 18, 23)}
    for (name, crf), f in figures.items():
        print(f"JPEG q90 frames, {name}, crf {crf}: mean |difference| {f['mae']:.2f} levels, PSNR {f['psnr']:.1f} dB, "
              f"mean {f['bias']:+.2f}, {f['kib_per_frame']:.2f} KiB per frame")
    assert figures[("textured", 18)]["mae"] < 6.0 and figures[("textured", 18)]["psnr"] > 30
    assert figures[("smoothed", 18)]["mae"] < 5.0 and figures[("smoothed", 18)]["psnr"] > 31.5
    # Most of it is there without compression: 4:2:0 chroma and the colour conversions.
    assert figures[("textured", 0)]["mae"] > 0.8 * figures[("textured", 18)]["mae"]
    assert figures[("textured", 23)]["mae"] > figures[("textured", 18)]["mae"]
