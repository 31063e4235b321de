"""Shapes world: a procedural, seeded source of 64x64 images and short clips with exact ground truth.

No model hub is reachable, so the project pretrains its own small Stable Diffusion on this world. The same
generator makes one-shot tuning clips ("a red circle is moving right on a white background") and records what
every frame shows, so that the pixel checker (`tuner.shapes.checker`) can score what a model generates.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

SIZE = 64
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 75, 220),
    "yellow": (235, 205, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
# Trajectory name -> the words a clip caption uses for it.
TRAJECTORIES: dict[str, str] = {
    "right": "is moving right",
    "left": "is moving left",
    "up": "is moving up",
    "down": "is moving down",
    "diagonal": "is moving diagonally",
    "bounce": "is bouncing",
    "grow": "is growing",
}
# Colour x shape combinations never shown in pretraining, to test whether a model composes words it knows.
HELD_OUT: tuple[tuple[str, str], ...] = (("blue", "triangle"), ("yellow", "circle"), ("red", "square"))

COLOUR_JITTER = 15
BACKGROUND_JITTER = 8
MIN_HALF_SIZE, MAX_HALF_SIZE = 9.0, 20.0


@dataclass(frozen=True)
class ShapeSpec:
    """Everything `render` needs: names, the exact (jittered) RGB values, centre and half-size in pixels."""

    colour: str
    shape: str
    background: str
    cx: float
    cy: float
    size: float
    fg_rgb: tuple[int, int, int]
    bg_rgb: tuple[int, int, int]


@dataclass(frozen=True)
class FrameTruth:
    """What a frame shows. cx, cy: area centroid in pixels (pixel centres at i + 0.5); size: half-size."""

    colour: str
    shape: str
    background: str
    cx: float
    cy: float
    size: float


def image_caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def clip_caption(colour: str, shape: str, background: str, trajectory: str) -> str:
    return f"a {colour} {shape} {TRAJECTORIES[trajectory]} on a {background} background"


def vocabulary() -> list[str]:
    """Every word a caption of this world can use, in a fixed order (each gets its own token)."""
    words = ["a", "on", "background", *COLOURS, *SHAPES, *BACKGROUNDS]
    for phrase in TRAJECTORIES.values():
        words += phrase.split()
    return list(dict.fromkeys(words))


def _jitter(rgb: Iterable[int], amount: int, rng: np.random.Generator) -> tuple[int, int, int]:
    values = np.asarray(tuple(rgb)) + rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(values, 0, 255))


def random_spec(
    rng: np.random.Generator,
    colour: str,
    shape: str,
    background: str,
    size: float | None = None,
    cx: float | None = None,
    cy: float | None = None,
) -> ShapeSpec:
    """A spec with jittered colours; size and position are drawn unless given (the shape always fits)."""
    size = float(rng.uniform(MIN_HALF_SIZE, MAX_HALF_SIZE)) if size is None else size
    lo, hi = size + 2.0, SIZE - size - 2.0
    cx = float(rng.uniform(lo, hi)) if cx is None else cx
    cy = float(rng.uniform(lo, hi)) if cy is None else cy
    return ShapeSpec(
        colour,
        shape,
        background,
        cx,
        cy,
        size,
        fg_rgb=_jitter(COLOURS[colour], COLOUR_JITTER, rng),
        bg_rgb=_jitter(BACKGROUNDS[background], BACKGROUND_JITTER, rng),
    )


def coverage(shape: str, cx: float, cy: float, size: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape, from its signed distance to each pixel centre.

    A triangle points up, with its apex at the top middle and its base along the bottom of the 2*size box.
    """
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        distance = np.hypot(dx, dy) - size
    elif shape == "square":
        distance = np.maximum(np.abs(dx), np.abs(dy)) - size
    elif shape == "triangle":
        # Outward normals of the two slanted edges are (+-2, -1) / sqrt(5), measured from the apex.
        slanted = (2.0 * np.abs(dx) - (dy + size)) / np.sqrt(5.0)
        distance = np.maximum(dy - size, slanted)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.clip(0.5 - distance, 0.0, 1.0)


def render(spec: ShapeSpec) -> np.ndarray:
    """The image of one spec, uint8 [64, 64, 3]."""
    alpha = coverage(spec.shape, spec.cx, spec.cy, spec.size)[..., None]
    image = (1.0 - alpha) * np.asarray(spec.bg_rgb, np.float32) + alpha * np.asarray(spec.fg_rgb, np.float32)
    return np.round(image).astype(np.uint8)


