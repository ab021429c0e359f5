"""pipeline.data.video: probing every broken kind, and transcodes that keep every n-th frame."""

import io
from fractions import Fraction

import av
import numpy as np
import pytest

from pipeline.data.decode import decode_frames
from pipeline.data.video import TranscodeError, output_size, probe_video, transcode_video
from tests.data.videos import COLOURS, KINDS, decode_all, make_frames, write_kind, write_video


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kinds")
    return {kind: write_kind(folder, kind) for kind in KINDS}


@pytest.mark.parametrize("kind", list(KINDS))
def test_probe_status_of_every_kind(kinds, kind):
    expected = KINDS[kind][1]
    path = kinds[kind]
    for src in (path, path.read_bytes(), io.BytesIO(path.read_bytes())):
        info = probe_video(src, min_frames=16, min_side=32)
        assert info["status"] == expected, (kind, info)
        assert (info["reason"] == "") == (expected == "ok")
        assert "\n" not in info["reason"]
    assert probe_video(path, decode="all")["status"] == expected


def test_probe_metadata(kinds):
    good = probe_video(kinds["good"])
    assert good["codec"] == "h264" and good["num_frames"] == 40 and good["fps"] == pytest.approx(30)
    assert (good["width"], good["height"], good["pix_fmt"]) == (64, 48, "yuv420p")
    assert good["duration_s"] == pytest.approx(40 / 30, rel=0.01) and not good["vfr"]
    webm = probe_video(kinds["good_webm"])  # WebM does not store a frame count: packets are counted
    assert (webm["codec"], webm["num_frames"]) == ("vp8", 24)
    assert probe_video(kinds["odd_size"])[("width")] == 65
    assert probe_video(kinds["vfr"])["vfr"] is True
    assert probe_video(kinds["ten_bit"])["bit_depth"] == 10
    assert "truncated" in probe_video(kinds["truncated"])["reason"]
    assert probe_video(kinds["audio_only"])["reason"] == "no video stream (streams: audio)"
    assert probe_video(kinds["tiny"])["reason"] == "24x16 is below the minimum side 32"
    assert probe_video(kinds["short"])["reason"] == "6 frames is below the minimum 16"
    assert probe_video(kinds["short"], min_frames=4)["status"] == "ok"


def test_probe_flags_an_flv_cut_between_frames(tmp_path):
    """Whole frames, fewer than the FLV's declared duration covers (a cut mid-frame is corrupt)."""
    path = write_video(tmp_path / "full.flv", make_frames(40, seed=7), container_format="flv")
    with av.open(str(path)) as container:
        starts = [packet.pos for packet in container.demux(video=0) if packet.size]
    cut = tmp_path / "cut.flv"
    cut.write_bytes(path.read_bytes()[:starts[25]])
    info = probe_video(cut)
    assert info["status"] == "unreadable", info
    assert info["reason"].startswith("truncated: the container declares 1.40 s"), info["reason"]


def _keyframes(path) -> list[int]:
    with av.open(str(path)) as container:
        return [i for i, p in enumerate(container.demux(container.streams.video[0])) if p.size and p.is_keyframe]


@pytest.mark.parametrize("name, codec, container_format", [("h264.ts", "libx264", "mpegts"),
                                                          ("mpeg4.ts", "mpeg4", "mpegts"),
                                                          ("mpeg4.avi", "mpeg4", "avi")])
def test_probe_decodes_the_last_gop_of_bframe_streams_in_ts_and_avi(tmp_path, name, codec, container_format):
    """TS and AVI look seeks up by dts: seeking to the last keyframe's pts landed after it, nothing
    decoded from there, and every good TS with B-frames was called unreadable."""
    path = write_video(tmp_path / name, make_frames(40, seed=13), codec=codec, gop=12, container_format=container_format)
    info = probe_video(path)
    assert info["status"] == "ok" and info["num_frames"] == 40, info


@pytest.mark.parametrize("stride", [1, 4])
def test_transcode_keeps_every_nth_frame_with_increasing_pts(tmp_path, stride):
    src = write_video(tmp_path / "src.mp4", make_frames(48), bframes=True)
    original, _ = decode_all(src)
    meta = transcode_video(src, tmp_path / "out.mp4", frame_stride=stride, keyframe_interval=4, crf=12)
    frames, pts = decode_all(tmp_path / "out.mp4")
    assert meta["num_frames"] == len(frames) == len(range(0, 48, stride)) and meta["source_frames"] == 48
    assert all(b > a for a, b in zip(pts, pts[1:])), pts
    assert meta["fps"] == pytest.approx(30 / stride)
    assert _keyframes(tmp_path / "out.mp4") == list(range(0, len(frames), 4))
    # Output frame j looks like original frame j * stride, and unlike its neighbours.
    for j, frame in enumerate(frames):
        errors = [np.abs(frame.astype(int) - o.astype(int)).mean() for o in original]
        assert int(np.argmin(errors)) == j * stride, (j, np.round(errors, 1))
        assert errors[j * stride] < 6


