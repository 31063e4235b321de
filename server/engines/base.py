"""The one interface between the generation loop and a runtime (PyTorch, ONNX Runtime, TensorRT, AOTInductor).

An `Engines` object runs the three networks of one tuned model at fixed shapes: the text encoder on token ids
`[1, L]`, the VAE on one frame at a time, and the video UNet on exactly `frames` (8) frames at batch 1
(inversion, unguided sampling) or batch 2 (classifier-free guidance). Tensors cross the interface as torch
tensors on `device`; what a backend does inside is its own business. A `LoadedModel` bundles the engines with
what the loop needs to drive them: tokenizer, scheduler config, VAE scale, source clip latents, fps, defaults.

Feature reuse between denoising steps (`cache_interval`) needs two more UNet passes: the full one that also returns
the branch features, and the shallow one from them (`tuner.inflate.VideoUNet.forward`). A backend that has them
implements `run_unet_branch` and says so in `cache_unsupported`; the others refuse with `Unsupported`.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import CLIPTokenizer

from tuner import lora
from tuner.artefacts import (
    ADAPTER_FILE,
    ENGINE_ADAPTER_FILE,
    ArtefactError,
    EngineDir,
    Source,
    TunedModel,
)
from tuner.io_utils import sha256_files

UNET_FRAMES = 8
UNET_BATCHES = (1, 2)


class EngineShapeError(ValueError):
    """An input whose shape the engine was not built for."""


class Unsupported(Exception):
    """A request option this model's backend cannot serve (the gRPC service answers FAILED_PRECONDITION)."""


