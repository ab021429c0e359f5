"""A hostile corpus, written by the tests (nothing downloaded): inputs that make FFmpeg read files
nobody sent, or that cost far more memory or time than their bytes.

`write_corpus(folder)` writes every case into `folder` beside `private.ts`, a good video that no case
may reveal, and returns name -> `Case`. A case is either a file (its path) or a path string that is
itself the attack (`concat:`, `subfile,`, an image2 pattern). Each case says what decoding raises,
the manifest status `prepare` records and the fixed error the model server answers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from pipeline.data.media import DecodeError, LimitExceeded, UnsupportedMedia
from tests.data.videos import make_frames, write_truncated, write_video

PRIVATE = "private.ts"
MULTI_GB = 3 * 2 ** 30

REFUSED = "UnsupportedMedia: unsupported container"
TOO_LARGE = "LimitExceeded: video too large"
TOO_LONG = "LimitExceeded: video too long"
UNDECODABLE = "DecodeError: undecodable video"


@dataclass(frozen=True)
class Case:
    source: str  # a file's path, or the hostile path string itself
    is_file: bool  # False: the string is the attack (a server must refuse it as a path, never read it)
    raises: type[DecodeError]  # what decode_frames raises (exactly this type)
    status: str  # what probe_video / prepare record
    server_error: str  # what the model server answers (for a file: sent as bytes, or as a path)
    message: str  # a pattern of the one-line error or reason: the format or the limit it names


def _write_bytes(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _wide(path: Path) -> str:
    """16384x2 H.264, 2.5 kB: scaled to a 64-pixel short side, each frame would be 524288x64 RGB (100 MB)."""
    return str(write_video(path, np.full((4, 2, 16384, 3), 100, np.uint8), bframes=False))


def _huge_sample_aspect(path: Path) -> str:
    """64x48 pixels, each 65535 times wider than high (MP4's `pasp` box): shown 4194240x48."""
    path = write_video(path, make_frames(4, 48, 64), sample_aspect_ratio=Fraction(16, 1), bframes=False)
    data = bytearray(path.read_bytes())
    at = data.index(b"pasp") + 4  # FFmpeg's encoders refuse such a ratio: patch the box instead
    data[at:at + 8] = struct.pack(">II", 65535, 1)
    return _write_bytes(path, bytes(data))


def _ten_hours(path: Path) -> str:
    """16x16 and three frames, 5 hours apart: a header that declares 10 hours, written in milliseconds."""
    return str(write_video(path, make_frames(3, 16, 16), times_s=[0, 18000, 36000], bframes=False))


def _zero_frames(path: Path) -> str:
    """MPEG-TS whose tables declare an H.264 stream that has no packets."""
    data = write_video(path, make_frames(4), bframes=False, container_format="mpegts").read_bytes()
    packets = [data[i:i + 188] for i in range(0, len(data), 188)]
    video_pid = 0x100  # FFmpeg's first elementary stream
    kept = b"".join(p for p in packets if ((p[1] & 0x1F) << 8 | p[2]) != video_pid)
    return _write_bytes(path, kept)


def _image_pattern(folder: Path) -> str:
    """img001.png ... exist: FFmpeg's image2 demuxer would read them for the pattern img%03d.png."""
    pattern = str(folder / "img%03d.png")
    with av.open(pattern, "w", format="image2") as out:
        stream = out.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "rgb24"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return pattern


def _multi_gb(path: Path) -> str:
    """3 GiB that take no disk: a sparse file, refused from its size before a byte is read."""
    with open(path, "wb") as f:
        f.truncate(MULTI_GB)
    return str(path)


def write_corpus(folder: str | Path) -> dict[str, Case]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    private = write_video(folder / PRIVATE, make_frames(40, seed=9), container_format="mpegts")
    playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\n{PRIVATE}\n#EXT-X-ENDLIST\n".encode()
    return {
        # A 37-byte body that once made the server classify private.ts from its working directory.
        "ffconcat": Case(_write_bytes(folder / "ffconcat.mp4", f"ffconcat version 1.0\nfile {PRIVATE}\n".encode()),
                         True, UnsupportedMedia, "unsupported", REFUSED, "ffconcat playlist"),
        "hls": Case(_write_bytes(folder / "playlist.m3u8", playlist), True, UnsupportedMedia, "unsupported", REFUSED,
                    "HLS playlist"),
        "extension_lies_hls": Case(_write_bytes(folder / "clip.mp4", playlist), True, UnsupportedMedia,
                                   "unsupported", REFUSED, "HLS playlist"),
        "concat_path": Case(f"concat:{private}|{private}", False, UnsupportedMedia, "unsupported", REFUSED,
                            "protocol 'concat:'"),
        "subfile_path": Case(f"subfile,,start,0,end,0,,:{private}", False, UnsupportedMedia, "unsupported",
                             REFUSED, "protocol 'subfile,'"),
        "image2_pattern": Case(_image_pattern(folder), False, UnsupportedMedia, "unsupported", REFUSED,
                               "image-sequence pattern"),
        "wide": Case(_wide(folder / "wide.mp4"), True, LimitExceeded, "too_large", TOO_LARGE,
                     "data.limits.max_aspect"),
        "huge_sample_aspect": Case(_huge_sample_aspect(folder / "sar.mp4"), True, LimitExceeded, "too_large",
                                   TOO_LARGE, "data.limits.max_pixels"),
        "ten_hours": Case(_ten_hours(folder / "long.mp4"), True, LimitExceeded, "too_large", TOO_LONG,
                          "data.limits.max_duration_s"),
        "zero_frames": Case(_zero_frames(folder / "zero.ts"), True, DecodeError, "unreadable", UNDECODABLE,
                            "no decodable frames|no frame size"),
        "truncated": Case(str(write_truncated(folder / "truncated.mp4", make_frames(40), faststart=True)), True,
                          DecodeError, "unreadable", UNDECODABLE, "truncated"),
        "multi_gb": Case(_multi_gb(folder / "huge.mp4"), True, LimitExceeded, "too_large", TOO_LARGE,
                         "data.limits.max_object_mb"),
    }
