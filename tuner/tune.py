"""One-shot tuning (`tav-tune`): fit the inflated video UNet to one text-video pair.

Only Tune-A-Video's trainable set is updated (attn1/attn2 query projections and the temporal attentions; with
`trainable="temporal"` the temporal attentions alone); the VAE, text encoder and every other UNet tensor stay
frozen. Loss, schedule and optimiser follow the reference:
epsilon (or v) prediction MSE on the clip's VAE latents at uniformly drawn timesteps, AdamW (lr 3e-5, weight
decay 1e-2), gradient clipping at 1.0, constant learning rate.

Those are `TuneSettings()`. `default_settings(base)` is the one source of defaults for a given base (`tav-tune`,
the demo and the tuning service read it): Stable Diffusion-size bases get the paper's settings; a small base (a
UNet under `SMALL_BASE_PARAMETERS`) gets `SMALL_BASE_SETTINGS`, chosen by measurement on the shipped shapes model
(benchmarks/README.md, "Why the tuned weights carried no motion"), because there the paper's settings leave the
clip's motion out of the tuned weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm

from tuner import artefacts, lora
from tuner.base_lora import BaseLoraError, merged_base, parse_base_lora
from tuner.components import (
    BaseModelError,
    base_model_hash,
    base_sizes,
    check_base_dir,
    encode_frames,
    encode_prompt,
    is_same_base,
    load_components,
)
from tuner.hub import resolve_base, split_variant
from tuner.inflate import ATTENTION_MODES, FRAME_POSITIONS, GROUP_NORMS, VideoUNet, inflate, is_trainable
from tuner.io_utils import atomic_directory, read_json_file
from tuner.official_config import ConfigError, OfficialConfig, read_official_config
from tuner.versions import versions
from tuner.video_io import VideoError, read_video


class TuneError(ValueError):
    """Bad tuning input, reported as one line with exit code 2."""


@dataclass
class TuneSettings:
    """How to tune; the field defaults are the paper's (for a given base, use `default_settings`)."""

    frames: int = 8
    width: int | None = None  # default: the base model's native size
    height: int | None = None
    steps: int = 300
    lr: float = 3e-5
    seed: int = 33
    start: int = 0
    stride: int = 1
    attention_mode: str = "sparse_causal"
    group_norm: str = "per_frame"  # "per_clip": the reference implementation's clip-wide ResNet statistics
    trainable: str = "paper"  # "temporal": tune the temporal attentions only, not the query projections
    frame_positions: str = "none"  # "sinusoidal*": the temporal attention sees each frame's index (not in the paper)
    timestep_power: float = 0.0  # timesteps drawn with density ~ t ** power; 0: uniform, the paper's
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # "auto" | "no" | "fp16" | "bf16" (the last two CUDA only): see `precision_for`
    adapter_kind: str = "full"  # "lora": low-rank factors on the trainable projections (`tuner.lora`)
    lora_rank: int | None = None  # lora only; default `LORA_RANK`
    lora_alpha: float | None = None  # lora only; default: the rank (a scale of 1)


def precision_for(mixed_precision: str, device: torch.device) -> str:
    """The autocast precision tuning runs at: as asked, or for `auto` the fastest measured on the device. On an
    H200 one 8-frame 512x512 step of an SD 1.4-size model took 144 ms in bf16, 164 ms in fp16 and 555 ms in fp32
    (benchmarks/README.md); so bf16 on CUDA (fp16 where the GPU has no bf16), none on CPU, where fp32 is fastest."""
    if mixed_precision != "auto":
        return mixed_precision
    if device.type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


# The rule that picks the defaults for a base: its UNet's parameter count (Stable Diffusion 1.x: 860 M; the shipped
# shapes model: 5.8 M). Below the threshold, these settings replace the paper's; each was measured on the shapes
# model (benchmarks/README.md): without them the tuned weights carry almost none of the clip's motion.
SMALL_BASE_PARAMETERS = 100_000_000
SMALL_BASE_SETTINGS = {"steps": 600, "lr": 1e-3, "trainable": "temporal",
                       "frame_positions": "sinusoidal_short_middle", "timestep_power": 3.0}


