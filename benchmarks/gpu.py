"""`tav-bench gpu`: the GPU figures in one command, each step in its own process under its own timeout.

Meant for an H100/H200 (about 5 minutes of measuring there; compilation is reported apart and cached in `--cache`,
so a second run skips it), and for machines that have torch, transformers and huggingface_hub but neither
diffusers, jsonschema nor PyAV installed (benchmarks/README.md says which wheels to bring). Nothing is downloaded.

- env: the machine, and the dense matmul rate (bf16, fp16) measured in the same run;
- base: a random Stable Diffusion 1.4-layout base built from configs on the machine and a 24-frame shapes-world
  clip as PNG frames (read without PyAV), both cached;
- tune: seconds per one-shot tuning step (the tuner's own loop) by precision, with peak memory; then the model the
  later steps serve, tuned a few steps at the tuner's default precision;
- export: `tav-export --aoti` (compile seconds per package), TensorRT plans where `tensorrt` imports, fp16 ONNX
  graphs where onnxruntime has its CUDA provider;
- probe: only when the packages failed their check in the export (a crash, or no end within `CHECK_SECONDS`): the
  check again; if it hangs, the native stacks of its threads from cuda-gdb or gdb; if it crashes, the check under
  CUDA_LAUNCH_BLOCKING=1 and under `compute-sanitizer` where installed, to name the cause (issue 16's open
  question: on an H200, loading a package did not return);
- unet: ms per video UNet call at batch 1 and 2 for each backend present and for the CUDA options of the torch
  engine (dtype, SDPA backend, channels-last, CUDA graphs), with achieved TFLOP/s against the matmul rate; and
  the VAE decoding 8 frames one by one (as the loop does) against one batched call;
- e2e: end-to-end ms per generated frame at 8 and 24 frames (50 steps), with the inversion computed and cached,
  and at 32 and 64 frames (10 steps) for flatness; per-phase times and peak memory, per backend.

A step that fails, crashes or runs out of time is recorded as such (status, exit signal, last output) and the
others go on; `gpu.json` is written again after every step. `--budget SECONDS` bounds the whole run (a device
lease): each step's timeout becomes the smaller of its own and what is left, and the steps past it are skipped.
Defaults are not changed by this study: it measures the options so that a change can be.
`--smoke` runs the same plumbing on the tiny model (on the CPU where there is no GPU) in about a minute.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from benchmarks.common import machine, save_plot, write_result

STEPS = ("env", "base", "tune", "export", "probe", "unet", "e2e")
TIMEOUTS = {"env": 180, "base": 300, "tune": 480, "export": 1500, "probe": 900, "unet": 600, "e2e": 900}
CHECK_SECONDS = 120  # the export's check of the packages: loading and running them takes seconds when it works
HANG_SECONDS = 60  # the probe's rerun of that check, before a debugger takes the stacks of a hung one
PROMPT = "a blue circle is moving right on a black background"
CAPTION = "a red circle is moving right on a white background"
# Stable Diffusion 1.4's VAE and CLIP ViT-L/14 text encoder (the UNet's is benchmarks.params.SD14_UNET_CONFIG).
SD14_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                       block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4)
SD14_TEXT_CONFIG = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        projection_dim=768, hidden_act="quick_gelu")
# How much of everything: a full run, and the smoke run that exercises the same code on the tiny model.
FULL = dict(tune_steps=12, unet_repeats=20, lengths=((8, 50), (24, 50), (32, 10), (64, 10)), clip_frames=24,
            matmul_size=8192)
SMOKE = dict(tune_steps=2, unet_repeats=2, lengths=((8, 1), (16, 1)), clip_frames=16, matmul_size=1024)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", type=Path, default=Path("runs/gpu-cache"),
                   help="base model, clip, tuned model and compiled packages, reused by later runs")
    p.add_argument("--smoke", action="store_true", help="the tiny model and a few steps: checks the plumbing")
    p.add_argument("--device", help="cuda (default where present) or cpu")
    p.add_argument("--backends", default="torch,aoti,tensorrt,onnxruntime",
                   help="those that cannot run here are skipped, saying why")
    p.add_argument("--aoti-precision", default="fp16", choices=["fp16", "bf16"], help="of the CUDA packages")
    p.add_argument("--only", help="comma-separated steps to run (default: all)")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="wall clock for the whole run: each step's timeout becomes the smaller of its own and what "
                        "is left, and a step with nothing left is skipped (default: no budget)")
    p.add_argument("--timeout", action="append", default=[], metavar="STEP=SECONDS",
                   help="override a step's timeout (default: " + ", ".join(f"{k} {v}" for k, v in TIMEOUTS.items())
                   + " seconds)")


class Setup:
    """What every step reads: the device, the sizes of this run and the paths in the cache."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device == "cuda"
        self.sizes = SMOKE if args.smoke else FULL
        self.backends = args.backends.split(",")
        self.cache = Path(args.cache).resolve()
        self.base = self.cache / ("tiny-base" if args.smoke else "sd14-base")
        self.clip = self.cache / f"clip{self.sizes['clip_frames']}"
        self.repo = self.cache / ("repo-smoke" if args.smoke else "repo")
        self.run = self.repo / "circle"
        self.aoti_precision = args.aoti_precision if self.cuda else "fp32"
        self.step = getattr(args, "step", None)

    def save(self, figures: dict) -> dict:
        """Write this step's figures so far (a step that dies later still leaves them), and return them."""
        path = self.args.out / "steps" / f"{self.step}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=2, default=str) + "\n")
        return figures


