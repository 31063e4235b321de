"""Load the parts of a Stable Diffusion 1.x-layout diffusers directory, and the few computations on them that
the tuner and the PyTorch engines share (prompt encoding, frame encoding/decoding, size rules).

A user's Stable Diffusion directory, the tiny test model and the shipped shapes model all load through here,
with the stock `from_pretrained` and safetensors only (no pickle is ever loaded).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from tuner.io_utils import JsonError, read_json_file, sha256_files

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# What a Stable Diffusion 1.x base is made of for this project, and nothing pickled: configs, tokenizer files and
# ONE variant of each network's safetensors weights (a hub repository also holds `.fp16` and `.non_ema` copies).
CONFIG_PATTERNS = ("model_index.json", "scheduler/*.json", "tokenizer/*.json", "tokenizer/*.txt", "unet/*.json",
                   "vae/*.json", "text_encoder/*.json")
WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
VARIANT = re.compile(r"[A-Za-z0-9_]+")  # diffusers' `variant=`: `fp16`, `non_ema`


def weights_file(part: str, variant: str | None) -> str:
    """The weights file of a network for a variant, as diffusers names it: `unet/diffusion_pytorch_model.fp16.
    safetensors` (None: the main weights, `unet/diffusion_pytorch_model.safetensors`)."""
    return f"{part}/{WEIGHT_NAMES[part]}{f'.{variant}' if variant else ''}.safetensors"


def model_file_patterns(variant: str | None = None) -> list[str]:
    """The files of a base that this project reads (the hub fetch's allow-list), with the weights of `variant`."""
    return [*CONFIG_PATTERNS, *(weights_file(part, variant) for part in WEIGHT_NAMES)]


class BaseModelError(ValueError):
    """A directory that is not a usable Stable Diffusion 1.x-style diffusers model."""


@dataclass
class Components:
    """The loaded parts of a base model. `unet` may be inflated in place by `tuner.inflate`."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict

    @property
    def vae_factor(self) -> int:
        """Pixels per latent along each side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this: the VAE's factor times the UNet's downsamplings."""
        return self.vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_factor


def check_base_dir(base: str | Path, variant: str | None = None) -> Path:
    """Raise BaseModelError unless `base` looks like an SD 1.x diffusers directory with weights to load
    (`weights_variant`); return it as a Path."""
    base = Path(base)
    if not (base / "model_index.json").is_file():
        raise BaseModelError(f"{base} is not a diffusers model directory (no model_index.json)")
    missing = [name for name in SUBFOLDERS if not (base / name).is_dir()]
    if missing:
        raise BaseModelError(f"{base} lacks the Stable Diffusion subfolder(s) {', '.join(missing)}")
    try:
        unet_config = read_json_file(base / "unet" / "config.json", f"{base}/unet/config.json")
    except JsonError as e:
        raise BaseModelError(str(e)) from None
    if not isinstance(unet_config, dict):
        raise BaseModelError(f"{base}/unet/config.json is not a JSON object")
    if unet_config.get("_class_name") != "UNet2DConditionModel":
        raise BaseModelError(f"{base}/unet is a {unet_config.get('_class_name')}, not a UNet2DConditionModel")
    weights_variant(base, variant)
    return base


def base_sizes(base: str | Path) -> tuple[int, int]:
    """A base's (size multiple, default size) in pixels, as `Components` has them, from its UNet and VAE configs
    alone (no weights are read): what a clip is decoded to before the model is loaded."""
    base = Path(base)
    try:
        vae = read_json_file(base / "vae" / "config.json", f"{base}/vae/config.json")
        unet = read_json_file(base / "unet" / "config.json", f"{base}/unet/config.json")
        vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
        return vae_factor * 2 ** (len(unet["block_out_channels"]) - 1), int(unet["sample_size"]) * vae_factor
    except (JsonError, KeyError, TypeError, ValueError) as e:
        raise BaseModelError(f"{base}: the UNet and VAE configs do not give the model's sizes ({e})") from None


def weights_variant(base: Path, variant: str | None = None) -> str | None:
    """Which weights of `base` load: those of `variant` when given, else the main weights, else the one variant
    that a directory holds alone (the base store's copy of a base given with a variant). BaseModelError naming the
    missing files otherwise."""
    if variant is not None and not VARIANT.fullmatch(variant):
        raise BaseModelError(f"variant {variant!r} is not a weights variant name (letters, digits, _)")
    if variant is None and not _missing_weights(base, None):
        return None
    if variant is None:
        held = sorted({p.name.split(".")[-2] for p in (base / "unet").glob(f"{WEIGHT_NAMES['unet']}.*.safetensors")})
        held = [v for v in held if VARIANT.fullmatch(v) and not _missing_weights(base, v)]
        if len(held) == 1:
            return held[0]
        if held:
            raise BaseModelError(f"{base} holds no main weights but the variants {', '.join(held)}: name one")
    missing = _missing_weights(base, variant)
    if missing:
        raise BaseModelError(f"{base} lacks {', '.join(missing)} (the {f'{variant} variant' if variant else 'main'} "
                             "safetensors weights; pickled weights are never loaded)")
    return variant


def _missing_weights(base: Path, variant: str | None) -> list[str]:
    return [weights_file(part, variant) for part in WEIGHT_NAMES if not (base / weights_file(part, variant)).is_file()]


def base_model_files(base: str | Path, variant: str | None = None) -> list[Path]:
    """The files of a base model that loading it reads (`model_file_patterns`): its configs, tokenizer files and
    one variant's safetensors weights (`weights_variant`); not a model card, a pickled checkpoint or another
    variant beside them, nor a component this project never loads (a safety checker, say)."""
    base = check_base_dir(base, variant)
    patterns = model_file_patterns(weights_variant(base, variant))
    return sorted({p for pattern in patterns for p in base.glob(pattern) if p.is_file()})


def base_model_hash(base: str | Path, variant: str | None = None) -> str:
    """Content hash of a base model's files (`base_model_files`): what a tuned model records of its base."""
    base = check_base_dir(base, variant)
    return sha256_files(base_model_files(base, variant), base)


def is_same_base(base: str | Path, recorded: str, variant: str | None = None) -> bool:
    """Whether `base` (its weights of `variant`) still holds the content a tuned model recorded as `recorded`.
    Models tuned by earlier versions recorded a hash over every safetensors file of the three networks (every
    variant), or before that over every file of the directory; those are accepted too."""
    if base_model_hash(base, variant) == recorded:
        return True
    base = check_base_dir(base)
    every_variant = (*CONFIG_PATTERNS, *(f"{part}/*.safetensors" for part in WEIGHT_NAMES))
    earlier = ({p for pattern in every_variant for p in base.glob(pattern) if p.is_file()},
               {p for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")})
    return any(sha256_files(list(files), base) == recorded for files in earlier)


def load_components(base: str | Path, device: str | torch.device = "cpu", dtype=torch.float32,
                    variant: str | None = None) -> Components:
    """Load a base model's UNet, VAE, text encoder, tokenizer and scheduler config, frozen, in eval mode: the
    weights of `variant` (diffusers' `variant=`), by default those `weights_variant` finds."""
    base = check_base_dir(base, variant)
    transformers.utils.logging.disable_progress_bar()  # keep CLI output to our own progress and errors
    diffusers.utils.logging.disable_progress_bar()
    kwargs = dict(torch_dtype=dtype, use_safetensors=True, variant=weights_variant(base, variant))
    try:
        components = Components(
            unet=UNet2DConditionModel.from_pretrained(base, subfolder="unet", **kwargs),
            vae=AutoencoderKL.from_pretrained(base, subfolder="vae", **kwargs),
            text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **kwargs),
            tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
            scheduler_config=read_json_file(base / "scheduler" / "scheduler_config.json",
                                            f"{base}/scheduler/scheduler_config.json"),
        )
    except (OSError, ValueError) as e:  # JsonError is a ValueError
        raise BaseModelError(f"cannot load the model in {base}: {e}") from e
    for module in (components.unet, components.vae, components.text_encoder):
        module.to(device).eval().requires_grad_(False)
    return components


def tokenize(tokenizer: CLIPTokenizer, prompt: str) -> tuple[torch.Tensor, bool]:
    """Token ids `[1, L]` padded to the tokenizer's length, and whether the prompt was truncated to fit."""
    ids = tokenizer(prompt, truncation=False).input_ids
    length = tokenizer.model_max_length
    truncated = len(ids) > length
    padded = tokenizer(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return padded.input_ids, truncated


@torch.inference_mode()
def encode_prompt(components: Components, prompt: str) -> torch.Tensor:
    """Text embeddings `[1, L, D]` of a prompt (the last hidden state, as Stable Diffusion uses)."""
    ids, _ = tokenize(components.tokenizer, prompt)
    encoder = components.text_encoder
    return encoder(ids.to(encoder.device))[0]


def frames_to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 `[N, H, W, 3]` -> float `[N, 3, H, W]` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def pixels_to_frames(pixels: torch.Tensor) -> np.ndarray:
    """float `[N, 3, H, W]` in [-1, 1] -> uint8 `[N, H, W, 3]`."""
    pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


@torch.inference_mode()
def encode_frames(vae: AutoencoderKL, frames: np.ndarray, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled VAE posterior mean and std of each frame, each `[C, N, h, w]` (channels first, as the UNet takes)."""
    scale = float(vae.config.scaling_factor)
    means, stds = [], []
    param = next(vae.parameters())
    for i in range(0, len(frames), batch):
        pixels = frames_to_pixels(frames[i : i + batch]).to(param.device, param.dtype)
        posterior = vae.encode(pixels).latent_dist
        means.append(posterior.mean.float() * scale)
        stds.append(posterior.std.float() * scale)
    return torch.cat(means).transpose(0, 1).cpu(), torch.cat(stds).transpose(0, 1).cpu()
