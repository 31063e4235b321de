"""The tuned model directory: the one artefact format the tuner writes and the exporter and server read.

```
RUN/
  tav_config.json      what was tuned and how: base model (path + content hash), clip, prompt, settings
  adapter.safetensors  full: every tuned tensor of the video UNet (attn1/attn2 to_q, attn_temp q/k/v/out), nothing
                       else; lora: the LoRA factors and whole-tuned biases (`tuner.lora`), changes to the base's W0
  source.safetensors   what an edit starts from (`Source`): the source clip at the tuning stride (`frames`, uint8
                       [N, H, W, 3], N <= 128) and its scaled VAE latents (`latents`, float32 [C, N, h, w]), DDIM-
                       inverted per request; or, for a model imported without its clip, latents already inverted
                       (`inverted`, float32 [C, N, h, w]: the official implementation's `inv_latents`); or nothing
```

Everything is safetensors or JSON; nothing is unpickled. Directories are written whole or not at all. Every JSON
file is read through `read_json`, bounded in size and depth and checked against its schema, so a broken file is an
`ArtefactError` naming the file (relative to its directory) and what is wrong with it, never anything else.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tuner import lora
from tuner.components import Components, load_components
from tuner.inflate import FRAME_POSITIONS, VideoUNet, inflate, is_trainable
from tuner.io_utils import JsonError, read_json_file, sha256_files

FORMAT = "tav-tuned-model"
# v2 added `frame_positions` (a v1 model has none); v3 its value "sinusoidal_short_middle", which a v2 reader
# would run as plain "sinusoidal" if it skipped the schema; v4 `adapter` (a LoRA model's adapter is not the tuned
# tensors, which a v3 reader would load as if it were); v5 a source without its clip (`source.kind`: inverted
# latents only, or nothing), which a v4 reader would fail on. Earlier directories still load (as full adapters).
FORMAT_VERSION = 5
READABLE_VERSIONS = (1, 2, 3, 4, 5)
CONFIG_FILE = "tav_config.json"
ADAPTER_FILE = "adapter.safetensors"
SOURCE_FILE = "source.safetensors"
MAX_SOURCE_FRAMES = 128

_POSITIVE_INT = {"type": "integer", "minimum": 1}
_STRING = {"type": "string"}
_RECOMMENDED = {
    "type": "object",
    "properties": {"steps": {"type": "integer", "minimum": 1, "maximum": 200},
                   "guidance": {"type": "number", "minimum": 1, "maximum": 30}},
}
# What the readers of a tuned model's tav_config.json rely on (writers add more).
CONFIG_SCHEMA = {
    "type": "object",
    "required": ["format", "format_version", "base", "attention_mode", "prompt", "frames", "width", "height",
                 "latent_width", "latent_height", "fps", "adapter_sha256"],
    "properties": {
        "format": {"const": "tav-tuned-model"},
        "format_version": {"type": "integer"},
        "base": {"type": "object", "required": ["path", "sha256"],
                 "properties": {"path": _STRING, "sha256": _STRING, "id": _STRING, "variant": _STRING}},
        "attention_mode": {"enum": ["sparse_causal", "per_frame", "full"]},
        "group_norm": {"enum": ["per_frame", "per_clip"]},
        "frame_positions": {"enum": list(FRAME_POSITIONS)},
        "prompt": {"type": "string", "minLength": 1},
        "frames": _POSITIVE_INT,
        "source_frames": {"type": "integer", "minimum": 0},
        "width": _POSITIVE_INT,
        "height": _POSITIVE_INT,
        "latent_width": _POSITIVE_INT,
        "latent_height": _POSITIVE_INT,
        "fps": {"type": "number", "exclusiveMinimum": 0},
        "recommended": _RECOMMENDED,
        "suggested_prompts": {"type": "array", "items": _STRING, "maxItems": 64},
        "source": {"type": "object", "required": ["kind"],
                   "properties": {"kind": {"enum": ["clip", "inverted", "none"]},
                                  "inverted_steps": {"type": ["integer", "null"], "minimum": 1}}},
        "adapter_sha256": _STRING,
        "adapter": {
            "type": "object", "required": ["kind"],
            "properties": {"kind": {"enum": ["full", "lora"]}, "rank": _POSITIVE_INT,
                           "alpha": {"type": "number", "exclusiveMinimum": 0},
                           "w0": {"type": "object", "required": ["path", "sha256"],
                                  "properties": {"path": _STRING, "sha256": _STRING}}},
            "if": {"properties": {"kind": {"const": "lora"}}},
            "then": {"required": ["kind", "rank", "alpha", "w0"]},
        },
    },
}


class ArtefactError(ValueError):
    """A tuned model or engine directory that is missing, unfinished, broken or of another format version. The
    message names the file relative to its directory: it may be shown to clients."""


def read_json(path: Path, name: str, schema: dict) -> dict:
    """A JSON file of an artefact, checked: bounded in size and depth (`parse_json`), UTF-8, and valid against
    `schema`. `name` is how messages call the file (relative to the model directory)."""
    try:
        value = read_json_file(path, name)
    except JsonError as e:
        raise ArtefactError(str(e)) from None
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(value))
    if error is not None:
        where = "/".join(map(str, error.absolute_path)) or "the document"
        raise ArtefactError(f"{name}: {where}: {_short(error.message)}")
    return value


def _short(message: str) -> str:
    """A schema message without the offending value when that value is long."""
    return message if len(message) <= 200 else message[:200] + "..."


def read_safetensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of an artefact's safetensors file, or ArtefactError naming it."""
    try:
        return load_file(path)
    except FileNotFoundError:
        raise ArtefactError(f"{name} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtefactError(f"{name} is not a readable safetensors file") from e


SOURCE_KINDS = ("clip", "inverted", "none")


@dataclass(frozen=True)
class Source:
    """What a model's edits start from. `latents`: the source clip's scaled VAE latents `[C, N, h, w]`, which the
    server DDIM-inverts at each request's step count (and caches); or `inverted`: latents already inverted
    (`[C, N, h, w]`, from an empty prompt at `inverted_steps` steps), which every request starts from whatever its
    own step count, as the official pipeline does with its `inv_latents`; or neither: the model generates from
    noise only. `frames` is the clip itself (uint8 `[N, H, W, 3]`) when the model has it."""

    latents: torch.Tensor | None = None
    inverted: torch.Tensor | None = None
    inverted_steps: int | None = None
    frames: np.ndarray | None = None

    @property
    def kind(self) -> str:
        return "clip" if self.latents is not None else "inverted" if self.inverted is not None else "none"

    def tensors(self) -> dict[str, torch.Tensor]:
        """The latents as a source file stores them (`latents` or `inverted`; empty for none)."""
        found = {"latents": self.latents, "inverted": self.inverted}
        return {name: tensor.float().contiguous() for name, tensor in found.items() if tensor is not None}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def read_source(path: Path, name: str, kind: str, latent_size: tuple[int, int], inverted_steps: int | None = None,
                with_frames: bool = True) -> Source:
    """The `Source` of kind `kind` in the safetensors file `path` (called `name` in messages), its latents checked
    against `latent_size`."""
    tensors = read_safetensors(path, name)
    key = {"clip": "latents", "inverted": "inverted"}.get(kind)
    if key is None:
        return Source()
    latents = tensors.get(key)
    if latents is None or latents.ndim != 4 or tuple(latents.shape[2:]) != tuple(latent_size):
        raise ArtefactError(f"{name}: '{key}' must be [C, N, {latent_size[0]}, {latent_size[1]}] (the model's "
                            "latent size)")
    if kind == "inverted":
        return Source(inverted=latents, inverted_steps=inverted_steps)
    frames = tensors.get("frames")
    if with_frames and (frames is None or frames.dtype != torch.uint8 or frames.ndim != 4):
        raise ArtefactError(f"{name}: 'frames' must be uint8 [N, H, W, 3]")
    return Source(latents=latents, frames=frames.numpy() if with_frames else None)


@dataclass(frozen=True)
class TunedModel:
    """A tuned model directory, opened and checked (its tensors are read on demand)."""

    path: Path
    config: dict

    @classmethod
    def open(cls, path: str | Path) -> TunedModel:
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise ArtefactError(f"not a tuned model directory ({CONFIG_FILE} is missing)")
        config = read_json(path / CONFIG_FILE, CONFIG_FILE, CONFIG_SCHEMA)
        if config["format_version"] not in READABLE_VERSIONS:
            raise ArtefactError(f"{CONFIG_FILE}: format {FORMAT} v{config['format_version']} is not "
                                f"v{' or v'.join(map(str, READABLE_VERSIONS))}")
        for name in (ADAPTER_FILE, SOURCE_FILE):
            if not (path / name).is_file():
                raise ArtefactError(f"unfinished: {name} is missing")
        return cls(path, config)

    @property
    def base_path(self) -> Path:
        """The base model's directory: recorded relative to this directory when it lies in the same repository
        (the base store a tuning worker fills), so it is found wherever the repository is mounted."""
        return self.path / self.config["base"]["path"]

    @property
    def base_variant(self) -> str | None:
        """The base's weights variant the model was tuned on (diffusers' `variant=`; None: its main weights)."""
        return self.config["base"].get("variant")

    @property
    def base_id(self) -> str:
        """The base's name: its id in the tuning service's allow-list, else its directory's name."""
        return self.config["base"].get("id") or Path(self.config["base"]["path"]).name

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

    @property
    def lora(self) -> dict | None:
        """The `adapter` record of a LoRA model (rank, alpha, W0's path and hash), None for a full one."""
        adapter = self.config.get("adapter", {"kind": "full"})
        return adapter if adapter["kind"] == "lora" else None

    def adapter(self) -> dict[str, torch.Tensor]:
        """The adapter file's tensors as stored: the tuned tensors, or a LoRA model's factors and extras."""
        return read_safetensors(self.path / ADAPTER_FILE, ADAPTER_FILE)

    def w0(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> lora.W0:
        """A LoRA model's W0 (shared per process), checked against the hash the model recorded."""
        record = self.lora["w0"]
        return lora.load_w0(self.path / record["path"], record["sha256"], "this LoRA model", device, dtype)

    def tuned_tensors(self) -> dict[str, torch.Tensor]:
        """Every tuned tensor under its state-dict name, fp32 on the CPU: a LoRA model's merged onto its W0."""
        adapter = self.adapter()
        if self.lora is None:
            return adapter
        return lora_tensors(adapter, self.w0().tensors, self.lora, ADAPTER_FILE)

    def source(self, with_frames: bool = True) -> Source:
        """What edits start from (`Source`), with the clip's frames or without; models before format v5 all hold
        their clip."""
        record = self.config.get("source", {"kind": "clip"})
        return read_source(self.path / SOURCE_FILE, SOURCE_FILE, record["kind"], self.latent_size,
                           record.get("inverted_steps"), with_frames)


def base_reference(base: Path, model_dir: Path) -> str:
    """How a tuned model directory records its base: relative when both lie in one repository, else absolute."""
    base, model_dir = base.resolve(), model_dir.resolve()
    return os.path.relpath(base, model_dir) if base.is_relative_to(model_dir.parent) else str(base)


def adapter_state(unet: VideoUNet) -> dict[str, torch.Tensor]:
    """The tuned tensors of a video UNet, under their state-dict names, as contiguous float32 CPU copies."""
    return {
        name: tensor.detach().float().cpu().contiguous()
        for name, tensor in unet.state_dict().items()
        if is_trainable(name)
    }


def lora_tensors(adapter: dict[str, torch.Tensor], w0: dict[str, torch.Tensor], record: dict, name: str,
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A LoRA adapter (`record`: its rank and alpha) checked against W0 and merged onto it; ArtefactError naming
    the file `name` when it does not fit."""
    try:
        lora.check_lora(adapter, w0, record["rank"])
    except lora.LoraFormatError as e:
        raise ArtefactError(f"{name}: {e}") from None
    return lora.merge(adapter, w0, record["alpha"] / record["rank"], dtype)


def write_tuned_model(directory: Path, config: dict, adapter: dict[str, torch.Tensor], source: Source) -> None:
    """Fill `directory` (a fresh temporary one) with a complete tuned model whose adapter file holds `adapter`
    (`adapter_state`, or a LoRA model's `tuner.lora.lora_state`) and whose edits start from `source`."""
    save_file(adapter, directory / ADAPTER_FILE)
    tensors = source.tensors()
    if source.frames is not None:
        tensors["frames"] = torch.from_numpy(np.ascontiguousarray(source.frames))
    save_file(tensors, directory / SOURCE_FILE)
    adapter_hash = sha256_files([directory / ADAPTER_FILE], directory)
    record = {"kind": source.kind, **({"inverted_steps": source.inverted_steps} if source.kind == "inverted" else {})}
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **config, "source": record,
            "adapter_sha256": adapter_hash}
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
    components = load_components(model.base_path, device, dtype, model.base_variant)
    inflate(components.unet, *model.architecture)
    apply_adapter(components.unet, model.tuned_tensors())
    return model, components


# The engine directory (`RUN/engines/`, written by the exporter, read by the server):
#   manifest.json        format version, backends, the model, shapes and the UNet's profiles, producer versions;
#                        for ONNX: precision, graphs (file, I/O names, shapes, dtypes, sha256), opset, store key and
#                        path (and a `tensorrt` record); for AOTInductor: an `aoti` record per device (store key and
#                        path, precision, torch version, compile target, packages and weights with their sha256)
#   tokenizer/           the tokenizer files
#   scheduler_config.json
#   adapter.safetensors  the tuned tensors (fp32) under their names in the graphs and packages
#   source.safetensors   the source clip's scaled latents (`latents`), or inverted latents (`inverted`; the
#                        manifest's `source` record says which), or nothing
# The graphs and packages themselves live once per base model (and size, precision, attention mode; device,
# torch version and compile target for packages) in the shared store `REPO/.engines/<key>/`, which the manifest
# points to by a path relative to the engine directory.
ENGINE_FORMAT = "tav-engines"
ENGINE_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ENGINE_ADAPTER_FILE = "adapter.safetensors"
ENGINE_SOURCE_FILE = "source.safetensors"
SCHEDULER_FILE = "scheduler_config.json"
ENGINE_DIR = "engines"  # in a tuned model directory
STORE_DIR = ".engines"  # in a repository: the shared engine store, entries by key
# The shared ONNX graphs for feature reuse between denoising steps (`cache_interval`): the full UNet pass with the
# branch features as a second output, and the shallow pass from them. Optional in a manifest: older exports lack them.
BRANCH_GRAPHS = ("unet_full_branch", "unet_shallow")

_FILE_NAME = {"type": "string", "pattern": r"^[^/\\]+$"}  # a plain name inside the store entry
_SIZE = {"type": "array", "items": _POSITIVE_INT, "minItems": 2, "maxItems": 2}
# What the readers of an engine directory's manifest.json rely on (backends may add their own sections).
MANIFEST_SCHEMA = {
    "type": "object",
    "required": ["format", "format_version", "backends", "model", "latent_channels", "latent_size", "pixel_size",
                 "text_shape", "scaling_factor", "fps", "defaults", "adapter_sha256", "source_sha256"],
    # the ONNX graphs' fields are there when onnxruntime is (TensorRT's plans are built from the same graphs)
    "if": {"properties": {"backends": {"contains": {"enum": ["onnxruntime", "tensorrt"]}}}},
    "then": {"required": ["precision", "store", "graphs", "weight_map"]},
    "properties": {
        "format": {"const": "tav-engines"},
        "format_version": {"type": "integer"},
        "backends": {"type": "array", "items": _STRING},
        "precision": {"enum": ["fp32", "fp16", "bf16"]},
        "store": {"type": "object", "required": ["key", "path"], "properties": {"key": _STRING, "path": _STRING}},
        "graphs": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["file", "files", "sha256"],
            "properties": {"file": _FILE_NAME, "files": {"type": "array", "items": _FILE_NAME}, "sha256": _STRING}}},
        "weight_map": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["input"], "properties": {"input": _STRING}}},
        "model": {"type": "object", "required": ["model_hash", "base_path", "prompt", "frames", "attention_mode"],
                  "properties": {"model_hash": _STRING, "base_path": _STRING, "prompt": _STRING,
                                 "frames": _POSITIVE_INT, "attention_mode": _STRING}},
        "unet_profiles": {"type": "array"},
        "latent_channels": _POSITIVE_INT,
        "latent_size": _SIZE,
        "pixel_size": _SIZE,
        "text_shape": _SIZE,
        "scaling_factor": {"type": "number", "exclusiveMinimum": 0},
        "fps": {"type": "number", "exclusiveMinimum": 0},
        "defaults": _RECOMMENDED,
        "adapter_sha256": _STRING,
        "source_sha256": _STRING,
        "source": CONFIG_SCHEMA["properties"]["source"],
        "aoti": {"type": "object", "additionalProperties": {"type": "object", "required": ["store"]}},
        # a LoRA model's: the adapter file holds its factors, merged by the runtimes onto this W0
        "lora": {"type": "object", "required": ["rank", "alpha", "w0"],
                 "properties": {"rank": _POSITIVE_INT, "alpha": {"type": "number", "exclusiveMinimum": 0},
                                "w0": {"type": "object", "required": ["path", "sha256"],
                                       "properties": {"path": _STRING, "sha256": _STRING}}}},
    },
}