# The orchestrator: one child process per step.


def run(args: argparse.Namespace) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    timeouts = {**TIMEOUTS, **{k: float(v) for k, v in (t.split("=", 1) for t in args.timeout)}}
    only = set(args.only.split(",")) if args.only else set(STEPS)
    deadline = time.monotonic() + args.budget if args.budget else math.inf
    steps: dict[str, dict] = {}
    for name in (name for name in STEPS if name in only):
        left = deadline - time.monotonic()
        if left <= 0:
            steps[name] = {"status": "skipped (the --budget was spent)"}
        else:
            steps[name] = _spawn(name, args, min(timeouts[name], left))
        write_result(args.out, "gpu", assemble(steps, Setup(args)))  # a run cut short keeps what it measured
    result = assemble(steps, Setup(args))
    write_result(args.out, "gpu", result)
    plot(result, args.out)
    return result


def _spawn(name: str, args: argparse.Namespace, timeout: float) -> dict:
    """Run one step in a child process (its own process group, killed whole on timeout); its JSON or its failure."""
    from exporter.aoti_check import describe_exit

    out = args.out / "steps" / f"{name}.json"
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "benchmarks.gpu", "--step", name, "--out", str(args.out),
               "--cache", str(args.cache), "--backends", args.backends, "--aoti-precision", args.aoti_precision,
               *(["--device", args.device] if args.device else []), *(["--smoke"] if args.smoke else [])]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
           "TORCHINDUCTOR_CACHE_DIR": str(Path(args.cache).resolve() / "inductor")}
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             start_new_session=True)
    try:
        output, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        output, _ = child.communicate()
        return {"status": "timeout", "timeout_seconds": timeout, "seconds": round(time.perf_counter() - started, 1),
                "output_tail": _tail(output)}
    seconds = round(time.perf_counter() - started, 1)
    print(f"tav-bench gpu: {name} ended with {describe_exit(child.returncode)} after {seconds} s", file=sys.stderr)
    figures = json.loads(out.read_text()) if out.is_file() else {}
    if child.returncode != 0:  # with the figures it saved before it ended, if any
        return {**figures, "status": f"failed ({describe_exit(child.returncode)})", "seconds": seconds,
                "output_tail": _tail(output)}
    return {**figures, "status": "ok", "seconds": seconds}


def _tail(text: str | None, lines: int = 25) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])


# The steps, each run in its own child process by `python -m benchmarks.gpu --step NAME`.


