"""Videos distributed as image frames, one folder per video (Something-Something V1: `<id>/00001.jpg`,
`<id>/00002.jpg`, ...): which files make a video, their checks, and their H.264 copy.

A frame folder holds JPEG or PNG files whose names end in the frame's number (`00001.jpg`,
`img_00001.jpg`); the numbers must run without a gap, from any start. Other files are ignored. Every
frame is decoded (PIL, JPEG and PNG only) and must have the first frame's size; the header's size is
checked against `data.limits` before a frame is decoded. A folder that fails gets a status and a
one-line reason (`FramesError`): `unreadable` (a gap, an empty or undecodable frame, frames of
different sizes), `too_small`, `too_short` or `too_large`, as a video would.

The copy is what `pipeline.data.video.encode_rgb_frames` writes: H.264 yuv420p MP4 at `fps` frames per
second (SSv1's frames are 12 per second), decoded by the project's decoder like any prepared video.
RGB frames have no colour matrix of their own, so the copy is BT.709 limited range; measured against
the JPEGs' own RGB (tests/data/test_frames.py) the decoded copy differs by a few levels, most of it
from 4:2:0 chroma and the two decoders' colour conversions, not from the encoder's quality.

Tar shards (`.tar`, `.tar.gz`, `.tgz`) of frame folders are read as one stream each; a folder's frames
must lie together in its shard (as `tar -cf shard.tar id1 id2 ...` writes them).
"""

from __future__ import annotations

import io
import posixpath
import re
import tarfile
from typing import IO, Iterable, Iterator

import numpy as np

