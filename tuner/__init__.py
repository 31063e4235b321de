"""The PyTorch side of Tune-A-Video: inflation of a Stable Diffusion 1.x UNet into a video UNet, video I/O,
one-shot tuning, the tiny test model, and the artefact formats every other part reads."""

from tuner.inflate import ATTENTION_MODES, VideoUNet, inflate

__all__ = ["ATTENTION_MODES", "VideoUNet", "inflate"]