def step_env(setup: Setup) -> dict:
    """The machine, what can run here, and the dense matmul rate measured now."""
    from tuner.aoti_support import require_aoti

    info = {"machine": machine(), "device": setup.device, "torch_cuda": torch.version.cuda,
            "compute_sanitizer": _compute_sanitizer(), "backends": {}}
    try:
        require_aoti(setup.device)
        info["backends"]["aoti"] = "supported"
    except RuntimeError as e:
        info["backends"]["aoti"] = str(e)
    info["backends"]["tensorrt"] = _tensorrt_status()
    info["backends"]["onnxruntime"] = _onnxruntime_status(setup)
    size = setup.sizes["matmul_size"]
    if setup.cuda:
        info["gpu"] = {"name": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
                       "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30}
        info["matmul_tflops"] = {name: _cuda_matmul_tflops(dtype, size)
                                 for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16))}
    else:
        from benchmarks.floor import matmul_rate

        info["matmul_tflops"] = {"fp32": matmul_rate(size) / 1e12}
    return info


def step_base(setup: Setup) -> dict:
    """The base model and the source clip, built here unless the cache has them."""
    from tuner.shapes.world import make_clip
    from tuner.tiny import make_tiny

    reused = setup.base.is_dir()
    if not reused and setup.args.smoke:
        make_tiny(setup.base)
    elif not reused:
        make_sd14_base(setup.base, setup.device)
    if not setup.clip.is_dir():
        frames, _, _ = make_clip("red", "circle", "white", "right", frames=setup.sizes["clip_frames"], seed=0)
        write_frames(setup.clip, frames)
    parameters = {}
    for part in ("unet", "vae", "text_encoder"):
        (weights,) = (setup.base / part).glob("*.safetensors")
        with safe_open(weights, "pt") as f:
            names = f.keys()
            parameters[part] = sum(math.prod(f.get_slice(k).get_shape()) for k in names)
    return {"base": str(setup.base), "reused": reused, "parameters": parameters,
            "note": "random weights; the text encoder's vocabulary is the tiny byte tokenizer's (CLIP-L's is 49408), "
                    "which changes its parameter count, not the cost of a call"}


def step_tune(setup: Setup) -> dict:
    """Seconds per tuning step by precision (the tuner's own loop), then the tuned model the other steps serve."""
    from tuner.tune import TuneSettings, is_tuned, tune

    variants = {"fp32": ("no", False)} if not setup.cuda else {
        "fp32": ("no", False), "fp16": ("fp16", False), "bf16": ("bf16", False),
        "bf16, gradient checkpointing": ("bf16", True)}
    if setup.args.smoke and setup.cuda:
        variants = {"bf16": ("bf16", False)}
    rows = {}
    for i, (label, (precision, checkpointing)) in enumerate(variants.items()):
        settings = TuneSettings(steps=setup.sizes["tune_steps"], mixed_precision=precision,
                                gradient_checkpointing=checkpointing)
        _reset_peak(setup)
        out = tune(setup.base, setup.clip, CAPTION, setup.cache / "tune" / str(i), settings, overwrite=True,
                   device=setup.device, progress=False)
        config = json.loads((out / "tav_config.json").read_text())
        step = config["step_seconds_median"]
        rows[label] = {"seconds_per_step": step, "seconds_for_500_steps": 500 * step, "peak_gib": _peak_gib(setup),
                       "size": [config["height"], config["width"]], "frames": config["frames"]}
        shutil.rmtree(out)
        _free(setup)
    settings = TuneSettings(steps=setup.sizes["tune_steps"])
    reused = is_tuned(setup.run, setup.base, CAPTION, settings)
    if not reused:
        tune(setup.base, setup.clip, CAPTION, setup.run, settings, overwrite=True, device=setup.device, progress=False)
    served = json.loads((setup.run / "tav_config.json").read_text())
    return {"precisions": rows, "served_model": {"path": str(setup.run), "reused": reused,
                                                 "mixed_precision": served["mixed_precision"]}}