from pipeline.config import MediaLimits
from pipeline.data.media import DEFAULT_LIMITS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_FORMATS = ["JPEG", "PNG"]  # what PIL may open a frame as (never its other, riskier decoders)
_NUMBER = re.compile(r"(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)


class FramesError(ValueError):
    """A frame folder that cannot be a video: `status` (a manifest status) and a one-line reason."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def is_tar(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


def frame_folders(paths: Iterable[str]) -> dict[str, list[str]]:
    """Folder -> its image files (paths or URIs, as given), for every folder holding an image."""
    folders: dict[str, list[str]] = {}
    for path in paths:
        if is_image(path):
            folders.setdefault(posixpath.dirname(path), []).append(path)
    return folders


def order_frames(names: list[str]) -> list[str]:
    """`names` (file names or paths) in frame order; FramesError when a name has no number, two names
    share one, or the numbers have a gap."""
    numbered = []
    for name in names:
        match = _NUMBER.search(posixpath.basename(name))
        if not match:
            raise FramesError("unreadable", f"frame {posixpath.basename(name)!r} has no number at the end of its "
                                            "name (frames are named like 00001.jpg)")
        numbered.append((int(match[1]), name))
    numbered.sort()
    numbers = [n for n, _ in numbered]
    for (a, first), (b, second) in zip(numbered, numbered[1:]):
        if a == b:
            raise FramesError("unreadable", f"frames {posixpath.basename(first)} and {posixpath.basename(second)} "
                                            f"have the same number {a}")
    missing = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers)) if numbers else []
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise FramesError("unreadable", f"{len(missing)} missing frame(s): numbers {shown} of "
                                        f"{numbers[0]}-{numbers[-1]}")
    return [name for _, name in numbered]


def image_header(data: bytes, name: str, limits: MediaLimits = DEFAULT_LIMITS):
    """The opened, not yet decoded PIL image of one frame, its size checked against `limits`."""
    from PIL import Image

    if not data:
        raise FramesError("unreadable", f"{name}: zero-byte file")
    try:
        image = Image.open(io.BytesIO(data), formats=_FORMATS)
    except Exception as err:  # noqa: BLE001 - PIL raises several kinds for a bad file
        raise FramesError("unreadable", f"{name}: not a JPEG or PNG image ({type(err).__name__})") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise FramesError("too_large", f"{name}: {width}x{height} pixels per frame, over data.limits.max_pixels="
                                       f"{limits.max_pixels}")
    if max(width, height) / max(1, min(width, height)) > limits.max_aspect:
        raise FramesError("too_large", f"{name}: aspect ratio of {width}x{height}, over data.limits.max_aspect="
                                       f"{limits.max_aspect:g}")
    return image


def decode_image(data: bytes, name: str, limits: MediaLimits = DEFAULT_LIMITS) -> np.ndarray:
    """uint8 RGB (H, W, 3) of one JPEG or PNG frame; FramesError when it is not one."""
    image = image_header(data, name, limits)
    try:
        return np.asarray(image.convert("RGB"))
    except Exception as err:  # noqa: BLE001 - a truncated or damaged file fails here
        raise FramesError("unreadable", f"{name}: the image does not decode ({type(err).__name__}: "
                                        f"{str(err).splitlines()[0][:120] if str(err) else ''})") from None


def checked_frames(frames: list[tuple[str, bytes]], *, min_frames: int, min_side: int,
                   limits: MediaLimits = DEFAULT_LIMITS) -> dict:
    """What the headers say of a folder's frames (in frame order): `num_frames`, `width`, `height`,
    `codec` (jpeg or png), `mode`, `bytes`; FramesError for a folder that fails a check before decoding."""
    if not frames:
        raise FramesError("unreadable", "no frames")
    total = sum(len(data) for _, data in frames)
    if total > limits.max_object_mb * 2 ** 20:
        raise FramesError("too_large", f"{len(frames)} frames of {total} bytes, over data.limits.max_object_mb="
                                       f"{limits.max_object_mb:g}")
    if len(frames) > limits.max_frames:
        raise FramesError("too_large", f"{len(frames)} frames, over data.limits.max_frames={limits.max_frames}")
    name, data = frames[0]
    first = image_header(data, name, limits)
    width, height = first.size
    info = {"num_frames": len(frames), "width": width, "height": height, "codec": (first.format or "").lower(),
            "mode": first.mode, "bytes": total}
    if min(width, height) < min_side:
        raise FramesError("too_small", f"{width}x{height} is below the minimum side {min_side}")
    if len(frames) < min_frames:
        raise FramesError("too_short", f"{len(frames)} frames is below the minimum {min_frames}")
    return info


def rgb_frames(frames: list[tuple[str, bytes]], limits: MediaLimits = DEFAULT_LIMITS, *,
               frame_stride: int = 1) -> Iterator[np.ndarray]:
    """Every `frame_stride`-th frame as uint8 RGB, in order; every frame is decoded (a damaged one in
    between is found too) and must have the first frame's size."""
    size = None
    for i, (name, data) in enumerate(frames):
        rgb = decode_image(data, posixpath.basename(name), limits)
        if size is None:
            size, first = rgb.shape[:2], posixpath.basename(name)
        elif rgb.shape[:2] != size:
            raise FramesError("unreadable", f"{posixpath.basename(name)} is {rgb.shape[1]}x{rgb.shape[0]}, "
                                            f"{first} {size[1]}x{size[0]}: the frames of a video share one size")
        if i % frame_stride == 0:
            yield rgb


def tar_folders(fileobj: IO[bytes], *, max_member_bytes: int) -> Iterator[tuple[str, list[tuple[str, bytes]], str]]:
    """(folder, [(file name, bytes)] of its images, error) for each frame folder of a tar stream, in the
    order the stream holds them. `error` is "" or why the folder cannot be used (its frames do not lie
    together, a frame is larger than `max_member_bytes`); members other than regular image files are
    skipped, never extracted."""
    done: set[str] = set()
    folder, files, error = None, [], ""
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            if not member.isfile() or not is_image(member.name):
                continue
            name = posixpath.normpath(member.name.lstrip("/"))
            parent = posixpath.dirname(name)
            if parent != folder:
                if folder is not None:
                    yield folder, files, error
                    done.add(folder)
                folder, files, error = parent, [], ""
                if parent in done:
                    error = "its frames do not lie together in the shard (write each folder's frames one after another)"
                elif parent == ".." or parent.startswith("../") or not parent:
                    error = f"member {member.name!r} is not inside a frame folder of the shard"
            if error:
                continue
            if member.size > max_member_bytes:
                error = f"{posixpath.basename(name)} has {member.size} bytes, over data.limits.max_object_mb"
                continue
            reader = tar.extractfile(member)
            files.append((posixpath.basename(name), reader.read() if reader is not None else b""))
        if folder is not None:
            yield folder, files, error
