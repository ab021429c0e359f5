"""Every open of a video goes through `open_media`: only media, only files, within limits.

FFmpeg opens more than media. Its concat/ffconcat, HLS, DASH and image2 demuxers read other files
named inside the input, and a path such as `concat:a|b`, `subfile,,start,0,end,0,,:x` or `file:x`
is a protocol, not a file name. So a video is opened only as one of `ALLOWED_FORMATS` (FFmpeg's
`format_whitelist`, enforced by FFmpeg after probing and before the demuxer reads its header), from
bytes, a binary file object or a resolved absolute path, with no protocol but `file`
(`protocol_whitelist`); a path that FFmpeg would read as a protocol is refused before FFmpeg sees it.

Limits (`pipeline.config.MediaLimits`) are checked from sizes and headers before anything large is
allocated: the bytes of the file, pixels per frame as stored and as displayed (a sample aspect ratio
stretches the width), the aspect ratio, declared frames and duration. The decoder gets the pixel limit
too (FFmpeg's `max_pixels`), so a stream whose frames grow mid-way is refused by the codec. Frame
counts (`check_frames`) and time (`Deadline`) are checked again while demuxing and decoding.

Each error carries a short fixed `reason`, what a model server may tell its caller (never FFmpeg's
text or a path), and a one-line message naming the value and the limit, for logs and manifests.
"""

from __future__ import annotations

import io
import os
import re
import time
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, Union

import av

from pipeline.config import MediaLimits

Source = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

DEFAULT_LIMITS = MediaLimits()

# FFmpeg demuxer name -> what it reads. "mov" is MP4/MOV/M4V/3GP, "mpeg" is MPEG-PS (.mpg, .vob).
ALLOWED_FORMATS = {"mov": "mp4/mov", "matroska": "matroska/webm", "avi": "avi", "mpegts": "mpeg-ts",
                   "mpeg": "mpeg-ps", "flv": "flv"}
_ALLOWED_TEXT = ", ".join(ALLOWED_FORMATS.values())
_CONTAINER_OPTIONS = {"format_whitelist": ",".join(ALLOWED_FORMATS), "protocol_whitelist": "file"}

# What FFmpeg reads as `protocol:` (its URL scheme characters before a colon), and `subfile,`.
_PROTOCOL = re.compile(r"(?:[A-Za-z0-9+.-]+:|subfile,)")
_IMAGE_PATTERN = re.compile(r"%0?\d*d")  # image2's frame-number pattern, as in img%03d.png

# Leading bytes of inputs FFmpeg would read other files for, or that are not video: to name them
# in the refusal (the whitelist's own error is only "Invalid argument").
_SIGNATURES = ((b"ffconcat", "an ffconcat playlist (concat demuxer)"), (b"#EXTM3U", "an HLS playlist (m3u8)"),
               (b"<?xml", "an XML document (a DASH manifest?)"), (b"\x89PNG", "a PNG image (image2)"),
               (b"\xff\xd8\xff", "a JPEG image (image2)"), (b"GIF8", "a GIF image"))


class DecodeError(RuntimeError):
    """The video cannot be decoded (unreadable container, no video stream, corrupt data)."""

    reason = "undecodable video"


class UnsupportedMedia(DecodeError):
    """Not one of the allowed containers, or a path that FFmpeg would read as something else."""

    reason = "unsupported container"


class NoSuchFile(DecodeError):
    """A local path that is not a file."""

    reason = "no such video"


class LimitExceeded(DecodeError):
    """Over one of the MediaLimits; `limit` is its config key and `reason` the short fixed reason."""

    def __init__(self, message: str, limit: str = "", reason: str = "video too large"):
        super().__init__(message)
        self.limit = limit
        self.reason = reason


def public_reason(err: BaseException) -> str:
    """The short fixed reason a caller of the model server may see for `err`."""
    return getattr(err, "reason", "") or "undecodable video"


def describe(src: Source) -> str:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    if isinstance(src, (str, os.PathLike)):
        return os.fsdecode(os.fspath(src))
    return f"<file {getattr(src, 'name', type(src).__name__)}>"


def check_path(path: str | os.PathLike) -> Path:
    """`path` resolved (absolute, no `..`, links followed); UnsupportedMedia when FFmpeg would read it
    as a protocol (`concat:`, `subfile,`, `file:`, `http:`, `data:`, `pipe:` ...)."""
    text = os.fsdecode(os.fspath(path))
    match = _PROTOCOL.match(text)
    if match:
        raise UnsupportedMedia(f"{text!r} names the FFmpeg protocol {match.group(0)!r}, not a file; "
                               "pass a plain local path or the video's bytes")
    return Path(text).resolve()


def max_bytes(limits: MediaLimits) -> int:
    return int(limits.max_object_mb * 2 ** 20)


def check_bytes(size: int | None, limits: MediaLimits, what: str) -> None:
    """Refuse a video of `size` bytes over data.limits.max_object_mb (before it is read)."""
    if size is not None and size > max_bytes(limits):
        raise LimitExceeded(f"{what} has {size} bytes, over data.limits.max_object_mb={limits.max_object_mb:g}",
                            "max_object_mb")


def check_frames(count: int, limits: MediaLimits) -> None:
    if count > limits.max_frames:
        raise LimitExceeded(f"more than data.limits.max_frames={limits.max_frames} frames", "max_frames",
                            "video too long")


class Deadline:
    """A time limit for one video's work, checked between packets and frames (each FFmpeg call in
    between is bounded by the pixel limit). `seconds=None`: no limit."""

    def __init__(self, seconds: float | None, key: str = "data.limits.row_deadline_s"):
        self.seconds, self.key = seconds, key
        self._at = None if seconds is None else time.monotonic() + seconds

    def check(self) -> None:
        if self._at is not None and time.monotonic() > self._at:
            raise LimitExceeded(f"decoding took longer than {self.key}={self.seconds:g}", self.key.rsplit(".")[-1],
                                "deadline exceeded")


