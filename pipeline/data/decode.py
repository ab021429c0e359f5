"""Frame-accurate seek-decoding of a few frames of a video with PyAV.

`decode_frames(src, indices)` returns exactly the frames that a full sequential decode yields at
those 0-based indices, while decoding only from the keyframe before each wanted run of frames.

How frame index <-> timestamp is mapped: one demux pass (no decoding; it only reads packet
headers and data) collects every packet's pts, dts and keyframe flag. Sorted pts is display order,
so frame i is the packet with the i-th smallest pts, for B-frame and variable-frame-rate
streams alike. To reach frame i we seek to the last keyframe at or before it, feed the decoder
from that keyframe's packet, and recognise frames by their pts. Containers look a seek's
timestamp up in different clocks: MP4 and Matroska by presentation time, AVI (whose index
counts frames in stored order) and MPEG-TS (no index: it bisects the file) by decode time.
With B-frames a keyframe is decoded before it is shown, so its pts finds a later packet in
AVI and TS, and its dts an earlier keyframe in Matroska: we seek by pts, and by dts when the
first packet read shows the pts seek went past the keyframe. Packets before the first keyframe
packet read are skipped, never decoded: MPEG-2 and MPEG-4 Part 2 decoders would make pictures
from missing references that look like wanted frames. A seek that lands on an earlier keyframe
is only slower: we decode through, and do not seek to that keyframe again. Decoded frames must
come out one after another in display order; if the stream breaks these assumptions (missing
or repeated timestamps, pts that do not follow display order, as the ones AVI invents for
H.264 with B-frames, pts that differ after a seek, as MPEG-PS guesses those of frames without
their own, a seek that lands past the wanted frame, a frame the decoder drops), we fall back
to one sequential decode that counts frames, which is the definition.

Frames come out as they are shown (`display_of`): a stream's display matrix (the rotation tag of
phone videos, and mirroring) is applied, and non-square pixels (a sample aspect ratio other than
1) are stretched to square by scaling the width while converting to RGB. Prepared copies
(`pipeline.data.video.transcode_video`) store that picture with square pixels and no tag, so a copy
and its original decode to the same frames, and training on copies matches `predict` on originals.

Every video is opened by `pipeline.data.media.open_media` (allowed containers, plain files, limits from
headers); the frame count, the timestamps' span and an optional deadline are checked again while
demuxing and decoding, before the frame table or a decoded frame grows past a limit.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterator, Sequence, Union

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from pipeline.config import MediaLimits
from pipeline.data.media import (DEFAULT_LIMITS, NO_DEADLINE, DecodeError, Deadline, LimitExceeded, Source,
                                 check_frames, open_media)
from pipeline.data.media import describe as _describe
from pipeline.data.sampling import crop_origin

__all__ = ["DecodeError", "LimitExceeded", "VideoDecoder", "decode_frames", "frame_table", "count_frames"]

Size = Union[int, tuple[int, int], None]


@dataclass(frozen=True)
class FrameTable:
    """Display-order timestamps of a video stream, from one demux pass."""

    pts: np.ndarray  # (N,) int64, sorted: pts[i] is frame i
    dts: np.ndarray  # (N,) int64, decode timestamp of frame i's packet (its pts where the container has none)
    decode_order: np.ndarray  # (N,) int64, position of frame i's packet in the stream
    keyframes: np.ndarray  # (K,) int64, sorted display indices of keyframes
    reliable: bool  # False: timestamps missing or repeated; only a sequential decode is exact

    @property
    def num_frames(self) -> int:
        return len(self.pts)

    def __repr__(self) -> str:
        return f"FrameTable(num_frames={self.num_frames}, keyframes={len(self.keyframes)}, reliable={self.reliable})"


# Options for the codec that avformat_find_stream_info opens to probe each stream: by default it
# decodes several frames (an H.264 I-frame plus its decode-delay guess), as much as a third of
# a 16-frame clip from a 320x240 H.264 copy (1.3-4 ms to open; 0.4 ms with this, measured; VP9
# opens in 1.4 ms either way). Skipping the probe's frames leaves the decoder we use untouched;
# tests compare against a plain open. Not "nonkey" (0.1 ms): FFmpeg 8 then loses the display
# matrix (the rotation of phone videos) for H.264 and VP9 alike.
_PROBE_OPTIONS = [{"skip_frame": "all"}] * 8  # per stream, in order; extra entries are ignored


def _video_stream(container: av.container.InputContainer, src: Source) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise DecodeError(f"no video stream in {_describe(src)}")
    stream = container.streams.video[0]
    # Frame threading decodes frames ahead of the ones asked for, which a seek then throws away;
    # one thread per decode is also what a pool of decode processes wants (measured by `uniformer bench data`).
    stream.thread_type = "SLICE"
    stream.codec_context.thread_count = 1
    return stream


def _frame_table(container: av.container.InputContainer, stream, limits: MediaLimits = DEFAULT_LIMITS,
                 deadline: Deadline = NO_DEADLINE) -> FrameTable:
    pts, dts, is_key = [], [], []
    present = 0  # packets with data, edit-list discards included (what the container's count counts)
    for packet in container.demux(stream):
        deadline.check()
        present += packet.size > 0
        if packet.size == 0 or packet.is_discard:  # the final flush packet; edit-list discards
            continue
        check_frames(len(pts) + 1, limits)  # before the lists grow: Matroska and MPEG-TS declare no count
        if packet.pts is None:  # no usable timestamps: only a sequential decode numbers the frames
            pts, dts, is_key = [], [], []
            break
        pts.append(packet.pts)
        dts.append(packet.pts if packet.dts is None else packet.dts)
        is_key.append(packet.is_keyframe)
    if pts and stream.frames and present < stream.frames:
        # A download cut short: MP4's index still lists the missing frames.
        raise DecodeError(f"truncated: the container declares {stream.frames} frames, {present} are present")
    order = np.argsort(np.asarray(pts, np.int64), kind="stable")  # frame i is packet order[i]
    sorted_pts = np.asarray(pts, np.int64)[order]
    if len(sorted_pts) > 1 and stream.time_base:  # containers that declare no duration, or a wrong one
        seconds = float((sorted_pts[-1] - sorted_pts[0]) * stream.time_base)
        if seconds > limits.max_duration_s:
            raise LimitExceeded(f"timestamps span {seconds:.0f} s, over data.limits.max_duration_s="
                                f"{limits.max_duration_s:g}", "max_duration_s", "video too long")
    keyframes = np.flatnonzero(np.asarray(is_key, bool)[order]).astype(np.int64)
    reliable = len(order) > 0 and bool(np.all(np.diff(sorted_pts) > 0)) and len(keyframes) > 0
    return FrameTable(sorted_pts, np.asarray(dts, np.int64)[order], order.astype(np.int64), keyframes, reliable)


def frame_table(src: Source) -> FrameTable:
    """The display-order timestamp table of the first video stream (one demux pass, no decoding)."""
    with VideoDecoder(src) as video:
        return video.table


def count_frames(src: Source) -> int:
    """Number of frames a sequential decode yields, counted from packets without decoding
    (decoded only for streams whose timestamps are missing or repeated)."""
    with VideoDecoder(src) as video:
        return video.num_frames


def _output_size(height: int, width: int, size: Size) -> tuple[int, int]:
    """(height, width) to convert a `height` x `width` picture to."""
    if size is None:
        return height, width
    if isinstance(size, (int, np.integer)):
        scale = int(size) / min(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))
    return int(size[0]), int(size[1])


Convert = Callable[[av.VideoFrame], np.ndarray]

# A view needing a centred crop is cut from the stored picture before scaling when the scaled frame
# would be more than this many times the crop's area (never for 4:3, 16:9 or 9:16 videos, whose frames
# come out exactly as scaled then cropped).
_CROP_FIRST = 4


def _center_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    top, left = crop_origin(rgb.shape[0], rgb.shape[1], size)
    return np.ascontiguousarray(rgb[top:top + size, left:left + size])


@dataclass(frozen=True)
class Display:
    """How a decoded picture is shown: stretched to square pixels (its sample aspect ratio), then
    turned upright by its display matrix (phones store sideways pictures and a rotation tag)."""

    height: int  # of the upright, square-pixel picture
    width: int
    transpose: bool  # a quarter turn: rows become columns (then the flips give its direction)
    flip_h: bool  # mirror left-right
    flip_v: bool  # mirror top-bottom

    @property
    def is_upright(self) -> bool:
        return not (self.transpose or self.flip_h or self.flip_v)

    def stored_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) to scale a stored picture to, for an upright `height` x `width`."""
        return (width, height) if self.transpose else (height, width)

    def upright(self, pixels: np.ndarray) -> np.ndarray:
        """A (H, W, ...) array of the stored picture, shown the way the display matrix says (a view)."""
        if self.transpose:
            pixels = pixels.swapaxes(0, 1)
        if self.flip_h:
            pixels = pixels[:, ::-1]
        if self.flip_v:
            pixels = pixels[::-1]
        return pixels


