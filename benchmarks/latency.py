"""`tav-bench latency`: what a user asks first: ms per UNet call (batch 1 and 2), time per phase, and end-to-end
ms per generated frame for several video lengths (autoregressive windows past 8 frames), per backend.

Backends are measured alternately (A B A B ...) and summarised by median and p90, since timings on shared
machines move by 10-30% between runs. Fewer denoising steps than the 50 a user would run are fine: the cost is
per step and per frame. With `--cache-intervals`, the sampling phase per frame at each feature-reuse interval
(`cache_interval`), backends and intervals interleaved, beside the FLOP share of a shallow pass.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import save_plot, summarize, time_alternating, write_result
from server.engines import LoadedModel, add_torch_engine_arguments, load_model
from server.generate import GenerationOptions, Generator, InversionCache
from tuner.artefacts import TunedModel

PROMPT = "a blue circle is moving right on a black background"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="tuned model directory (default: tune the tiny model on a clip)")
    p.add_argument("--backends", default="torch,onnxruntime", help="comma-separated")
    add_torch_engine_arguments(p)
    p.add_argument("--lengths", default="8,16,32", help="comma-separated frame counts; empty to skip")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per generation")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--unet-repeats", type=int, default=10)
    p.add_argument("--no-grpc", action="store_true", help="skip the comparison through tav-serve on loopback")
    p.add_argument("--grpc-backends", help="backends compared through tav-serve (default: all of --backends)")
    p.add_argument("--cache-intervals", default="", help="comma-separated feature-reuse intervals to time the "
                   "sampling phase at (8 frames, --steps, --guidance), e.g. 1,2,3,5; empty to skip")


def default_model(workdir: Path) -> Path:
    """The tiny model tuned briefly on a 64-frame shapes-world clip, exported (so every backend can load it)."""
    from exporter.cli import export
    from tuner.shapes.world import make_clip
    from tuner.tiny import make_tiny
    from tuner.tune import TuneSettings, tune
    from tuner.video_io import write_video

    frames, caption, _ = make_clip("red", "circle", "white", "right", frames=64, seed=0)
    clip = workdir / "clip.mp4"
    write_video(clip, frames, fps=8)
    base = make_tiny(workdir / "tiny")
    run = tune(base, clip, caption, workdir / "repo" / "circle", TuneSettings(width=32, height=32, steps=20),
               progress=False)
    export(run, progress=lambda message: None)
    return run


def load_models(model_dir: str | Path, backends: list[str], compile_mode: str | None) -> dict[str, LoadedModel]:
    """The model on each backend; with `compile_mode`, also on the torch engine with its UNet compiled
    (`torch-compiled`), measured beside eager torch."""
    models = {backend: load_model(model_dir, backend) for backend in backends}
    if compile_mode:
        models["torch-compiled"] = load_model(model_dir, "torch", compile_mode=compile_mode)
    return models


def unet_calls(models: dict, repeats: int) -> dict:
    """ms per UNet call at batch 1 and 2, backends interleaved."""
    variants = {}
    for backend, model in models.items():
        engines = model.engines
        for batch in engines.batches:
            sample = torch.randn(engines.unet_input_shape(batch), device=engines.device)
            text = torch.randn(batch, *engines.text_shape, device=engines.device)
            t = torch.tensor([500.0], device=engines.device)
            variants[f"{backend}/batch{batch}"] = (lambda e=engines, s=sample, x=text, tt=t: e.unet(s, tt, x))
    return time_alternating(variants, repeats, warmup=2)


def generations(models: dict, lengths: list[int], args: argparse.Namespace) -> dict:
    """Per length and backend: end-to-end ms per frame, and the per-phase split (medians)."""
    results = {}
    for length in lengths:
        options = GenerationOptions(PROMPT, frames=length,
                                    steps=args.steps, guidance=args.guidance, seed=0)
        timings: dict[str, list[dict]] = {backend: [] for backend in models}
        for repeat in range(args.repeats + 1):  # the first round is warm-up
            for backend, model in models.items():
                generator = Generator(model, InversionCache(max_bytes=0))  # measure inversion every time
                result = generator.generate(options)
                if repeat:
                    timings[backend].append(result.timings)
        for backend, runs in timings.items():
            per_frame = summarize([r["total"] / length for r in runs])
            phases = {phase: summarize([r[phase] for r in runs])["median_ms"] for phase in runs[0]}
            results[f"{backend}/{length}"] = {"backend": backend, "frames": length, "ms_per_frame": per_frame,
                                              "phase_median_ms": phases}
    return results


def branch_calls(models: dict, repeats: int) -> dict:
    """ms per UNet call at batch 2 of the two passes of feature reuse: the full one that keeps the branch, and
    the shallow one from it, backends and passes interleaved."""
    variants = {}
    for backend, model in models.items():
        engines = model.engines
        sample = torch.randn(engines.unet_input_shape(2), device=engines.device)
        text = torch.randn(2, *engines.text_shape, device=engines.device)
        t = torch.tensor([500.0], device=engines.device)
        _, branch = engines.unet(sample, t, text, return_branch=True)
        variants[f"{backend}/full"] = lambda e=engines, s=sample, x=text, tt=t: e.unet(s, tt, x)
        variants[f"{backend}/shallow"] = lambda e=engines, s=sample, x=text, tt=t, b=branch: e.unet(s, tt, x, branch=b)
    timings = time_alternating(variants, repeats, warmup=2)
    for backend in models:
        timings[f"{backend}/shallow_share"] = (timings[f"{backend}/shallow"]["median_ms"]
                                               / timings[f"{backend}/full"]["median_ms"])
    return timings


def cache_intervals(models: dict, intervals: list[int], args: argparse.Namespace) -> dict:
    """Per backend and interval: the sampling phase's ms per frame (8 frames, from the inversion, which each
    generator inverts once, in its warm-up round), and its speed-up over interval 1 (medians)."""
    generators = {backend: Generator(model) for backend, model in models.items()}
    seconds: dict[str, list[float]] = {f"{b}/{n}": [] for b in models for n in intervals}
    for repeat in range(args.repeats + 1):  # the first round is warm-up
        for backend, generator in generators.items():
            for interval in intervals:
                options = GenerationOptions(PROMPT, steps=args.steps, guidance=args.guidance, seed=0,
                                            cache_interval=interval)
                result = generator.generate(options)
                if repeat:
                    seconds[f"{backend}/{interval}"].append(result.timings["sample"] / 8)
    results = {}
    for name, values in seconds.items():
        backend, interval = name.split("/")
        base = summarize(seconds[f"{backend}/{intervals[0]}"])["median_ms"]
        timing = summarize(values)
        results[name] = {"backend": backend, "cache_interval": int(interval), "sample_ms_per_frame": timing,
                         "speedup_vs_first": base / timing["median_ms"]}
    return results


def through_grpc(model_dir: Path, model: LoadedModel, backend: str, lengths: list[int],
                 args: argparse.Namespace) -> dict:
    """ms per frame through tav-serve on loopback against the Python API, alternating, per length; the ratio
    is the server's overhead (queueing, progress streaming, encoding the video, transport)."""
    from clients import Client
    from server.serve import BackgroundServer, ServerConfig

    server = BackgroundServer(ServerConfig(repo=model_dir.parent, port=0, backend=backend))
    try:
        server.wait_ready()
        client = Client(server.target)
        results = {}
        for length in lengths:
            options = dict(frames=length, steps=args.steps, guidance=args.guidance, seed=0)
            api = Generator(model)
            seconds: dict[str, list[float]] = {"api": [], "grpc": []}
            for repeat in range(args.repeats + 1):
                for via in ("api", "grpc"):
                    started = time.perf_counter()
                    if via == "api":
                        api.generate(GenerationOptions(PROMPT, **options))
                    else:
                        client.generate(model_dir.name, PROMPT, format="mp4", **options)
                    if repeat:
                        seconds[via].append((time.perf_counter() - started) / length)
            api_ms, grpc_ms = summarize(seconds["api"]), summarize(seconds["grpc"])
            results[f"{backend}/{length}"] = {"api_ms_per_frame": api_ms, "grpc_ms_per_frame": grpc_ms,
                                              "grpc_over_api": grpc_ms["median_ms"] / api_ms["median_ms"]}
        client.close()
    finally:
        server.stop()
    return results


