"""`tav-bench reference`: the project's UNet engines against the official Tune-A-Video `UNet3DConditionModel`.

Why it exists: the project claims its torch engine serves the paper's video UNet at least as fast as the official
code, and that ONNX Runtime is faster still (issue 35's goals: torch eager >= 1.3x the official UNet at batch 2,
the fastest backend >= 2.0x). A claim like that needs the official code itself, run beside the engines under the
same conditions, and a profile saying where each one's time goes. The official code is never copied into this
repository: the study RUNS it, from a checkout given by path (`--ref-dir`, showlab/Tune-A-Video) with the Python
of a virtualenv that has its dependencies (`--ref-python`: torch, diffusers==0.11.1, einops).

What it does, at batch 2 (classifier-free guidance), 8 frames and the model's native latent size:

* the model: the shipped shapes model (`models/shapes-sd`) tuned for a few steps with the small-base defaults but
  in the official architecture (sparse-causal attention, GroupNorm per clip, no frame positions; `--model` takes
  any tuned model of that architecture); exported to ONNX (into a temporary copy when it has no ONNX engines);
* the official UNet is built from the model's UNet config with its block types mapped to their 3-D names (not
  `from_pretrained_2d`, which hard-codes four levels; the shapes model has three) and given the state dict of the
  project's inflated UNet, key for key (strict);
* each implementation runs in its own long-lived child process (a driver script written to a temporary file: the
  official one with `--ref-python` and the checkout on PYTHONPATH, the project's with this Python), all with the
  same thread count (`torch.set_num_threads`, ONNX Runtime's intra-op threads, OMP_NUM_THREADS, and
  OMP_WAIT_POLICY=PASSIVE as the other studies); the children's outputs on one input are compared (max |diff| over
  max |official|), then after warm-up they are timed round-robin, one call each in turn (the order rotated every
  round), so the machine's noise hits all alike; each child times its own call;
* `torch.profiler` (CPU) over a few calls of the official UNet and the torch engine: the top ops by self time, the
  same grouped by kind, and inclusive time per module kind (attention, GroupNorm, feed-forward, convolutions).

The torch engine is measured in the official architecture (the like-for-like comparison, outputs checked), as the
small-base defaults serve the same weights (GroupNorm per frame, frame positions in the temporal attention; outputs
differ by design and are not compared), and with two PyTorch options applied from outside in its child process (the
engine code is unchanged): SDPA's math kernel in the temporal attention (forward hooks), and channels-last weights.

Without `--ref-dir`, or when the checkout lacks `tuneavideo/models/unet.py`, or `--ref-python` cannot import it,
the study writes a JSON saying it is skipped and why, and no plot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import save_plot, write_result

REPO = Path(__file__).resolve().parents[1]
SHAPES_MODEL = REPO / "models" / "shapes-sd"
OFFICIAL_UNET_FILE = Path("tuneavideo") / "models" / "unet.py"
BATCH = 2  # classifier-free guidance
FRAMES = 8
TIMESTEP = 500.0
AGREEMENT_TOLERANCE = 1e-4  # max |diff| over max |official output|
# The small-base defaults as served: what a model tuned here with `tav-tune`'s defaults runs (same weights).
DEFAULTS_ARCHITECTURE = ("sparse_causal", "per_frame", "sinusoidal_short_middle")
VARIANTS = {  # name -> (python: "ref" or "project", label, short label for the plot)
    "official": ("ref", "official UNet3DConditionModel", "official"),
    "torch": ("project", "torch engine, eager (official architecture)", "torch"),
    "torch_defaults": ("project", "torch engine, eager, as the small-base defaults serve the same weights "
                                  "(GroupNorm per frame, frame positions)", "torch\nsmall-base\ndefaults"),
    "onnxruntime": ("project", "ONNX Runtime engine (official architecture)", "onnxruntime"),
    # PyTorch options on the torch engine's UNet, applied from outside in the child (the engine code is unchanged)
    "torch_temporal_math": ("project", "torch engine + the SDPA math kernel in the temporal attention",
                            "torch\n+temporal\nSDPA math"),
    "torch_channels_last": ("project", "torch engine + channels-last weights", "torch\n+channels\nlast"),
    "torch_both": ("project", "torch engine + both options", "torch\n+both"),
}
OPTIONS = {"torch_temporal_math": ["temporal_sdpa_math"], "torch_channels_last": ["channels_last"],
           "torch_both": ["temporal_sdpa_math", "channels_last"]}

# The child process: reads one JSON command a line on stdin, answers one JSON line. It runs under the official
# virtualenv's Python as well as this project's, so it imports only the standard library and torch at the top.
DRIVER = r'''
import json, os, sys, time, traceback
proto = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)  # anything a library prints goes to the log, not into the protocol
import torch

spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
torch.manual_seed(0)


def module_label(name):
    parts = name.split(".")
    last, parent = parts[-1], (parts[-2] if len(parts) > 1 else "")
    if parent == "resnets":
        return "ResNet blocks"
    if "resnets" in parts and last in ("norm1", "norm2"):
        return "ResNet GroupNorm"
    if "resnets" in parts and last in ("conv1", "conv2"):
        return "ResNet 3x3 convolutions"
    if parent == "attentions":
        return "transformers (whole)"
    if parent == "transformer_blocks":
        return "transformer blocks"
    if last in ("attn1", "attn2", "attn_temp", "ff") and "transformer_blocks" in parts:
        return {"attn1": "attn1: sparse-causal self-attention", "attn2": "attn2: cross-attention",
                "attn_temp": "attn_temp: temporal attention", "ff": "feed-forward"}[last]
    if name == "conv_norm_out":
        return "output GroupNorm"
    return None


def build():
    kind = spec["kind"]
    if kind == "official":
        import inspect
        from tuneavideo.models.unet import UNet3DConditionModel
        config = json.loads(open(spec["config"]).read())
        accepted = set(inspect.signature(UNet3DConditionModel.__init__).parameters) - {"self"}
        unet = UNet3DConditionModel(**{k: v for k, v in config.items() if k in accepted})
        unet.load_state_dict(torch.load(spec["state"], weights_only=True), strict=True)
        unet.eval()

        def call(sample, t, text):
            with torch.no_grad():  # as the official pipeline runs it
                return unet(sample, t, encoder_hidden_states=text).sample
        return unet, call, {"ignored_config_keys": sorted(k for k in config if k not in accepted and k[0] != "_")}
    if kind == "torch" and spec.get("architecture") is None:
        from server.engines.torch_engine import load_torch_model
        engines = load_torch_model(spec["model"], "cpu").engines
        unet = engines.components.unet
        options = spec.get("options", [])
        if "channels_last" in options:
            unet.to(memory_format=torch.channels_last)
        if "temporal_sdpa_math" in options:  # attn_temp's 8-frame sequences: SDPA's math kernel, not flash
            from torch.nn.attention import SDPBackend, sdpa_kernel
            entered = []

            def enter(module, inputs):
                entered.append(sdpa_kernel([SDPBackend.MATH]))
                entered[-1].__enter__()

            def leave(module, inputs, output):
                entered.pop().__exit__(None, None, None)
            for name, module in unet.named_modules():
                if name.endswith("attn_temp"):
                    module.register_forward_pre_hook(enter)
                    module.register_forward_hook(leave)
        return unet, engines.unet, {"built_by": "server.engines.torch_engine.load_torch_model", "options": options}
    if kind == "torch":  # the same base and adapter, inflated as another architecture would serve them
        from server.engines.base import TunedTensors
        from tuner.artefacts import TunedModel, apply_adapter
        from tuner.components import load_components
        from tuner.inflate import inflate
        model = TunedModel.open(spec["model"])
        unet = load_components(model.base_path, "cpu", torch.float32, model.base_variant).unet
        inflate(unet, *spec["architecture"])
        apply_adapter(unet, TunedTensors.of_model(model, torch.device("cpu"), torch.float32).merged())

        def call(sample, t, text):
            with torch.inference_mode():  # as the torch engine runs it
                return unet(sample, t, text)
        return unet, call, {"built_by": "tuner.inflate.inflate" + str(tuple(spec["architecture"]))}
    if kind == "onnxruntime":
        from server.engines.base import open_engine_dir
        from server.engines.onnx_engine import OnnxEngines
        engine_dir, _ = open_engine_dir(spec["engines"])
        engine_dir.verify()
        engines = OnnxEngines(engine_dir, threads=spec["threads"])
        return None, engines.unet, {"built_by": "server.engines.onnx_engine.OnnxEngines",
                                    "providers": engines.providers}
    raise ValueError(f"unknown kind {kind}")


def profile(unet, call, args, calls):
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile
    stack, hooks = [], []
    if unet is not None:
        for name, module in unet.named_modules():
            label = module_label(name)
            if label is None:
                continue

            def pre(module, inputs, label=label):
                ctx = record_function("module: " + label)
                ctx.__enter__()
                stack.append(ctx)

            def post(module, inputs, output):
                stack.pop().__exit__(None, None, None)
            hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        call(*args)  # the hooks' first pass outside the profile
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(calls):
                call(*args)
            wall = time.perf_counter() - start
    finally:
        for hook in hooks:
            hook.remove()
    ops, modules = [], {}
    for event in prof.key_averages():
        if event.key.startswith("module: "):
            modules[event.key[len("module: "):]] = {"ms_per_call": event.cpu_time_total / 1000 / calls,
                                                    "count_per_call": event.count / calls}
        else:
            ops.append({"op": event.key, "self_ms_per_call": event.self_cpu_time_total / 1000 / calls,
                        "count_per_call": event.count / calls})
    ops.sort(key=lambda row: -row["self_ms_per_call"])
    return {"calls": calls, "wall_ms_per_call": 1000 * wall / calls, "ops": ops, "modules": modules}


try:
    started = time.perf_counter()
    inputs = torch.load(spec["inputs"], weights_only=True)
    args = (inputs["sample"], inputs["timestep"], inputs["text"])
    unet, call, info = build()
    info.update(ready=True, build_seconds=time.perf_counter() - started, torch=torch.__version__,
                threads=torch.get_num_threads(), pid=os.getpid(),
                environment={k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")})
    proto.write(json.dumps(info) + "\n")
except Exception:
    proto.write(json.dumps({"ready": False, "error": traceback.format_exc()[-2000:]}) + "\n")
    sys.exit(1)
for line in sys.stdin:
    command = json.loads(line)
    try:
        if command["cmd"] == "call":
            start = time.perf_counter()
            call(*args)
            answer = {"seconds": time.perf_counter() - start}
        elif command["cmd"] == "output":
            torch.save(call(*args).detach().float().contiguous(), command["path"])
            answer = {"ok": True}
        elif command["cmd"] == "profile":
            answer = profile(unet, call, args, command["calls"])
        else:
            break
    except Exception:
        answer = {"error": traceback.format_exc()[-2000:]}
    proto.write(json.dumps(answer) + "\n")
'''


class Worker:
    """One long-lived child process running `DRIVER` for one variant."""

    def __init__(self, name: str, python: str, spec: dict, pythonpath: str, workdir: Path, driver: Path,
                 threads: int) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": str(threads),
               "MKL_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
        env.pop("GOMP_SPINCOUNT", None)
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([python, str(driver), json.dumps(spec)], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=log, text=True, cwd=workdir, env=env)
        self.info = self._answer()
        if not self.info.get("ready"):
            raise RuntimeError(f"the {name} child failed to start:\n{self.info.get('error', '')}")

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=30)
            tail = self.log.read_text()[-2000:]
            raise RuntimeError(f"the {self.name} child exited ({self.process.returncode}):\n{tail}")
        answer = json.loads(line)
        if "error" in answer and answer.get("ready") is not False:
            raise RuntimeError(f"the {self.name} child failed:\n{answer['error']}")
        return answer

    def ask(self, command: dict) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ref-dir", type=Path, help="a checkout of showlab/Tune-A-Video (holds tuneavideo/models/unet.py)")
    p.add_argument("--ref-python", help="the Python of a virtualenv with the official code's dependencies "
                                        "(torch, diffusers==0.11.1, einops)")
    p.add_argument("--model", type=Path, help="a tuned model directory in the official architecture (sparse-causal, "
                                             "GroupNorm per clip, no frame positions); default: the shapes model "
                                             "tuned for --tune-steps steps")
    p.add_argument("--calls", type=int, default=30, help="timed rounds (one call per variant each)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=2, help="threads of every child (torch, ORT intra-op, OpenMP)")
    p.add_argument("--profile-calls", type=int, default=3, help="UNet calls under torch.profiler per variant")
    p.add_argument("--tune-steps", type=int, default=2, help="tuning steps of the default model")


def skip_reason(ref_dir: Path | None, ref_python: str | None) -> str | None:
    """Why the official UNet cannot be run from `ref_dir` with `ref_python`, or None when it can."""
    if ref_dir is None:
        return "no --ref-dir: give a checkout of showlab/Tune-A-Video and --ref-python to run the official UNet"
    if not (ref_dir / OFFICIAL_UNET_FILE).is_file():
        return f"{ref_dir} has no {OFFICIAL_UNET_FILE}: not a showlab/Tune-A-Video checkout"
    if not ref_python:
        return "no --ref-python: give the Python of a virtualenv with the official code's dependencies"
    try:
        probe = subprocess.run(
            [ref_python, "-c", "from tuneavideo.models.unet import UNet3DConditionModel"],
            env={**os.environ, "PYTHONPATH": str(ref_dir.resolve())}, cwd=tempfile.gettempdir(),
            capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"--ref-python {ref_python} could not be run: {e}"
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["(no output)"])[-1]
        return f"--ref-python {ref_python} cannot import the official UNet from {ref_dir}: {last}"
    return None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, as `benchmarks.common.summarize` takes its p90."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(seconds: list[float]) -> dict:
    ms = [1000 * s for s in seconds]
    return {"median_ms": statistics.median(ms), "p10_ms": percentile(ms, 0.1), "p90_ms": percentile(ms, 0.9),
            "mean_ms": statistics.fmean(ms), "runs": len(ms)}


OP_KINDS = (  # (kind, substrings of aten op names), first match wins
    ("attention (SDPA / baddbmm, softmax, bmm)", ("scaled_dot_product", "flash_attention", "baddbmm", "bmm",
                                                  "softmax")),
    ("GroupNorm", ("group_norm",)),
    ("LayerNorm", ("layer_norm",)),
    ("linear / matmul", ("addmm", "aten::mm", "matmul", "aten::linear")),
    ("convolution", ("conv",)),
    ("copies and layout (copy_, cat, index, clone, contiguous)", ("copy_", "aten::cat", "index", "clone",
                                                                  "contiguous", "repeat", "expand", "permute",
                                                                  "transpose", "reshape", "view", "empty",
                                                                  "as_strided", "select", "slice", "unsqueeze",
                                                                  "flatten", "chunk", "split", "stack")),
    ("element-wise (add, mul, SiLU, GELU, ...)", ("add", "mul", "silu", "gelu", "div", "sub", "exp", "sin", "cos",
                                                  "neg", "pow", "sigmoid", "fill", "zero", "to", "arange",
                                                  "upsample")),
)


def op_kind(name: str) -> str:
    return next((kind for kind, keys in OP_KINDS if any(k in name for k in keys)), "other")


def summarize_profile(raw: dict, top: int = 12) -> dict:
    """The child's profile as the JSON keeps it: top ops, ops by kind, module kinds with the remainders."""
    total = sum(row["self_ms_per_call"] for row in raw["ops"])
    kinds: dict[str, float] = {}
    for row in raw["ops"]:
        kinds[op_kind(row["op"])] = kinds.get(op_kind(row["op"]), 0.0) + row["self_ms_per_call"]
    modules = {name: round(row["ms_per_call"], 2) for name, row in raw["modules"].items()}
    m = raw["modules"]

    def ms(name: str) -> float:
        return m.get(name, {}).get("ms_per_call", 0.0)

    derived = {
        "transformer blocks minus attn1/attn2/attn_temp/ff (LayerNorms, residuals, temporal reshapes)":
            ms("transformer blocks") - sum(ms(k) for k in ("attn1: sparse-causal self-attention",
                                                             "attn2: cross-attention", "attn_temp: temporal attention",
                                                             "feed-forward")),
        "transformers minus their blocks (GroupNorm, proj_in/out, layout)":
            ms("transformers (whole)") - ms("transformer blocks"),
        "ResNet blocks minus GroupNorm and 3x3 convs (time embedding, SiLU, skips)":
            ms("ResNet blocks") - ms("ResNet GroupNorm") - ms("ResNet 3x3 convolutions"),
        "outside ResNets and transformers (conv in/out, down/up-sampling, time embedding, folds)":
            raw["wall_ms_per_call"] - ms("ResNet blocks") - ms("transformers (whole)"),
    }
    return {
        "calls": raw["calls"],
        "profiled_ms_per_call": round(raw["wall_ms_per_call"], 2),
        "self_ms_per_call_total": round(total, 2),
        "ops_per_call": sum(row["count_per_call"] for row in raw["ops"]),
        "top_ops": [{"op": row["op"], "self_ms_per_call": round(row["self_ms_per_call"], 2),
                     "share": round(row["self_ms_per_call"] / total, 3), "count_per_call": row["count_per_call"]}
                    for row in raw["ops"][:top]],
        "op_kinds_ms_per_call": {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "modules_ms_per_call": modules,
        "derived_ms_per_call": {k: round(v, 2) for k, v in derived.items()},
    }


def prepare_model(workdir: Path, model: Path | None, tune_steps: int) -> tuple[Path, Path, str]:
    """(tuned model directory, its ONNX engine directory, how it was made)."""
    from exporter.cli import export
    from server.official_export import OFFICIAL_ARCHITECTURE
    from tuner.artefacts import TunedModel

    official = tuple(OFFICIAL_ARCHITECTURE[k] for k in ("attention_mode", "group_norm", "frame_positions"))
    if model is None:
        from tuner.shapes.world import make_clip
        from tuner.tune import default_settings, tune
        from tuner.video_io import write_video

        frames, caption, _ = make_clip("red", "circle", "white", "right", frames=8, seed=0)
        clip = workdir / "clip.mp4"
        write_video(clip, frames, fps=8)
        settings = replace(default_settings(SHAPES_MODEL), steps=tune_steps, group_norm="per_clip",
                           frame_positions="none")
        model = tune(SHAPES_MODEL, clip, caption, workdir / "repo" / "circle", settings, progress=False)
        made = (f"{SHAPES_MODEL.relative_to(REPO)} tuned {tune_steps} steps with the small-base defaults "
                f"(tuner.tune.default_settings) but GroupNorm per clip and no frame positions")
    else:
        made = str(model)
    tuned = TunedModel.open(model)
    if tuned.architecture != official:
        raise SystemExit(f"tav-bench reference: {model} has architecture {tuned.architecture}; the official UNet "
                         f"runs {official} (tune with --group-norm per_clip --frame-positions none)")
    engines = Path(model) / "engines"
    manifest = engines / "manifest.json"
    if not (manifest.is_file() and "onnxruntime" in json.loads(manifest.read_text()).get("backends", [])):
        engines = export(model, out=workdir / "engines", store=workdir / "store", progress=lambda message: None)
    return Path(model), engines, made


def write_inputs(workdir: Path, model: Path) -> tuple[Path, Path, Path, dict]:
    """The seeded inputs, the project's inflated UNet's state dict and the official UNet's config, as files."""
    from server.official_export import official_unet_config
    from tuner.artefacts import load_tuned

    tuned, components = load_tuned(model)
    unet = components.unet
    h, w = tuned.latent_size
    generator = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(BATCH, int(unet.config.in_channels), FRAMES, h, w, generator=generator),
              "timestep": torch.tensor([TIMESTEP]),
              "text": torch.randn(BATCH, components.tokenizer.model_max_length,
                                  int(components.text_encoder.config.hidden_size), generator=generator)}
    paths = workdir / "inputs.pt", workdir / "unet_state.pt", workdir / "official_unet_config.json"
    torch.save(inputs, paths[0])
    torch.save({k: v.contiguous() for k, v in unet.state_dict().items()}, paths[1])
    config = official_unet_config(dict(unet.config))
    paths[2].write_text(json.dumps(config, indent=2))
    shapes = {k: list(v.shape) for k, v in inputs.items()}
    return *paths, {"shapes": shapes, "official_unet_config": config,
                    "parameters": sum(p.numel() for p in unet.parameters())}


