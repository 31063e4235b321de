"""Compiled code of the torch engine's video UNet (`torch.compile`), kept in the engine store so that a restarted
process skips Inductor's code generation.

A store entry `REPO/.engines/<key>/` holds `torch_compile.bin`, PyTorch's portable cache artefacts
(`torch.compiler.save_cache_artifacts`), and `torch_compile.json`, its index (mode, device, torch and Triton
versions, compile target, the batches compiled, the file's sha256). The key names everything the compiled code
depends on: base content, latent size, attention mode, GroupNorm and frame positions, dtype, mode, torch and Triton
versions, device and compile target. Tuned tensors are not in it: the weights are graph inputs, not constants
folded into the code, so every tuned model of a base runs the same compiled code (and `tav-export --gc` keeps an
entry while a model of its base, `base_sha256` in the index, is in the repository).

`tav-export --torch-compile` writes entries; a replica (which mounts the repository read-only) only reads them.
On CUDA the artefacts hold the Triton kernels too; on CPU they hold Inductor's generated code, and the C++
compiler still runs on a restart when the inductor cache directory is empty (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tuner.aoti_support import compile_target
from tuner.io_utils import JsonError, atomic_directory, file_sha256, read_json_file

if TYPE_CHECKING:
    from tuner.artefacts import TunedModel

FORMAT = "tav-torch-compile"
FORMAT_VERSION = 1
ARTEFACTS, INDEX = "torch_compile.bin", "torch_compile.json"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
OWN_CUDA_GRAPHS = ("reduce-overhead", "max-autotune")  # modes whose code captures CUDA graphs itself


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def store_key(model: TunedModel, device: torch.device, dtype: torch.dtype, mode: str) -> str:
    """The store entry of `model`'s compiled UNet on `device` (hashed key parts, as the other entries')."""
    c = model.config
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    parts = [c["base"]["sha256"], c["latent_height"], c["latent_width"], *model.architecture, str(dtype), mode,
             FORMAT, FORMAT_VERSION, torch.__version__, triton_version(), name, compile_target(device.type)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def read_entry(entry: Path) -> bytes | None:
    """The artefacts of a complete, intact entry, or None (absent, partial or corrupt: the engine compiles)."""
    try:
        index = read_json_file(entry / INDEX, INDEX)
        if index.get("format") != FORMAT or index.get("format_version") != FORMAT_VERSION:
            return None
        data = (entry / ARTEFACTS).read_bytes()
    except (OSError, JsonError, AttributeError):
        return None
    return data if hashlib.sha256(data).hexdigest() == index.get("sha256") else None


def write_entry(entry: Path, data: bytes, index: dict) -> None:
    """Write an entry whole (a directory renamed into place), replacing an older one."""
    with atomic_directory(entry, overwrite=True) as tmp:
        (tmp / ARTEFACTS).write_bytes(data)
        index = {"format": FORMAT, "format_version": FORMAT_VERSION, **index,
                 "sha256": file_sha256(tmp / ARTEFACTS)}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
