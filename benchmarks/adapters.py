"""`tav-bench models --adapters`: what one tuned model costs, by adapter kind (full, LoRA) and rank.

- bytes on disk per model (the adapter file), on a Stable Diffusion 1.x-size UNet (random weights,
  `benchmarks.params.SD14_UNET_CONFIG`, fp32 and fp16) and on the shipped shapes model;
- resident bytes per loaded model: the RSS growth of a fresh process (the server's registry, torch backend) over
  `--models` loaded models of the shapes model, its tokenizer replaced by one of CLIP's size (49,408 tokens), fitted
  as a line; and the models the registry's default budget (16 GiB) holds at that cost; with `--sd-models N`, the
  same for N rank-16 LoRA models of an SD 1.x-size random-weight base (`benchmarks.gpu.make_sd14_base`);
- merge time on activation (W0 + B @ A * alpha / r, then copied into the shared UNet's tensors), median of 20: for
  the shapes model through the torch engine's own switch, for SD 1.x as the same merge and copy on its tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from benchmarks.common import save_plot, summarize, write_result
from tuner import lora

RANKS = (4, 8, 16, 32)
DEFAULT_BUDGET = 16 * 2**30  # the registry's default max_bytes
CLIP_VOCAB = 49408


def clip_size_tokenizer(directory: Path) -> None:
    """Rewrite the tokenizer in `directory` as a CLIP-size BPE (49,408 tokens, 48,894 merges) that tokenizes plain
    ASCII prompts exactly as before: its added merges join only the byte-level characters of bytes >= 128."""
    vocab = json.loads((directory / "vocab.json").read_text())
    merges = (directory / "merges.txt").read_text().splitlines()
    high = [chr(c) for c in range(0x100, 0x180)]  # the byte-level alphabet's characters for non-printable bytes
    new = [(a, b) for a in high for b in high]
    new += [(a + b, c) for a in high for b in high for c in high][: CLIP_VOCAB - len(vocab) - len(new) - len(high)]
    for token in high + [a + b for a, b in new]:
        vocab.setdefault(token, len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("\n".join([*merges, *(f"{a} {b}" for a, b in new)]) + "\n")
    (directory / "tokenizer.json").unlink(missing_ok=True)  # rebuilt from the files above


def sd_sizes_and_merge(repeats: int) -> dict:
    """Adapter bytes per kind and rank on an SD 1.x-size UNet, and the merge-and-copy time of each rank."""
    from diffusers import UNet2DConditionModel

    from benchmarks.params import SD14_UNET_CONFIG
    from tuner.inflate import inflate, is_trainable
    from tuner.tune import TRAINABLE_MODULES

    with torch.device("meta"):
        unet = inflate(UNet2DConditionModel(**SD14_UNET_CONFIG))
    shapes = {n: tuple(p.shape) for n, p in unet.named_parameters() if is_trainable(n)}
    generator = torch.Generator().manual_seed(0)
    w0 = {n: torch.randn(s, generator=generator) * 0.02 for n, s in shapes.items()}
    targets = tuple(f".{m}.weight" for m in TRAINABLE_MODULES["paper"])
    out: dict = {"trainable_parameters": sum(t.numel() for t in w0.values()), "kinds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        def sizes(tensors: dict) -> dict:
            for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16")):
                save_file({k: v.to(dtype) for k, v in tensors.items()}, Path(tmp) / f"{name}.safetensors")
            return {name: (Path(tmp) / f"{name}.safetensors").stat().st_size for name in ("fp32", "fp16")}

        out["kinds"]["full"] = {"bytes": sizes(w0)}
        dest = {n: torch.empty_like(t) for n, t in w0.items()}  # the shared UNet's tensors a merge is copied into
        for rank in RANKS:
            factors = {}
            for name, shape in shapes.items():
                if name.endswith(targets):
                    module = name.removesuffix(".weight")
                    factors[module + lora.LORA_A] = torch.randn((rank, shape[1]), generator=generator) * 0.01
                    factors[module + lora.LORA_B] = torch.randn((shape[0], rank), generator=generator) * 0.01
                elif name.endswith("attn_temp.to_out.0.bias"):
                    factors[name] = w0[name].clone()
            seconds = []
            for _ in range(repeats + 1):
                started = time.perf_counter()
                for n, t in lora.merge(factors, w0, 1.0).items():
                    dest[n].copy_(t)
                seconds.append(time.perf_counter() - started)
            out["kinds"][f"lora-r{rank}"] = {"bytes": sizes(factors),
                                             "parameters": sum(t.numel() for t in factors.values()),
                                             "merge": summarize(seconds[1:])}
    return out


def make_repository(root: Path, count: int) -> dict[str, list[Path]]:
    """The shapes model with a CLIP-size tokenizer as a base, and `count` models of each kind and rank: one tuned
    (one step), the others its copies with other adapter values (as distinct models as tuning would make)."""
    from tuner.shapes import SHAPES_MODEL
    from tuner.tune import adapter_defaults, default_settings, tune

    base = root / "shapes-clip-tokenizer"
    shutil.copytree(SHAPES_MODEL, base)
    clip_size_tokenizer(base / "tokenizer")
    clip, caption = source_clip(root)
    defaults = replace(default_settings(base), steps=1, frames=8)
    kinds = {"full": adapter_defaults(defaults, "full")}
    kinds.update({f"lora-r{r}": replace(adapter_defaults(defaults, "lora"), lora_rank=r) for r in (4, 16, 32)})
    return {kind: copies(tune(base, clip, caption, root / kind / "m000", settings, progress=False), count)
            for kind, settings in kinds.items()}


def make_sd_repository(root: Path, count: int) -> list[Path]:
    """A random-weight SD 1.4-size base (`benchmarks.gpu.make_sd14_base`) and `count` rank-16 LoRA models of it with
    the base's own (paper) tuning set: one tuned one step on an 8-frame 64x64 clip, the others its copies."""
    from benchmarks.gpu import make_sd14_base
    from tuner.tune import adapter_defaults, default_settings, tune

    base = make_sd14_base(root / "sd14", "cpu")
    clip, caption = source_clip(root)
    settings = replace(adapter_defaults(default_settings(base), "lora"), steps=1, frames=8, width=64, height=64)
    return copies(tune(base, clip, caption, root / "sd-lora-r16" / "m000", settings, progress=False), count)