class Engines(ABC):
    """Text encoder, VAE encoder/decoder and video UNet of one model, at fixed shapes."""

    backend: str
    device: torch.device
    dtype: torch.dtype = torch.float32
    frames: int = UNET_FRAMES
    batches: tuple[int, ...] = UNET_BATCHES

    def __init__(self, latent_shape: tuple[int, int, int], text_shape: tuple[int, int]) -> None:
        self.latent_shape = latent_shape  # (C, h, w) of one frame's latents
        self.text_shape = text_shape  # (L, D) of the text embeddings

    def unet_input_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.latent_shape[0], self.frames, *self.latent_shape[1:])

    def check_unet_input(self, sample: torch.Tensor, text: torch.Tensor) -> None:
        batch = sample.shape[0]
        if batch not in self.batches or tuple(sample.shape) != self.unet_input_shape(batch):
            raise EngineShapeError(
                f"the UNet engine takes samples of shape {self.unet_input_shape(1)} or "
                f"{self.unet_input_shape(2)}, got {tuple(sample.shape)}"
            )
        if tuple(text.shape) != (batch, *self.text_shape):
            raise EngineShapeError(f"the UNet engine takes text of shape {(batch, *self.text_shape)}, "
                                   f"got {tuple(text.shape)}")

    @abstractmethod
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """int64 `[1, L]` -> `[1, L, D]`."""

    @abstractmethod
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """One frame in [-1, 1], `[1, 3, H, W]` -> the VAE posterior mean `[1, C, h, w]` (unscaled)."""

    @abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """One frame's unscaled latents `[1, C, h, w]` -> pixels in [-1, 1], `[1, 3, H, W]`."""

    @abstractmethod
    def run_unet(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """`[B, C, 8, h, w]`, float32 `[1]`, `[B, L, D]` -> `[B, C, 8, h, w]`, B in `batches`."""

    def cache_unsupported(self) -> str | None:
        """Why these engines cannot reuse UNet features between steps, or None when they can."""
        return f"the {self.backend} backend does not reuse UNet features between steps (cache_interval must be 1)"

    def run_unet_branch(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                        branch: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """With `branch` None, the full pass and its branch features; else the shallow pass from `branch` (and
        None). Only for engines whose `cache_unsupported()` is None."""
        raise Unsupported(self.cache_unsupported() or f"{type(self).__name__} lacks run_unet_branch")

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
             branch: torch.Tensor | None = None, return_branch: bool = False
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Check the shapes, then run the UNet: the noise prediction; with `return_branch` also the branch
        features for later shallow passes; with `branch` (such features) the shallow pass from them."""
        self.check_unet_input(sample, text)
        if branch is None and not return_branch:
            return self.run_unet(sample, timestep, text)
        if branch is not None and return_branch:
            raise ValueError("a shallow pass (branch given) has no branch features to return")
        reason = self.cache_unsupported()
        if reason is not None:
            raise Unsupported(reason)
        prediction, features = self.run_unet_branch(sample, timestep, text, branch)
        return (prediction, features) if return_branch else prediction


class TunedTensors:
    """A model's tuned tensors as a loaded model keeps them: whole (a full adapter), or as LoRA factors plus the
    base's shared W0, merged (W0 + B @ A * alpha / r) only when an engine needs the tensors themselves. `key` (the
    adapter file's hash) tells models apart; `nbytes` is what the model holds of its own."""

    def __init__(self, key: str, stored: dict[str, torch.Tensor], record: dict | None, w0: lora.W0 | None,
                 name: str) -> None:
        self.key = key
        self.stored = stored
        self.record = record
        self.w0 = w0
        if w0 is not None:  # check the factors now: a model that does not fit is skipped at load, not on a request
            try:
                lora.check_lora(stored, w0.tensors, record["rank"])
            except lora.LoraFormatError as e:
                raise ArtefactError(f"{name}: {e}") from None
        self.name = name

    @property
    def is_lora(self) -> bool:
        return self.w0 is not None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stored.values())

    def merged(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every tuned tensor under its state-dict name, on the stored tensors' device."""
        if self.w0 is None:
            return self.stored if dtype is None else {k: v.to(dtype) for k, v in self.stored.items()}
        return lora.merge(self.stored, self.w0.tensors, self.record["alpha"] / self.record["rank"], dtype)

    @classmethod
    def of_model(cls, model: TunedModel, device: torch.device, dtype: torch.dtype) -> TunedTensors:
        """A tuned model directory's tensors on `device`: whole ones in `dtype`, LoRA factors in fp32 (W0 in
        `dtype`)."""
        stored = model.adapter()
        if model.lora is None:
            return cls(model.config["adapter_sha256"], {k: v.to(device, dtype) for k, v in stored.items()}, None,
                       None, "adapter.safetensors")
        if sha256_files([model.path / ADAPTER_FILE], model.path) != model.config["adapter_sha256"]:  # a few MB
            raise ArtefactError(f"{ADAPTER_FILE} does not match its recorded hash")
        w0 = model.w0(device, dtype)
        return cls(model.config["adapter_sha256"], {k: v.to(device) for k, v in stored.items()}, model.lora, w0,
                   "adapter.safetensors")

    @classmethod
    def of_engine_dir(cls, engine_dir: EngineDir, device: torch.device, dtype: torch.dtype) -> TunedTensors:
        """An engine directory's tensors, as `of_model` (a LoRA model's W0 is the one its manifest records)."""
        stored, record = engine_dir.adapter(), engine_dir.manifest.get("lora")
        key, name = engine_dir.manifest["adapter_sha256"], f"engines/{ENGINE_ADAPTER_FILE}"
        if record is None:
            return cls(key, {k: v.to(device, dtype) for k, v in stored.items()}, None, None, name)
        w0 = lora.load_w0(engine_dir.path / record["w0"]["path"], record["w0"]["sha256"], "this LoRA model",
                          device, dtype)
        return cls(key, {k: v.to(device) for k, v in stored.items()}, record, w0, name)


@dataclass
class LoadedModel:
    """A model ready to generate: its engines and everything else the loop reads."""

    name: str
    engines: Engines
    tokenizer: CLIPTokenizer
    scheduler_config: dict
    scaling_factor: float
    source: Source  # what edits start from: the clip's latents, inverted latents, or nothing
    source_hash: str
    fps: float
    model_hash: str
    pixel_size: tuple[int, int]  # (height, width)
    defaults: dict = field(default_factory=lambda: {"guidance": 12.5, "steps": 50})
    info: dict = field(default_factory=dict)  # what GetModel reports: base model, prompt, profiles, ...


# tokenizer files' content hash -> the tokenizer, shared by the loaded models whose files are the same (one per base)
_TOKENIZERS: weakref.WeakValueDictionary[str, CLIPTokenizer] = weakref.WeakValueDictionary()


def shared_tokenizer(directory: Path) -> CLIPTokenizer:
    """The tokenizer of `directory`, loaded once per process for all directories with the same files."""
    key = sha256_files([p for p in directory.iterdir() if p.is_file()], directory)
    tokenizer = _TOKENIZERS.get(key)
    if tokenizer is None:
        tokenizer = _TOKENIZERS[key] = CLIPTokenizer.from_pretrained(directory)
    return tokenizer


def open_engine_dir(run: str | Path) -> tuple[EngineDir, str]:
    """A tuned model's engine directory (`RUN/engines`, or an engine directory given itself) and the model name."""
    path = Path(run)
    engine_dir = EngineDir.open(path / "engines" if (path / "engines").is_dir() else path)
    return engine_dir, path.name if path.name != "engines" else path.parent.name


def model_from_engine_dir(engine_dir: EngineDir, engines: Engines, name: str, **info) -> LoadedModel:
    """The `LoadedModel` of an exported model, whatever runtime `engines` is."""
    manifest = engine_dir.manifest
    return LoadedModel(
        name=name,
        engines=engines,
        tokenizer=shared_tokenizer(engine_dir.path / "tokenizer"),
        scheduler_config=engine_dir.scheduler_config(),
        scaling_factor=float(manifest["scaling_factor"]),
        source=engine_dir.source(),
        source_hash=manifest["source_sha256"],
        fps=float(manifest["fps"]),
        model_hash=manifest["model"]["model_hash"],
        pixel_size=tuple(manifest["pixel_size"]),
        defaults=dict(manifest["defaults"]),
        info={"base_model": manifest["model"]["base_path"], "prompt": manifest["model"]["prompt"],
              "frames": manifest["model"]["frames"], "attention_mode": manifest["model"]["attention_mode"],
              "profiles": manifest["unet_profiles"], "precision": manifest.get("precision"), **info},
    )
