"""Reads a shapes-world frame from its pixels alone: background, colour and shape of the one object, its
centroid and size.

Generated frames are blurred and haloed, so every reading is made to survive that: the background comes from
the border, the object is segmented at half contrast between background and object colour (a symmetric blur
keeps edges there), the colour is the chroma-weighted mean hue of the object (blending with an achromatic
background does not change hue), and the shape comes from how the width changes from top to bottom (triangles)
and whether the corners of the bounding box are filled (squares), not from fill ratio alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from tuner.shapes.world import BACKGROUNDS, COLOURS, SIZE, FrameTruth

BORDER = 2
# Below this colour distance between the object and the background the frame is read as empty.
MIN_CONTRAST = 30.0
TAPER_TRIANGLE = 0.35
CORNER_SQUARE = 0.5


@dataclass(frozen=True)
class FrameReading:
    """What the checker sees. colour / shape are "none" on an empty frame; cx, cy, size are in pixels."""

    colour: str
    shape: str
    background: str
    cx: float
    cy: float
    size: float


def _hue(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue in degrees and chroma of RGB values [..., 3]."""
    r, g, b = np.moveaxis(rgb.astype(np.float64), -1, 0)
    hi, lo = rgb.max(-1).astype(np.float64), rgb.min(-1).astype(np.float64)
    chroma = hi - lo
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(
        hi == r, ((g - b) / safe) % 6.0, np.where(hi == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )
    return hue * 60.0, chroma


_REFERENCE_HUES = {name: float(_hue(np.asarray(rgb))[0]) for name, rgb in COLOURS.items()}


def _nearest_colour(hue: float) -> str:
    return min(_REFERENCE_HUES, key=lambda name: abs((hue - _REFERENCE_HUES[name] + 180.0) % 360.0 - 180.0))


def _dilate(mask: np.ndarray) -> np.ndarray:
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def _box3(values: np.ndarray) -> np.ndarray:
    """3x3 mean (edge-padded): takes pixel noise off the alpha map before it is thresholded."""
    padded = np.pad(values, 1, mode="edge")
    return (
        sum(padded[i : i + values.shape[0], j : j + values.shape[1]] for i in range(3) for j in range(3))
        / 9.0
    )


def _main_component(mask: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The 4-connected part of `mask` around its deepest point (largest 5x5 box sum of `weight`)."""
    padded = np.pad(np.where(mask, weight, 0.0), 2)
    window = sum(padded[i : i + mask.shape[0], j : j + mask.shape[1]] for i in range(5) for j in range(5))
    seed = np.unravel_index(np.argmax(np.where(mask, window, -np.inf)), mask.shape)
    component = np.zeros_like(mask)
    component[seed] = True
    while True:
        grown = _dilate(component) & mask
        if (grown == component).all():
            return component
        component = grown


def _shape(mask: np.ndarray) -> tuple[str, int, int]:
    """Shape name, bounding-box height and width of a segmented object."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = box.shape
    widths = box.sum(1) / width
    quarter = max(1, round(height / 4))
    taper = widths[-quarter:].mean() - widths[:quarter].mean()
    k = max(1, round(0.2 * min(height, width)))
    corners = np.mean([box[:k, :k].mean(), box[:k, -k:].mean(), box[-k:, :k].mean(), box[-k:, -k:].mean()])
    if abs(taper) > TAPER_TRIANGLE:
        return "triangle", height, width
    return ("square" if corners > CORNER_SQUARE else "circle"), height, width


def check_frame(img: np.ndarray) -> FrameReading:
    """Read one frame, uint8 or float in [0, 255], shape [H, W, 3]."""
    image = np.asarray(img, np.float64)[..., :3]
    border = np.concatenate(
        [
            image[:BORDER].reshape(-1, 3),
            image[-BORDER:].reshape(-1, 3),
            image[:, :BORDER].reshape(-1, 3),
            image[:, -BORDER:].reshape(-1, 3),
        ]
    )
    bg = np.median(border, axis=0)
    background = min(BACKGROUNDS, key=lambda name: float(np.linalg.norm(bg - BACKGROUNDS[name])))

    distance = np.linalg.norm(image - bg, axis=-1)
    strongest = float(np.percentile(distance, 99))
    if strongest < MIN_CONTRAST:
        return FrameReading("none", "none", background, math.nan, math.nan, 0.0)
    fg = np.median(image[distance > 0.7 * strongest], axis=0)
    direction = fg - bg
    alpha = np.clip((image - bg) @ direction / float(direction @ direction), 0.0, 1.0)

    smooth = _box3(alpha)
    component = _main_component(smooth > 0.5, smooth)
    shape, height, width = _shape(component)

    confident = component & (alpha > 0.6)
    hue, chroma = _hue(image[confident if confident.any() else component])
    angle = np.deg2rad(hue)
    mean_hue = (
        math.degrees(math.atan2((chroma * np.sin(angle)).sum(), (chroma * np.cos(angle)).sum())) % 360.0
    )

    region = _dilate(_dilate(component))
    weight = np.where(region, alpha, 0.0)
    ys, xs = np.mgrid[0 : image.shape[0], 0 : image.shape[1]] + 0.5
    cx, cy = float((weight * xs).sum() / weight.sum()), float((weight * ys).sum() / weight.sum())
    return FrameReading(_nearest_colour(mean_hue), shape, background, cx, cy, (height + width) / 4.0)


def check_clip(frames: np.ndarray) -> list[FrameReading]:
    """Read every frame of a clip [F, H, W, 3]."""
    return [check_frame(frame) for frame in frames]


def score_clip(
    readings: list[FrameReading], wanted: tuple[str, str, str], source: list[FrameTruth]
) -> dict[str, float]:
    """How well a generated clip shows the `wanted` (colour, shape, background) with the `source` clip's motion.

    - text alignment: the fraction of frames whose colour, shape, background (and all three) match `wanted`;
    - motion fidelity: `trajectory_px`, the mean distance between generated and source centroids (an empty
      frame counts as the frame's diagonal, 64 * sqrt(2), so losing the object is never rewarded), and
      `any_order_trajectory_px`, the same with the generated frames in the order that fits the source best (a
      minimum-cost matching of frames to source frames): where it is much lower, the frames show the source's
      places in the wrong order;
    - temporal consistency: the fraction of consecutive frame pairs whose colour or shape reading changes
      (`flip_rate`), and `size_change_px`, the mean |change of size| between consecutive frames beyond the
      source's own change.
    Frames past the source's length are scored for alignment and consistency only.
    """
    colour, shape, background = wanted
    n = min(len(readings), len(source))
    diagonal = math.hypot(SIZE, SIZE)
    distance = np.array([[diagonal if r.colour == "none" else math.hypot(r.cx - s.cx, r.cy - s.cy)
                          for s in source[:n]] for r in readings[:n]]).reshape(n, n)
    matched = linear_sum_assignment(distance)
    pairs = list(zip(readings[:-1], readings[1:], strict=True))
    source_growth = [b.size - a.size for a, b in zip(source[:-1], source[1:], strict=True)]
    source_growth += [0.0] * (len(pairs) - len(source_growth))
    flips = [(a.colour, a.shape) != (b.colour, b.shape) for a, b in pairs]
    size_changes = [abs((b.size - a.size) - g) for (a, b), g in zip(pairs, source_growth, strict=False)]
    return {
        "colour": float(np.mean([r.colour == colour for r in readings])),
        "shape": float(np.mean([r.shape == shape for r in readings])),
        "background": float(np.mean([r.background == background for r in readings])),
        "all": float(np.mean([(r.colour, r.shape, r.background) == wanted for r in readings])),
        "trajectory_px": float(np.mean(np.diag(distance))),
        "any_order_trajectory_px": float(np.mean(distance[matched])),
        "flip_rate": float(np.mean(flips)) if pairs else 0.0,
        "size_change_px": float(np.mean(size_changes)) if pairs else 0.0,
    }
