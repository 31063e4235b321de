"""Video in and out for the whole stack: the tuner reads its training clip here and the server encodes the
generated frames here, so every part agrees on one frame layout (uint8 RGB, [N, H, W, 3]) and one error type.

Containers are decoded and encoded by PyAV (FFmpeg); images, resizing and GIFs go through Pillow. PyAV is imported
only when a container is read or written, so the rest of the stack (generation, tuning from an image folder, GIF
and PNG output) runs on a machine without it.

Decoding is bounded before it starts: a frame may have at most `MAX_FRAME_PIXELS` pixels and a whole read at most
`MAX_DECODED_PIXELS` (frames x width x height), checked against the container's header where it declares them and
again frame by frame as they are decoded, so a tiny file that declares a huge canvas costs nothing. A read can be
stopped between frames (`check`), and can resize each frame as it is decoded (`size`), so memory holds the output
size, never the source's.
"""

import contextlib
import io
import os
import tempfile
from collections.abc import Callable, Generator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

DEFAULT_FPS = 8.0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Container format -> (PyAV encoder, encoder options); crf 18 is visually lossless for H.264.
_AV_ENCODERS = {
    "mp4": ("libx264", {"crf": "18", "preset": "medium"}),
    "webm": ("libvpx-vp9", {"crf": "30", "b:v": "0"}),
}
ENCODE_FORMATS = (*_AV_ENCODERS, "gif")

VideoSource = str | os.PathLike[str] | bytes

MAX_FRAME_PIXELS = 4096 * 4096  # one decoded frame
MAX_DECODED_PIXELS = 2**28  # one read, frames x width x height: 128 frames of 1920x1080 fit


class VideoError(ValueError):
    """A video could not be read or does not have the frames asked for; the message names the source."""


@dataclass(frozen=True)
class Clip:
    """Decoded frames, uint8 RGB of shape [N, H, W, 3], played at `fps` frames per second."""

    frames: np.ndarray
    fps: float

    def __post_init__(self) -> None:
        _check_frames(self.frames)
        if not self.fps > 0:
            raise ValueError(f"fps must be positive, got {self.fps}")

    def __len__(self) -> int:
        return len(self.frames)


def read_video(
    source: VideoSource,
    max_frames: int | None = None,
    max_pixels: int = MAX_DECODED_PIXELS,
    size: tuple[int, int] | None = None,
    check: Callable[[], None] | None = None,
    start: int = 0,
    stride: int = 1,
) -> Clip:
    """Read the frames (all, or the first `max_frames`) of a video file, encoded video bytes or image folder.

    Anything FFmpeg decodes works (MP4, WebM, GIF, MOV, ...); a folder is read in file-name order at 8 fps. A
    source over the pixel bounds (`max_pixels` in all, `MAX_FRAME_PIXELS` a frame) is a VideoError. `size`
    (width, height): resize and centre-crop each frame as it is read. `start`, `stride`: keep only frames start,
    start + stride, ... of those read (the others are decoded and dropped; the clip plays at fps / stride). `check`
    is called before each frame; raise from it to stop the read (a cancelled request).
    """
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    _check_sampling(None, start, stride)
    name, frames, fps = _open(source, max_frames, max_pixels)
    out, read = [], 0
    with contextlib.closing(frames):
        while True:
            if check is not None:
                check()
            frame = next(frames, None)
            if frame is None:
                break
            if read >= start and (read - start) % stride == 0:
                out.append(frame if size is None else resize_center_crop(frame[None], *size)[0])
            read += 1
    if not out:
        raise VideoError(f"{name} has only {read} frames: none from index {start}" if read else f"{name} has no frames")
    return Clip(np.stack(out), fps / stride)


@dataclass(frozen=True)
class VideoInfo:
    """What `probe_video` learnt of a video: its frame size and rate."""

    width: int
    height: int
    fps: float


def probe_video(source: VideoSource, max_frames: int | None = None, max_pixels: int = MAX_DECODED_PIXELS
                ) -> VideoInfo:
    """Check, decoding the first frame only, that `read_video` can read a video within the same bounds (as far
    as its header tells); a VideoError says why not."""
    name, frames, fps = _open(source, max_frames, max_pixels)
    with contextlib.closing(frames):
        first = next(frames, None)
    if first is None:
        raise VideoError(f"{name} has no frames")
    return VideoInfo(first.shape[1], first.shape[0], fps)


