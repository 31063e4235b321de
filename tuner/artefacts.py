"""The tuned model directory: the one artefact format the tuner writes and the exporter and server read.

```
RUN/
  tav_config.json      what was tuned and how: base model (path + content hash), clip, prompt, settings
  adapter.safetensors  every tuned tensor of the video UNet (attn1/attn2 to_q, attn_temp q/k/v/out), nothing else
  source.safetensors   the source clip at the tuning stride (`frames`, uint8 [N, H, W, 3], N <= 128) and its
                       scaled VAE latents (`latents`, float32 [C, N, h, w]) for DDIM inversion
```

Everything is safetensors or JSON; nothing is unpickled. Directories are written whole or not at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tuner.components import Components, load_components
from tuner.inflate import VideoUNet, inflate, is_trainable
from tuner.io_utils import sha256_files

FORMAT = "tav-tuned-model"
# v2 added `frame_positions` (a v1 model has none); v1 directories still load.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_FILE = "tav_config.json"
ADAPTER_FILE = "adapter.safetensors"
SOURCE_FILE = "source.safetensors"
MAX_SOURCE_FRAMES = 128


class ArtefactError(ValueError):
    """A tuned model directory that is missing, unfinished or of another format version."""


@dataclass(frozen=True)
class TunedModel:
    """A tuned model directory, opened and checked (its tensors are read on demand)."""

    path: Path
    config: dict

    @classmethod
    def open(cls, path: str | Path) -> TunedModel:
        path = Path(path)
        config_path = path / CONFIG_FILE
        if not config_path.is_file():
            raise ArtefactError(f"{path} is not a tuned model directory (no {CONFIG_FILE})")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ArtefactError(f"{config_path} is not valid JSON: {e}") from e
        if config.get("format") != FORMAT or config.get("format_version") not in READABLE_VERSIONS:
            raise ArtefactError(
                f"{path}: format {config.get('format')} v{config.get('format_version')} is not "
                f"{FORMAT} v{' or v'.join(map(str, READABLE_VERSIONS))}"
            )
        for name in (ADAPTER_FILE, SOURCE_FILE):
            if not (path / name).is_file():
                raise ArtefactError(f"{path} is unfinished: {name} is missing")
        return cls(path, config)

    @property
    def model_hash(self) -> str:
        """Identifies the tuned weights: base model hash and adapter hash together."""
        return f"{self.config['base']['sha256'][:16]}-{self.config['adapter_sha256'][:16]}"

    @property
    def architecture(self) -> tuple[str, str, str]:
        """`inflate`'s (attention mode, group norm, frame positions) for this adapter; models tuned before the
        group-norm setting existed normalised per clip, and before format v2 had no frame positions."""
        return (self.config["attention_mode"], self.config.get("group_norm", "per_clip"),
                self.config.get("frame_positions", "none"))

    @property
    def latent_size(self) -> tuple[int, int]:
        """(height, width) of the latents."""
        return self.config["latent_height"], self.config["latent_width"]

    def adapter(self) -> dict[str, torch.Tensor]:
        return load_file(self.path / ADAPTER_FILE)

    def source(self) -> tuple[np.ndarray, torch.Tensor]:
        """The source clip's frames (uint8 `[N, H, W, 3]`) and scaled latents (`[C, N, h, w]`)."""
        tensors = load_file(self.path / SOURCE_FILE)
        return tensors["frames"].numpy(), tensors["latents"]


def adapter_state(unet: VideoUNet) -> dict[str, torch.Tensor]:
    """The tuned tensors of a video UNet, under their state-dict names, as contiguous float32 CPU copies."""
    return {
        name: tensor.detach().float().cpu().contiguous()
        for name, tensor in unet.state_dict().items()
        if is_trainable(name)
    }


def write_tuned_model(
    directory: Path, config: dict, unet: VideoUNet, frames: np.ndarray, latents: torch.Tensor
) -> None:
    """Fill `directory` (a fresh temporary one) with a complete tuned model."""
    save_file(adapter_state(unet), directory / ADAPTER_FILE)
    source = {"frames": torch.from_numpy(np.ascontiguousarray(frames)), "latents": latents.float().contiguous()}
    save_file(source, directory / SOURCE_FILE)
    adapter_hash = sha256_files([directory / ADAPTER_FILE], directory)
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **config, "adapter_sha256": adapter_hash}
    (directory / CONFIG_FILE).write_text(json.dumps(full, indent=2) + "\n")


