"""Opening untrusted media: only allowed containers, only plain files, and limits checked before anything
large is allocated. Every case of the hostile corpus (tests/data/hostile.py) gets its error and status."""

from __future__ import annotations

import dataclasses
import re
import tracemalloc
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.config import MediaLimits
from pipeline.data import decode, media
from pipeline.data import storage as st
from pipeline.data.decode import VideoDecoder, decode_frames
from pipeline.data.media import LimitExceeded, UnsupportedMedia, open_media
from pipeline.data.prepare import PrepareOptions, prepare
from pipeline.data.transforms import center_crop
from pipeline.data.video import probe_video
from tests.data.hostile import MULTI_GB, write_corpus
from tests.data.videos import make_frames, write_video


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    return folder, write_corpus(folder)


CASES = ("ffconcat", "hls", "extension_lies_hls", "concat_path", "subfile_path", "image2_pattern", "wide",
         "huge_sample_aspect", "ten_hours", "zero_frames", "truncated", "multi_gb")


def test_the_corpus_is_every_case(corpus):
    assert set(corpus[1]) == set(CASES)


@pytest.mark.parametrize("name", CASES)
def test_every_hostile_case_gets_its_error_and_status(corpus, name):
    folder, cases = corpus
    case = cases[name]
    with pytest.raises(case.raises, match=f"{case.message}") as caught:
        decode_frames(case.source, [0, 1])
    assert type(caught.value) is case.raises
    assert len(str(caught.value).splitlines()) == 1
    assert f"{type(caught.value).__name__}: {caught.value.reason}" == case.server_error
    info = probe_video(case.source)
    assert info["status"] == case.status and re.search(case.message, info["reason"]), info
    if case.is_file and Path(case.source).stat().st_size < MULTI_GB:
        # The same bytes sent as a body: the same refusal (the multi-GB one is never read whole).
        with pytest.raises(case.raises, match=case.message):
            decode_frames(Path(case.source).read_bytes(), [0])


def test_a_file_whose_extension_lies_opens_by_its_content(tmp_path):
    path = write_video(tmp_path / "really_mpegts.mp4", make_frames(20), container_format="mpegts")
    with open_media(path) as container:
        assert container.format.name == "mpegts"
    assert decode_frames(path, [0, 19]).shape == (2, 48, 64, 3)
    assert probe_video(path, min_frames=4)["status"] == "ok"


def test_paths_reach_ffmpeg_absolute_and_resolved(tmp_path, monkeypatch):
    write_video(tmp_path / "a.mp4", make_frames(4))
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.mp4").symlink_to(tmp_path / "a.mp4")
    monkeypatch.chdir(tmp_path / "sub")
    opened = []
    real_open = av.open

    def spy(target, *args, **kwargs):
        opened.append((target, kwargs.get("container_options")))
        return real_open(target, *args, **kwargs)

    monkeypatch.setattr(media.av, "open", spy)
    for given in ("../link.mp4", "../sub/../a.mp4"):
        open_media(given).close()
    assert [target for target, _ in opened] == [str(tmp_path / "a.mp4")] * 2
    assert opened[0][1] == {"format_whitelist": "mov,matroska,avi,mpegts,mpeg,flv", "protocol_whitelist": "file"}
    for given in ("file:../a.mp4", "data:video/mp4;base64,AAAA", "pipe:0", "http://example.com/a.mp4", "async:a.mp4"):
        with pytest.raises(UnsupportedMedia, match="names the FFmpeg protocol"):
            open_media(given)
    assert len(opened) == 2  # refused before FFmpeg saw them


def test_limits_are_checked_while_demuxing(tmp_path):
    """Matroska declares no frame count: the count is checked as the frame table grows."""
    path = write_video(tmp_path / "v.mkv", make_frames(40))
    with pytest.raises(LimitExceeded, match=r"data.limits.max_frames=10") as caught:
        VideoDecoder(path, limits=MediaLimits(max_frames=10))
    assert caught.value.reason == "video too long"
    assert probe_video(path, limits=MediaLimits(max_frames=10))["status"] == "too_large"
    # Timestamps that span more than the limit, whatever the header says (here it says the same).
    with pytest.raises(LimitExceeded, match=r"declares 1 s, over data.limits.max_duration_s=1\b"):
        VideoDecoder(path, limits=MediaLimits(max_duration_s=1))
    with open_media(path) as container:
        with pytest.raises(LimitExceeded, match=r"timestamps span 1 s, over data.limits.max_duration_s=1\b"):
            decode._frame_table(container, container.streams.video[0], MediaLimits(max_duration_s=1))