def step_export(setup: Setup) -> dict:
    """AOTInductor packages (compile time apart; reused from the cache), and TensorRT / ONNX where they can run."""
    from exporter.cli import export
    from exporter.onnx_export import ExportError

    results = {}
    if "aoti" in setup.backends:
        messages: list[str] = []
        started = time.perf_counter()
        try:
            export(setup.run, aoti=True, device=setup.device, precision=setup.aoti_precision,
                   progress=messages.append, aoti_check_timeout=CHECK_SECONDS)
        except (ExportError, RuntimeError) as e:
            results["aoti"] = {"status": "failed", "error": str(e), "seconds": time.perf_counter() - started}
        else:
            record = _manifest(setup.run)["aoti"][setup.device]
            results["aoti"] = {
                "status": "ok", "reused": any(m.startswith("reusing") for m in messages),
                "precision": record["precision"], "compile_target": record["compile_target"],
                "export_seconds": {n: p["export_seconds"] for n, p in record["packages"].items()},
                "compile_seconds": {n: p["compile_seconds"] for n, p in record["packages"].items()},
                "check_seconds": record["check_seconds"], "build_seconds": record["build_seconds"],
                "checks": record["checks"], "seconds": time.perf_counter() - started}
    trt, ort = _tensorrt_status(), _onnxruntime_status(setup)
    if "tensorrt" in setup.backends and trt == "available":
        results["tensorrt"] = _export_status(lambda: export(setup.run, precision="fp16", tensorrt=True))
    elif "onnxruntime" in setup.backends and ort == "available":
        results["onnxruntime"] = _export_status(lambda: export(setup.run, precision="fp16"))
    results["skipped"] = {"tensorrt": trt, "onnxruntime": ort}
    return results


def step_probe(setup: Setup) -> dict:
    """Where the packages failed their check in the export: the check again, and what names the cause. A check
    that hangs (loading a package on an H200 did not return) gets the native stacks of all its threads from a
    debugger attached to it, and runs again once per lead on what it waits for (`exporter.aoti_check --before`); one
    that crashes runs again with CUDA launches blocking (the faulting kernel is then
    the last phase announced) and under compute-sanitizer's memcheck."""
    failed = sorted((setup.repo / ".engines").glob("*.failed"), key=lambda p: p.stat().st_mtime)
    if not failed:
        return {"needed": False}
    from exporter.aoti_check import LEADS

    check = [sys.executable, "-m", "exporter.aoti_check", str(failed[-1])]
    results = {"needed": True, "directory": str(failed[-1]), "check": watch_check(check, HANG_SECONDS)}
    setup.save(results)
    if results["check"]["exit"].startswith("hung"):
        for lead in LEADS:  # each lead in its own process, with its own timeout and stacks
            results[f"before {lead}"] = watch_check([*check, "--before", lead], HANG_SECONDS)
            setup.save(results)
        return results
    runs = {"launch_blocking": (check, {"CUDA_LAUNCH_BLOCKING": "1"})}
    sanitizer = _compute_sanitizer()
    if sanitizer:
        runs["compute_sanitizer"] = ([sanitizer, "--tool", "memcheck", "--print-limit", "20", *check], {})
    for name, (command, extra) in runs.items():
        results[name] = watch_check(command, 300, extra)
        setup.save(results)
    return results


def watch_check(command: list[str], hang_seconds: float, extra_env: dict | None = None) -> dict:
    """Run an `exporter.aoti_check` command; its exit and last phase, or, if it has not ended within
    `hang_seconds`, the native stack of each of its threads (cuda-gdb or gdb, attached in batch mode) before it is
    killed."""
    from exporter.aoti_check import describe_exit, last_phase

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, env={**os.environ, **(extra_env or {})})
        try:
            child.wait(timeout=hang_seconds)
            stacks = None
        except subprocess.TimeoutExpired:
            stacks = _native_stacks(child.pid)
            child.kill()
            child.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    result = {"exit": describe_exit(child.returncode) if stacks is None else f"hung (killed after {hang_seconds:g} s)",
              "phase": last_phase(stderr), "output_tail": _tail(stdout + stderr, 40)}
    if stacks is not None:
        result["native_stacks"] = stacks
    return result