def display_of(frame: av.VideoFrame, sample_aspect_ratio: Fraction | None) -> Display:
    """The Display of a decoded frame; `sample_aspect_ratio` is its stream's (PyAV has no frame's).

    The display matrix maps a stored pixel (x, y) to x' = a x + c y, y' = b x + d y (FFmpeg's
    layout: a, b, c, d are entries 0, 1, 3, 4). Angles between quarter turns go to the nearest one.
    """
    width = frame.width
    if sample_aspect_ratio and sample_aspect_ratio != 1:
        width = max(1, round(frame.width * sample_aspect_ratio))  # players keep the height
    a, b, c, d = 1, 0, 0, 1
    matrix = frame.side_data.get("DISPLAYMATRIX")
    if matrix is not None:
        a, b, _, c, d = np.frombuffer(bytes(matrix), np.int32)[:5].tolist()
    if abs(b) > abs(a):  # x' follows y: a quarter turn
        return Display(width, frame.height, True, flip_h=c < 0, flip_v=b < 0)
    return Display(frame.height, width, False, flip_h=a < 0, flip_v=d < 0)


def _check_size(size: Size) -> None:
    if size is None:
        return
    if isinstance(size, (int, np.integer)):
        if size < 1:
            raise ValueError(f"size={size}: a short side in pixels must be >= 1")
        return
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size={size!r}: use None, a short side (int) or (height, width) >= 1")


