"""`tav-bench backends`: which backend serves fastest on this machine, PyTorch eager, ONNX Runtime (the store's
fused graph) or AOTInductor (`--backends ...,aoti`: packages compiled for this machine, compile time recorded),
measured on one tuned model: ms per UNet call at batch 1 and 2, and ms per generated frame for an 8-frame
generation (inversion on, classifier-free guidance on). The server's default backend on a machine is the one this
study finds faster there; the result records which.

The default model is bigger than the tiny test model so the numbers mean something: the shapes-world UNet
(block_out_channels (64, 128, 128), cross-attention 64, 8 heads) at 16x16 latents, built like `tav-make-tiny`
and tuned for a few steps at the base's native size (or `--base models/shapes-sd`, the shipped model). Backends
are measured alternately and summarised by median and p90; the machine's load average before and after is
recorded, since timings on shared machines move by 10-30% between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from benchmarks.common import save_plot, write_result
from benchmarks.latency import generations, load_models, unet_calls
from server.engines import add_torch_engine_arguments
from tuner import tiny
from tuner.artefacts import TunedModel
from tuner.io_utils import atomic_directory

BENCH_UNET_CONFIG = {
    **tiny.UNET_CONFIG,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (64, 128, 128),
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
BENCH_TEXT_WIDTH = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="tuned model directory, exported (default: build, tune and export)")
    p.add_argument("--base", type=Path, help="base model directory to tune and export (default: the bench base)")
    p.add_argument("--backends", default="torch,onnxruntime", help="comma-separated: torch, onnxruntime, aoti")
    add_torch_engine_arguments(p)
    p.add_argument("--steps", type=int, default=10, help="denoising steps per generation")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=3, help="generations per backend")
    p.add_argument("--unet-repeats", type=int, default=20, help="UNet calls per backend and batch")


def make_bench_base(out: Path, seed: int = 0) -> Path:
    """Write the benchmark's base model directory: `tav-make-tiny`'s, with the shapes-world UNet."""
    torch.manual_seed(seed)
    with atomic_directory(out) as tmp:
        UNet2DConditionModel(**BENCH_UNET_CONFIG).save_pretrained(tmp / "unet")
        AutoencoderKL(**tiny.VAE_CONFIG).save_pretrained(tmp / "vae")
        tokenizer = tiny._byte_tokenizer(tmp / "tokenizer")
        CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=BENCH_TEXT_WIDTH, intermediate_size=4 * BENCH_TEXT_WIDTH,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=tiny.MAX_TOKENS,
            projection_dim=BENCH_TEXT_WIDTH, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )).save_pretrained(tmp / "text_encoder")
        DDIMScheduler(**tiny.SCHEDULER_CONFIG).save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps(tiny._model_index(), indent=2) + "\n")
    return out


def tuned_model(workdir: Path, base: Path | None, aoti: bool = False) -> Path:
    """`base` (default: the bench base) tuned for a few steps on a shapes-world clip at its native size, exported
    to ONNX (and with `aoti`, to AOTInductor packages for this CPU)."""
    from exporter.cli import export
    from tuner.shapes.world import make_clip
    from tuner.tune import TuneSettings, tune
    from tuner.video_io import write_video

    frames, caption, _ = make_clip("red", "circle", "white", "right", frames=16, seed=0)
    clip = workdir / "clip.mp4"
    write_video(clip, frames, fps=8)
    base = base or make_bench_base(workdir / "base")
    run = tune(base, clip, caption, workdir / "repo" / "circle", TuneSettings(steps=3), progress=False)
    export(run, progress=lambda message: None)
    if aoti:
        export(run, aoti=True, device="cpu", progress=lambda message: None)
    return run


def speedups(unet_ms: dict, per_frame: dict) -> dict:
    """Each backend's speed relative to PyTorch eager (medians; > 1 is faster)."""
    if "torch" not in per_frame:
        return {}
    return {
        b: {"batch1": unet_ms["torch/batch1"]["median_ms"] / unet_ms[f"{b}/batch1"]["median_ms"],
            "batch2": unet_ms["torch/batch2"]["median_ms"] / unet_ms[f"{b}/batch2"]["median_ms"],
            "per_frame": per_frame["torch"]["median_ms"] / per_frame[b]["median_ms"]}
        for b in per_frame if b != "torch"
    }


def run(args: argparse.Namespace) -> dict:
    backends = args.backends.split(",")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or tuned_model(Path(tmp), args.base, aoti="aoti" in backends)
        models = load_models(model_dir, backends, args.compile)
        backends = list(models)
        aoti = json.loads((Path(model_dir) / "engines" / "manifest.json").read_text()).get("aoti", {}).get("cpu")
        first = next(iter(models.values()))
        unet_config = json.loads((TunedModel.open(model_dir).base_path / "unet" / "config.json").read_text())
        unet_ms = unet_calls(models, args.unet_repeats)
        generation = generations(models, [8], args)
    per_frame = {backend: generation[f"{backend}/8"]["ms_per_frame"] for backend in backends}
    fastest = min(backends, key=lambda b: per_frame[b]["median_ms"])
    result = {
        "study": "backends",
        "torch_compile_mode": args.compile,
        "model": str(args.model or f"{args.base or 'bench base (shapes-world UNet)'}, tuned 3 steps"),
        "pixel_size": list(first.pixel_size),
        "unet_config": {k: v for k, v in unet_config.items() if not k.startswith("_")},
        "latent_shape": list(first.engines.latent_shape),
        "frames": 8, "steps": args.steps, "guidance": args.guidance, "invert": True,
        "threads": {"torch": torch.get_num_threads(), "onnxruntime": len(os.sched_getaffinity(0)),
                    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},  # torch's OpenMP workers spin unless PASSIVE
        "unet_ms": unet_ms,
        "ms_per_frame": per_frame,
        "phase_median_ms": {b: generation[f"{b}/8"]["phase_median_ms"] for b in backends},
        "speedup_vs_torch": speedups(unet_ms, per_frame),
        "aoti_compile_seconds": {name: p["compile_seconds"] for name, p in aoti["packages"].items()} if aoti else None,
        "fastest_backend": fastest,
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }
    write_result(args.out, "backends", result)

    def bars(ax):
        groups = ("UNet call, batch 1", "UNet call, batch 2", "per generated frame")
        width = 0.8 / len(backends)
        for i, backend in enumerate(backends):
            rows = [unet_ms[f"{backend}/batch1"], unet_ms[f"{backend}/batch2"], per_frame[backend]]
            medians = [r["median_ms"] for r in rows]
            spread = [[0.0] * len(rows), [r["p90_ms"] - r["median_ms"] for r in rows]]
            ax.bar([g + i * width for g in range(len(groups))], medians, width, yerr=spread, capsize=3,
                   label=backend)
        ax.set_xticks([g + width * (len(backends) - 1) / 2 for g in range(len(groups))], groups)
        ax.set_ylabel("ms (median, whisker to p90)")
        ax.set_title(f"backends on this CPU; fastest: {fastest}")
        ax.legend()

    save_plot(args.out / "backends.png", bars)
    return result
