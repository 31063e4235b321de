"""The shapes world: procedural clips of coloured shapes, the pixel checker that reads them back, and the small
Stable Diffusion 1.x-layout model the project pretrained on them and ships as its embedded default."""

from pathlib import Path

SHAPES_MODEL = Path(__file__).resolve().parents[2] / "models" / "shapes-sd"  # the shipped model
