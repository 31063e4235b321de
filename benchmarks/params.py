"""`tav-bench params`: total and trainable parameters of the video UNet, for the tiny model and for a full
Stable Diffusion 1.4-config UNet built on the meta device (no weights, nothing downloaded)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from benchmarks.common import save_plot, write_result
from tuner.inflate import inflate, is_trainable
from tuner.tiny import UNET_CONFIG

# The UNet configuration of Stable Diffusion 1.4 (diffusers' defaults are exactly that layout).
SD14_UNET_CONFIG = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


def count(config: dict) -> dict:
    with torch.device("meta"):
        unet = inflate(UNet2DConditionModel(**config))
    total = sum(p.numel() for p in unet.parameters())
    trainable = sum(p.numel() for n, p in unet.named_parameters() if is_trainable(n))
    return {"total": total, "trainable": trainable, "trainable_fraction": trainable / total}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This study takes no options."""


def run(args: argparse.Namespace) -> dict:
    result = {"study": "params", "tiny": count(UNET_CONFIG), "sd14": count(SD14_UNET_CONFIG)}
    write_result(args.out, "params", result)
    save_plot(Path(args.out) / "params.png", lambda ax: (
        ax.bar(["tiny total", "tiny trainable"], [result["tiny"]["total"], result["tiny"]["trainable"]]),
        ax.bar(["SD1.4 total", "SD1.4 trainable"], [result["sd14"]["total"], result["sd14"]["trainable"]]),
        ax.set_yscale("log"), ax.set_ylabel("parameters"),
    ))
    return result