def source_clip(root: Path) -> tuple[Path, str]:
    """The clip every model here is tuned on (the demo's: a red circle moving right, 8 frames), written to `root`."""
    from tuner.shapes.world import make_clip
    from tuner.video_io import write_video

    frames, caption, _ = make_clip("red", "circle", "white", "right", frames=8, seed=0)
    write_video(root / "clip.mp4", frames, fps=8)
    return root / "clip.mp4", caption


def copies(first: Path, count: int) -> list[Path]:
    """The tuned model `first` and `count - 1` copies beside it with other adapter values (each as distinct a model
    as tuning would make: its own file and hash)."""
    from tuner.artefacts import ADAPTER_FILE, CONFIG_FILE
    from tuner.io_utils import sha256_files

    generator = torch.Generator().manual_seed(0)
    adapter = load_file(first / ADAPTER_FILE)
    runs = [first]
    for i in range(1, count):
        run = first.parent / f"m{i:03d}"
        shutil.copytree(first, run, ignore=shutil.ignore_patterns(ADAPTER_FILE))
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in adapter.items()},
                  run / ADAPTER_FILE)
        config = json.loads((run / CONFIG_FILE).read_text())
        config["adapter_sha256"] = sha256_files([run / ADAPTER_FILE], run)
        (run / CONFIG_FILE).write_text(json.dumps(config))
        runs.append(run)
    return runs


def resident(repo: Path, count: int) -> dict:
    """In this (fresh) process: RSS after loading each of `count` models of `repo` through a registry (torch), and
    the time of each switch between two of them (the engine's merge and copy)."""
    from benchmarks.models import rss_mib
    from server.registry import ModelRegistry

    registry = ModelRegistry(repo, "torch", "cpu", max_bytes=2**62)
    ids = sorted(e.id for e in registry.entries())[:count]
    curve = []
    for model_id in ids:
        registry.load(model_id)
        curve.append(rss_mib())
    engines = [registry.ready(i).engines for i in ids[:2]]
    sample = torch.zeros(engines[0].unet_input_shape(1))
    text = torch.zeros((1, *engines[0].text_shape))
    switches = []
    for i in range(21):
        engines[i % 2].unet(sample, torch.tensor([500.0]), text)
        switches.append(engines[i % 2].base.last_switch_seconds)
    return {"rss_mib": curve, "switch": summarize(switches[1:])}


