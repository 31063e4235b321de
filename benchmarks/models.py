"""`tav-bench models`: many tuned videos per replica. Resident memory against the number of loaded models of one
base, and the time to switch models between requests, per backend.

Every tuned model differs from its base only in its adapter tensors, so a backend that shares the base weights
should grow by about the adapter's size per model, not by a UNet.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import save_plot, summarize, write_result
from server.engines import load_model
from server.generate import GenerationOptions, Generator

# A UNet of about 23 MB (fp32): big enough that a full copy per model would show plainly in resident memory.
MEASURABLE_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(64, 128, 128), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
    norm_num_groups=32,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", type=int, default=20)
    p.add_argument("--backends", default="torch,onnxruntime", help="comma-separated: torch, onnxruntime, aoti")
    p.add_argument("--switches", type=int, default=10, help="requests alternating between two models")
    p.add_argument("--adapters", action="store_true",
                   help="instead: cost per model by adapter kind and LoRA rank (benchmarks/adapters.py; --models "
                   "of each, at least 50 for the resident figure)")
    p.add_argument("--sd-models", type=int, default=0,
                   help="with --adapters: also this many rank-16 LoRA models of an SD 1.x-size random base loaded for "
                   "the resident figure (about 3 GB of temporary disk for 60; 0: skip)")


def rss_mib() -> float:
    """Current resident memory of this process."""
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_repository(root: Path, count: int, export_engines: bool, aoti: bool = False) -> list[Path]:
    """`count` tuned models of one measurable base (one tuning step each: distinct adapters), exported (ONNX, and
    with `aoti` AOTInductor packages for this CPU: compiled for the first model, shared by the others)."""
    from exporter.cli import export
    from tuner.shapes.world import COLOURS, make_clip
    from tuner.tiny import make_tiny
    from tuner.tune import TuneSettings, tune
    from tuner.video_io import write_video

    base = make_tiny(root / "base", unet_config=MEASURABLE_UNET)
    runs = []
    colours = list(COLOURS)
    for i in range(count):
        frames, caption, _ = make_clip(colours[i % len(colours)], "circle", "white", "right", frames=8, seed=i)
        clip = root / f"clip{i}.mp4"
        write_video(clip, frames, fps=8)
        run = tune(base, clip, caption, root / "repo" / f"m{i:03d}", TuneSettings(width=32, height=32, steps=1,
                                                                                   seed=i), progress=False)
        if export_engines:
            export(run, progress=lambda message: None, check_tuned=False)
        if aoti:
            export(run, aoti=True, device="cpu", progress=lambda message: None)
        runs.append(run)
    return runs


def memory_curve(runs: list[Path], backend: str) -> tuple[list[float], list]:
    """Resident MiB after loading each model in turn (every model kept), and the loaded models."""
    gc.collect()
    curve = [rss_mib()]
    loaded = []
    for run in runs:
        model = load_model(run, backend)
        Generator(model).generate(GenerationOptions("a circle", steps=1, guidance=2.0, seed=0))  # touch it
        loaded.append(model)
        gc.collect()
        curve.append(rss_mib())
    return curve, loaded


def switch_times(models: list, switches: int) -> dict:
    """ms per one-step generation when every request changes model, against repeating the same model."""
    options = GenerationOptions("a circle", steps=1, guidance=2.0, seed=0, invert=False)
    generators = [Generator(m) for m in models[:2]]
    same, alternating = [], []
    for i in range(switches + 1):
        started = time.perf_counter()
        generators[0].generate(options)
        same.append(time.perf_counter() - started)
        started = time.perf_counter()
        generators[i % 2].generate(options)
        alternating.append(time.perf_counter() - started)
    swap = getattr(generators[1].engines, "last_switch_seconds", None)  # aoti: the load_constants of a switch
    return {"same_model": summarize(same[1:]), "switching": summarize(alternating[1:]),
            "switch_overhead_ms": summarize(alternating[1:])["median_ms"] - summarize(same[1:])["median_ms"],
            "swap_ms": None if swap is None else 1000 * swap}


def run(args: argparse.Namespace) -> dict:
    if args.adapters:
        from benchmarks import adapters

        return adapters.run(args)
    backends = args.backends.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = make_repository(Path(tmp), args.models, export_engines="onnxruntime" in backends,
                               aoti="aoti" in backends)
        unet_mib = sum(p.stat().st_size for p in (Path(tmp) / "base" / "unet").glob("*.safetensors")) / 2**20
        adapter_mib = (runs[0] / "adapter.safetensors").stat().st_size / 2**20
        for backend in backends:
            curve, loaded = memory_curve(runs, backend)
            steps = np.diff(curve[1:]) if len(curve) > 2 else np.array([0.0])
            results[backend] = {"rss_mib": curve, "per_added_model_mib": float(np.median(steps)),
                                "per_added_model_fraction_of_unet": float(np.median(steps)) / unet_mib,
                                "switch": switch_times(loaded, args.switches)}
            del loaded
            gc.collect()
    result = {"study": "models", "models": args.models, "unet_mib": unet_mib, "adapter_mib": adapter_mib,
              "unet_config": MEASURABLE_UNET, "backends": results,
              "note": "backends are measured one after the other in one process: a later curve starts from the "
                      "memory the earlier one left"}
    write_result(args.out, "models", result)

    def draw(ax):
        for backend, r in results.items():
            ax.plot(range(len(r["rss_mib"])), np.array(r["rss_mib"]) - r["rss_mib"][0], marker="o", label=backend)
        xs = np.arange(args.models + 1)
        ax.plot(xs, xs * unet_mib, linestyle="--", color="gray", label="a full UNet per model")
        ax.set_xlabel("tuned models loaded")
        ax.set_ylabel("resident memory added (MiB)")
        ax.legend()

    save_plot(args.out / "models.png", draw)
    return result
