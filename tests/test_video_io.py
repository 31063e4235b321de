"""Tests for tuner.video_io on small synthetic clips made here, and on the shared real clips when present."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tuner.video_io import (
    Clip,
    VideoError,
    encode_png_frames,
    encode_video,
    load_clip,
    read_video,
    resize_center_crop,
    write_video,
)

SHARED_VIDEOS = Path(
    os.environ.get("TAV_SHARED_VIDEOS", Path(__file__).resolve().parents[2] / "shared" / "videos")
)
REAL_CLIPS = ("man-skiing.mp4", "man-surfing.mp4", "rabbit-watermelon.mp4", "car-turn.mp4")

BACKGROUND = (30, 60, 200)
SQUARE = (250, 200, 20)


def moving_square(n: int = 12, width: int = 64, height: int = 48, size: int = 16) -> np.ndarray:
    """A flat-colored square sliding left to right over a flat background: uint8 [n, height, width, 3]."""
    frames = np.empty((n, height, width, 3), np.uint8)
    frames[:] = BACKGROUND
    top = (height - size) // 2
    for index, frame in enumerate(frames):
        left = index * (width - size) // (n - 1)
        frame[top : top + size, left : left + size] = SQUARE
    return frames


def numbered_clip(n: int, fps: float = 12.0) -> Clip:
    """A clip whose frame i is filled with the value i, so sampled indices can be read back from pixels."""
    frames = np.empty((n, 2, 2, 3), np.uint8)
    frames[:] = np.arange(n)[:, None, None, None]
    return Clip(frames, fps)


def frame_indices(clip: Clip) -> list[int]:
    return [int(frame[0, 0, 0]) for frame in clip.frames]


def mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize("fps", [12.0, 30000 / 1001])
def test_mp4_round_trip_keeps_frames_size_fps_and_pixels(tmp_path: Path, fps: float) -> None:
    frames = moving_square()
    path = tmp_path / "clip.mp4"
    write_video(path, frames, fps)

    clip = read_video(path)
    assert clip.frames.shape == frames.shape
    assert clip.frames.dtype == np.uint8
    assert clip.fps == fps
    assert mean_abs_error(clip.frames, frames) < 3
    assert list(tmp_path.iterdir()) == [path]  # the temporary file was renamed, not left behind


def test_gif_round_trip_keeps_flat_colors_and_rounds_delay_to_10_ms(tmp_path: Path) -> None:
    frames = moving_square()
    path = tmp_path / "samples" / "clip.gif"  # write_video creates the missing folder
    write_video(path, frames, fps=8.0)

    clip = read_video(path)
    assert clip.frames.shape == frames.shape
    assert round(1000 / clip.fps) in (120, 130)  # 125 ms per frame, stored in centiseconds
    assert np.abs(clip.frames.astype(np.int16) - frames).max() <= 2


@pytest.mark.parametrize("fmt", ["mp4", "gif", "webm"])
def test_encoded_bytes_read_back(fmt: str) -> None:
    frames = moving_square()
    clip = read_video(encode_video(frames, 10.0, fmt))
    assert clip.frames.shape == frames.shape
    assert clip.fps == pytest.approx(10.0)
    assert mean_abs_error(clip.frames, frames) < 4


def test_mp4_pads_odd_sizes_by_repeating_the_edge() -> None:
    frames = moving_square(width=63, height=47)
    clip = read_video(encode_video(frames, 8.0, "mp4"))
    assert clip.frames.shape == (12, 48, 64, 3)
    assert mean_abs_error(clip.frames[:, :47, :63], frames) < 3
    assert mean_abs_error(clip.frames[:, 47, :63], frames[:, 46]) < 3
    assert mean_abs_error(clip.frames[:, :47, 63], frames[:, :, 62]) < 3


def test_write_video_overwrites_and_rejects_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    write_video(path, moving_square(n=4), 8.0)
    write_video(path, moving_square(n=6), 8.0)
    assert len(read_video(path)) == 6

    with pytest.raises(ValueError, match="unknown video format 'avi'"):
        write_video(tmp_path / "clip.avi", moving_square(), 8.0)
    assert list(tmp_path.iterdir()) == [path]


def test_encode_png_frames_decode_to_the_same_pixels() -> None:
    frames = moving_square(n=3)
    pngs = encode_png_frames(frames)
    assert len(pngs) == 3
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(png))) for png in pngs])
    np.testing.assert_array_equal(decoded, frames)


def test_read_video_stops_at_max_frames() -> None:
    data = encode_video(moving_square(), 8.0, "mp4")
    assert len(read_video(data, max_frames=5)) == 5
    assert len(read_video(data, max_frames=100)) == 12


def test_image_folder_reads_in_name_order(tmp_path: Path) -> None:
    clip = numbered_clip(3)
    for index in (2, 0, 1):
        Image.fromarray(clip.frames[index]).save(tmp_path / f"frame_{index:03d}.png")
    (tmp_path / "notes.txt").write_text("not a frame")

    folder_clip = read_video(tmp_path)
    assert frame_indices(folder_clip) == [0, 1, 2]
    assert folder_clip.fps == 8.0
    assert frame_indices(read_video(tmp_path, max_frames=2)) == [0, 1]


def test_image_folder_with_mixed_sizes_is_an_error(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 6)).save(tmp_path / "b.png")
    with pytest.raises(VideoError, match="b.png is 8x6, but the first image, a.png, is 8x8"):
        read_video(tmp_path)


def numbered_folder(path: Path, n: int) -> Path:
    """`numbered_clip(n)` as an image folder (read at 8 fps)."""
    path.mkdir()
    for i, frame in enumerate(numbered_clip(n).frames):
        Image.fromarray(frame).save(path / f"{i:03d}.png")
    return path


def test_sampling_start_stride_and_fps(tmp_path: Path) -> None:
    """Start and stride pick the frames as they are decoded (the tuner's and the server's path)."""
    folder = numbered_folder(tmp_path / "clip", 10)
    sampled = load_clip(folder, 4, 2, 2, start=1, stride=2)
    assert frame_indices(sampled) == [1, 3, 5, 7]
    assert sampled.fps == 4.0  # 8 fps at stride 2: the clip lasts as long as the span it was taken from
    assert frame_indices(load_clip(folder, 5, 2, 2, stride=2)) == [0, 2, 4, 6, 8]
    assert frame_indices(read_video(folder, start=3, stride=3)) == [3, 6, 9]
    assert frame_indices(read_video(folder)) == list(range(10))


def test_sampling_errors(tmp_path: Path) -> None:
    folder = numbered_folder(tmp_path / "clip", 10)
    with pytest.raises(VideoError, match="asked for 8 frames from index 0 at stride 2, but the clip gives only 5"):
        load_clip(folder, 8, 2, 2, stride=2)
    with pytest.raises(VideoError, match="has only 10 frames: none from index 10"):
        read_video(folder, start=10)
    for kwargs in ({"n": 0}, {"n": 2, "start": -1}, {"n": 2, "stride": 0}):
        with pytest.raises(ValueError) as raised:
            load_clip(folder, width=2, height=2, **kwargs)
        assert raised.type is ValueError  # bad arguments, not a bad video


def test_resize_center_crop_keeps_the_center_of_a_wide_frame() -> None:
    green, red = (0, 255, 0), (255, 0, 0)
    frames = np.empty((2, 40, 80, 3), np.uint8)
    frames[:] = green
    frames[:, :, :10] = red
    frames[:, :, -10:] = red

    cropped = resize_center_crop(frames, 32, 32)
    assert cropped.shape == (2, 32, 32, 3)
    assert cropped.dtype == np.uint8
    assert np.abs(cropped.astype(np.int16) - green).max() <= 2

    # Not cropped: a target of the same aspect ratio scales the whole frame, red edges included.
    scaled = resize_center_crop(frames, 40, 20)
    assert scaled.shape == (2, 20, 40, 3)
    assert tuple(scaled[0, 10, 0]) == red
    assert tuple(scaled[0, 10, -1]) == red


def test_resize_center_crop_upscales_a_tall_frame() -> None:
    frames = np.zeros((1, 30, 10, 3), np.uint8)
    frames[:, :5] = 255  # a white band at the top, well outside the central 10x10 that is kept
    cropped = resize_center_crop(frames, 20, 20)
    assert cropped.shape == (1, 20, 20, 3)
    assert cropped.max() <= 2


def test_load_clip_samples_and_resizes(tmp_path: Path) -> None:
    path = tmp_path / "clip.gif"
    write_video(path, moving_square(), fps=10.0)
    clip = load_clip(path, n=4, width=32, height=32, start=1, stride=3)
    assert clip.frames.shape == (4, 32, 32, 3)
    assert clip.fps == pytest.approx(10.0 / 3)
    with pytest.raises(VideoError, match="asked for 5 frames from index 1 at stride 3"):
        load_clip(path, n=5, width=32, height=32, start=1, stride=3)


def test_missing_path_is_a_video_error() -> None:
    with pytest.raises(VideoError, match="nope.mp4 does not exist"):
        read_video("/definitely/not/here/nope.mp4")


def test_random_bytes_named_mp4_is_a_video_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match="garbage.mp4 is not a readable video") as raised:
        read_video(path)
    assert "\n" not in str(raised.value)


def test_empty_bytes_and_empty_folder_are_video_errors(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="source clip is empty"):
        read_video(b"")
    empty = tmp_path / "no_frames_here"
    empty.mkdir()
    with pytest.raises(VideoError, match="no_frames_here has no images"):
        read_video(empty)


def test_clip_rejects_bad_frames() -> None:
    with pytest.raises(ValueError, match="uint8 RGB frames"):
        Clip(np.zeros((0, 4, 4, 3), np.uint8), 8.0)
    with pytest.raises(ValueError, match="uint8 RGB frames"):
        Clip(np.zeros((2, 4, 4, 3), np.float32), 8.0)
    with pytest.raises(ValueError, match="fps must be positive"):
        Clip(np.zeros((2, 4, 4, 3), np.uint8), 0.0)


@pytest.mark.parametrize("name", REAL_CLIPS)
def test_real_clip(name: str) -> None:
    path = SHARED_VIDEOS / name
    if not path.is_file():
        pytest.skip(f"{path} not found (set TAV_SHARED_VIDEOS to the folder of reference clips)")
    clip = read_video(path)
    assert len(clip) > 8
    assert clip.fps > 0

    sampled = load_clip(path, n=8, width=64, height=64, stride=2)
    assert sampled.frames.shape == (8, 64, 64, 3)
    assert sampled.fps == pytest.approx(clip.fps / 2)


def test_generation_serving_and_tuning_do_not_import_pyav() -> None:
    """A GPU machine without PyAV runs the benchmark: PyAV is imported only when a container is read or written."""
    code = ("import sys, server.generate, tuner.tune\n"
            "assert 'av' not in sys.modules, 'PyAV was imported'\n"
            "from tuner.video_io import encode_video\n"
            "import numpy as np\n"
            "encode_video(np.zeros((2, 8, 8, 3), np.uint8), 8, 'mp4')\n"
            "assert 'av' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