class _PixelBudget:
    """Decoded pixels against the bounds; a VideoError names the bound a source would pass."""

    def __init__(self, name: str, max_pixels: int) -> None:
        self.name = name
        self.max_pixels = max_pixels
        self.used = 0

    def check(self, frames: int, width: int, height: int) -> None:
        """Raise unless `frames` more frames of width x height fit."""
        if width * height > MAX_FRAME_PIXELS:
            raise VideoError(f"{self.name} has {width}x{height} frames: at most {MAX_FRAME_PIXELS} pixels "
                             f"(4096x4096) a frame are decoded")
        if self.used + frames * width * height > self.max_pixels:
            raise VideoError(f"{self.name} decodes to more than {self.max_pixels} pixels (frames x width x height): "
                             f"send a shorter or smaller clip")

    def take(self, width: int, height: int) -> None:
        self.check(1, width, height)
        self.used += width * height


def _open(source: VideoSource, max_frames: int | None, max_pixels: int
          ) -> tuple[str, Generator[np.ndarray, None, None], float]:
    """A name for messages, a generator of the source's frames within the bounds, and the frame rate."""
    if isinstance(source, bytes):
        if not source:
            raise VideoError("source clip is empty (0 bytes)")
        frames, fps = _open_container(io.BytesIO(source), "source clip", max_frames, max_pixels)
        return "source clip", frames, fps
    path = Path(source)
    if not path.exists():
        raise VideoError(f"{path} does not exist")
    if path.is_dir():
        return str(path), _image_folder_frames(path, max_frames, _PixelBudget(str(path), max_pixels)), DEFAULT_FPS
    frames, fps = _open_container(path, str(path), max_frames, max_pixels)
    return str(path), frames, fps


def _av():
    """PyAV, imported on first use."""
    try:
        import av
    except ImportError as e:
        raise VideoError("reading or writing video containers needs PyAV (pip install av); image folders, GIF output "
                         "and PNG frames do not") from e
    return av


def _open_container(file: Path | io.BytesIO, name: str, max_frames: int | None, max_pixels: int
                    ) -> tuple[Generator[np.ndarray, None, None], float]:
    """Open a container and check the frame size (and count, where declared) in its header against the bounds
    before anything is decoded; each frame is checked again as it is decoded, before it is converted."""
    av = _av()
    budget = _PixelBudget(name, max_pixels)
    try:
        container = av.open(file)
    except av.FFmpegError as error:
        raise VideoError(f"{name} is not a readable video ({error.strerror})") from error
    try:
        if not container.streams.video:
            raise VideoError(f"{name} has no video stream")
        stream = container.streams.video[0]
        declared = min(stream.frames, max_frames or stream.frames)  # stream.frames is 0 when the header does not say
        budget.check(max(declared, 1), stream.codec_context.width, stream.codec_context.height)
        rate = stream.average_rate
    except BaseException:
        container.close()
        raise
    return _container_frames(container, stream, name, max_frames, budget), float(rate) if rate else DEFAULT_FPS


def _container_frames(container, stream, name: str, max_frames: int | None, budget: _PixelBudget
                      ) -> Generator[np.ndarray, None, None]:
    av = _av()
    try:
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if max_frames is not None and index >= max_frames:
                break
            budget.take(frame.width, frame.height)
            yield frame.to_ndarray(format="rgb24")
    except av.FFmpegError as error:
        raise VideoError(f"{name} is not a readable video ({error.strerror})") from error
    finally:
        container.close()