@dataclass(frozen=True)
class EngineDir:
    """An engine directory, opened and checked against its manifest."""

    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path) -> EngineDir:
        """Open `path` (`RUN/engines`); messages name its files as `engines/<file>`."""
        path = Path(path)
        if not (path / MANIFEST_FILE).is_file():
            raise ArtefactError(f"no engines ({ENGINE_DIR}/{MANIFEST_FILE} is missing): run tav-export")
        manifest = read_json(path / MANIFEST_FILE, f"{ENGINE_DIR}/{MANIFEST_FILE}", MANIFEST_SCHEMA)
        if manifest["format_version"] != ENGINE_FORMAT_VERSION:
            raise ArtefactError(f"{ENGINE_DIR}/{MANIFEST_FILE}: engine format v{manifest['format_version']} is not "
                                f"v{ENGINE_FORMAT_VERSION}: re-run tav-export")
        for name in (ENGINE_ADAPTER_FILE, ENGINE_SOURCE_FILE, SCHEDULER_FILE, "tokenizer"):
            if not (path / name).exists():
                raise ArtefactError(f"{ENGINE_DIR} is unfinished: {name} is missing")
        return cls(path, manifest)

    @property
    def store(self) -> Path:
        return (self.path / self.manifest["store"]["path"]).resolve()

    def graph_path(self, name: str) -> Path:
        return self.store / self.manifest["graphs"][name]["file"]

    def verify(self, names: tuple[str, ...] | None = None) -> None:
        """Check that each graph (and the adapter) still has the content hash the manifest recorded."""
        for name in names or tuple(self.manifest.get("graphs", {})):
            graph = self.manifest["graphs"][name]
            files = [self.store / f for f in graph["files"]]
            if not all(f.is_file() for f in files):
                raise ArtefactError(f"the shared graph {name} of store entry {self.manifest['store']['key']} is "
                                    f"missing: re-run tav-export")
            if sha256_files(files, self.store) != graph["sha256"]:
                raise ArtefactError(f"the shared graph {name} of store entry {self.manifest['store']['key']} does not "
                                    f"match its recorded hash: re-run tav-export")
        if sha256_files([self.path / ENGINE_ADAPTER_FILE], self.path) != self.manifest["adapter_sha256"]:
            raise ArtefactError(f"{ENGINE_DIR}/{ENGINE_ADAPTER_FILE} does not match its recorded hash")

    def adapter(self) -> dict[str, torch.Tensor]:
        return read_safetensors(self.path / ENGINE_ADAPTER_FILE, f"{ENGINE_DIR}/{ENGINE_ADAPTER_FILE}")

    def source(self) -> Source:
        """What edits start from: the source clip's latents, inverted latents or nothing (no clip frames here)."""
        record = self.manifest.get("source", {"kind": "clip"})
        return read_source(self.path / ENGINE_SOURCE_FILE, f"{ENGINE_DIR}/{ENGINE_SOURCE_FILE}", record["kind"],
                           tuple(self.manifest["latent_size"]), record.get("inverted_steps"), with_frames=False)

    def scheduler_config(self) -> dict:
        return read_json(self.path / SCHEDULER_FILE, f"{ENGINE_DIR}/{SCHEDULER_FILE}", {"type": "object"})
