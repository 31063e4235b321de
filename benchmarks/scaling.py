"""`tav-bench scaling`: why sparse-causal attention serves long videos. Per-frame cost against video length for
the same model with sparse-causal attention (8-frame windows) and with full cross-frame attention over all frames
in one UNet call (the tuner's `full` mode).

Sparse-causal: one 8-frame UNet call per window, measured, times the number of windows the length needs.
Full: one UNet call over all N frames, measured where it fits in `--max-measured-frames`, beyond that computed
from the measured cost at the largest measured length plus the extra attention FLOPs (counted, not timed).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.common import save_plot, time_alternating, write_result
from benchmarks.floor import unet_flops
from server.generate import plan_windows
from tuner.components import load_components
from tuner.inflate import inflate
from tuner.tiny import make_tiny


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", type=Path, help="base model directory (default: the tiny model)")
    p.add_argument("--lengths", default="8,16,32,64,128")
    p.add_argument("--latent", type=int, default=16, help="latent height = width")
    p.add_argument("--max-measured-frames", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)


def run(args: argparse.Namespace) -> dict:
    lengths = [int(n) for n in args.lengths.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        base = args.base or make_tiny(Path(tmp) / "tiny")
        components = load_components(base)
    unet = inflate(components.unet).eval()
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    channels, latent = unet.config.in_channels, args.latent
    text = torch.randn(2, components.tokenizer.model_max_length, unet.config.cross_attention_dim)
    t = torch.tensor([500.0])

    def call(frames: int, mode: str):
        sample = torch.randn(2, channels, frames, latent, latent)

        def go():
            unet.set_attention_mode(mode)
            with torch.inference_mode():
                unet(sample, t, text)
        return go

    measured_full = [n for n in lengths if n <= args.max_measured_frames]
    variants = {"sparse_causal/8": call(8, "sparse_causal")} | {f"full/{n}": call(n, "full") for n in measured_full}
    timings = time_alternating(variants, args.repeats, warmup=1)
    window_ms = timings["sparse_causal/8"]["median_ms"]
    rows = []
    largest = max(measured_full)
    for n in lengths:
        windows = len(plan_windows(max(n, 8)))
        row = {"frames": n, "windows": windows, "sparse_causal_ms_per_frame": window_ms * windows / n,
               "sparse_causal": "measured (8-frame call) x windows"}
        if n in measured_full:
            row |= {"full_ms_per_frame": timings[f"full/{n}"]["median_ms"] / n, "full": "measured"}
        else:  # the measured time at the largest length, plus the added FLOPs at this machine's achieved rate
            base_flops = unet_flops(config, 2, largest, latent, mode="full")
            rate = base_flops / (timings[f"full/{largest}"]["median_ms"] / 1000)
            extra = unet_flops(config, 2, n, latent, mode="full") - base_flops * n / largest
            row |= {"full_ms_per_frame": (timings[f"full/{largest}"]["median_ms"] * n / largest
                                          + 1000 * extra / rate) / n,
                    "full": f"computed from FLOPs (measured up to {largest} frames)"}
        rows.append(row)
    result = {"study": "scaling", "unet_config": config, "latent": latent, "batch": 2,
              "unet_ms": timings, "rows": rows,
              "note": "ms per frame of one denoising step at batch 2 (guidance on); a generation multiplies by steps"}
    write_result(args.out, "scaling", result)

    def draw(ax):
        xs = [r["frames"] for r in rows]
        ax.plot(xs, [r["sparse_causal_ms_per_frame"] for r in rows], marker="o", label="sparse-causal (windows)")
        measured = [r for r in rows if r["full"] == "measured"]
        computed = [r for r in rows if r["full"] != "measured"]
        ax.plot([r["frames"] for r in measured], [r["full_ms_per_frame"] for r in measured], marker="s",
                label="full attention (measured)")
        if computed:
            ax.plot([measured[-1]["frames"]] + [r["frames"] for r in computed],
                    [measured[-1]["full_ms_per_frame"]] + [r["full_ms_per_frame"] for r in computed],
                    marker="s", linestyle="--", label="full attention (computed)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("frames in the video")
        ax.set_ylabel("ms per frame per denoising step")
        ax.legend()

    save_plot(args.out / "scaling.png", draw)
    return result