def _image_folder_frames(folder: Path, max_frames: int | None, budget: _PixelBudget
                         ) -> Generator[np.ndarray, None, None]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:max_frames]
    if not files:
        raise VideoError(f"{folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
    first_size = None
    for file in files:
        try:
            with Image.open(file) as image:  # reads the header; convert() decodes the pixels
                if first_size is not None and image.size != first_size:
                    raise VideoError(f"{file} is {image.width}x{image.height}, but the first image, "
                                     f"{files[0].name}, is {first_size[0]}x{first_size[1]}")
                first_size = image.size
                budget.take(*image.size)
                frame = np.asarray(image.convert("RGB"))
        except OSError as error:  # includes UnidentifiedImageError
            raise VideoError(f"{file} is not a readable image ({error})") from error
        yield frame


def resize_center_crop(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale frames to cover width x height keeping their aspect ratio, then crop the center.

    Returns uint8 frames of shape [N, height, width, 3]; frames already that size are returned as they are.
    """
    _check_frames(frames)
    if width < 1 or height < 1:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    if frames.shape[1:3] == (height, width):
        return frames
    size = (width, height)
    fitted = [ImageOps.fit(Image.fromarray(frame), size, Image.Resampling.BICUBIC) for frame in frames]
    return np.stack([np.asarray(image) for image in fitted])


def load_clip(
    path: VideoSource,
    n: int | None,
    width: int,
    height: int,
    start: int = 0,
    stride: int = 1,
    max_frames: int | None = None,
) -> Clip:
    """Read a video (path, folder or encoded bytes), sample `n` frames (all from `start` at `stride` when None)
    and resize/crop them to width x height.

    Decoding stops once the last frame that sampling needs has been read, and memory holds the sampled frames at
    width x height only, whatever the source's size and length.
    """
    _check_sampling(n, start, stride)
    if n is not None:
        frames_needed = start + (n - 1) * stride + 1
        max_frames = frames_needed if max_frames is None else min(max_frames, frames_needed)
    clip = read_video(path, max_frames=max_frames, size=(width, height), start=start, stride=stride)
    if n is not None and len(clip) < n:
        raise VideoError(f"asked for {n} frames from index {start} at stride {stride}, but the clip gives only "
                         f"{len(clip)}")
    return clip


def encode_video(frames: np.ndarray, fps: float, fmt: str) -> bytes:
    """Encode uint8 RGB frames [N, H, W, 3] as an "mp4" (H.264), "webm" (VP9) or "gif" file, in memory.

    MP4 and WebM use yuv420p, which needs an even width and height: odd sizes get one extra row or column that
    repeats the edge pixels. GIF stores frame delays in centiseconds, so the delay is 1 / fps rounded to 10 ms
    (at least 20 ms, since browsers slow shorter delays down).
    """
    _check_frames(frames)
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if fmt == "gif":
        return _encode_gif(frames, fps)
    if fmt in _AV_ENCODERS:
        return _encode_with_av(frames, fps, fmt)
    raise ValueError(f"unknown video format {fmt!r}, expected one of {', '.join(ENCODE_FORMATS)}")


def _encode_with_av(frames: np.ndarray, fps: float, fmt: str) -> bytes:
    av = _av()
    codec, options = _AV_ENCODERS[fmt]
    _, height, width, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = options
        for index, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def _encode_gif(frames: np.ndarray, fps: float) -> bytes:
    images = [Image.fromarray(frame) for frame in frames]
    delay_ms = 10 * max(2, round(100 / fps))
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=delay_ms, loop=0)
    return buffer.getvalue()


def write_video(path: str | os.PathLike[str], frames: np.ndarray, fps: float) -> None:
    """Encode frames in the format the suffix names (.mp4, .webm, .gif) and write them atomically to `path`.

    The file is written next to `path` under a temporary name, then renamed: no reader sees half a video.
    Missing parent folders are created.
    """
    path = Path(path)
    data = encode_video(frames, fps, path.suffix.lower().removeprefix("."))
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.chmod(temp_name, 0o644)  # mkstemp makes the file private to its owner
        os.replace(temp_name, path)
    except BaseException:
        os.unlink(temp_name)
        raise


def encode_png_frames(frames: np.ndarray) -> list[bytes]:
    """Encode each uint8 RGB frame of [N, H, W, 3] as a PNG file."""
    _check_frames(frames)
    encoded = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


def _check_sampling(n: int | None, start: int, stride: int) -> None:
    if n is not None and n < 1:
        raise ValueError(f"n must be at least 1 (or None for all frames), got {n}")
    if start < 0:
        raise ValueError(f"start must be non-negative, got {start}")
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")


def _check_frames(frames: np.ndarray) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected uint8 RGB frames [N >= 1, H, W, 3], got {frames.dtype} {frames.shape}")