NO_DEADLINE = Deadline(None)


def _file_size(f) -> int | None:
    size = getattr(f, "size", None)  # pyarrow's files know theirs without seeking
    if callable(size):
        return int(size())
    try:
        position = f.tell()
        end = f.seek(0, os.SEEK_END)
        f.seek(position)
        return end
    except (AttributeError, OSError, ValueError):
        return None


def _head(target) -> bytes:
    """The first bytes of what was handed to FFmpeg (to name a refused kind)."""
    try:
        if isinstance(target, str):
            with open(target, "rb") as f:
                return f.read(64)
        target.seek(0)
        return target.read(64)
    except (OSError, ValueError, AttributeError):
        return b""


def _refused_kind(head: bytes) -> str:
    text = head.lstrip()
    for signature, kind in _SIGNATURES:
        if text.startswith(signature):
            return kind
    if text.startswith(b"file ") or b"\nfile " in text:
        return "a concat list (concat demuxer)"
    return ""


def check_stream(container: av.container.InputContainer, limits: MediaLimits, what: str) -> None:
    """Refuse the first video stream when its header is over a limit, and tell its decoder the pixel limit."""
    if not container.streams.video:
        return
    stream = container.streams.video[0]
    ctx = stream.codec_context
    width, height = ctx.width or 0, ctx.height or 0
    if width and height:
        if width * height > limits.max_pixels:
            raise LimitExceeded(f"{what}: {width}x{height} pixels per frame, over data.limits.max_pixels="
                                f"{limits.max_pixels}", "max_pixels")
        sar = stream.sample_aspect_ratio
        shown = float(width * Fraction(sar)) if sar and sar > 0 else float(width)
        if shown * height > limits.max_pixels:
            raise LimitExceeded(f"{what}: {width}x{height} with sample aspect ratio {sar} shows {shown:.0f}x{height} "
                                f"pixels, over data.limits.max_pixels={limits.max_pixels}", "max_pixels")
        aspect = max(shown, height) / max(1.0, min(shown, height))
        if aspect > limits.max_aspect:
            raise LimitExceeded(f"{what}: aspect ratio {aspect:.1f} of {shown:.0f}x{height} (as shown), over "
                                f"data.limits.max_aspect={limits.max_aspect:g}", "max_aspect")
    if stream.frames and stream.frames > limits.max_frames:
        raise LimitExceeded(f"{what}: declares {stream.frames} frames, over data.limits.max_frames="
                            f"{limits.max_frames}", "max_frames", "video too long")
    seconds = [float(stream.duration * stream.time_base)] if stream.duration and stream.time_base else []
    seconds += [container.duration / av.time_base] if container.duration else []
    if seconds and max(seconds) > limits.max_duration_s:
        raise LimitExceeded(f"{what}: declares {max(seconds):.0f} s, over data.limits.max_duration_s="
                            f"{limits.max_duration_s:g}", "max_duration_s", "video too long")
    # The header's size can change mid-stream; the codec refuses any frame over the limit.
    ctx.options = {**ctx.options, "max_pixels": str(limits.max_pixels)}


def open_media(src: Source, *, limits: MediaLimits = DEFAULT_LIMITS,
               probe_options: list[dict[str, str]] | None = None) -> av.container.InputContainer:
    """`av.open` for reading untrusted bytes, a binary file object or a local path (see the module's
    docstring). `probe_options` are per-stream codec options for FFmpeg's stream probing. Raises
    UnsupportedMedia, LimitExceeded or DecodeError, with one line."""
    what = describe(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        check_bytes(len(src), limits, what)
        target = io.BytesIO(src)
    elif isinstance(src, (str, os.PathLike)):
        path = check_path(src)
        if not path.is_file():
            if _IMAGE_PATTERN.search(path.name):
                raise UnsupportedMedia(f"{what} is an image-sequence pattern (image2): not one of the allowed "
                                       f"containers ({_ALLOWED_TEXT})")
            raise NoSuchFile(f"cannot open video {what}: no such file")
        check_bytes(path.stat().st_size, limits, what)
        target = str(path)
    else:
        check_bytes(_file_size(src), limits, what)
        target = src
    probe = [{**options, "max_pixels": str(limits.max_pixels)} for options in probe_options or []]
    try:
        try:
            container = av.open(target, mode="r", container_options=_CONTAINER_OPTIONS, stream_options=probe)
        except ValueError as err:
            # MPEG-PS and FLV find their streams only while probing, so they refuse per-stream options.
            if "stream_options" not in str(err):
                raise
            if hasattr(target, "seek"):
                target.seek(0)
            container = av.open(target, mode="r", container_options=_CONTAINER_OPTIONS)
    except (av.FFmpegError, OSError, ValueError) as err:
        kind = _refused_kind(_head(target))
        if kind or isinstance(err, av.ArgumentError):  # the format whitelist answers EINVAL
            raise UnsupportedMedia(f"{what} is {kind or 'not media'}: not one of the allowed containers "
                                   f"({_ALLOWED_TEXT})") from None
        raise DecodeError(f"cannot open video {what}: {err}") from None
    try:
        if not set(container.format.name.split(",")) & set(ALLOWED_FORMATS):
            raise UnsupportedMedia(f"{what} is {container.format.name}: not one of the allowed containers "
                                   f"({_ALLOWED_TEXT})")
        check_stream(container, limits, what)
    except BaseException:
        container.close()
        raise
    return container