def _native_stacks(pid: int) -> str:
    debugger = _cuda_tool("cuda-gdb") or shutil.which("gdb")
    if debugger is None:
        return "no debugger (cuda-gdb or gdb) on this machine"
    try:
        child = subprocess.run([debugger, "-p", str(pid), "-batch", "-ex", "thread apply all bt"],
                               capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return f"{debugger} did not finish within 120 s"
    return _tail(child.stdout + child.stderr, 200)


def step_unet(setup: Setup) -> dict:
    """ms per video UNet call at batch 1 and 2: each backend present, and the CUDA options of the torch engine."""
    from benchmarks.common import time_alternating
    from benchmarks.floor import unet_flops
    from server.engines import load_model
    from server.registry import read_entry

    eager = load_model(setup.run, "torch", setup.device, cuda_graphs=False)
    engines = eager.engines
    calls = {f"torch eager {_dtype_name(engines.dtype)}": engines.unet}
    errors = {}
    if setup.cuda:
        calls.update(_cuda_options(setup, eager))
        errors.update(_graphs_against_eager(setup, eager, calls))
    for backend in [b for b in setup.backends if b != "torch" and b in read_entry(setup.run, "torch").backends]:
        try:
            calls[backend] = load_model(setup.run, backend, setup.device).engines.unet
        except Exception as e:  # one backend that cannot load must not cost the others' figures
            errors[backend] = f"{type(e).__name__}: {e}"
    variants, inputs = {}, {}
    generator = torch.Generator().manual_seed(0)
    for batch in engines.batches:
        sample = torch.randn(engines.unet_input_shape(batch), generator=generator).to(setup.device)
        text = torch.randn(batch, *engines.text_shape, generator=generator).to(setup.device)
        inputs[batch] = (sample, torch.tensor([500.0], device=setup.device), text)
        for name, call in calls.items():
            try:
                call(*inputs[batch])  # a variant that cannot run at all is reported, not timed
            except Exception as e:
                errors[name] = f"{type(e).__name__}: {e}"
                continue
            variants[f"{name}/batch{batch}"] = _synchronized(setup, call, inputs[batch])
    timings = time_alternating(variants, setup.sizes["unet_repeats"], warmup=3)
    config = json.loads((setup.base / "unet" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    flops = {batch: unet_flops(config, batch, engines.frames, engines.latent_shape[1]) for batch in engines.batches}
    rows = {}
    for key, timing in timings.items():
        name, batch = key.rsplit("/batch", 1)
        seconds = timing["median_ms"] / 1000
        rows.setdefault(name, {})[f"batch{batch}"] = {**timing, "tflops": flops[int(batch)] / seconds / 1e12}
    return {"latent_shape": list(engines.latent_shape), "frames": engines.frames,
            "tflop_per_call": {f"batch{b}": f / 1e12 for b, f in flops.items()}, "variants": rows, "errors": errors,
            "vae_decode_8_frames": _decode_timings(setup, eager)}


def step_e2e(setup: Setup) -> dict:
    """End-to-end ms per generated frame by length, with the inversion computed and then cached, per backend."""
    from server.engines import load_model
    from server.generate import GenerationOptions, Generator, InversionCache
    from server.registry import read_entry

    rows, errors = {}, {}
    torch_unet = "eager, the engine's CUDA graphs" if setup.cuda else "eager"  # the torch engine's defaults
    for backend in [b for b in setup.backends if b in read_entry(setup.run, "torch").backends]:
        try:
            model = load_model(setup.run, backend, setup.device)
        except Exception as e:
            errors[backend] = f"{type(e).__name__}: {e}"
            continue
        Generator(model).generate(GenerationOptions(PROMPT, steps=2, guidance=12.5, seed=0))  # warm-up
        for frames, steps in setup.sizes["lengths"]:
            cache = InversionCache()
            options = GenerationOptions(PROMPT, frames=frames, steps=steps, guidance=12.5, seed=0)
            for label in ("inversion", "cached inversion"):
                _reset_peak(setup)
                result = Generator(model, cache).generate(options)
                rows[f"{backend}/{frames}/{label}"] = {
                    "backend": backend, "frames": frames, "steps": steps, "inversion": label,
                    "ms_per_frame": 1000 * result.timings["total"] / frames,
                    "phase_ms": {k: 1000 * v for k, v in result.timings.items()}, "peak_gib": _peak_gib(setup)}
        setup.save({"guidance": 12.5, "rows": rows, "errors": errors, "torch_unet": torch_unet})  # kept if a later
        del model  # backend crashes
        _free(setup)
    return {"guidance": 12.5, "rows": rows, "errors": errors, "torch_unet": torch_unet}


# Assembling the steps' figures into the study's result and plots.


def assemble(steps: dict, setup: Setup) -> dict:
    """The study's JSON: every step's status and figures, the UNet's fraction of the matmul rate, and the issue's
    goals against what was measured (a goal whose figure is missing is left out)."""
    result = {"study": "gpu", "smoke": setup.args.smoke, "device": setup.device,
              "steps": {n: {k: s[k] for k in ("status", "seconds", "timeout_seconds", "output_tail") if k in s}
                        for n, s in steps.items()}}
    for name, step in steps.items():
        if step["status"] == "ok":
            result[name] = {k: v for k, v in step.items() if k not in ("status", "seconds")}
    rate = max(result.get("env", {}).get("matmul_tflops", {}).values(), default=None)
    for timings in result.get("unet", {}).get("variants", {}).values():
        for timing in timings.values():
            timing["fraction_of_matmul_rate"] = timing["tflops"] / rate if rate else None
    result["goals"] = goals(result)
    if setup.args.smoke:
        result["goals_note"] = "the goals are for SD 1.4 at 512x512 on an H100/H200: a smoke run checks plumbing"
    return result


def goals(result: dict) -> dict:
    """Issue 16's goals (H100/H200, SD 1.4, 512x512, 8 frames, 50 steps, guidance 12.5) against the figures."""
    found = {}
    rows = result.get("e2e", {}).get("rows", {})
    for backend in {r["backend"] for r in rows.values()}:
        def per_frame(frames: int, label: str, b: str = backend) -> float | None:
            row = rows.get(f"{b}/{frames}/{label}")
            return row["ms_per_frame"] if row else None

        with_inversion, cached = per_frame(8, "inversion"), per_frame(8, "cached inversion")
        found[backend] = {"8 frames with inversion <= 400 ms/frame": _verdict(with_inversion, 400),
                          "8 frames, inversion cached <= 250 ms/frame": _verdict(cached, 250)}
        at32, at64 = per_frame(32, "cached inversion"), per_frame(64, "cached inversion")
        if at32 and at64:
            found[backend]["32 to 64 frames flat within 10%"] = {"value": at64 / at32 - 1, "met": abs(at64 / at32 - 1)
                                                                 <= 0.10}
    for name, timings in result.get("unet", {}).get("variants", {}).items():
        found.setdefault(f"unet: {name}", {}).update({
            "batch 2 <= 36 ms": _verdict(timings.get("batch2", {}).get("median_ms"), 36),
            "batch 1 <= 22 ms": _verdict(timings.get("batch1", {}).get("median_ms"), 22)})
    for label, row in result.get("tune", {}).get("precisions", {}).items():
        found[f"tuning, {label}"] = {"500 steps <= 60 s": _verdict(row["seconds_for_500_steps"], 60)}
    return found


def _verdict(value: float | None, limit: float) -> dict:
    return {"value": value, "met": value is not None and value <= limit}


def plot(result: dict, out: Path) -> None:
    """gpu_unet.png (ms per call by variant), gpu_e2e.png (ms per frame by length), gpu_tune.png (s per step)."""
    title = f"{result['device']}: {(result.get('env', {}).get('gpu') or {}).get('name', 'no GPU')}"

    def unet(ax):
        variants = result.get("unet", {}).get("variants", {})
        names = list(variants)
        for i, batch in enumerate(("batch1", "batch2")):
            ax.barh([y + 0.4 * i for y in range(len(names))],
                    [variants[n].get(batch, {}).get("median_ms", 0) for n in names], 0.4, label=batch)
        ax.set_yticks([y + 0.2 for y in range(len(names))], names, fontsize=6)
        ax.set_xlabel("ms per video UNet call (median)")
        ax.set_title(title, fontsize=8)
        ax.legend(fontsize=7)

    def e2e(ax):
        rows = result.get("e2e", {}).get("rows", {}).values()
        for backend in sorted({r["backend"] for r in rows}):
            for label, style in (("inversion", "-"), ("cached inversion", "--")):
                points = sorted((r["frames"], r["ms_per_frame"]) for r in rows
                                if r["backend"] == backend and r["inversion"] == label)
                if points:
                    ax.plot(*zip(*points, strict=True), style, marker="o", label=f"{backend}, {label}")
        ax.set_xlabel("frames generated (50 steps to 24 frames, 10 beyond)")
        ax.set_ylabel("ms per generated frame")
        ax.set_title(title, fontsize=8)
        ax.legend(fontsize=6)

    def tuning(ax):
        rows = result.get("tune", {}).get("precisions", {})
        ax.bar(list(rows), [r["seconds_per_step"] * 1000 for r in rows.values()])
        ax.set_ylabel("ms per tuning step (median)")
        ax.tick_params(axis="x", labelsize=6)
        ax.set_title(title, fontsize=8)

    for name, draw in (("gpu_unet", unet), ("gpu_e2e", e2e), ("gpu_tune", tuning)):
        save_plot(out / f"{name}.png", draw)


# Helpers.


def make_sd14_base(out: Path, device: str) -> Path:
    """A random-weight Stable Diffusion 1.4-layout model directory (fp16 weights), built on `device`."""
    import diffusers
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from benchmarks.params import SD14_UNET_CONFIG
    from tuner import tiny
    from tuner.io_utils import atomic_directory

    torch.manual_seed(0)
    with atomic_directory(out) as tmp, torch.device(device):
        UNet2DConditionModel(**SD14_UNET_CONFIG).half().save_pretrained(tmp / "unet")
        AutoencoderKL(**SD14_VAE_CONFIG).half().save_pretrained(tmp / "vae")
        tokenizer = tiny._byte_tokenizer(tmp / "tokenizer")
        CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), max_position_embeddings=tiny.MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SD14_TEXT_CONFIG,
        )).half().save_pretrained(tmp / "text_encoder")
        DDIMScheduler(**tiny.SCHEDULER_CONFIG).save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps({**tiny._model_index(),
                                                          "_diffusers_version": diffusers.__version__}) + "\n")
    return out


