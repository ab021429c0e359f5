"""Seek-decoding must return exactly what a full sequential decode yields at the same indices."""

import dataclasses
import io
import os
from fractions import Fraction

import av
import numpy as np
import pytest

from pipeline.data import decode
from pipeline.data.decode import DecodeError, VideoDecoder, count_frames, decode_frames, frame_table
from pipeline.data.synth import MOTIONS, encode_h264, render_video
from tests.data.videos import KINDS, decode_all, make_frames, write_kind, write_video

NUM_FRAMES = 70


def _frames(num_frames: int = NUM_FRAMES, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return render_video(rng, MOTIONS[seed % 8], num_frames=num_frames, height=48, width=64)


def _vfr_pts(num_frames: int) -> np.ndarray:
    return np.cumsum(np.random.default_rng(7).integers(1, 5, size=num_frames))  # gaps of 1-4 ticks


# name -> encoded bytes; every kind of stream the decoder must handle
STREAMS = {
    "bframes_gop16": lambda: encode_h264(_frames(), gop=16),
    "bframes_gop250": lambda: encode_h264(_frames(), gop=250),
    "no_bframes_gop10": lambda: encode_h264(_frames(), gop=10, bframes=False),
    "vfr_bframes_gop12": lambda: encode_h264(_frames(), gop=12, pts=_vfr_pts(NUM_FRAMES), fps=60),
}


def sequential(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module", params=sorted(STREAMS))
def stream(request):
    data = STREAMS[request.param]()
    return request.param, data, sequential(data)


@pytest.fixture
def no_fallback(monkeypatch):
    """Fail if decode_frames gives up seeking on these well-formed streams."""
    def refuse(*args, **kwargs):
        raise AssertionError("sequential fallback used")
    monkeypatch.setattr(decode, "_decode_sequential", refuse)


INDEX_CASES = {
    "first": [0],
    "middle": [33],
    "across_keyframes": [10, 11, 12, 15, 16, 17, 31, 32, 33],
    "dense_16x4": list(range(2, 66, 4)),
    "out_of_order_repeats": [50, 3, 3, 49, 17, 50, 0],
    "spread": [5, 40, 65],
    "last": [NUM_FRAMES - 1],
}


@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_matches_sequential_decode(stream, case, no_fallback):
    _, data, reference = stream
    indices = INDEX_CASES[case]
    out = decode_frames(data, indices)
    assert out.dtype == np.uint8 and out.shape == (len(indices), 48, 64, 3)
    np.testing.assert_array_equal(out, reference[indices])


def test_stream_kinds_are_what_they_claim():
    def packets(data):
        with av.open(io.BytesIO(data)) as c:
            return [(p.pts, p.is_keyframe) for p in c.demux(video=0) if p.size]
    reordered = packets(STREAMS["bframes_gop16"]())
    assert any(b[0] < a[0] for a, b in zip(reordered, reordered[1:])), "expected B-frames (pts out of order)"
    assert sum(k for _, k in reordered) == 5  # keyframes at 0, 16, 32, 48, 64
    assert sum(k for _, k in packets(STREAMS["bframes_gop250"]())) == 1
    vfr = sorted(p for p, _ in packets(STREAMS["vfr_bframes_gop12"]()))
    assert len(set(np.diff(vfr).tolist())) > 1, "expected uneven frame durations"


def test_past_the_end_repeats_last_frame(stream):
    _, data, reference = stream
    out = decode_frames(data, [NUM_FRAMES - 2, NUM_FRAMES, NUM_FRAMES + 50])
    np.testing.assert_array_equal(out, reference[[NUM_FRAMES - 2, NUM_FRAMES - 1, NUM_FRAMES - 1]])


def test_sources_path_bytes_fileobj(tmp_path, stream):
    name, data, reference = stream
    path = tmp_path / f"{name}.mp4"
    path.write_bytes(data)
    for src in (str(path), path, data, io.BytesIO(data), open(path, "rb")):
        np.testing.assert_array_equal(decode_frames(src, [20, 21]), reference[[20, 21]])


def test_count_frames_and_table(stream):
    _, data, _ = stream
    assert count_frames(data) == NUM_FRAMES
    table = frame_table(data)
    assert table.reliable and table.num_frames == NUM_FRAMES and table.keyframes[0] == 0
    assert "num_frames=70" in repr(table)


def test_decoder_reuses_one_demux_pass(stream):
    _, data, reference = stream
    with VideoDecoder(data) as video:
        assert video.num_frames == NUM_FRAMES and (video.height, video.width) == (48, 64)
        for indices in ([60, 61], [2, 3], [30]):  # backwards and forwards on one container
            np.testing.assert_array_equal(video.decode(indices), reference[indices])


@pytest.mark.parametrize("indices, expected", [
    ([40, 41], 10),  # from the keyframe at 32, not from 0
    ([20, 50, 66], 5 + 3 + 3),  # three seeks: 16..20, 48..50, 64..66
    ([47, 48], 16 + 1),  # one run across a keyframe: no seek needed
])
def test_seeking_decodes_only_from_the_keyframe_before(indices, expected):
    data = STREAMS["bframes_gop16"]()
    with VideoDecoder(data) as video:
        np.testing.assert_array_equal(video.decode(indices), sequential(data)[indices])
        assert video.stats.frames_decoded == expected and video.stats.sequential_decodes == 0


# B-frames in containers whose seeks look keyframes up by decode time (AVI, MPEG-TS: a keyframe's
# pts finds a later packet there) or by presentation time (Matroska). MPEG-4 Part 2 keeps its
# scene-change keyframes, which this texture makes every few frames: some closer than the
# B-frame delay. Its decoder makes pictures from missing references after a seek that lands
# mid-GOP. Each writer takes a folder and returns the video's path.
SEEKABLE = {
    "h264_ts": lambda d: write_video(d / "h264.ts", make_frames(90, seed=8), gop=15, container_format="mpegts"),
    "mpeg4_ts": lambda d: write_video(d / "mpeg4.ts", make_frames(90, seed=9), codec="mpeg4", gop=15,
                                      container_format="mpegts"),
    "mpeg4_avi": lambda d: write_video(d / "mpeg4.avi", make_frames(90, seed=10), codec="mpeg4", gop=15,
                                       container_format="avi"),
    "h264_mkv": lambda d: write_video(d / "h264.mkv", make_frames(90, seed=11), gop=15, container_format="matroska"),
}


@pytest.mark.parametrize("name", sorted(SEEKABLE))
def test_seeks_in_ts_avi_and_mkv(tmp_path, name):
    """Random indices: the frames of a sequential decode, found by seeking, never by the fallback."""
    path = SEEKABLE[name](tmp_path)
    reference, _ = decode_all(path)
    rng = np.random.default_rng(0)
    decoded = from_start = 0
    for _ in range(8):
        indices = sorted(rng.choice(len(reference), size=3, replace=False).tolist())
        with VideoDecoder(path) as video:
            np.testing.assert_array_equal(video.decode(indices), reference[indices])
            assert video.stats.sequential_decodes == 0 and video.stats.seeks >= 1
            decoded += video.stats.frames_decoded
        from_start += max(indices) + 1
    assert decoded < from_start / 2  # what seeking saves over decoding from the first frame


def test_avi_h264_with_bframes_is_exact(tmp_path):
    """AVI stores no pts: for H.264 with B-frames FFmpeg makes them up in decode order, so they do
    not say which frame is shown when. The decoder must notice and still return the right frames."""
    path = write_video(tmp_path / "h264.avi", make_frames(60, seed=12), gop=12, container_format="avi")
    reference, pts = decode_all(path)
    assert pts != sorted(pts)  # the made-up pts are out of display order
    rng = np.random.default_rng(1)
    for _ in range(8):
        indices = sorted(rng.choice(len(reference), size=3, replace=False).tolist())
        np.testing.assert_array_equal(decode_frames(path, indices), reference[indices])


def test_fallback_for_streams_without_usable_timestamps(monkeypatch):
    data = STREAMS["bframes_gop16"]()
    reference = sequential(data)
    real = decode._frame_table

    def unreliable(container, stream, *args):
        table = real(container, stream, *args)
        return dataclasses.replace(table, reliable=False)
    monkeypatch.setattr(decode, "_frame_table", unreliable)
    np.testing.assert_array_equal(decode_frames(data, [40, 3, 90]), reference[[40, 3, NUM_FRAMES - 1]])
    assert count_frames(data) == NUM_FRAMES


def test_size_scales_while_converting():
    data = STREAMS["bframes_gop16"]()
    assert decode_frames(data, [5, 6], size=24).shape == (2, 24, 32, 3)  # short side 24, aspect kept
    assert decode_frames(data, [5], size=(30, 40)).shape == (1, 30, 40, 3)
    full = decode_frames(data, [5])
    small = decode_frames(data, [5], size=(24, 32)).astype(float)
    assert np.abs(small.mean() - full.mean()) < 4  # same picture, smaller


@pytest.mark.parametrize("bad, match", [
    (b"", "cannot open video"),
    (b"<html>404</html>" * 64, "cannot open video"),
])
def test_unreadable_raises_decode_error(bad, match):
    with pytest.raises(DecodeError, match=match):
        decode_frames(bad, [0])


def test_truncated_index_raises():
    data = encode_h264(_frames(), gop=16)
    with pytest.raises(DecodeError, match="cannot open video"):
        decode_frames(data[: len(data) // 2], [0])  # the moov atom is at the end: the index is gone


GOOD_KINDS = [k for k, (_, status, _) in KINDS.items() if status == "ok" or k in ("tiny", "short")]
BAD_KINDS = [k for k, (_, status, _) in KINDS.items() if k not in GOOD_KINDS]


@pytest.mark.parametrize("kind", GOOD_KINDS)
def test_other_containers_and_formats(tmp_path, kind):
    """webm/VP8, 10-bit, yuv444 odd sizes, VFR in a 1/1000 time base: same as a sequential decode."""
    path = write_kind(tmp_path, kind)
    reference, _ = decode_all(path)
    n = count_frames(path)
    assert n == len(reference)
    indices = [0, n // 2, 1, n - 1, n + 5]
    np.testing.assert_array_equal(decode_frames(path, indices), reference[np.minimum(indices, n - 1)])


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_broken_videos_raise_decode_error_or_decode(tmp_path, kind):
    """Broken files raise DecodeError (nothing else), or decode what a sequential decode can."""
    path = write_kind(tmp_path, kind)
    try:
        out = decode_frames(path, [0, 1000])
    except DecodeError:
        return
    assert out.dtype == np.uint8 and out.shape[0] == 2


@pytest.mark.parametrize("indices, size, match", [
    ([], None, "indices is empty"),
    ([-1, 2], None, r"indices must be >= 0.*-1"),
    ([0], 0, r"size=0"),
    ([0], (10,), r"size=\(10,\)"),
])
def test_bad_arguments(indices, size, match):
    with pytest.raises(ValueError, match=match):
        decode_frames(STREAMS["no_bframes_gop10"](), indices, size=size)


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_one_thread_and_one_reformatter_per_decode(monkeypatch):
    """PyAV converts with a pool of one thread per core unless told otherwise: a decode task stays
    on its own thread, and its one reformatter serves every frame of the video."""
    made, threads_after_conversion = [], []
    real = decode.VideoReformatter

    class CountingReformatter:
        def __init__(self):
            self._real = real()
            made.append(self)

        def reformat(self, *args, **kwargs):
            out = self._real.reformat(*args, **kwargs)
            threads_after_conversion.append(_threads())  # a pool lives as long as its reformatter
            return out

    monkeypatch.setattr(decode, "VideoReformatter", CountingReformatter)
    data = encode_h264(_frames(num_frames=20, seed=1), gop=8)
    before = _threads()
    with VideoDecoder(data) as video:
        video.decode([1, 12, 19])
        video.decode([3], size=24)
    assert len(made) == 1 and len(threads_after_conversion) == 4
    assert max(threads_after_conversion) == before


@pytest.mark.parametrize("kind", ["mpeg_ps", "flv1", "h264_flv"])
def test_formats_that_refuse_stream_options_open_from_any_source(tmp_path, kind):
    """MPEG-PS and FLV are opened again without the probe's per-stream options, from the start."""
    path = write_kind(tmp_path, kind)
    reference, _ = decode_all(path)
    for src in (path, path.read_bytes(), io.BytesIO(path.read_bytes()), open(path, "rb")):
        np.testing.assert_array_equal(decode_frames(src, [0, 9, 3]), reference[[0, 9, 3]])


def _shown(frames: np.ndarray, rotation: int, hflip: bool) -> np.ndarray:
    """(T, H, W, 3) stored frames as the display matrix of `write_video` shows them."""
    turned = np.rot90(frames, k=rotation // 90, axes=(1, 2))  # counter-clockwise
    return turned[:, :, ::-1] if hflip else turned


@pytest.mark.parametrize("rotation, hflip, codec", [(90, False, "libx264"), (180, False, "libx264"),
                                                    (270, False, "libx264"), (0, True, "libx264"),
                                                    (90, True, "libx264"), (90, False, "libvpx-vp9")])
def test_rotated_videos_decode_upright(tmp_path, rotation, hflip, codec):
    """A phone video's display matrix is applied: frames are those of a sequential decode, turned."""
    stored = make_frames(24, 48, 64)
    container = "mp4" if codec == "libx264" else "webm"
    path = write_video(tmp_path / f"phone.{container}", stored, rotation=rotation, hflip=hflip, gop=8, codec=codec,
                       container_format=container)
    reference = _shown(decode_all(path)[0], rotation, hflip)
    indices = [0, 13, 2, 23]
    out = decode_frames(path, indices)
    np.testing.assert_array_equal(out, reference[indices])
    # The written picture, the right way round: of the 8 ways to turn and mirror it, the closest.
    errors = {(r, f): np.abs(out.astype(int) - _shown(stored, r, f)[indices]).mean()
              for r in (0, 90, 180, 270) for f in (False, True) if _shown(stored, r, f).shape[1:] == out.shape[1:]}
    assert min(errors, key=errors.get) == (rotation, hflip), errors
    assert decode_frames(path, [5], size=24).shape == ((1, 24, 32, 3) if rotation % 180 == 0 else (1, 32, 24, 3))


def test_non_square_pixels_are_stretched_to_square(tmp_path):
    """A 64x48 picture of 3:2 pixels shows as 96x48; the stored width is scaled while converting."""
    path = write_video(tmp_path / "anamorphic.mp4", make_frames(20, 48, 64), sample_aspect_ratio=Fraction(3, 2))
    with av.open(str(path)) as container:
        reference = np.stack([f.to_ndarray(format="rgb24", width=96) for f in container.decode(video=0)])
    indices = [0, 7, 19]
    np.testing.assert_array_equal(decode_frames(path, indices), reference[indices])
    assert decode_frames(path, [3], size=24).shape == (1, 24, 48, 3)


def test_rotation_and_pixel_aspect_together(tmp_path):
    path = write_video(tmp_path / "both.mp4", make_frames(12, 48, 64), rotation=90, sample_aspect_ratio=Fraction(1, 2))
    assert decode_frames(path, [0, 11]).shape == (2, 32, 48, 3)  # 32 wide stored -> 32 tall shown