ADAPTER_KINDS = ("full", "lora")
LORA_RANK = 16
# A LoRA's learning rate, as a multiple of the full adapter's for the base. On the shapes model (1e-3 full; one clip,
# rank 16, 600 steps) 3e-3 kept every edit from the inversion right, where 1e-2 broke them (53% alignment); neither
# redraws the clip from noise as well as full tuning from its seed's start, nor does full tuning from LoRA's start,
# W0 (benchmarks/README.md, "Quality by LoRA rank"). For SD-size bases it gives 9e-5, the order LoRA fine-tunes of
# SD 1.x use (not measured here).
LORA_LR_FACTOR = 3.0


def adapter_defaults(defaults: TuneSettings, kind: str) -> TuneSettings:
    """`defaults` (a base's, `default_settings`) for adapter kind `kind`: a LoRA gets its rank and learning rate."""
    if kind != "lora":
        return replace(defaults, adapter_kind=kind)
    return replace(defaults, adapter_kind=kind, lora_rank=LORA_RANK, lr=defaults.lr * LORA_LR_FACTOR)


def _meta_unet(base: str | Path) -> UNet2DConditionModel:
    """The base's UNet built from its config alone on the meta device: no weights are read."""
    config = read_json_file(check_base_dir(base) / "unet" / "config.json", f"{base}/unet/config.json")
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def unet_parameters(base: str | Path) -> int:
    """The base UNet's parameter count, from its config alone."""
    return sum(p.numel() for p in _meta_unet(base).parameters())


def max_lora_rank(base: str | Path) -> int:
    """The largest LoRA rank tuning `base` takes: the smallest width of the projections it can target."""
    with torch.device("meta"):
        unet = inflate(_meta_unet(base))
    return lora.smallest_width(unet, TRAINABLE_MODULES["paper"])


def default_rule(parameters: int) -> dict:
    """Which defaults a base whose UNet has `parameters` parameters gets, and why (recorded in `tav_config.json`)."""
    small = parameters < SMALL_BASE_PARAMETERS
    return {"unet_parameters": parameters, "small_base_below": SMALL_BASE_PARAMETERS,
            "applied": "small_base" if small else "paper", "changes": dict(SMALL_BASE_SETTINGS) if small else {}}


def default_settings(base: str | Path) -> TuneSettings:
    """The tuning defaults for `base`: the paper's, with `SMALL_BASE_SETTINGS` for a small UNet (`default_rule`).
    Raises `BaseModelError` for a directory that is not an SD 1.x model."""
    return replace(TuneSettings(), **default_rule(unet_parameters(base))["changes"])


def draw_timestep(count: int, power: float, generator: torch.Generator) -> torch.Tensor:
    """One training timestep in [0, count), with density ~ t ** power. 0 is the paper's uniform draw; a larger power
    favours the noisy end, where a sample's layout, and so the clip's motion, is decided."""
    if power == 0:
        return torch.randint(0, count, (1,), generator=generator)
    u = torch.rand(1, generator=generator)
    return (count * u ** (1.0 / (power + 1.0))).long().clamp(max=count - 1)


# Which of the tunable tensors (`is_trainable`) tuning updates, by `TuneSettings.trainable`: the paper's whole set,
# or the temporal attentions alone. The adapter always holds every tunable tensor, updated or not.
TRAINABLE_MODULES = {
    "paper": ("attn1.to_q", "attn2.to_q", "attn_temp.to_q", "attn_temp.to_k", "attn_temp.to_v", "attn_temp.to_out.0"),
    "temporal": ("attn_temp.to_q", "attn_temp.to_k", "attn_temp.to_v", "attn_temp.to_out.0"),
}


def invalid_choice(s: TuneSettings, max_rank: int | None = None) -> tuple[str, str] | None:
    """The first of `s`'s named choices (and its timestep power and LoRA settings, the rank at most `max_rank`)
    that is not one the tuner takes, as (setting, what it must be); None when all are. `tune` and the tuning
    service's request check both use it."""
    choices = {"attention_mode": ATTENTION_MODES, "group_norm": GROUP_NORMS, "trainable": tuple(TRAINABLE_MODULES),
               "frame_positions": FRAME_POSITIONS, "adapter_kind": ADAPTER_KINDS}
    for name, allowed in choices.items():
        if getattr(s, name) not in allowed:
            return name, f"must be one of {', '.join(allowed)}"
    if not s.timestep_power >= 0:  # NaN too
        return "timestep_power", "must be >= 0"
    if s.adapter_kind == "full":
        for name in ("lora_rank", "lora_alpha"):
            if getattr(s, name) is not None:
                return name, "is for adapter kind lora only (the full adapter has no rank)"
        return None
    rank = s.lora_rank
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        return "lora_rank", f"must be a whole number >= 1, got {rank!r}"
    if rank is not None and max_rank is not None and rank > max_rank:
        return "lora_rank", f"must be at most {max_rank} (the smallest width of the projections it adapts), got {rank}"
    alpha = s.lora_alpha
    if alpha is not None and not (isinstance(alpha, int | float) and not isinstance(alpha, bool) and 0 < alpha < 1e6):
        return "lora_alpha", f"must be a number > 0, got {alpha!r}"
    return None