@dataclass
class DecodeStats:
    """The work one VideoDecoder has done: what seeking saves (read by tests and benchmarks)."""

    frames_decoded: int = 0  # every frame the codec produced, wanted or not
    seeks: int = 0  # container seeks (a retry by dts counts too)
    sequential_decodes: int = 0  # decodes from the start: the fallback, or counting frames


def _decode_sequential(container, stream, wanted: set[int], convert: Convert, stats: DecodeStats,
                       deadline: Deadline = NO_DEADLINE) -> tuple[dict[int, np.ndarray], int]:
    """Decode from the start counting frames, which is the definition of a frame's index.

    Returns the wanted frames found and the index of the last frame decoded; when the stream
    ends before the largest wanted index, the last frame is included under its index.
    """
    stats.sequential_decodes += 1
    out: dict[int, np.ndarray] = {}
    last_needed = max(wanted)
    i, last = -1, None
    for i, frame in enumerate(container.decode(stream)):
        deadline.check()
        stats.frames_decoded += 1
        last = frame
        if i in wanted:
            out[i] = convert(frame)
            if i == last_needed:
                return out, i
    if last is None:
        raise DecodeError("the video stream has no decodable frames")
    out[i] = convert(last)
    return out, i


def _seek_to_keyframe(container, stream, table: FrameTable, key: int, index_of: dict[int, int],
                      keyframes: set[int], stats: DecodeStats) -> tuple[int, Iterator[av.Packet]] | None:
    """Seek to keyframe `key` (a display index): returns the keyframe where demuxing starts
    (`key` or an earlier one) and the packets from it on, or None if every seek lands after it.

    Tries the keyframe's pts, then its dts (see the module's docstring). The packets read
    before the first keyframe packet are dropped.
    """
    for target in dict.fromkeys((int(table.pts[key]), int(table.dts[key]))):
        stats.seeks += 1
        container.seek(target, backward=True, any_frame=False, stream=stream)
        packets = container.demux(stream)
        for packet in packets:
            i = index_of.get(packet.pts)
            if i is None or table.decode_order[i] > table.decode_order[key]:
                break  # past the keyframe, or a packet the demux pass did not see
            if i in keyframes:
                return i, itertools.chain([packet], packets)
    return None


def _decoded(packets: Iterator[av.Packet], stats: DecodeStats, deadline: Deadline) -> Iterator[av.VideoFrame]:
    for packet in packets:
        deadline.check()
        for frame in packet.decode():
            stats.frames_decoded += 1
            yield frame


