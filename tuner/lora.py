"""LoRA adapters: a tuned model stored as low-rank changes to its base's starting point, W0.

A full adapter (`tuner.artefacts.adapter_state`) holds every tunable tensor whole: ~298 MB fp32 on Stable
Diffusion 1.x. A LoRA adapter holds, for each projection tuning targets (`tuner.tune.TRAINABLE_MODULES`), two
factors under the project's own state-dict names, `<module>.lora_A.weight` `[r, in]` and `<module>.lora_B.weight`
`[out, r]`, and whole the trainable tensors LoRA does not cover: the targeted projections' biases (in SD 1.x only
the temporal attention's output bias, `attn_temp.to_out.0.bias`). Every tunable tensor is then

    W = W0 + B @ A * alpha / r        (weights with factors)
    W = the stored extra              (biases tuned whole)
    W = W0                            (everything else)

W0 is what tuning starts from: the base's own query projections and the temporal attentions as `inflate` draws
them, with the global RNG seeded by `W0_SEED` (not the tuning seed), so that every LoRA model of a base shares
one. It is stored once per base in the repository's base store (`REPO/.bases/w0-<base hash>/w0.safetensors`,
fp32) and each LoRA model records its path and hash; a model whose W0 is missing or differs cannot be served.

peft injects and trains the factors (`LoraConfig` with `target_modules` a regex matching exactly the targeted
projections); its names (`base_layer`, `lora_A.default`) never leave this module.
"""

from __future__ import annotations

import re
import weakref
from pathlib import Path

import torch
from safetensors.torch import save_file

from tuner.inflate import VideoUNet, is_trainable
from tuner.io_utils import atomic_directory, file_lock, sha256_files

W0_SEED = 20240117  # the RNG seed the temporal attentions' starting tensors of every LoRA model are drawn from
W0_DIR = "w0-{hash}"  # in the base store (`.bases`), one per base content hash (its first 16 hex digits)
W0_FILE = "w0.safetensors"
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"


class LoraFormatError(ValueError):
    """LoRA tensors that do not fit the model they are applied to; the message names the first tensor."""


def target_pattern(modules: tuple[str, ...]) -> str:
    """peft's `target_modules` regex: exactly the modules whose names end in one of `modules` (`attn1.to_q`...)."""
    return r".*\.(" + "|".join(re.escape(m) for m in modules) + r")$"


def inject(unet: VideoUNet, modules: tuple[str, ...], rank: int, alpha: float) -> list[torch.nn.Parameter]:
    """Freeze `unet` and add trainable rank-`rank` factors (B zero: the UNet is unchanged) to the projections
    `modules` names; the targeted biases train whole. Returns the trainable parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                        target_modules=target_pattern(modules))
    inject_adapter_in_model(config, unet)
    trainable = []
    for name, p in unet.named_parameters():
        if ".lora_A." in name or ".lora_B." in name or name.endswith(".base_layer.bias"):
            p.requires_grad_(True)
            trainable.append(p)
    return trainable


def lora_state(unet: VideoUNet) -> dict[str, torch.Tensor]:
    """The LoRA adapter of a UNet `inject` prepared, under the project's names, as contiguous fp32 CPU copies."""
    out = {}
    for name, tensor in unet.state_dict().items():
        if ".lora_A.default." in name or ".lora_B.default." in name:
            out[name.replace(".default.", ".")] = tensor
        elif name.endswith(".base_layer.bias"):
            out[name.replace(".base_layer.", ".")] = tensor
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def smallest_width(unet: torch.nn.Module, modules: tuple[str, ...]) -> int:
    """The smallest input or output width of the projections `modules` names: the largest rank a LoRA may have."""
    suffixes = tuple(f".{m}" for m in modules)
    return min(min(m.in_features, m.out_features) for name, m in unet.named_modules()
               if name.endswith(suffixes) and isinstance(m, torch.nn.Linear))


