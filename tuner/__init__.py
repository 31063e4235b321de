"""The PyTorch side of Tune-A-Video: inflation of a Stable Diffusion 1.x UNet into a video UNet, video I/O,
one-shot tuning, the tiny test model, and the artefact formats every other part reads.

The package itself imports nothing, so that `tuner.threads` can set a tuning process's OpenMP settings before
torch loads."""
