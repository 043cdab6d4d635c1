"""Frames of videos and animated images, one at a time, as ``[H, W, 3]`` uint8 RGB.

Videos are decoded by torchcodec or PyAV, whichever is installed (torchvision 0.22+ no
longer decodes video itself); animated GIF / WebP / TIFF files by PIL.  Frames are produced
lazily, so a long video is never held in memory.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageSequence

from ..errors import DataError
from .images import IntensityScaling, check_pixel_count, pil_to_rgb, read_image

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")


def is_video(path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def video_backend() -> str | None:
    """"torchcodec" or "av" if one is installed, else None."""
    for name in ("torchcodec", "av"):
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def require_video_backend(path) -> str:
    """The installed video decoder; DataError naming ``path`` if there is none."""
    backend = video_backend()
    if backend is None:
        raise DataError(f"{path}: cannot decode video: no video decoder is installed "
                        "(pip install 'maskrcnn[video]', or install torchcodec)")
    return backend


def frame_count(path) -> int:
    """Frames in an image file: 1 for a still image (or one PIL cannot open; reading it
    then reports why), more for an animated one."""
    try:
        with Image.open(path) as img:
            return int(getattr(img, "n_frames", 1))
    except (OSError, SyntaxError, ValueError):
        return 1


def image_frames(path, scaling: IntensityScaling | None = None) -> Iterator[np.ndarray]:
    """Each frame of an image file: a still image gives one frame, exactly as
    :func:`~maskrcnn.data.images.read_image`; an animated GIF / WebP / TIFF gives each frame
    (animations carry no EXIF orientation), 16/32-bit frames mapped by ``scaling`` as
    ``read_image`` maps them."""
    if frame_count(path) == 1:
        yield read_image(path, scaling)
        return
    with Image.open(path) as img:
        check_pixel_count(img.size, path)
        try:
            for frame in ImageSequence.Iterator(img):
                yield pil_to_rgb(frame if frame.mode in ("RGB", "I", "F") or frame.mode.startswith("I;16")
                                 else frame.convert("RGB"), path, scaling)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: corrupt animation frame ({e})") from None


def video_frames(path) -> Iterator[np.ndarray]:
    """Each frame of a video file, decoded lazily by torchcodec or PyAV."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such video file")
    backend = require_video_backend(path)
    try:
        if backend == "torchcodec":
            from torchcodec.decoders import VideoDecoder
            for frame in VideoDecoder(str(path)):  # [3, H, W] uint8 tensors
                yield frame.permute(1, 2, 0).numpy()
        else:
            import av
            with av.open(str(path)) as container:
                for frame in container.decode(video=0):
                    yield frame.to_ndarray(format="rgb24")
    except DataError:
        raise
    except Exception as e:  # decoders raise their own error types for corrupt streams
        raise DataError(f"{path}: cannot decode video ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