def truth(spec: ShapeSpec) -> FrameTruth:
    alpha = coverage(spec.shape, spec.cx, spec.cy, spec.size)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    total = float(alpha.sum())
    cx, cy = float((alpha * xs).sum() / total), float((alpha * ys).sum() / total)
    return FrameTruth(spec.colour, spec.shape, spec.background, cx, cy, spec.size)


def trajectory_specs(
    rng: np.random.Generator, colour: str, shape: str, background: str, trajectory: str, frames: int = 8
) -> list[ShapeSpec]:
    """Specs of the frames of one clip: colours are jittered once, then the shape moves (or grows)."""
    if trajectory not in TRAJECTORIES:
        raise ValueError(f"unknown trajectory {trajectory!r}; expected one of {tuple(TRAJECTORIES)}")
    t = np.linspace(0.0, 1.0, frames)
    if trajectory == "grow":
        sizes = np.linspace(rng.uniform(7.0, 10.0), rng.uniform(18.0, 22.0), frames)
        margin = sizes[-1] + 2.0
        cx = np.full(frames, rng.uniform(margin, SIZE - margin))
        cy = np.full(frames, rng.uniform(margin, SIZE - margin))
    else:
        size = float(rng.uniform(9.0, 13.0))
        lo, hi = size + 2.0, SIZE - size - 2.0
        travel = float(rng.uniform(0.6, 1.0)) * (hi - lo)
        start = rng.uniform(lo, hi - travel, size=2)
        sizes = np.full(frames, size)
        cx = np.full(frames, rng.uniform(lo, hi))
        cy = np.full(frames, rng.uniform(lo, hi))
        if trajectory in ("right", "left"):
            cx = start[0] + travel * (t if trajectory == "right" else 1.0 - t)
        elif trajectory in ("down", "up"):
            cy = start[1] + travel * (t if trajectory == "down" else 1.0 - t)
        elif trajectory == "diagonal":
            sign_x, sign_y = rng.choice([-1.0, 1.0], size=2)
            cx = start[0] + travel * (t if sign_x > 0 else 1.0 - t)
            cy = start[1] + travel * (t if sign_y > 0 else 1.0 - t)
        else:  # bounce: drifts sideways while hopping twice off the bottom
            cx = start[0] + 0.5 * travel * t
            cy = hi - travel * np.abs(np.sin(2.0 * np.pi * t))
    fg_rgb = _jitter(COLOURS[colour], COLOUR_JITTER, rng)
    bg_rgb = _jitter(BACKGROUNDS[background], BACKGROUND_JITTER, rng)
    return [
        ShapeSpec(colour, shape, background, float(x), float(y), float(s), fg_rgb, bg_rgb)
        for x, y, s in zip(cx, cy, sizes, strict=True)
    ]


def make_clip(
    colour: str, shape: str, background: str, trajectory: str, frames: int = 8, seed: int = 0
) -> tuple[np.ndarray, str, list[FrameTruth]]:
    """A clip: frames uint8 [F, 64, 64, 3], its caption, and the ground truth of each frame."""
    specs = trajectory_specs(np.random.default_rng(seed), colour, shape, background, trajectory, frames)
    video = np.stack([render(spec) for spec in specs])
    return video, clip_caption(colour, shape, background, trajectory), [truth(spec) for spec in specs]


def training_combos() -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT]


def sample_dataset(count: int, seed: int = 0, motion_fraction: float = 0.3) -> tuple[np.ndarray, list[str]]:
    """Training images uint8 [N, 64, 64, 3] and captions, with the HELD_OUT combinations left out.

    A `motion_fraction` of the images are single frames of clips captioned with the clip's caption, so the
    model also reads motion captions (a still frame cannot show motion: it learns to draw what words name).
    """
    rng = np.random.default_rng(seed)
    combos = training_combos()
    images = np.empty((count, SIZE, SIZE, 3), np.uint8)
    captions = []
    for i in range(count):
        colour, shape = combos[rng.integers(len(combos))]
        background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        if rng.random() < motion_fraction:
            trajectory = list(TRAJECTORIES)[rng.integers(len(TRAJECTORIES))]
            specs = trajectory_specs(rng, colour, shape, background, trajectory)
            spec = specs[rng.integers(len(specs))]
            captions.append(clip_caption(colour, shape, background, trajectory))
        else:
            spec = random_spec(rng, colour, shape, background)
            captions.append(image_caption(colour, shape, background))
        images[i] = render(spec)
    return images, captions
