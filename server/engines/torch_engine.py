"""PyTorch engines: the tuned model's own modules, eager, under `torch.inference_mode`.

fp32 on CPU; fp16 (or bf16) on CUDA. The reference every other backend is checked against.
"""

from __future__ import annotations

from pathlib import Path

import torch

from server.engines.base import Engines, LoadedModel
from tuner.artefacts import load_tuned
from tuner.components import Components
from tuner.io_utils import sha256_files


class TorchEngines(Engines):
    backend = "torch"

    def __init__(
        self, components: Components, latent_size: tuple[int, int], device: torch.device, dtype: torch.dtype
    ) -> None:
        channels = int(components.unet.config.in_channels)
        text_shape = (components.tokenizer.model_max_length, int(components.text_encoder.config.hidden_size))
        super().__init__((channels, *latent_size), text_shape)
        self.components = components
        self.device = device
        self.dtype = dtype

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
        out = self.components.unet(sample.to(self.dtype), timestep.to(self.device), text.to(self.dtype))
        return out.float()


def load_torch_model(run: str | Path, device: str | None = None, name: str | None = None) -> LoadedModel:
    """Load a tuned model directory as a `LoadedModel` with PyTorch engines."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model, components = load_tuned(run, device, dtype)
    engines = TorchEngines(components, model.latent_size, device, dtype)
    _, latents = model.source()
    config = model.config
    return LoadedModel(
        name=name or Path(run).name,
        engines=engines,
        tokenizer=components.tokenizer,
        scheduler_config=components.scheduler_config,
        scaling_factor=components.scaling_factor,
        source_latents=latents,
        source_hash=sha256_files([model.path / "source.safetensors"], model.path),
        fps=float(config["fps"]),
        model_hash=model.model_hash,
        pixel_size=(config["height"], config["width"]),
        defaults=dict(config.get("recommended", {"guidance": 12.5, "steps": 50})),
        info={"base_model": config["base"]["path"], "prompt": config["prompt"], "frames": config["frames"],
              "attention_mode": config["attention_mode"]},
    )