def test_transcode_scales_short_side_to_even_dims(tmp_path):
    src = write_video(tmp_path / "wide.mp4", make_frames(20, 96, 170), pix_fmt="yuv444p")
    meta = transcode_video(src, tmp_path / "out.mp4", short_side=50)
    info = probe_video(tmp_path / "out.mp4", min_frames=1)
    assert (meta["width"], meta["height"]) == (info["width"], info["height"]) == (88, 50)
    assert (info["codec"], info["pix_fmt"]) == ("h264", "yuv420p")
    assert output_size(65, 49, None) == (64, 48)
    assert output_size(100, 50, 200) == (100, 50)  # never upscales
    assert output_size(1920, 1080, 320) == (568, 320)


@pytest.mark.parametrize("kind", ["odd_size", "vfr", "ten_bit", "good_webm"])
def test_transcode_handles_awkward_inputs(kinds, tmp_path, kind):
    meta = transcode_video(kinds[kind].read_bytes(), tmp_path / "out.mp4", frame_stride=2)
    info = probe_video(tmp_path / "out.mp4", min_frames=1)
    assert info["status"] == "ok" and info["pix_fmt"] == "yuv420p"
    assert info["width"] % 2 == 0 and info["height"] % 2 == 0
    assert info["num_frames"] == meta["num_frames"] == (probe_video(kinds[kind])["num_frames"] + 1) // 2
    assert not info["vfr"]
    _, pts = decode_all(tmp_path / "out.mp4")
    assert all(b > a for a, b in zip(pts, pts[1:]))


def _colour_tags(path) -> tuple[int, int, int, int]:
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        return frame.colorspace, frame.color_range, frame.color_primaries, frame.color_trc


@pytest.mark.parametrize("colour", sorted(COLOURS))
def test_transcode_keeps_the_colour_description(tmp_path, colour):
    """A BT.709 or full-range source decodes to its own RGB, and so does its prepared copy."""
    rgb = make_frames(12, 48, 64, speed_px=0, cell=16)  # flat squares: little chroma subsampling loss
    src = write_video(tmp_path / "src.mp4", rgb, colour=colour)
    transcode_video(src, tmp_path / "copy.mp4", crf=12)
    assert _colour_tags(tmp_path / "copy.mp4") == _colour_tags(src) == COLOURS[colour][2]
    indices = list(range(12))
    error = {name: np.abs(decode_frames(path, indices).astype(int) - rgb).mean()
             for name, path in (("original", src), ("copy", tmp_path / "copy.mp4"))}
    assert error["original"] < 3, error  # decoded with the tagged matrix and range
    assert error["copy"] < error["original"] + 1, error


def test_transcode_gives_an_rgb_source_a_colour_description(tmp_path):
    rgb = make_frames(12, 48, 64, speed_px=0, cell=16)
    src = write_video(tmp_path / "src.mkv", rgb, codec="libx264rgb", pix_fmt="rgb24")
    transcode_video(src, tmp_path / "copy.mp4", crf=12)
    assert _colour_tags(tmp_path / "copy.mp4")[:2] == (1, 1)  # BT.709, limited range
    assert np.abs(decode_frames(tmp_path / "copy.mp4", range(12)).astype(int) - rgb).mean() < 3


@pytest.mark.parametrize("rotation, hflip, sample_aspect_ratio", [
    (90, False, None), (270, True, None), (0, False, Fraction(3, 2)), (90, False, Fraction(3, 2))])
def test_prepared_copy_decodes_like_its_original(tmp_path, rotation, hflip, sample_aspect_ratio):
    """Training reads prepared copies and predict reads originals: both decode to the same upright,
    square-pixel frames, and the copy stores them so, untagged."""
    src = write_video(tmp_path / "phone.mp4", make_frames(24, 48, 64, cell=8), rotation=rotation, hflip=hflip,
                      sample_aspect_ratio=sample_aspect_ratio)
    copy = tmp_path / "copy.mp4"
    meta = transcode_video(src, copy, frame_stride=2, crf=12)
    original, prepared = probe_video(src), probe_video(copy)
    assert (original["width"], original["height"]) == (prepared["width"], prepared["height"]) \
        == (meta["width"], meta["height"])
    with av.open(str(copy)) as container:
        assert next(container.decode(video=0)).rotation == 0
        assert container.streams.video[0].sample_aspect_ratio in (None, 1)
    for size in (None, 32):
        a = decode_frames(src, range(0, 24, 2), size=size).astype(int)
        b = decode_frames(copy, range(12), size=size).astype(int)
        assert a.shape == b.shape
        error, mirrored = np.abs(a - b).mean(), np.abs(a - b[:, :, ::-1]).mean()
        assert error < 6 and 4 * error < mirrored, (size, error, mirrored)


@pytest.mark.parametrize("kind", ["not_video", "audio_only", "truncated_index"])
def test_transcode_errors_are_one_line(kinds, tmp_path, kind):
    with pytest.raises(TranscodeError) as info:
        transcode_video(kinds[kind], tmp_path / "out.mp4")
    assert "\n" not in str(info.value)


def test_bad_arguments():
    with pytest.raises(ValueError, match="frame_stride=0 must be at least 1"):
        transcode_video(b"", "/tmp/never.mp4", frame_stride=0)
    with pytest.raises(ValueError, match="decode='some' is not one of 'ends', 'all'"):
        probe_video(b"x", decode="some")