def _decode_seeking(container, stream, table: FrameTable, wanted: list[int], convert: Convert,
                    stats: DecodeStats, deadline: Deadline = NO_DEADLINE) -> dict[int, np.ndarray] | None:
    """Seek-decode the sorted, in-range `wanted` indices; None if the stream defeats seeking."""
    index_of = {int(p): i for i, p in enumerate(table.pts)}
    keyframes = set(table.keyframes.tolist())
    want = set(wanted)
    out: dict[int, np.ndarray] = {}
    lands_early: set[int] = set()  # keyframes whose seek lands on an earlier one: decode through instead
    w = 0  # next wanted index to get
    while w < len(wanted):
        k = bisect.bisect_right(table.keyframes, wanted[w]) - 1
        if k < 0:
            return None  # no keyframe before the frame: only a sequential decode knows it
        landed = _seek_to_keyframe(container, stream, table, int(table.keyframes[k]), index_of, keyframes, stats)
        if landed is None:
            return None
        start, packets = landed
        if start < table.keyframes[k]:
            lands_early.add(k)
        position = -1
        for frame in _decoded(packets, stats, deadline):
            i = index_of.get(frame.pts)
            if i is None or i > wanted[w] or (position >= 0 and i != position + 1):
                return None  # not display order, landed past the frame, or the decoder dropped one
            position = i
            if i in want and i not in out:
                out[i] = convert(frame)
            while w < len(wanted) and wanted[w] in out:
                w += 1
            if w == len(wanted):
                return out
            # Seek again when the next wanted frame lies past a keyframe not reached yet.
            k_next = bisect.bisect_right(table.keyframes, wanted[w]) - 1
            if table.keyframes[k_next] > position + 1 and k_next not in lands_early:
                break
        else:
            return None  # the stream ended before the frame appeared
    return out


def _check_indices(indices: Sequence[int] | np.ndarray) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        raise ValueError("indices is empty; ask for at least one frame")
    if idx.min() < 0:
        raise ValueError(f"indices must be >= 0 (0-based frame numbers), got {int(idx.min())}")
    return idx


