"""Runtime engines behind one interface (`base.Engines`): torch | onnxruntime | tensorrt | aoti."""

from __future__ import annotations

from pathlib import Path

import torch

from server.engines.base import Engines, LoadedModel
from tuner.artefacts import BRANCH_GRAPHS

BACKENDS = ("torch", "onnxruntime", "tensorrt", "aoti")


def check_backend(backend: str, device: str | None = None) -> None:
    """Raise ValueError saying why `backend` cannot run on this machine (checked once, at server start)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is visible")
    if backend == "tensorrt":
        from tuner.tensorrt_support import require_tensorrt

        require_tensorrt(ValueError)
    if backend == "aoti":
        from tuner.aoti_support import require_aoti

        require_aoti((device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0], ValueError)


def supports_cache_interval(backend: str, manifest: dict | None) -> bool:
    """Whether `backend` serves `cache_interval` > 1 for a model whose engine manifest is `manifest` (None: not
    exported), told without loading it: torch always, ONNX Runtime with the branch graphs, the others not yet."""
    if backend == "torch":
        return True
    if backend == "onnxruntime":
        return manifest is not None and set(BRANCH_GRAPHS) <= set(manifest.get("graphs", {}))
    return False


def load_model(path: str | Path, backend: str = "torch", device: str | None = None, name: str | None = None
               ) -> LoadedModel:
    """Load a tuned model directory for `backend`."""
    if backend == "torch":
        from server.engines.torch_engine import load_torch_model

        return load_torch_model(path, device, name)
    if backend == "onnxruntime":
        from server.engines.onnx_engine import load_onnx_model

        return load_onnx_model(path, name)
    if backend == "tensorrt":
        from server.engines.tensorrt_engine import load_tensorrt_model

        return load_tensorrt_model(path, name)
    if backend == "aoti":
        from server.engines.aoti_engine import load_aoti_model

        return load_aoti_model(path, device, name)
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


__all__ = ["BACKENDS", "Engines", "LoadedModel", "check_backend", "load_model", "supports_cache_interval"]
