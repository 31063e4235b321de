"""The PyTorch side of Tune-A-Video: inflation of a Stable Diffusion 1.x UNet into a video UNet, video I/O,
one-shot tuning, the tiny test model, and the artefact formats every other part reads."""

import os

# Before torch loads: idle OpenMP workers sleep rather than spin (spinning made calls 5-20x slower on shared CPUs).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


from tuner.inflate import ATTENTION_MODES, VideoUNet, inflate

__all__ = ["ATTENTION_MODES", "VideoUNet", "inflate"]