def measured_resident(runs: list[Path], count: int) -> dict:
    """Load the models `runs` (one repository) one by one in a fresh process (`resident`): the RSS after each, its
    slope per model, the models the registry's default budget holds at that cost, and the switch times."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.adapters", str(runs[0].parent), str(count)],
                         capture_output=True, text=True, check=True, env=env)
    measured = json.loads(out.stdout.splitlines()[-1])
    curve = np.array(measured["rss_mib"])
    slope = float(np.polyfit(np.arange(len(curve) - 1), curve[1:], 1)[0]) * 2**20  # bytes per model
    return {"adapter_bytes": (runs[0] / "adapter.safetensors").stat().st_size,
            "resident_bytes_per_model": slope, "models_per_gib": 2**30 / slope if slope > 0 else None,
            "models_in_default_budget": int(DEFAULT_BUDGET / slope) if slope > 0 else None,
            "rss_mib": measured["rss_mib"], "switch": measured["switch"]}


def run(args: argparse.Namespace) -> dict:
    result: dict = {"study": "models --adapters", "models": args.models, "sd": sd_sizes_and_merge(20), "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, kind_runs in make_repository(Path(tmp) / "shapes", args.models).items():
            result["shapes"][kind] = measured_resident(kind_runs, args.models)
    if args.sd_models:
        with tempfile.TemporaryDirectory() as tmp:
            result["sd"]["resident"] = {"lora-r16": measured_resident(make_sd_repository(Path(tmp), args.sd_models),
                                                                      args.sd_models)}
    result["note"] = ("resident bytes: slope of a line through the RSS of a fresh process after each loaded model "
                      "(the first excluded: it loads the base); models_in_default_budget: the registry's 16 GiB "
                      "divided by it")
    write_result(args.out, "models-adapters", result)
    plot(result, args.out / "models-adapters.png")
    return result


def plot(result: dict, path: Path) -> None:
    """The resident memory added by each loaded model, by base and adapter kind."""
    def draw(ax):
        curves = {f"shapes {k}": v for k, v in result["shapes"].items()}
        curves.update({f"SD 1.x {k}": v for k, v in result["sd"].get("resident", {}).items()})
        for kind, r in curves.items():
            ax.plot(np.arange(len(r["rss_mib"])), np.array(r["rss_mib"]) - r["rss_mib"][0], marker=".", label=kind)
        ax.set_xlabel("tuned models loaded (torch backend)")
        ax.set_ylabel("resident memory added (MiB)")
        ax.legend()

    save_plot(path, draw)


def quality_by_rank(results: Path) -> dict:
    """Gather `tav-bench quality` runs, one per adapter (`results/<full|rK|...>/quality.json`, each with its
    `--work` models' tuning seconds per step), into `results/quality-by-rank.json` and a plot. A run gathered
    before whose `--work` directory is gone keeps its earlier row."""
    gathered = results / "quality-by-rank.json"
    earlier = json.loads(gathered.read_text())["runs"] if gathered.is_file() else {}
    rows = {}
    for run in sorted(p for p in results.iterdir() if (p / "quality.json").is_file()):
        quality = json.loads((run / "quality.json").read_text())
        by = quality["by_method"]
        edits = {k.split("/")[0]: v for k, v in quality["tune_a_video_by_edit"].items() if k.endswith("/inversion")}
        work = Path(quality["settings"]["work"])
        if not work.is_dir() and run.name in earlier:
            rows[run.name] = earlier[run.name]
            continue
        configs = [json.loads(p.read_text()) for p in work.glob("models/*/tav_config.json")]
        rows[run.name] = {
            "edit_alignment_min": min(v["all"] for k, v in edits.items() if k != "reconstruction"),
            "edit_trajectory_px_max": max(v["trajectory_px"] for k, v in edits.items() if k != "reconstruction"),
            "inversion": by["tune_a_video/inversion"], "noise": by["tune_a_video/noise"],
            "noise_reconstruction_px": by["tune_a_video/noise"]["reconstruction_px"],
            "tune_seconds_per_step": [c["step_seconds_median"] for c in configs],
            "adapter": configs[0].get("adapter", {"kind": "full"}) if configs else None}
    out = {"study": "quality by adapter", "runs": rows}
    gathered.write_text(json.dumps(out, indent=2) + "\n")

    def draw(ax):
        names = list(rows)
        ax.bar(np.arange(len(names)) - 0.2, [rows[n]["noise_reconstruction_px"] for n in names], 0.4,
               label="from-noise reconstruction px")
        ax.bar(np.arange(len(names)) + 0.2, [rows[n]["edit_trajectory_px_max"] for n in names], 0.4,
               label="worst edit trajectory px (inversion)")
        ax.set_xticks(np.arange(len(names)), names)
        ax.set_ylabel("px from the source's path")
        ax.legend()

    save_plot(results / "quality-by-rank.png", draw)
    return out


if __name__ == "__main__":
    if sys.argv[1] == "--quality-by-rank":  # python -m benchmarks.adapters --quality-by-rank RESULTS_DIR
        print(json.dumps(quality_by_rank(Path(sys.argv[2])), indent=2))
    else:  # one measurement in a fresh process: python -m benchmarks.adapters REPO COUNT
        torch.set_num_threads(min(2, torch.get_num_threads()))
        print(json.dumps(resident(Path(sys.argv[1]), int(sys.argv[2]))))
