"""Community Stable Diffusion 1.x LoRAs on the base (`tav-tune --base-lora FILE[:SCALE]`, showlab/Tune-A-Video #66).

A style or character LoRA trained on SD 1.x images is merged into the 2-D base before inflation, as the reference's
maintainer advises ("merge it into the pretrained SD first"): diffusers' `load_lora_weights` reads the file (its
own, peft's or kohya's naming), `fuse_lora` adds it at its scale to the UNet (and the text encoder where the file
has it). The merged base is a base of its own, written once to the repository's base store
(`REPO/.bases/lora-<key>/`, the key a hash of the base and each file's content and scale), so that its engines are
exported and shared like any base's. A file that is not a LoRA for this base's layout is refused before anything
is merged, naming its first tensor that does not fit.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from tuner.components import base_model_files, base_model_hash, load_components
from tuner.io_utils import atomic_directory, file_lock, file_sha256

STORE = ".bases"
FACTORS = {".lora_A.weight": "in", ".lora_B.weight": "out"}


class BaseLoraError(ValueError):
    """A `--base-lora` argument or file that cannot be merged into the base; one line."""


def parse_base_lora(arg: str) -> tuple[Path, float]:
    """`FILE[:SCALE]` -> (file, scale; default 1.0)."""
    file, sep, scale = arg.rpartition(":")
    if not sep or not scale.replace(".", "", 1).replace("-", "", 1).isdigit():
        file, scale = arg, "1"
    path = Path(file)
    if not path.is_file():
        raise BaseLoraError(f"--base-lora {arg}: {file} is not a file")
    return path, float(scale)


def check_layout(state: dict[str, torch.Tensor], networks: dict[str, torch.nn.Module], name: str) -> None:
    """Every LoRA factor of `state` (diffusers' names after `lora_state_dict`: `unet.<module>.lora_A.weight`, ...)
    must adapt a linear or convolution of `networks` (by prefix) of the factor's width."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    modules = {prefix: dict(net.named_modules()) for prefix, net in networks.items()}
    found = 0
    for prefix, net_modules in modules.items():
        part = {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}
        for key, tensor in convert_unet_state_dict_to_peft(part).items():
            suffix = next((s for s in FACTORS if key.endswith(s)), None)
            if suffix is None:
                continue
            module = net_modules.get(key.removesuffix(suffix))
            if isinstance(module, torch.nn.Linear):
                width = module.in_features if FACTORS[suffix] == "in" else module.out_features
            elif isinstance(module, torch.nn.Conv2d):
                width = module.in_channels if FACTORS[suffix] == "in" else module.out_channels
            else:
                raise BaseLoraError(f"{name}: tensor {prefix}.{key} adapts no layer of this base")
            if tensor.shape[1 if FACTORS[suffix] == "in" else 0] != width:
                raise BaseLoraError(f"{name}: tensor {prefix}.{key} has shape {tuple(tensor.shape)}, which does not "
                                    f"fit this base's {key.removesuffix(suffix)} (width {width})")
            found += 1
    if not found:
        raise BaseLoraError(f"{name}: holds no LoRA factors for this base's UNet or text encoder")


def merged_base(base: Path, loras: list[tuple[Path, float]], repo: Path) -> tuple[Path, list[dict]]:
    """The base with `loras` (file, scale) fused in, in the base store of `repo` (made once); and what a tuned model
    records of them (file name, sha256, scale)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    records = [{"file": path.name, "sha256": file_sha256(path), "scale": scale} for path, scale in loras]
    key = hashlib.sha256(repr((base_model_hash(base), [(r["sha256"], r["scale"]) for r in records])).encode())
    target = repo / STORE / f"lora-{key.hexdigest()[:16]}"
    with file_lock(repo / STORE / f".{target.name}.lock"):
        if target.is_dir():
            return target, records
        components = load_components(base)
        pipe = StableDiffusionPipeline(
            vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
            unet=components.unet, scheduler=DDIMScheduler.from_config(components.scheduler_config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        networks = {"unet": components.unet, "text_encoder": components.text_encoder}
        for i, (path, scale) in enumerate(loras):
            try:
                state, _ = StableDiffusionPipeline.lora_state_dict(str(path))
            except (SafetensorError, OSError, ValueError, KeyError) as e:
                raise BaseLoraError(f"{path.name}: not a LoRA file diffusers reads ({str(e).splitlines()[0]})") from e
            check_layout(state, networks, path.name)
            pipe.load_lora_weights(str(path), adapter_name=f"base_lora_{i}")
            pipe.fuse_lora(lora_scale=scale, adapter_names=[f"base_lora_{i}"])
            pipe.unload_lora_weights()
        with atomic_directory(target) as tmp:
            for name, network in (*networks.items(), ("vae", components.vae)):
                network.save_pretrained(tmp / name, safe_serialization=True)
            for file in base_model_files(base):
                relative = file.relative_to(base)
                if relative.parts[0] in ("tokenizer", "scheduler") or relative.name == "model_index.json":
                    (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, tmp / relative)
    return target, records