def max_rel_diff(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out - reference).abs().max() / reference.abs().max())


def run(args: argparse.Namespace) -> dict:
    reason = skip_reason(args.ref_dir, args.ref_python)
    if reason is not None:
        stale = args.out / "reference.png"  # an earlier run's plot would contradict this JSON
        stale.unlink(missing_ok=True)
        result = {"study": "reference", "skipped": True, "reason": reason,
                  "ref_dir": str(args.ref_dir) if args.ref_dir else None, "ref_python": args.ref_python}
        write_result(args.out, "reference", result)
        return result
    load_before = os.getloadavg()
    workers: dict[str, Worker] = {}
    with tempfile.TemporaryDirectory(prefix="tav-reference-") as tmp:
        workdir = Path(tmp)
        model, engines, made = prepare_model(workdir, args.model, args.tune_steps)
        inputs, state, config, described = write_inputs(workdir, model)
        driver = workdir / "driver.py"
        driver.write_text(DRIVER)
        base_spec = {"inputs": str(inputs), "threads": args.threads}
        specs = {
            "official": {**base_spec, "kind": "official", "config": str(config), "state": str(state)},
            "torch": {**base_spec, "kind": "torch", "model": str(Path(model).resolve())},
            "torch_defaults": {**base_spec, "kind": "torch", "model": str(Path(model).resolve()),
                               "architecture": list(DEFAULTS_ARCHITECTURE)},
            "onnxruntime": {**base_spec, "kind": "onnxruntime", "engines": str(Path(engines).resolve())},
            **{name: {**base_spec, "kind": "torch", "model": str(Path(model).resolve()), "options": options}
               for name, options in OPTIONS.items()},
        }
        try:
            for name, (python, _, _) in VARIANTS.items():
                ref = python == "ref"
                workers[name] = Worker(name, args.ref_python if ref else sys.executable, specs[name],
                                       str(args.ref_dir.resolve()) if ref else str(REPO), workdir, driver,
                                       args.threads)
            outputs = {}
            for name, worker in workers.items():
                worker.ask({"cmd": "output", "path": str(workdir / f"{name}.out.pt")})
                outputs[name] = torch.load(workdir / f"{name}.out.pt", weights_only=True)
            agreement = {name: max_rel_diff(outputs[name], outputs["official"]) for name in workers
                         if name != "official"}
            load_timing = os.getloadavg()  # after this study's own tuning and export
            for _ in range(args.warmup):
                for worker in workers.values():
                    worker.ask({"cmd": "call"})
            seconds: dict[str, list[float]] = {name: [] for name in workers}
            names = list(workers)
            for round_index in range(args.calls):
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    seconds[name].append(workers[name].ask({"cmd": "call"})["seconds"])
            load_timed = os.getloadavg()
            profiles = {name: summarize_profile(workers[name].ask({"cmd": "profile", "calls": args.profile_calls}))
                        for name in ("official", "torch", "torch_defaults")}
            infos = {name: worker.info for name, worker in workers.items()}
        finally:
            for worker in workers.values():
                worker.close()
    timings = {name: summary(values) for name, values in seconds.items()}
    official_median = timings["official"]["median_ms"]
    speedups = {
        name: {"of_medians": official_median / timings[name]["median_ms"],
               "median_of_round_ratios": statistics.median(o / v for o, v in zip(seconds["official"], values,
                                                                                   strict=True))}
        for name, values in seconds.items() if name != "official"}
    fastest = max(("torch", "onnxruntime"), key=lambda n: speedups[n]["of_medians"])  # the served backends
    result = {
        "study": "reference",
        "skipped": False,
        "ref_dir": str(args.ref_dir.resolve()),
        "ref_python": args.ref_python,
        "model": made,
        "batch": BATCH, "frames": FRAMES, "timestep": TIMESTEP, "inputs": described["shapes"],
        "unet_parameters": described["parameters"],
        "official_unet_config": described["official_unet_config"],
        "threads": args.threads,
        "environment": {"OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"},
        "variants": {name: {"label": VARIANTS[name][1], **infos[name]} for name in workers},
        "agreement_max_rel_diff": agreement,
        "agreement_tolerance": AGREEMENT_TOLERANCE,
        "agree": {name: diff < AGREEMENT_TOLERANCE for name, diff in agreement.items()
                  if name != "torch_defaults"},  # torch_defaults is another architecture: differs by design
        "rounds": args.calls, "warmup_rounds": args.warmup,
        "ms_per_call": timings,
        "speedup_vs_official": speedups,
        "fastest_backend": fastest,
        "goals": {"torch eager >= 1.3x official": speedups["torch"]["of_medians"] >= 1.3,
                  "fastest >= 2.0x official": speedups[fastest]["of_medians"] >= 2.0},
        "profile": profiles,
        # 1, 5, 15-minute load averages: before the study, before its timed rounds (its own tuning and export count
        # in them), after them (one child computes at a time: about 1 is the study itself), at the end
        "load_average": {"before": load_before, "before_timing": load_timing, "after_timing": load_timed,
                         "after": os.getloadavg()},
    }
    write_result(args.out, "reference", result)

    def bars(ax):
        names = list(timings)
        medians = [timings[n]["median_ms"] for n in names]
        spread = [[timings[n]["median_ms"] - timings[n]["p10_ms"] for n in names],
                  [timings[n]["p90_ms"] - timings[n]["median_ms"] for n in names]]
        colours = {"official": "#888888", "onnxruntime": "#ff7f0e", "torch": "#1f77b4"}
        ax.bar(range(len(names)), medians, yerr=spread, capsize=4,
               color=[colours.get(n, "#aec7e8") for n in names])
        for i, name in enumerate(names):
            text = "1.00x" if name == "official" else f"{speedups[name]['of_medians']:.2f}x"
            ax.text(i, timings[name]["p90_ms"], text, ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), [VARIANTS[n][2] for n in names], fontsize=7)
        ax.set_ylabel("ms per UNet call (median; whiskers p10-p90)")
        ax.set_title(f"video UNet, batch {BATCH}, {FRAMES} frames, {args.threads} threads, CPU; "
                     f"1-min load before {load_before[0]:.2f}", fontsize=9)

    save_plot(args.out / "reference.png", bars)
    return result