def check_lora(tensors: dict[str, torch.Tensor], w0: dict[str, torch.Tensor], rank: int) -> None:
    """Every tensor must be a rank-`rank` factor of a W0 weight, or a tunable tensor of W0 of its shape."""
    for name, tensor in tensors.items():
        if name.endswith((LORA_A, LORA_B)):
            weight = name[: -len(LORA_A)] + ".weight"
            if weight not in w0:
                raise LoraFormatError(f"{name} is a factor of no tunable weight")
            out_features, in_features = w0[weight].shape
            shape = (rank, in_features) if name.endswith(LORA_A) else (out_features, rank)
            partner = name[: -len(LORA_A)] + (LORA_B if name.endswith(LORA_A) else LORA_A)
            if partner not in tensors:
                raise LoraFormatError(f"{name} has no {partner.rsplit('.', 2)[-2]}")
        elif name in w0 and is_trainable(name):
            shape = tuple(w0[name].shape)
        else:
            raise LoraFormatError(f"{name} is neither a LoRA factor nor a tunable tensor")
        if tuple(tensor.shape) != tuple(shape):
            raise LoraFormatError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")


def merge(tensors: dict[str, torch.Tensor], w0: dict[str, torch.Tensor], scale: float,
          dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tunable tensor of a LoRA model (`tensors`, checked by `check_lora`) under its state-dict name:
    W0 + B @ A * scale where there are factors, the stored tensor where it is whole, W0 elsewhere. Computed in
    fp32 on W0's device, returned in `dtype` (default: W0's)."""
    merged = {}
    for name, base in w0.items():
        module = name.removesuffix(".weight")
        if name in tensors:
            value = tensors[name].to(base.device, torch.float32)
        elif module + LORA_A in tensors:
            a = tensors[module + LORA_A].to(base.device, torch.float32)
            b = tensors[module + LORA_B].to(base.device, torch.float32)
            value = torch.addmm(base.float(), b, a, alpha=scale)
        else:
            value = base
        merged[name] = value.to(dtype or base.dtype).contiguous()
    return merged


def w0_path(repo: Path, base_hash: str) -> Path:
    """Where the repository `repo` keeps W0 for the base of content hash `base_hash`."""
    return repo / ".bases" / W0_DIR.format(hash=base_hash[:16]) / W0_FILE


def store_w0(repo: Path, base_hash: str, unet: VideoUNet) -> tuple[Path, str]:
    """Make `unet`'s tunable tensors W0, once per base: write them (fp32) if the repository has no W0 for this base
    yet, else load the stored one into `unet`, so that every LoRA model of the base starts from the same tensors.
    `unet` must have been inflated under `torch.manual_seed(W0_SEED)`. Returns W0's path and hash."""
    from tuner.artefacts import adapter_state, apply_adapter, read_safetensors

    path = w0_path(repo, base_hash)
    with file_lock(path.parent.parent / f".{path.parent.name}.lock"):
        if not path.is_file():
            with atomic_directory(path.parent) as tmp:
                save_file(adapter_state(unet), tmp / W0_FILE)
        apply_adapter(unet, read_safetensors(path, str(path)))
    return path, sha256_files([path], path.parent)


class W0:
    """A base's W0 tensors on one device, in one dtype, shared by the loaded LoRA models of that base."""

    def __init__(self, tensors: dict[str, torch.Tensor], sha256: str) -> None:
        self.tensors = tensors
        self.sha256 = sha256


# (file, its stat, device, dtype) -> W0, while some model holds it
_W0S: weakref.WeakValueDictionary[tuple, W0] = weakref.WeakValueDictionary()


def load_w0(path: Path, sha256: str, what: str, device: torch.device | str = "cpu",
            dtype: torch.dtype = torch.float32) -> W0:
    """The W0 at `path`, which must hash to `sha256` (what a LoRA model recorded; `what` names the model in the
    message); read and hashed once per process while any model holds it."""
    from tuner.artefacts import ArtefactError, read_safetensors

    try:
        st = path.stat()
    except OSError:
        raise ArtefactError(f"{what}: its W0 ({path.parent.name}/{W0_FILE}) is missing") from None
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, str(device), dtype)
    w0 = _W0S.get(key)
    if w0 is None:
        actual = sha256_files([path], path.parent)
        tensors = {k: v.to(device, dtype) for k, v in read_safetensors(path, f"{path.parent.name}/{W0_FILE}").items()}
        w0 = _W0S[key] = W0(tensors, actual)
    if w0.sha256 != sha256:
        raise ArtefactError(f"{what}: its W0 ({path.parent.name}/{W0_FILE}) differs from the one it was tuned from "
                            f"(hash {w0.sha256[:12]}, recorded {sha256[:12]})")
    return w0
