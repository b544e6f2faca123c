"""Videos in and out with PyAV (the optional ``video`` extra: ``pip install
"detr_deform[video]"``), and detections frame by frame.

    detector = detr_deform.Detector.from_pretrained("checkpoint.pth")
    with VideoReader("clip.mp4") as video, VideoWriter("drawn.mp4", video.fps) as out:
        for frame in detect_video(detector, video):     # the checkpoint's calibrated threshold
            out.write(detector.draw(frame.image, frame.detections))

PyAV is imported only when a video is opened, so the rest of the package works
without it.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from detr_deform.errors import DetrDeformError
from detr_deform.inference.detector import DEFAULT_BATCH_SIZE, Detections, Detector
from detr_deform.inference.inputs import VIDEO_SUFFIXES

# Encoders tried in order, by output suffix (the first one this FFmpeg build has wins).
ENCODERS = {".webm": ("libvpx-vp9", "libvpx"), ".avi": ("mpeg4",)}
DEFAULT_ENCODERS = ("libx264", "h264", "mpeg4")
INSTALL_HINT = 'reading and writing videos needs PyAV: pip install "detr_deform[video]" (or pip install av)'


class VideoError(DetrDeformError, ValueError):
    """A video cannot be read or written; the message names the file."""


def require_av() -> Any:
    """The ``av`` module, or ModuleNotFoundError (name "av") saying how to install it."""
    try:
        import av  # optional extra: only videos need it
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(INSTALL_HINT, name="av") from error
    return av


@dataclass
class Frame:
    """One decoded frame: ``index`` from 0, ``time`` in seconds from the start
    (None when the file has no timestamps), ``image`` (H, W, 3) uint8 RGB."""
    index: int
    time: float | None
    image: np.ndarray


class VideoReader:
    """The frames of a video's first video stream, decoded as RGB. ``fps`` (average
    rate, 25 when the file gives none), ``width``, ``height``, ``frame_count`` (the
    container's count; None when unknown)."""

    def __init__(self, path: str | os.PathLike) -> None:
        av = require_av()
        self.path = Path(path)
        if not self.path.is_file():
            raise VideoError(f"video file not found: {self.path}")
        if self.path.stat().st_size == 0:  # FFmpeg would say "Invalid data found when processing input"
            raise VideoError(f"{self.path} is empty (0 bytes): an interrupted copy or recording? Nothing to read")
        try:
            self._container = av.open(str(self.path))
        except av.FFmpegError as error:
            # FFmpeg's "[Errno 1094995529] Invalid data ..." says nothing to a user: name the file and what it is not
            reason = getattr(error, "strerror", None) or str(error)
            if self.path.suffix.lower() in VIDEO_SUFFIXES:
                raise VideoError(f"cannot open {self.path} as a video ({reason}): a damaged file, or not a "
                                 f"video despite its name?") from error
            raise VideoError(f"{self.path} is neither an image nor a video: PIL cannot identify it as an image "
                             f"and FFmpeg cannot open it as a video ({reason}); pass image or video files") from error
        if not self._container.streams.video:
            self._container.close()
            raise VideoError(f"{self.path} has no video stream")
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"  # frame-parallel decoding
        rate = self._stream.average_rate or self._stream.guessed_rate
        self.fps: Fraction = Fraction(rate) if rate else Fraction(25)
        self.width, self.height = self._stream.width, self._stream.height
        self.frame_count: int | None = self._stream.frames or None

    def __iter__(self) -> Iterator[Frame]:
        av = require_av()
        try:
            for index, frame in enumerate(self._container.decode(self._stream)):
                yield Frame(index, frame.time, frame.to_ndarray(format="rgb24"))
        except av.FFmpegError as error:
            raise VideoError(f"{self.path}: cannot decode the video: {error}") from error

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VideoWriter:
    """Writes RGB frames (PIL images or (H, W, 3) uint8 arrays) at ``fps``: H.264
    (.mp4, .mov, .mkv; MPEG-4 part 2 when the FFmpeg build has no H.264 encoder), VP9
    (.webm) or MPEG-4 part 2 (.avi), 4:2:0 chroma. The size is the first frame's,
    rounded up to even numbers (4:2:0 needs them; the extra row/column is black)."""

    def __init__(self, path: str | os.PathLike, fps: Fraction | float, codec: str | None = None) -> None:
        self.path = Path(path)
        self.fps = Fraction(fps).limit_denominator(100000)
        self.codec = codec
        self.frames = 0
        self._container = self._stream = None
        self._size: tuple[int, int] | None = None

    def _open(self, width: int, height: int) -> None:
        av = require_av()
        names = [self.codec] if self.codec else ENCODERS.get(self.path.suffix.lower(), DEFAULT_ENCODERS)
        codec = next((n for n in names if _can_encode(av, n)), None)
        if codec is None:
            raise VideoError(f"{self.path}: this FFmpeg build has none of the encoders {', '.join(names)}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), "w")
        stream = self._container.add_stream(codec, rate=self.fps)
        self._size = (width + width % 2, height + height % 2)
        stream.width, stream.height = self._size
        stream.pix_fmt = "yuv420p"
        if codec in ("libx264", "h264"):
            stream.options = {"crf": "20", "preset": "veryfast"}
        else:  # bit-rate based encoders: about 6 bits per pixel per second at 25 frames/s
            stream.bit_rate = max(1_000_000, 6 * self._size[0] * self._size[1])
        self._stream = stream
        self.codec = codec

    def write(self, image: Image.Image | np.ndarray) -> None:
        av = require_av()
        array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        if self._container is None:
            self._open(array.shape[1], array.shape[0])
        width, height = self._size
        if array.shape[:2] != (height, width):
            padded = np.zeros((height, width, 3), np.uint8)
            padded[: min(height, array.shape[0]), : min(width, array.shape[1])] = array[:height, :width]
            array = padded
        for packet in self._stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        """Flushes the encoder and finishes the file (playable with the frames so far)."""
        if self._container is None:
            return
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
        finally:
            self._container.close()
            self._container = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _can_encode(av: Any, name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except (av.FFmpegError, ValueError):  # unknown codec name, or decoder only
        return False
    return True


@dataclass
class FrameDetections:
    """The detections of one video frame, with the frame."""
    frame: Frame
    detections: Detections

    def to_dict(self) -> dict[str, Any]:
        """{"frame", "time", "width", "height", "detections": [COCO-style records]}."""
        found = self.detections.to_dict()
        return {"frame": self.frame.index, "time": self.frame.time, "width": found["width"],
                "height": found["height"], "detections": found["detections"]}


def detect_video(detector: Detector, video: VideoReader | str | os.PathLike, threshold: float | None = None,
                 topk: int = 100, batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[FrameDetections]:
    """Detections of every frame of ``video``, in order, ``batch_size`` frames per
    forward pass (frames share a size, so batching changes no result); ``threshold``:
    default ``detector.score_threshold`` (the checkpoint's calibrated one)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    reader = video if isinstance(video, VideoReader) else VideoReader(video)
    try:
        batch: list[Frame] = []
        for frame in reader:
            batch.append(frame)
            if len(batch) == batch_size:
                yield from _detect_frames(detector, reader, batch, threshold, topk)
                batch = []
        if batch:
            yield from _detect_frames(detector, reader, batch, threshold, topk)
    finally:
        if reader is not video:
            reader.close()


def _detect_frames(detector: Detector, reader: VideoReader, frames: list[Frame], threshold: float | None,
                   topk: int) -> Iterator[FrameDetections]:
    found = detector([f.image for f in frames], threshold=threshold, topk=topk, batch_size=len(frames))
    for frame, detections in zip(frames, found):
        detections.source = f"{reader.path} frame {frame.index}"
        yield FrameDetections(frame, detections)


__all__ = ["FrameDetections", "Frame", "VideoError", "VideoReader", "VideoWriter", "detect_video", "require_av"]