def run(args: argparse.Namespace) -> dict:
    backends = args.backends.split(",")
    lengths = [int(n) for n in args.lengths.split(",") if n.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or default_model(Path(tmp))
        models = load_models(model_dir, backends, args.compile)
        backends = list(models)
        first = next(iter(models.values()))
        engines = first.engines
        base = TunedModel.open(model_dir).base_path  # info["base_model"] is the base's id for a shipped base
        unet_config = json.loads((base / "unet" / "config.json").read_text())
        result = {
            "study": "latency",
            "torch_compile_mode": args.compile,
            "model": str(args.model or "tiny model tuned on a shapes-world clip (tav-bench default)"),
            "latent_shape": list(engines.latent_shape),
            "unet_config": {k: v for k, v in unet_config.items() if not k.startswith("_")},
            "steps": args.steps,
            "guidance": args.guidance,
            "unet_ms": unet_calls(models, args.unet_repeats),
            "generation": generations(models, lengths, args),
        }
        intervals = [int(n) for n in args.cache_intervals.split(",") if n.strip()]
        if intervals:
            from benchmarks.floor import shallow_share

            result["cache_interval_unet_ms"] = branch_calls(models, args.unet_repeats)
            result["cache_interval"] = cache_intervals(models, intervals, args)
            result["shallow_flop_share"] = shallow_share(result["unet_config"], engines.latent_shape[1])
        if not args.no_grpc:
            # both sides keep their inversion cache: after the warm-up round neither inverts again, so the
            # ratio compares sampling, decoding and, for gRPC, queueing, streaming, encoding and transport
            result["grpc"] = {}
            for backend in (args.grpc_backends or args.backends).split(","):
                result["grpc"] |= through_grpc(Path(model_dir), models[backend], backend, lengths, args)
    write_result(args.out, "latency", result)

    def per_frame(ax):
        for backend in backends:
            rows = [result["generation"][f"{backend}/{n}"]["ms_per_frame"]["median_ms"] for n in lengths]
            ax.plot(lengths, rows, marker="o", label=backend)
        ax.set_xlabel("frames generated")
        ax.set_ylabel(f"ms per frame ({args.steps} steps, guidance {args.guidance:g})")
        ax.set_ylim(bottom=0)
        ax.legend()

    def phases(ax):
        names = [k for k in result["generation"][f"{backends[0]}/{lengths[0]}"]["phase_median_ms"] if k != "total"]
        labels = [f"{b}/{n}" for b in backends for n in lengths]
        bottom = [0.0] * len(labels)
        for phase in names:
            heights = [result["generation"][label]["phase_median_ms"][phase] / int(label.split("/")[1])
                       for label in labels]
            ax.bar(labels, heights, bottom=bottom, label=phase)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.set_ylabel("ms per frame, by phase")
        ax.tick_params(axis="x", rotation=45)
        ax.legend()

    if lengths:
        save_plot(args.out / "latency_per_frame.png", per_frame)
        save_plot(args.out / "latency_phases.png", phases)
    if "cache_interval" in result:
        def by_interval(ax):
            rows = result["cache_interval"]
            for backend in backends:
                chosen = [r for r in rows.values() if r["backend"] == backend]
                ax.plot([r["cache_interval"] for r in chosen], [r["sample_ms_per_frame"]["median_ms"] for r in chosen],
                        marker="o", label=backend)
            ax.set_xlabel("cache_interval (full UNet every N-th sampling step)")
            ax.set_ylabel(f"sampling ms per frame ({args.steps} steps, guidance {args.guidance:g})")
            ax.set_ylim(bottom=0)
            ax.legend()

        save_plot(args.out / "latency_cache_interval.png", by_interval)
    return result