def test_a_deadline_stops_the_work_on_a_row(tmp_path):
    path = write_video(tmp_path / "v.mp4", make_frames(20))
    with pytest.raises(LimitExceeded, match="longer than data.limits.row_deadline_s=0") as caught:
        VideoDecoder(path, deadline_s=0)
    assert caught.value.reason == "deadline exceeded"


def test_the_decoder_refuses_frames_over_the_pixel_limit(tmp_path):
    """A header can understate the frames that follow; the codec itself is given the limit."""
    path = write_video(tmp_path / "v.mp4", make_frames(4))
    with open_media(path, limits=MediaLimits(max_pixels=64 * 48)) as container:
        assert container.streams.video[0].codec_context.options["max_pixels"] == str(64 * 48)
    with pytest.raises(LimitExceeded, match="64x48 pixels per frame, over data.limits.max_pixels=100"):
        open_media(path, limits=MediaLimits(max_pixels=100))


def test_a_centre_crop_of_a_very_wide_frame_is_cut_before_scaling(corpus):
    """With the aspect limit lifted, the 16384x2 clip scaled to a 64-pixel short side would be 100 MB a
    frame; cropped first, the decode allocates about one stored frame."""
    _, cases = corpus
    wide = cases["wide"].source
    lifted = MediaLimits(max_aspect=10_000)
    with VideoDecoder(wide, limits=lifted) as video:
        with pytest.raises(LimitExceeded, match=r"scaled to 64x524288 is over data.limits.max_pixels"):
            video.decode([0], size=64)
        tracemalloc.start()
        try:
            frames = video.decode([0, 1, 2, 3], size=64, center_crop=64)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert frames.shape == (4, 64, 64, 3) and abs(int(frames.mean()) - 100) <= 2
    assert peak < 8 * 2 ** 20, peak


def test_a_centre_crop_of_an_ordinary_frame_is_the_crop_of_the_scaled_frame(tmp_path):
    path = write_video(tmp_path / "v.mp4", make_frames(12, 90, 160))  # 16:9
    with VideoDecoder(path) as video:
        np.testing.assert_array_equal(video.decode([0, 5, 11], size=72, center_crop=64),
                                      center_crop(video.decode([0, 5, 11], size=72), size=64))


def test_s3_object_over_the_limit_is_refused_from_its_size(s3_bucket):
    endpoint, bucket = s3_bucket
    cfg = st.StorageConfig(endpoint_url=endpoint)
    uri = f"s3://{bucket}/hostile/big.mp4"
    st.write_bytes(uri, b"\0" * 4096, storage=cfg)
    with pytest.raises(st.ObjectTooLarge, match=f"^{uri}: 4096 bytes, over the limit of 4095 bytes$"):
        st.read_bytes(uri, storage=cfg, max_bytes=4095)
    assert len(st.read_bytes(uri, storage=cfg, max_bytes=4096)) == 4096


def test_prepare_records_each_hostile_video_with_its_status(corpus, tmp_path, capsys):
    """One manifest row per annotation row; the multi-GB file is refused from its listed size, unread."""
    folder, cases = corpus
    files = {name: case for name, case in cases.items() if case.is_file}
    write_video(folder / "fine.mp4", make_frames(24))
    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"{Path(c.source).name} 0\n" for c in files.values()) + "fine.mp4 0\n")
    options = dataclasses.replace(PrepareOptions(), short_side=32, min_side=16)
    summary = prepare(str(listing), str(folder), str(tmp_path / "out"), options=options, executor="inline")
    from pipeline.data.manifest import read_manifest

    rows = read_manifest(str(tmp_path / "out"))
    assert rows.num_rows == len(files) + 1 == summary["rows"]
    got = dict(zip(rows.column("source_path").to_pylist(), zip(rows.column("status").to_pylist(),
                                                                   rows.column("reason").to_pylist())))
    for case in files.values():
        status, reason = got[case.source]
        assert status == case.status and re.search(case.message, reason), (case, status, reason)
    assert got[str(folder / "fine.mp4")] == ("ok", "")
