"""PyTorch engines: the video UNet, VAE and text encoder as PyTorch modules, eager, under `torch.inference_mode`.

fp32 on CPU; fp16 on CUDA. The reference every other backend is checked against. Models of one base share one
set of modules (`SharedBase`); each model holds only its adapter tensors (a LoRA model its factors; the base's W0
is shared and kept apart from the UNet, whose tensors a switch overwrites), copied (or merged) into the shared UNet
in place when a request for it starts and another model's were active. The engines hold their base; the process-wide
index of bases holds them weakly, so a base is freed once no loaded model uses it.
"""

from __future__ import annotations

import time
import weakref
from pathlib import Path

import torch

from server.engines.base import Engines, LoadedModel, TunedTensors
from tuner.artefacts import TunedModel, apply_adapter
from tuner.components import Components, load_components
from tuner.inflate import VideoUNet, inflate
from tuner.io_utils import sha256_files


class SharedBase:
    """A base model's modules, inflated once, with the adapter of the model most recently activated."""

    def __init__(self, components: Components) -> None:
        self.components = components
        self.active = lambda: None  # a weak reference to the owner of the adapter now in the UNet
        self.last_switch_seconds = 0.0

    def activate(self, owner: object, tensors: TunedTensors) -> None:
        if self.active() is not owner:
            started = time.perf_counter()
            self.active = lambda: None  # until the copy is complete
            apply_adapter(self.components.unet, tensors.merged())
            self.active = weakref.ref(owner)
            self.last_switch_seconds = time.perf_counter() - started


# (base path, base hash, attention mode, group norm, device, dtype) -> SharedBase, while some engines use it
_BASES: weakref.WeakValueDictionary[tuple, SharedBase] = weakref.WeakValueDictionary()


class TorchEngines(Engines):
    backend = "torch"

    def __init__(self, base: SharedBase, adapter: TunedTensors, latent_size: tuple[int, int],
                 device: torch.device, dtype: torch.dtype) -> None:
        components = base.components
        channels = int(components.unet.config.in_channels)
        text_shape = (components.tokenizer.model_max_length, int(components.text_encoder.config.hidden_size))
        super().__init__((channels, *latent_size), text_shape)
        self.base = base
        self.adapter = adapter
        self.device = device
        self.dtype = dtype

    @property
    def components(self) -> Components:
        return self.base.components

    def tuned_unet(self) -> VideoUNet:
        """The shared video UNet holding this model's tuned tensors (until another model's call activates its own)."""
        self.base.activate(self, self.adapter)
        return self.components.unet

    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.components.text_encoder(input_ids.to(self.device))[0]

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.components.vae.encode(pixels.to(self.device, self.dtype)).latent_dist.mean

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.components.vae.decode(latents.to(self.device, self.dtype)).sample

    @torch.inference_mode()
    def run_unet(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        self.base.activate(self, self.adapter)
        out = self.components.unet(sample.to(self.dtype), timestep.to(self.device), text.to(self.dtype))
        return out.float()

    def cache_unsupported(self) -> str | None:
        return None

    @torch.inference_mode()
    def run_unet_branch(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                        branch: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.base.activate(self, self.adapter)
        args = (sample.to(self.dtype), timestep.to(self.device), text.to(self.dtype))
        if branch is None:
            out, features = self.components.unet(*args, return_branch=True)
            return out.float(), features
        return self.components.unet(*args, branch=branch.to(self.dtype)).float(), None


def shared_base(model: TunedModel, device: torch.device, dtype: torch.dtype) -> SharedBase:
    key = (str(model.base_path.resolve()), model.config["base"]["sha256"], *model.architecture, str(device), dtype)
    shared = _BASES.get(key)
    if shared is None:
        components = load_components(model.base_path, device, dtype, model.base_variant)
        inflate(components.unet, *model.architecture)
        shared = _BASES[key] = SharedBase(components)
    return shared


def load_torch_model(run: str | Path, device: str | None = None, name: str | None = None) -> LoadedModel:
    """Load a tuned model directory as a `LoadedModel` with PyTorch engines (its base shared with others)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = TunedModel.open(run)
    base = shared_base(model, device, dtype)
    adapter = TunedTensors.of_model(model, device, dtype)
    engines = TorchEngines(base, adapter, model.latent_size, device, dtype)
    config = model.config
    return LoadedModel(
        name=name or Path(run).name,
        engines=engines,
        tokenizer=base.components.tokenizer,
        scheduler_config=base.components.scheduler_config,
        scaling_factor=base.components.scaling_factor,
        source=model.source(with_frames=False),
        source_hash=sha256_files([model.path / "source.safetensors"], model.path),
        fps=float(config["fps"]),
        model_hash=model.model_hash,
        pixel_size=(config["height"], config["width"]),
        defaults=dict(config.get("recommended", {"guidance": 12.5, "steps": 50})),
        info={"base_model": model.base_id, "prompt": config["prompt"], "frames": config["frames"],
              "attention_mode": config["attention_mode"]},
    )