def mark_trainable(unet: VideoUNet, trainable: str = "paper") -> dict[str, torch.nn.Parameter]:
    """Freeze the whole UNet but the tensors `trainable` names (`TRAINABLE_MODULES`), and return them by name."""
    unet.requires_grad_(False)
    modules = tuple(f".{m}." for m in TRAINABLE_MODULES[trainable])
    chosen = {name: p for name, p in unet.named_parameters()
              if is_trainable(name) and any(m in name for m in modules)}
    for p in chosen.values():
        p.requires_grad_(True)
    return chosen


def diffusion_loss(
    unet: VideoUNet,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    text: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Mean squared error of the UNet's prediction for clean `latents` `[1, C, F, h, w]` noised by `noise` at
    `timesteps` `[1]`, against the target of the scheduler's prediction type."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    prediction = unet(noisy, timesteps, text)
    return F.mse_loss(prediction.float(), target.float())


# The sampling a tuned model recommends unless told otherwise (the paper's), and the bounds tav_config.json takes.
RECOMMENDED = {"guidance": 12.5, "steps": 50}
RECOMMENDED_BOUNDS = {name: (spec["minimum"], spec["maximum"])
                      for name, spec in artefacts.CONFIG_SCHEMA["properties"]["recommended"]["properties"].items()}


def recommended_problem(recommended: dict, suggested_prompts: list[str] | None) -> str | None:
    """Why `recommended` ({"steps", "guidance"}) or `suggested_prompts` cannot be recorded, or None."""
    for name, kinds in (("steps", int), ("guidance", int | float)):
        value, (low, high) = recommended[name], RECOMMENDED_BOUNDS[name]
        if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
            return f"recommended {name} must be a {'whole ' if name == 'steps' else ''}number within {low}..{high}, " \
                f"got {value!r}"
    if suggested_prompts is not None and not (
            isinstance(suggested_prompts, list) and all(isinstance(p, str) and p.strip() for p in suggested_prompts)):
        return "suggested prompts must be a list of non-empty strings"
    return None


def is_tuned(out: str | Path, base: str | Path, prompt: str, settings: TuneSettings) -> bool:
    """Whether `out` already holds a finished model tuned from this very base (by content: a copy in a tuning
    service's base store counts) on `prompt` with `settings`, so that a script may reuse it instead of tuning
    again."""
    try:
        config = artefacts.TunedModel.open(out).config
    except artefacts.ArtefactError:
        return False
    recorded = {**asdict(TuneSettings()), **config["settings"]}  # a model tuned before a setting existed: its default
    return (is_same_base(base, config["base"]["sha256"], config["base"].get("variant")) and config["prompt"] == prompt
            and recorded == asdict(settings))


def tune(
    base: str | Path,
    video: str | Path | bytes,
    prompt: str,
    out: str | Path,
    settings: TuneSettings | None = None,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
    on_step: Callable[[int, int, float], None] | None = None,
    base_id: str | None = None,
    base_loras: list[tuple[Path, float]] = (),
    suggested_prompts: list[str] | None = None,
    recommended: dict[str, int | float] | None = None,
    variant: str | None = None,
) -> Path:
    """Tune `base` on `video` (a file, a folder of frames, or encoded bytes) captioned `prompt` and write the tuned
    model directory `out`, with `settings` (default: `default_settings(base)`). `on_step(step, total, loss)` is
    called after every step (raise from it to stop: nothing is written); `base_id` names the base in the tuned
    model's config (default: its directory's name). `base_loras` (file, scale) are SD 1.x LoRAs fused into the base
    first (`tuner.base_lora`): the model is tuned from, and refers to, the merged base. `suggested_prompts` (edits
    to try) and `recommended` ({"steps", "guidance"} for sampling; default `RECOMMENDED`) are recorded for the tuned
    model's users (an official config's validation prompts and sampling, `tuner.official_config`). `variant`: the
    base's weights variant (diffusers' `variant=`; default its main weights)."""
    try:
        s = settings or default_settings(base)
    except BaseModelError as e:
        raise TuneError(str(e)) from e
    out = Path(out)
    try:
        bad = invalid_choice(s, max_lora_rank(base) if s.adapter_kind == "lora" else None)
    except BaseModelError as e:
        raise TuneError(str(e)) from e
    if bad:
        raise TuneError(f"--{bad[0].replace('_', '-')} {bad[1]}")
    if s.frames < 1 or s.steps < 0 or s.stride < 1 or s.start < 0:
        raise TuneError("--frames and --stride must be >= 1, --steps and --start >= 0")
    if out.exists() and not overwrite:
        raise TuneError(f"output directory {out} already exists (use --overwrite to replace it)")
    if not prompt.strip():
        raise TuneError("--prompt is empty")
    recommended = {**RECOMMENDED, **(recommended or {})}
    bad = recommended_problem(recommended, suggested_prompts)
    if bad:
        raise TuneError(bad)
    if variant is not None and base_loras:
        raise TuneError("--base-lora takes a base's main weights, not a weights variant")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    source_name = f"an uploaded clip of {len(video)} bytes" if isinstance(video, bytes) else str(video)
    if s.mixed_precision not in ("auto", "no", "fp16", "bf16"):
        raise TuneError("--mixed-precision must be auto, no, fp16 or bf16")
    precision = precision_for(s.mixed_precision, device)
    if precision != "no" and device.type != "cuda":
        raise TuneError("--mixed-precision fp16 or bf16 needs a CUDA device")

    try:
        check_base_dir(base, variant)
        multiple, default_size = base_sizes(base)
    except BaseModelError as e:
        raise TuneError(str(e)) from e
    width, height = s.width or default_size, s.height or default_size
    if width % multiple or height % multiple or width <= 0 or height <= 0:
        raise TuneError(f"--width/--height {width}x{height} must be positive multiples of {multiple} for this model")
    try:  # at the tuning size, and only the frames kept: the upload's own size never reaches memory
        clip = read_video(video, max_frames=s.start + s.stride * artefacts.MAX_SOURCE_FRAMES, size=(width, height),
                          start=s.start, stride=s.stride)
    except VideoError as e:
        raise TuneError(str(e)) from e
    if len(clip) < s.frames:
        raise TuneError(f"{source_name} gives only {len(clip)} frames from index {s.start} at stride {s.stride}; "
                        f"--frames asks for {s.frames}")
    base_lora_records = None
    if base_loras:
        try:
            base, base_lora_records = merged_base(Path(base), list(base_loras), out.parent)
        except BaseLoraError as e:
            raise TuneError(str(e)) from e
        base_id = base.name
    try:
        base_hash = base_model_hash(base, variant)
        components = load_components(base, device, variant=variant)
    except BaseModelError as e:
        raise TuneError(str(e)) from e
    parameters = sum(p.numel() for p in components.unet.parameters())
    frames = clip.frames

    lora_record = None
    if s.adapter_kind == "lora":  # the temporal attentions start from the base's W0, not from the tuning seed
        torch.manual_seed(lora.W0_SEED)
        unet = inflate(components.unet, s.attention_mode, s.group_norm, s.frame_positions)
        w0, w0_hash = lora.store_w0(out.parent, base_hash, unet)
        rank = s.lora_rank or LORA_RANK
        lora_record = {"kind": "lora", "rank": rank, "alpha": s.lora_alpha or rank,
                       "targets": list(TRAINABLE_MODULES[s.trainable]),
                       "w0": {"path": artefacts.base_reference(w0, out), "sha256": w0_hash}}
        torch.manual_seed(s.seed)
        trainable = lora.inject(unet, TRAINABLE_MODULES[s.trainable], rank, lora_record["alpha"])
    else:
        torch.manual_seed(s.seed)
        unet = inflate(components.unet, s.attention_mode, s.group_norm, s.frame_positions)
        trainable = list(mark_trainable(unet, s.trainable).values())
    if s.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()

    mean, std = encode_frames(components.vae, frames)
    text = encode_prompt(components, prompt).clone()
    scheduler = DDPMScheduler.from_config(components.scheduler_config)
    optimizer = torch.optim.AdamW(trainable, lr=s.lr, weight_decay=1e-2)
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    grad_scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    generator = torch.Generator().manual_seed(s.seed)
    clean_mean, clean_std = mean[:, : s.frames][None].to(device), std[:, : s.frames][None].to(device)

    started = time.perf_counter()
    loss_value = float("nan")
    step_seconds = []  # each step ends in a host sync (`loss.item()`), so these are true step times on a GPU too
    bar = tqdm(range(s.steps), desc="tuning", disable=not progress, dynamic_ncols=True)
    for step in bar:
        step_started = time.perf_counter()
        latent_noise = torch.randn(clean_mean.shape, generator=generator).to(device)
        latents = clean_mean + clean_std * latent_noise  # a sample of the VAE posterior, as the reference trains
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = draw_timestep(scheduler.config.num_train_timesteps, s.timestep_power, generator).to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = diffusion_loss(unet, scheduler, latents, text, timesteps, noise)
        optimizer.zero_grad(set_to_none=True)
        grad_scaler.scale(loss).backward()
        grad_scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        grad_scaler.step(optimizer)
        grad_scaler.update()
        loss_value = loss.item()
        step_seconds.append(time.perf_counter() - step_started)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if on_step is not None:
            on_step(step + 1, s.steps, loss_value)
    seconds = time.perf_counter() - started
    unet.eval()

    config = {
        "base": {"path": artefacts.base_reference(Path(base), out), "sha256": base_hash,
                 "id": base_id or Path(base).resolve().name, **({"variant": variant} if variant else {})},
        "attention_mode": s.attention_mode,
        "group_norm": s.group_norm,
        "frame_positions": s.frame_positions,
        "prompt": prompt,
        "video": source_name,
        "frames": s.frames,
        "width": width,
        "height": height,
        "latent_width": width // components.vae_factor,
        "latent_height": height // components.vae_factor,
        "fps": clip.fps,
        "start": s.start,
        "stride": s.stride,
        "source_frames": len(frames),
        "steps": s.steps,
        "lr": s.lr,
        "seed": s.seed,
        "trainable_modules": list(TRAINABLE_MODULES[s.trainable]),
        "settings": asdict(s),
        "mixed_precision": precision,
        "default_rule": default_rule(parameters),
        "final_loss": loss_value,
        "tuning_seconds": round(seconds, 3),
        "step_seconds_median": round(statistics.median(step_seconds[1:]), 4) if len(step_seconds) > 1 else None,
        "recommended": {"guidance": recommended["guidance"], "steps": recommended["steps"]},
        "suggested_prompts": list(suggested_prompts or []),
        "adapter": lora_record or {"kind": "full"},
        **({"base_loras": base_lora_records} if base_lora_records else {}),
        "versions": versions(),
    }
    adapter = lora.lora_state(unet) if lora_record else artefacts.adapter_state(unet)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        artefacts.write_tuned_model(tmp, config, adapter, artefacts.Source(latents=mean, frames=frames))
    return out


# The arguments every tuning needs: the flag, and the key of an official config (`--config`) that may give it instead.
REQUIRED = {"base": "pretrained_model_path", "video": "train_data.video_path", "prompt": "train_data.prompt",
            "out": "output_dir"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tav-tune", description="One-shot tune a Stable Diffusion 1.x model on a video.")
    p.add_argument("--config", metavar="FILE.yaml",
                   help="an official Tune-A-Video per-clip config (showlab/Tune-A-Video configs/*.yaml); the flags "
                   "given override it")
    p.add_argument("--base", help="Stable Diffusion 1.x-layout diffusers directory, or a hub id ID[@VARIANT] (through "
                   "huggingface_hub's cache; HF_HUB_OFFLINE=1 honoured). Required unless --config names one")
    p.add_argument("--variant", help="the base's weights variant, as diffusers names it (fp16); default: main weights")
    p.add_argument("--video", help="MP4/WebM/GIF file or a folder of frames")
    p.add_argument("--prompt", help='the clip\'s caption, e.g. "a man is skiing"')
    p.add_argument("--out", help="tuned model directory to write (e.g. REPO/<model-id>)")
    # Every setting left out takes its value from --config, else from `default_settings(--base)`: the paper's, or
    # the small-base rule's.
    p.add_argument("--frames", type=int)
    p.add_argument("--width", type=int, help="default: the base model's native size")
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--start", type=int, help="index of the first frame")
    p.add_argument("--stride", type=int, help="take every n-th frame")
    p.add_argument("--attention-mode", choices=ATTENTION_MODES)
    p.add_argument("--group-norm", choices=GROUP_NORMS,
                   help="ResNet GroupNorm statistics per frame, or per clip as the reference implementation")
    p.add_argument("--trainable", choices=tuple(TRAINABLE_MODULES),
                   help="paper (attn1/attn2 queries and temporal attentions) or temporal (temporal attentions only)")
    p.add_argument("--frame-positions", choices=FRAME_POSITIONS,
                   help="none (the paper); sinusoidal: each frame's index added to the temporal attention's input; "
                   "sinusoidal_short_middle: the same, with wavelengths up to 20 x 2 pi in the UNet's middle block")
    p.add_argument("--timestep-power", type=float,
                   help="training timesteps drawn with density ~ t ** power (0: uniform, the paper's)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"],
                   help="auto: bf16 on CUDA (fastest measured), fp32 on CPU")
    p.add_argument("--adapter-kind", choices=ADAPTER_KINDS,
                   help="full (the paper: every trainable tensor whole) or lora (low-rank factors, a few MB)")
    p.add_argument("--lora-rank", type=int, help=f"LoRA rank (--adapter-kind lora; default {LORA_RANK})")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha; the update is scaled by alpha/rank (default: rank)")
    p.add_argument("--base-lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="an SD 1.x LoRA (diffusers, peft or kohya safetensors) fused into the base before tuning, "
                   "at SCALE (default 1); repeatable. The merged base is stored as a base of its own")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return p


@dataclass
class TuneCall:
    """What a `tav-tune` command line asks `tune` to do, worked out before anything is read or written."""

    base: Path
    video: str
    prompt: str
    out: str
    settings: TuneSettings
    variant: str | None = None
    suggested_prompts: list[str] | None = None
    recommended: dict[str, int | float] | None = None
    base_loras: list[tuple[Path, float]] = field(default_factory=list)
    overwrite: bool = False
    device: str | None = None
    warnings: list[str] = field(default_factory=list)  # an official config's keys that have no effect here


def plan(argv: list[str] | None = None) -> TuneCall:
    """`tav-tune`'s command line (and its `--config`, which the flags given override) as a `TuneCall`. Raises
    TuneError, ConfigError, BaseModelError or BaseLoraError (one line each); argparse exits 2 on a malformed flag."""
    args = _parser().parse_args(argv)
    config = read_official_config(args.config) if args.config else OfficialConfig()
    named = {}
    for flag, key in REQUIRED.items():
        named[flag] = getattr(args, flag) if getattr(args, flag) is not None else getattr(config, flag)
        if named[flag] is None:
            raise TuneError(f"--{flag} is required (or {key} in a --config file)")
    source = named["base"]
    if args.variant is not None:
        if split_variant(source)[1] is not None:
            raise TuneError(f"--variant {args.variant}: the base {source} names a variant already")
        source = f"{source}@{args.variant}"
    base, variant = resolve_base(source)
    defaults = adapter_defaults(default_settings(base), args.adapter_kind or "full")
    from_config = dict(config.settings)
    given = {k: v for k, v in vars(args).items() if k in asdict(defaults) and v is not None}
    if config.lr_scale != 1 and "lr" not in given:  # scale_lr: the official code scales the config's rate
        from_config["lr"] = from_config.get("lr", defaults.lr) * config.lr_scale
    settings = replace(defaults, **{**from_config, **given})
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if "mixed_precision" not in given and from_config.get("mixed_precision") in ("fp16", "bf16") and \
            torch.device(device).type != "cuda":
        raise TuneError(f"mixed_precision: {from_config['mixed_precision']} (--config) needs a CUDA device: give "
                        "--mixed-precision no to tune in fp32 here")
    return TuneCall(base, named["video"], named["prompt"], named["out"], settings, variant, config.suggested_prompts,
                    config.recommended or None, [parse_base_lora(arg) for arg in args.base_lora], args.overwrite,
                    args.device, config.warnings)


def main(argv: list[str] | None = None) -> None:
    try:
        call = plan(argv)
        for warning in call.warnings:
            print(f"tav-tune: warning: {warning}", file=sys.stderr)
        out = tune(call.base, call.video, call.prompt, call.out, call.settings, call.overwrite, call.device,
                   base_loras=call.base_loras, suggested_prompts=call.suggested_prompts,
                   recommended=call.recommended, variant=call.variant)
    except (BaseModelError, TuneError, BaseLoraError, ConfigError) as e:
        print(f"tav-tune: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(out)


if __name__ == "__main__":
    main()
