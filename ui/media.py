"""The page offers a generation as MP4 and GIF from one request: the server sends the MP4 (what the page plays)
and the GIF is transcoded here, not generated twice."""

from __future__ import annotations

import imageio.v3 as iio


def mp4_to_gif(video: bytes, fps: float) -> bytes:
    """A looping GIF of an encoded video's frames at `fps` (delays rounded to 10 ms by the format)."""
    frames = iio.imread(video, index=None, extension=".mp4", plugin="pyav")
    return iio.imwrite("<bytes>", frames, extension=".gif", duration=1000 / fps, loop=0)
