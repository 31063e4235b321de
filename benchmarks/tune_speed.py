"""`tav-bench tune`: seconds per one-shot tuning step and peak memory, for a base model on this machine."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import peak_rss_mib, save_plot, summarize, write_result
from tuner.components import load_components
from tuner.inflate import inflate
from tuner.tiny import make_tiny
from tuner.tune import TuneSettings, diffusion_loss, mark_trainable


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", type=Path, help="base model directory (default: a fresh tiny model)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, help="pixel width = height (default: the model's native size)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--gradient-checkpointing", action="store_true")


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        base = args.base or make_tiny(Path(tmp) / "tiny")
        components = load_components(base)
        size = args.size or components.default_size
        latent = size // components.vae_factor
        torch.manual_seed(0)
        unet = inflate(components.unet)
        trainable = list(mark_trainable(unet).values())
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(components.scheduler_config)
        optimizer = torch.optim.AdamW(trainable, lr=TuneSettings.lr, weight_decay=1e-2)
        channels = unet.config.in_channels
        text = torch.randn(1, components.tokenizer.model_max_length, unet.config.cross_attention_dim)
        latents = torch.randn(1, channels, args.frames, latent, latent)
        rss_before = peak_rss_mib()
        seconds = []
        for step in range(args.steps + 1):
            start = time.perf_counter()
            t = torch.randint(0, 1000, (1,))
            loss = diffusion_loss(unet, scheduler, latents, text, t, torch.randn_like(latents))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            if step:  # the first step is warm-up
                seconds.append(time.perf_counter() - start)
    total = sum(p.numel() for p in unet.parameters())
    result = {
        "study": "tune",
        "base": str(args.base or "tiny (tav-make-tiny, seed 0)"),
        "frames": args.frames,
        "size": size,
        "gradient_checkpointing": args.gradient_checkpointing,
        "unet_parameters": total,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "step": summarize(seconds),
        "seconds_per_step_mean": float(np.mean(seconds)),
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_before_training_mib": rss_before,
    }
    write_result(args.out, "tune", result)
    save_plot(args.out / "tune.png", lambda ax: (
        ax.plot(np.array(seconds) * 1000, marker="o"),
        ax.set_xlabel("step"), ax.set_ylabel("ms per tuning step"),
        ax.set_title(f"one-shot tuning, {args.frames} frames at {size}px"),
    ))
    return result
