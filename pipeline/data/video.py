"""Probe videos for problems and transcode good ones into cheap-to-seek training copies.

`probe_video` never raises on a bad video: it returns a `status` (see `pipeline.data.manifest`) and
a one-line `reason`, plus whatever metadata it could read. Both open videos with
`pipeline.data.media.open_media`: a container outside the allow-list is `unsupported`, a video over
one of the `data.limits` is `too_large` (its reason names the limit), found before it is decoded. It counts frames by demuxing every
packet (containers such as WebM do not say), and decodes the first frame and the last group of
pictures so that truncated files are noticed, not only broken headers.

`transcode_video` writes H.264 yuv420p in MP4 (index at the front, for range reads) with even
dimensions, an optional smaller short side, every `frame_stride`-th frame of the original,
a keyframe every `keyframe_interval` frames, no B-frames, explicit increasing timestamps
(frames written without them all get pts 0 and break seeking), and the source's colour
description (matrix, range, primaries, transfer). It stores the picture as shown (turned
upright, square pixels, no rotation tag; see `pipeline.data.decode.display_of`), so a copy decodes
to the frames its original decodes to.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import IO, Iterable, Iterator, Union

import av
import numpy as np
from av.video.frame import PictureType
from av.video.reformatter import VideoReformatter

from pipeline.config import MediaLimits
from pipeline.data.decode import Display, display_of
from pipeline.data.media import DEFAULT_LIMITS, LimitExceeded, UnsupportedMedia, check_frames, open_media

Source = Union[str, Path, bytes, bytearray, memoryview, IO[bytes]]

_COLOUR_TAGS = ("colorspace", "color_range", "color_primaries", "color_trc")
DEFAULT_MIN_FRAMES = 16
DEFAULT_MIN_SIDE = 32


class TranscodeError(RuntimeError):
    """A transcode failed; the message is one line."""


def _source_size(src: Source) -> int | None:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return len(src)
    if isinstance(src, (str, Path)):
        try:
            return os.path.getsize(src)
        except OSError:  # open_media says why (a protocol, a pattern, no such file)
            return None
    try:
        pos = src.tell()
        size = src.seek(0, os.SEEK_END)
        src.seek(pos)
        return size
    except (AttributeError, OSError):
        return None


def _one_line(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err)
    text = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(err).__name__}: {text}"[:300] if text else type(err).__name__


def _bit_depth(pix_fmt: str) -> int:
    for depth in (16, 14, 12, 10, 9):
        if f"p{depth}" in pix_fmt:
            return depth
    return 8


def probe_video(src: Source, *, min_frames: int = DEFAULT_MIN_FRAMES, min_side: int = DEFAULT_MIN_SIDE,
                decode: str = "ends", limits: MediaLimits = DEFAULT_LIMITS) -> dict:
    """Inspect a video (path, bytes or seekable binary file); never raises for a bad video.

    Returns `status` (`ok`, `empty`, `unreadable`, `unsupported`, `too_large`, `no_video_stream`,
    `too_small`, `too_short`),
    `reason` ("" when ok) and `container`, `codec`, `pix_fmt`, `bit_depth`, `num_frames`, `fps`
    (average), `vfr`, `width`, `height` (of the frames as decoded: upright, square pixels),
    `duration_s`, `keyframe_interval` (largest gap between keyframes, in frames), `bytes`.
    `decode="ends"` decodes the first frame and the last GOP; `decode="all"` decodes every frame
    (slower, catches damage in the middle too).
    """
    if decode not in ("ends", "all"):
        raise ValueError(f"decode={decode!r} is not one of 'ends', 'all'")
    info: dict = {"status": "ok", "reason": "", "container": "", "codec": "", "pix_fmt": "", "bit_depth": 0,
                  "num_frames": 0, "fps": 0.0, "vfr": False, "width": 0, "height": 0, "duration_s": 0.0,
                  "keyframe_interval": 0, "bytes": 0}
    size = _source_size(src)
    info["bytes"] = size or 0

    def bad(status: str, reason: str) -> dict:
        info.update(status=status, reason=reason)
        return info

    if size == 0:
        return bad("empty", "zero-byte file")
    if hasattr(src, "seek"):
        src.seek(0)
    try:
        container = open_media(src, limits=limits)
    except UnsupportedMedia as err:
        return bad("unsupported", _one_line(err))
    except LimitExceeded as err:
        return bad("too_large", _one_line(err))
    except Exception as err:  # noqa: BLE001 - any other failure to open means unreadable
        return bad("unreadable", f"not a readable media container ({_one_line(err)})")
    with container:
        info["container"] = container.format.name
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams})
            return bad("no_video_stream", f"no video stream (streams: {', '.join(kinds) or 'none'})")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        info.update(codec=ctx.name, pix_fmt=ctx.pix_fmt or "", width=ctx.width, height=ctx.height)
        info["bit_depth"] = _bit_depth(info["pix_fmt"])
        if not ctx.width or not ctx.height:
            return bad("unreadable", "video stream has no frame size")

        # Pass 1: every packet (frame count, timestamps, keyframes), decoding up to the first frame.
        pts: list[int] = []
        keyframes: list[int] = []
        count = first_frames = 0
        shown: Display | None = None  # of the first frame: the manifest's size is what decoding yields

        def decode_packet(packet) -> int:  # None flushes the decoder
            nonlocal shown
            frames = stream.decode(packet)
            if frames and shown is None:
                shown = display_of(frames[0], stream.sample_aspect_ratio)
            return len(frames)

        try:
            for packet in container.demux(stream):
                if not packet.size:
                    continue
                if packet.is_corrupt:
                    return bad("unreadable", f"corrupt packet {count} (truncated or damaged file)")
                check_frames(count + 1, limits)  # before `pts` grows past the limit
                if packet.is_keyframe:
                    keyframes.append(count)
                    last_key_times = (packet.pts, packet.dts)
                if packet.pts is not None:
                    pts.append(packet.pts)
                count += 1
                if decode == "all" or not first_frames:
                    first_frames += decode_packet(packet)
            if decode == "all" or not first_frames:
                first_frames += decode_packet(None)
        except LimitExceeded as err:
            return bad("too_large", _one_line(err))
        except Exception as err:  # noqa: BLE001
            return bad("unreadable", f"failed at packet {count}: {_one_line(err)}")
        declared = stream.frames or 0
        if declared and count < declared:
            return bad("unreadable", f"truncated: the container declares {declared} frames, {count} are present")
        if count == 0 or first_frames == 0:
            return bad("unreadable", "no decodable frames")
        if decode == "all" and first_frames < count:
            return bad("unreadable", f"only {first_frames} of {count} frames decode")
        info["width"], info["height"] = shown.width, shown.height

        info["num_frames"] = count
        gaps = [b - a for a, b in zip(keyframes, keyframes[1:] + [count])]
        info["keyframe_interval"] = max(gaps) if gaps else count
        tb = stream.time_base or Fraction(1, 1)
        end_s = 0.0  # where the last frame ends, counted from timestamp 0
        if len(pts) >= 2:
            ordered = sorted(pts)
            deltas = [b - a for a, b in zip(ordered, ordered[1:]) if b > a]
            step = min(deltas) if deltas else 0
            info["vfr"] = bool(deltas) and max(deltas) > 1.5 * step
            mean_delta = (ordered[-1] - ordered[0]) / max(1, len(ordered) - 1)
            info["duration_s"] = float((ordered[-1] - ordered[0] + mean_delta) * tb)
            end_s = float((ordered[-1] + mean_delta) * tb)
            if info["duration_s"] > limits.max_duration_s:  # Matroska and MPEG-TS need not declare it
                return bad("too_large", f"timestamps span {info['duration_s']:.0f} s, over "
                                        f"data.limits.max_duration_s={limits.max_duration_s:g}")
        elif container.duration:
            info["duration_s"] = container.duration / av.time_base
        rate = stream.average_rate or stream.guessed_rate
        if info["vfr"] or not rate:
            rate = count / info["duration_s"] if info["duration_s"] > 0 else 0
        info["fps"] = float(rate)
        if not declared:
            # Matroska/WebM store no frame count: a cut file just has fewer packets. Compare the
            # frames' time span with the declared duration (only when it can be the video's own).
            if stream.duration:
                declared_s = float(stream.duration * tb)
            elif len(container.streams) == 1 and container.duration:
                declared_s = container.duration / av.time_base
            else:
                declared_s = 0.0
            # FLV declares the end time of its last frame, which B-frames put after the first
            # frame's delay: a complete file covers its declared duration one way or the other.
            covered_s = max(info["duration_s"], end_s)
            period = 1 / info["fps"] if info["fps"] else 0.0
            if declared_s and declared_s - covered_s > 1.5 * period + 0.01:
                return bad("unreadable", f"truncated: the container declares {declared_s:.2f} s, "
                                         f"the frames cover {covered_s:.2f} s")

        # Pass 2: decode the last group of pictures (where a truncated download is damaged). Seek to
        # the earlier of the last keyframe's pts and dts: AVI and MPEG-TS look a seek up by dts, and
        # with B-frames the keyframe's pts finds a packet after it, from which nothing decodes.
        if decode == "ends" and keyframes and len(pts) == count:
            try:
                container.seek(min(t for t in last_key_times if t is not None), stream=stream, backward=True,
                               any_frame=False)
                tail = sum(1 for _ in container.decode(stream))
            except Exception as err:  # noqa: BLE001
                return bad("unreadable", f"the last frames do not decode: {_one_line(err)}")
            if tail == 0:
                return bad("unreadable", "the last frames do not decode")

    if min(info["width"], info["height"]) < min_side:
        return bad("too_small", f"{info['width']}x{info['height']} is below the minimum side {min_side}")
    if info["num_frames"] < min_frames:
        return bad("too_short", f"{info['num_frames']} frames is below the minimum {min_frames}")
    return info


def output_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """Even (width, height) with the short side scaled down to `short_side` (never up)."""
    scale = 1.0
    if short_side and min(width, height) > short_side:
        scale = short_side / min(width, height)
    w = max(2, int(round(width * scale / 2)) * 2) if scale != 1.0 else max(2, width - width % 2)
    h = max(2, int(round(height * scale / 2)) * 2) if scale != 1.0 else max(2, height - height % 2)
    return w, h


def _upright_yuv420p(image: av.VideoFrame, display: Display) -> av.VideoFrame:
    """`image` turned and mirrored as `display` says, plane by plane (chroma is half size both ways)."""
    height, width = image.height, image.width
    flat = image.to_ndarray().reshape(-1)  # Y, then U, then V
    luma, chroma = height * width, height * width // 4
    planes = [flat[:luma].reshape(height, width), flat[luma:luma + chroma].reshape(height // 2, width // 2),
              flat[luma + chroma:].reshape(height // 2, width // 2)]
    planes = [display.upright(plane) for plane in planes]
    packed = np.concatenate([plane.reshape(-1) for plane in planes]).reshape(-1, planes[0].shape[1])
    turned = av.VideoFrame.from_ndarray(packed, format="yuv420p")
    for tag in _COLOUR_TAGS:  # a frame made from an array has no colour description
        setattr(turned, tag, getattr(image, tag))
    return turned


def _h264_stream(out, image, rate: Fraction, *, keyframe_interval: int, crf: int, preset: str, threads: int):
    """An H.264 stream for frames like `image`, tagged with its colour description: without one a
    decoder assumes BT.601 limited range, several levels off for a BT.709 or full-range source."""
    stream = out.add_stream("libx264", rate=rate)
    stream.width, stream.height, stream.pix_fmt = image.width, image.height, "yuv420p"
    context = stream.codec_context
    context.time_base = Fraction(rate.denominator, rate.numerator)
    context.gop_size = keyframe_interval
    context.max_b_frames = 0
    context.thread_count = threads
    for tag in _COLOUR_TAGS:
        setattr(context, tag, getattr(image, tag))
    stream.options = {"crf": str(crf), "preset": preset,
                      "x264-params": f"keyint={keyframe_interval}:min-keyint={keyframe_interval}:scenecut=0:bframes=0"}
    return stream


def _write_h264(dst: Path, images: Iterable[av.VideoFrame], rate: Fraction, *, keyframe_interval: int, crf: int,
                preset: str, threads: int, no_frames: str) -> dict:
    """Encode yuv420p `images` (one size) as an MP4 at `dst`: H.264, a keyframe every `keyframe_interval`
    frames, no B-frames, frame j at timestamp j in a 1/`rate` time base. Returns the copy's facts
    (`num_frames`, `fps`, `width`, `height`, `duration_s`, `bytes`, `codec`, `pix_fmt`,
    `keyframe_interval`); TranscodeError(`no_frames`) when `images` is empty."""
    time_base = Fraction(rate.denominator, rate.numerator)
    written, stream = 0, None
    with av.open(str(dst), "w", format="mp4", options={"movflags": "+faststart"}) as out:
        for image in images:
            if stream is None:
                stream = _h264_stream(out, image, rate, keyframe_interval=keyframe_interval, crf=crf, preset=preset,
                                      threads=threads)
                width, height = image.width, image.height
            image.pts, image.time_base = written, time_base
            # libx264 obeys a decoded frame's I/P/B picture type when set; let it choose.
            image.pict_type = PictureType.NONE
            for packet in stream.encode(image):
                out.mux(packet)
            written += 1
        if stream is None:
            raise TranscodeError(no_frames)
        for packet in stream.encode():
            out.mux(packet)
    return {"num_frames": written, "fps": float(rate), "width": width, "height": height,
            "duration_s": float(written * time_base), "bytes": dst.stat().st_size, "codec": "h264",
            "pix_fmt": "yuv420p", "keyframe_interval": keyframe_interval}


def transcode_video(src: Source, dst_local_path: str | Path, *, short_side: int | None = None,
                    frame_stride: int = 1, keyframe_interval: int = 16, crf: int = 23,
                    preset: str = "veryfast", threads: int = 0, limits: MediaLimits = DEFAULT_LIMITS) -> dict:
    """Re-encode the first video stream of `src` to an MP4 at `dst_local_path`.

    Output frame j is frame `j * frame_stride` of a sequential decode of the original, at
    `fps / frame_stride` frames per second with timestamps j (time base 1/output fps).
    Returns the output's `num_frames`, `fps`, `width`, `height`, `duration_s`, `bytes`, `codec`,
    `pix_fmt`, `frame_stride`, `keyframe_interval` and `source_frames` (frames decoded).
    Raises `TranscodeError` with one line when the source cannot be decoded or encoded.
    """
    if frame_stride < 1:
        raise ValueError(f"frame_stride={frame_stride} must be at least 1")
    if keyframe_interval < 1:
        raise ValueError(f"keyframe_interval={keyframe_interval} must be at least 1")
    dst = Path(dst_local_path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(src, "seek"):
        src.seek(0)
    decoded = 0

    def upright_images(container, in_stream) -> Iterator[av.VideoFrame]:
        nonlocal decoded
        reformatter, display = VideoReformatter(), None
        for frame in container.decode(in_stream):
            decoded += 1
            check_frames(decoded, limits)
            if (decoded - 1) % frame_stride:
                continue
            if display is None:
                # The copy stores the picture as shown (upright, square pixels), untagged.
                display = display_of(frame, in_stream.sample_aspect_ratio)
                shown_width, shown_height = output_size(display.width, display.height, short_side)
                height, width = display.stored_size(shown_height, shown_width)
                # YUV keeps its own matrix and range; RGB has none to keep, so it gets BT.709.
                colour = {"dst_colorspace": "ITU709", "dst_color_range": "MPEG"} if frame.format.is_rgb else {}
            image = reformatter.reformat(frame, width=width, height=height, format="yuv420p",
                                         interpolation="AREA", threads=threads, **colour)
            yield image if display.is_upright else _upright_yuv420p(image, display)

    try:
        with open_media(src, limits=limits) as container:
            if not container.streams.video:
                raise TranscodeError("no video stream")
            in_stream = container.streams.video[0]
            if threads != 1:
                in_stream.thread_type = "AUTO"
            in_stream.codec_context.thread_count = threads
            src_rate = in_stream.average_rate or in_stream.guessed_rate or Fraction(30)
            rate = (Fraction(src_rate) / frame_stride).limit_denominator(1001)
            copy = _write_h264(dst, upright_images(container, in_stream), rate, keyframe_interval=keyframe_interval,
                               crf=crf, preset=preset, threads=threads, no_frames="no decodable frames")
    except TranscodeError:
        raise
    except Exception as err:  # noqa: BLE001 - one line for the manifest's reason
        raise TranscodeError(f"after {decoded} decoded frames: {_one_line(err)}") from None
    return {**copy, "frame_stride": frame_stride, "source_frames": decoded}


def encode_rgb_frames(frames: Iterable[np.ndarray], dst_local_path: str | Path, *, fps: float,
                      short_side: int | None = None, keyframe_interval: int = 16, crf: int = 23,
                      preset: str = "veryfast", threads: int = 0) -> dict:
    """Encode uint8 RGB frames (H, W, 3) of one size as the MP4 `transcode_video` writes: H.264
    yuv420p, even dimensions, the short side scaled down to `short_side`, a keyframe every
    `keyframe_interval` frames, no B-frames, timestamps j in a 1/`fps` time base. RGB has no matrix of
    its own to keep, so the copy is BT.709 limited range and tagged so, as a transcoded RGB video is.
    Returns what `transcode_video` returns (`source_frames`: frames given). Raises `TranscodeError`
    (one line) when encoding fails or no frame is given; ValueError for a frame of another size.
    """
    if fps <= 0:
        raise ValueError(f"fps={fps} must be > 0")
    rate = Fraction(fps).limit_denominator(1001)
    dst = Path(dst_local_path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    given = 0

    def yuv_images() -> Iterator[av.VideoFrame]:
        nonlocal given
        reformatter, size = VideoReformatter(), None
        for rgb in frames:
            if size is None:
                size = rgb.shape[:2]
                width, height = output_size(rgb.shape[1], rgb.shape[0], short_side)
            elif rgb.shape[:2] != size:
                raise ValueError(f"frame {given} is {rgb.shape[1]}x{rgb.shape[0]}, the first {size[1]}x{size[0]}")
            given += 1
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb, dtype=np.uint8), format="rgb24")
            yield reformatter.reformat(picture, width=width, height=height, format="yuv420p",
                                       interpolation="AREA", threads=threads, dst_colorspace="ITU709",
                                       dst_color_range="MPEG")

    try:
        copy = _write_h264(dst, yuv_images(), rate, keyframe_interval=keyframe_interval, crf=crf, preset=preset,
                           threads=threads, no_frames="no frames to encode")
    except (TranscodeError, ValueError):
        raise
    except Exception as err:  # noqa: BLE001 - one line for the manifest's reason
        raise TranscodeError(f"after {given} encoded frames: {_one_line(err)}") from None
    return {**copy, "frame_stride": 1, "source_frames": given}