class VideoDecoder:
    """One open video for several `decode` calls that share one demux pass.

    >>> with VideoDecoder(data) as video:
    ...     clip = video.decode(range(0, 64, 4))  # (16, H, W, 3) uint8
    ...     video.stats  # DecodeStats(frames_decoded=..., seeks=..., sequential_decodes=0)
    """

    def __init__(self, src: Source, *, limits: MediaLimits = DEFAULT_LIMITS, deadline_s: float | None = None):
        self._src = src
        self._limits = limits
        self._deadline = Deadline(deadline_s)  # one budget for opening and every decode call
        self._container = open_media(src, limits=limits, probe_options=_PROBE_OPTIONS)
        try:
            self._stream = _video_stream(self._container, src)
            self.table = _frame_table(self._container, self._stream, limits, self._deadline)
        except av.FFmpegError as err:
            self._container.close()
            raise DecodeError(f"cannot demux {_describe(src)}: {err}") from None
        except BaseException:
            self._container.close()
            raise
        # The stored size; frames come out upright with square pixels (see `display_of`).
        self.height = self._stream.codec_context.height
        self.width = self._stream.codec_context.width
        self._sample_aspect_ratio = self._stream.sample_aspect_ratio
        # One reformatter, one thread: PyAV's default builds a reformatter per frame, each with an
        # automatic pool of one thread per core; a pool of decode processes wants one thread each.
        self._reformatter = VideoReformatter()
        self.stats = DecodeStats()
        self._seekable = self.table.reliable
        self._num_frames = self.table.num_frames if self.table.reliable else None

    @property
    def num_frames(self) -> int:
        """Frames a sequential decode yields (from the demux pass; decoded once if timestamps are unusable)."""
        if self._num_frames is None:
            _, last_index = self._decode_sequential({2 ** 62}, None)
            self._num_frames = last_index + 1
        return self._num_frames

    def decode(self, indices: Sequence[int] | np.ndarray, *, size: Size = None,
               center_crop: int | None = None) -> np.ndarray:
        """Frames at 0-based `indices` (any order, repeats allowed) as uint8 RGB (T, H, W, 3).

        Indices at or past the end repeat the last frame. Frames are upright with square pixels
        (see `display_of`). `size` scales while converting to RGB: an int is the short side in
        pixels, a tuple is (height, width), both of the upright picture. `center_crop`: only the
        centred `center_crop` x `center_crop` window of each scaled frame, as
        `pipeline.data.transforms.center_crop` cuts it; a frame much wider than that window is cropped
        before it is scaled (scaling all of a 16384x2 frame to a short side would take gigabytes).
        """
        idx = _check_indices(indices)
        _check_size(size)
        if center_crop is not None and center_crop < 1:
            raise ValueError(f"center_crop={center_crop}: a crop side in pixels must be >= 1, or None")
        if self._seekable:
            clamped = np.minimum(idx, self.table.num_frames - 1)
            try:
                frames = _decode_seeking(self._container, self._stream, self.table, sorted(set(clamped.tolist())),
                                         lambda frame: self._to_rgb(frame, size, center_crop), self.stats,
                                         self._deadline)
            except av.FFmpegError as err:
                raise DecodeError(f"cannot decode {_describe(self._src)}: {err}") from None
            if frames is not None:
                return np.stack([frames[i] for i in clamped.tolist()])
            self._seekable = False  # this stream defeats seeking; later calls go straight to the fallback
        frames, last_index = self._decode_sequential(set(idx.tolist()), size, center_crop)
        return np.stack([frames[min(i, last_index)] for i in idx.tolist()])

    def _to_rgb(self, frame: av.VideoFrame, size: Size, center_crop: int | None = None) -> np.ndarray:
        display = display_of(frame, self._sample_aspect_ratio)
        out_height, out_width = _output_size(display.height, display.width, size)
        if center_crop is not None and out_height * out_width > _CROP_FIRST * center_crop ** 2:
            return self._cropped_rgb(frame, display, out_height, out_width, center_crop)
        if out_height * out_width > self._limits.max_pixels:
            raise LimitExceeded(f"{display.height}x{display.width} scaled to {out_height}x{out_width} is over "
                                f"data.limits.max_pixels={self._limits.max_pixels}", "max_pixels")
        height, width = display.stored_size(out_height, out_width)
        rgb = self._reformatter.reformat(frame, width=width, height=height, format="rgb24", threads=1)
        rgb = display.upright(rgb.to_ndarray())
        return rgb if center_crop is None else _center_crop(rgb, center_crop)

    def _cropped_rgb(self, frame: av.VideoFrame, display: Display, out_height: int, out_width: int,
                     crop: int) -> np.ndarray:
        """The centred crop x crop window of `frame` scaled to out_height x out_width, cut from the
        stored picture first: only the window is scaled."""
        rgb = display.upright(self._reformatter.reformat(frame, format="rgb24", threads=1).to_ndarray())
        top, left = crop_origin(out_height, out_width, crop)
        scale_y, scale_x = rgb.shape[0] / out_height, rgb.shape[1] / out_width
        y0, x0 = int(top * scale_y), int(left * scale_x)
        y1 = max(y0 + 1, int(np.ceil((top + crop) * scale_y)))
        x1 = max(x0 + 1, int(np.ceil((left + crop) * scale_x)))
        window = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[y0:y1, x0:x1]), format="rgb24")
        return self._reformatter.reformat(window, width=crop, height=crop, format="rgb24", threads=1).to_ndarray()

    def _decode_sequential(self, wanted: set[int], size: Size,
                           center_crop: int | None = None) -> tuple[dict[int, np.ndarray], int]:
        # A fresh container: seeking back to the start is exactly what this stream may not support.
        if hasattr(self._src, "seek"):
            self._src.seek(0)
        with open_media(self._src, limits=self._limits, probe_options=_PROBE_OPTIONS) as container:
            try:
                return _decode_sequential(container, _video_stream(container, self._src), wanted,
                                          lambda frame: self._to_rgb(frame, size, center_crop), self.stats,
                                          self._deadline)
            except av.FFmpegError as err:
                raise DecodeError(f"cannot decode {_describe(self._src)}: {err}") from None

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoDecoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VideoDecoder({_describe(self._src)}, {self.height}x{self.width}, {self.table!r})"


def decode_frames(src: Source, indices: Sequence[int] | np.ndarray, *, size: Size = None,
                  limits: MediaLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Frames at 0-based `indices` (any order, repeats allowed) as uint8 RGB (T, H, W, 3).

    Indices at or past the end repeat the last frame. `size` scales while converting to RGB
    (cheaper than decoding at full size and resizing): an int is the short side in pixels,
    a tuple is (height, width). With `size=None` the frames are exactly those of a full
    sequential decode, as displayed: turned upright by the stream's display matrix and, for
    non-square pixels, with the width scaled by the sample aspect ratio (see `display_of`).
    The video is opened by `pipeline.data.media.open_media` (allowed containers only, `limits`).
    Raises DecodeError for an unreadable, refused (UnsupportedMedia) or too large (LimitExceeded)
    video, ValueError for bad arguments.
    """
    idx = _check_indices(indices)
    _check_size(size)
    with VideoDecoder(src, limits=limits) as video:
        return video.decode(idx, size=size)