def write_frames(folder: Path, frames) -> None:
    """A clip as numbered PNG files (the tuner reads an image folder without PyAV)."""
    from PIL import Image

    from tuner.io_utils import atomic_directory

    with atomic_directory(folder) as tmp:
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(tmp / f"{i:04d}.png")


def _cuda_options(setup: Setup, eager) -> dict:
    """The torch engine's CUDA options, each a UNet call: bf16, each SDPA backend, channels-last, CUDA graphs."""
    from torch.nn.attention import SDPBackend

    from server.engines import load_model
    from server.engines.base import TunedTensors
    from server.engines.torch_engine import TorchEngines, shared_base
    from tuner.artefacts import TunedModel

    engines = eager.engines
    model = TunedModel.open(setup.run)
    bf16 = TorchEngines(shared_base(model, engines.device, torch.bfloat16),
                        TunedTensors.of_model(model, engines.device, torch.bfloat16),
                        model.latent_size, engines.device, torch.bfloat16)
    options = {"torch eager bf16": bf16.unet}
    dtype = _dtype_name(engines.dtype)
    for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        options[f"torch {dtype}, sdpa {backend.lower()}"] = _with_sdpa(engines.unet, getattr(SDPBackend, backend))
    unet = engines.components.unet
    engines.base.activate(engines, engines.adapter)
    channels_last = copy.deepcopy(unet).to(memory_format=torch.channels_last)

    def channels_last_call(sample, t, text):
        with torch.inference_mode():
            return channels_last(sample.to(engines.dtype), t, text.to(engines.dtype)).float()

    options[f"torch {dtype}, channels-last"] = channels_last_call
    options[f"torch {dtype}, the engine's CUDA graphs"] = load_model(setup.run, "torch", setup.device).engines.unet
    return options