def apply_adapter(unet: VideoUNet, adapter: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into a video UNet in place; every name must be a trainable tensor of it."""
    state = unet.state_dict()
    for name, tensor in adapter.items():
        if name not in state or not is_trainable(name):
            raise ArtefactError(f"adapter tensor {name} is not a tunable tensor of this UNet")
        if state[name].shape != tensor.shape:
            raise ArtefactError(f"adapter tensor {name} has shape {tuple(tensor.shape)}, "
                                f"the UNet's is {tuple(state[name].shape)}")
    with torch.no_grad():
        for name, tensor in adapter.items():
            state[name].copy_(tensor)


def load_tuned(
    run: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[TunedModel, Components]:
    """Load a tuned model directory into ready components whose `unet` is the tuned video UNet."""
    model = TunedModel.open(run)
    components = load_components(model.config["base"]["path"], device, dtype)
    inflate(components.unet, *model.architecture)
    apply_adapter(components.unet, model.adapter())
    return model, components


# The engine directory (`RUN/engines/`, written by the exporter, read by the server):
#   manifest.json        format version, backend(s), precision, graphs (file, I/O names, shapes, dtypes, sha256),
#                        the UNet's profiles, opset, producer versions, store key and path, model metadata
#   tokenizer/           the tokenizer files
#   scheduler_config.json
#   adapter.safetensors  the tuned tensors under their names in the graphs
#   source.safetensors   the source clip's scaled latents
# The graphs themselves live once per (base model, size, precision, attention mode) in the shared store
# `REPO/.engines/<key>/`, which the manifest points to by a path relative to the engine directory.
ENGINE_FORMAT = "tav-engines"
ENGINE_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ENGINE_ADAPTER_FILE = "adapter.safetensors"
ENGINE_SOURCE_FILE = "source.safetensors"
SCHEDULER_FILE = "scheduler_config.json"


@dataclass(frozen=True)
class EngineDir:
    """An engine directory, opened and checked against its manifest."""

    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path) -> EngineDir:
        path = Path(path)
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise ArtefactError(f"{path} has no engines ({MANIFEST_FILE} missing): run tav-export")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise ArtefactError(f"{manifest_path} is not valid JSON: {e}") from e
        if manifest.get("format") != ENGINE_FORMAT or manifest.get("format_version") != ENGINE_FORMAT_VERSION:
            raise ArtefactError(f"{path}: engine format {manifest.get('format')} v{manifest.get('format_version')}"
                                f" is not {ENGINE_FORMAT} v{ENGINE_FORMAT_VERSION}: re-run tav-export")
        for name in (ENGINE_ADAPTER_FILE, ENGINE_SOURCE_FILE, SCHEDULER_FILE, "tokenizer"):
            if not (path / name).exists():
                raise ArtefactError(f"{path} is unfinished: {name} is missing")
        return cls(path, manifest)

    @property
    def store(self) -> Path:
        return (self.path / self.manifest["store"]["path"]).resolve()

    def graph_path(self, name: str) -> Path:
        return self.store / self.manifest["graphs"][name]["file"]

    def verify(self, names: tuple[str, ...] | None = None) -> None:
        """Check that each graph (and the adapter) still has the content hash the manifest recorded."""
        for name in names or tuple(self.manifest["graphs"]):
            graph = self.manifest["graphs"][name]
            files = [self.store / f for f in graph["files"]]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise ArtefactError(f"{self.path}: graph {name} is missing ({', '.join(missing)}): re-run tav-export")
            if sha256_files(files, self.store) != graph["sha256"]:
                raise ArtefactError(f"{self.path}: graph {name} does not match its recorded hash: re-run tav-export")
        if sha256_files([self.path / ENGINE_ADAPTER_FILE], self.path) != self.manifest["adapter_sha256"]:
            raise ArtefactError(f"{self.path}: {ENGINE_ADAPTER_FILE} does not match its recorded hash")

    def adapter(self) -> dict[str, torch.Tensor]:
        return load_file(self.path / ENGINE_ADAPTER_FILE)

    def source_latents(self) -> torch.Tensor:
        return load_file(self.path / ENGINE_SOURCE_FILE)["latents"]

    def scheduler_config(self) -> dict:
        return json.loads((self.path / SCHEDULER_FILE).read_text())
