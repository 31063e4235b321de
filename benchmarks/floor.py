"""`tav-bench floor`: how far each backend is from this machine's arithmetic limit, and what the full-size
model costs per frame in FLOPs (with the floor that implies on an H100 and an A100).

FLOPs are counted by `torch.utils.flop_counter` over one UNet call (matmuls, convolutions, attention); the
machine's rate is measured once with a large fp32 matrix multiply. `shallow_share` counts what a shallow pass of
feature reuse (`cache_interval`) keeps of a full call, for a branch of `branch_layers` layers.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import save_plot, write_result
from benchmarks.params import SD14_UNET_CONFIG
from tuner.inflate import inflate

GPU_DENSE_FP16_TFLOPS = {"H100 SXM": 989.0, "A100": 312.0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--latency-json", type=Path, help="a tav-bench latency result, to rate each backend against")
    p.add_argument("--steps", type=int, default=50)


def unet_flops(config: dict, batch: int, frames: int, latent: int, text_length: int = 77,
               mode: str = "sparse_causal", branch_layers: int | None = None) -> float:
    """FLOPs of one video UNet call with attention `mode`, counted on the meta device (no memory, no weights);
    with `branch_layers`, of the shallow pass of feature reuse with a branch of that many layers."""
    with torch.device("meta"):
        unet = inflate(UNet2DConditionModel(**config), mode)
        sample = torch.randn(batch, unet.config.in_channels, frames, latent, latent)
        text = torch.randn(batch, text_length, unet.config.cross_attention_dim)
    timestep = torch.tensor([500.0], device="meta")
    branch = None
    if branch_layers is not None:
        unet.branch_layers = branch_layers
        with torch.no_grad():
            _, branch = unet(sample, timestep, text, return_branch=True)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(sample, timestep, text, branch=branch)
    return float(counter.get_total_flops())


def shallow_share(config: dict, latent: int, batch: int = 2, frames: int = 8) -> dict[str, float]:
    """The FLOP share of a shallow pass in a full UNet call: for the finest branch (the final up block's last
    layer, the default) and the block-level one (the whole final up block, and the first down block's layers)."""
    full = unet_flops(config, batch, frames, latent)
    block = config.get("layers_per_block", 2) + 1
    return {"finest": unet_flops(config, batch, frames, latent, branch_layers=1) / full,
            "block": unet_flops(config, batch, frames, latent, branch_layers=block) / full}


def matmul_rate(size: int = 2048, repeats: int = 10) -> float:
    """This machine's achieved fp32 matrix-multiply rate, FLOP/s (median of `repeats`)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / sorted(times)[len(times) // 2]


def per_frame_table(steps: int) -> dict:
    """SD 1.4-config video UNet at 512x512 x 8 frames: FLOPs per generated frame and the GPU floors."""
    sample = unet_flops(SD14_UNET_CONFIG, batch=2, frames=8, latent=64)
    invert = unet_flops(SD14_UNET_CONFIG, batch=1, frames=8, latent=64)
    per_frame = {"sampling": steps * sample / 8, "sampling_and_inversion": steps * (sample + invert) / 8}
    floors = {gpu: {k: 1000 * v / (tflops * 1e12) for k, v in per_frame.items()}
              for gpu, tflops in GPU_DENSE_FP16_TFLOPS.items()}
    return {"unet_call_flops": {"batch2": sample, "batch1": invert}, "flops_per_frame": per_frame,
            "floor_ms_per_frame": floors, "steps": steps, "guidance": "on (batch 2)", "size": "512x512 x 8 frames"}


def run(args: argparse.Namespace) -> dict:
    rate = matmul_rate()
    result = {"study": "floor", "matmul_fp32_gflops": rate / 1e9, "sd14": per_frame_table(args.steps),
              "sd14_shallow_flop_share": shallow_share(SD14_UNET_CONFIG, latent=64)}
    if args.latency_json:
        import json

        latency = json.loads(args.latency_json.read_text())
        channels, h, w = latency["latent_shape"]
        config = latency.get("unet_config")
        if config:
            achieved = {}
            for name, timing in latency["unet_ms"].items():
                batch = int(name.rsplit("batch", 1)[1])
                flops = unet_flops(config, batch, 8, h)
                achieved[name] = {"gflops_per_call": flops / 1e9,
                                  "achieved_gflops": flops / (timing["median_ms"] / 1000) / 1e9,
                                  "fraction_of_matmul_rate": flops / (timing["median_ms"] / 1000) / rate}
            result["backends"] = achieved
    write_result(args.out, "floor", result)

    def draw(ax):
        floors = result["sd14"]["floor_ms_per_frame"]
        names = list(floors)
        ax.bar(names, [floors[n]["sampling"] for n in names], label="sampling")
        ax.bar(names, [floors[n]["sampling_and_inversion"] - floors[n]["sampling"] for n in names],
               bottom=[floors[n]["sampling"] for n in names], label="+ inversion")
        ax.set_ylabel(f"floor ms per frame, SD 1.4 512px, {args.steps} steps")
        ax.legend()

    save_plot(args.out / "floor.png", draw)
    return result