def _graphs_against_eager(setup: Setup, eager, calls: dict) -> dict:
    """The engine's CUDA graphs must replay eager's output (fp16: within 1e-2, relative): an error per batch where
    they do not (the variant is then not timed)."""
    dtype = _dtype_name(eager.engines.dtype)
    name = f"torch {dtype}, the engine's CUDA graphs"
    errors = {}
    generator = torch.Generator().manual_seed(1)
    for batch in eager.engines.batches:
        sample = torch.randn(eager.engines.unet_input_shape(batch), generator=generator).to(setup.device)
        text = torch.randn(batch, *eager.engines.text_shape, generator=generator).to(setup.device)
        t = torch.tensor([500.0], device=setup.device)
        want, got = eager.engines.unet(sample, t, text), calls[name](sample, t, text)
        error = float((got - want).norm() / want.norm())
        if not error <= 1e-2:
            errors[f"{name}/batch{batch}"] = f"replay differs from eager: relative error {error:.2e}"
    if errors:
        calls.pop(name)
    return errors


def _decode_timings(setup: Setup, eager) -> dict:
    """The torch VAE decoding 8 frames as the loop does (8 calls of one frame) against one call of all 8."""
    from benchmarks.common import time_alternating

    engines = eager.engines
    vae = engines.components.vae
    latents = torch.randn(8, *engines.latent_shape, device=setup.device, dtype=engines.dtype)

    @torch.inference_mode()
    def per_frame():
        for i in range(len(latents)):
            vae.decode(latents[i : i + 1])

    @torch.inference_mode()
    def batched():
        vae.decode(latents)

    timings = time_alternating({"8 calls of 1 frame": _synchronized(setup, per_frame, ()),
                                "1 call of 8 frames": _synchronized(setup, batched, ())},
                               max(2, setup.sizes["unet_repeats"] // 4), warmup=1)
    return {name: t["median_ms"] for name, t in timings.items()}


def _with_sdpa(call, backend):
    """`call` with scaled_dot_product_attention restricted to one backend."""
    from torch.nn.attention import sdpa_kernel

    def restricted(sample, t, text):
        with sdpa_kernel(backend):
            return call(sample, t, text)

    return restricted


def _synchronized(setup: Setup, call, inputs: tuple):
    """A timed call that ends when the device is done."""
    if not setup.cuda:
        return lambda: call(*inputs)

    def timed():
        call(*inputs)
        torch.cuda.synchronize()

    return timed


def _cuda_matmul_tflops(dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    seconds = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1000)
    return 2 * size**3 / statistics.median(seconds) / 1e12


def _compute_sanitizer() -> str | None:
    return _cuda_tool("compute-sanitizer")


def _cuda_tool(name: str) -> str | None:
    """A CUDA toolkit program, on PATH or where the toolkit installs it."""
    for candidate in (shutil.which(name), f"/usr/local/cuda/bin/{name}"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def _tensorrt_status() -> str:
    try:
        from tuner.tensorrt_support import require_tensorrt

        require_tensorrt()
        return "available"
    except RuntimeError as e:
        return str(e)


def _onnxruntime_status(setup: Setup) -> str:
    import onnxruntime

    if not setup.cuda or "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "no CUDA execution provider (onnxruntime-gpu is not installed)"
    return "available"


def _export_status(export) -> dict:
    started = time.perf_counter()
    try:
        export()
    except Exception as e:
        return {"status": "failed", "error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - started}
    return {"status": "ok", "seconds": time.perf_counter() - started}


def _manifest(run: Path) -> dict:
    return json.loads((run / "engines" / "manifest.json").read_text())


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def _reset_peak(setup: Setup) -> None:
    if setup.cuda:
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(setup: Setup) -> float:
    """Peak GPU memory allocated since the last reset, or this process's peak resident memory on the CPU."""
    if setup.cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    from benchmarks.common import peak_rss_mib

    return peak_rss_mib() / 1024


def _free(setup: Setup) -> None:
    gc.collect()
    if setup.cuda:
        torch.cuda.empty_cache()


STEP_FUNCTIONS = {"env": step_env, "base": step_base, "tune": step_tune, "export": step_export, "probe": step_probe,
                  "unet": step_unet, "e2e": step_e2e}


def main(argv: list[str] | None = None) -> None:
    """`python -m benchmarks.gpu`: the whole study (what `tav-bench gpu` runs, without importing the other
    studies), or with `--step` one step, in a child process of `run`, its figures in OUT/steps/STEP.json."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--step", choices=STEPS, help="run one step (what the study does in each child process)")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="directory for JSON and PNG")
    add_arguments(p)
    args = p.parse_args(argv)
    if args.step is None:
        print(json.dumps(run(args), indent=2))
        return
    setup = Setup(args)
    setup.save(STEP_FUNCTIONS[args.step](setup))


if __name__ == "__main__":
    main()
