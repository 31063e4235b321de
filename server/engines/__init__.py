"""Runtime engines behind one interface (`base.Engines`): torch | onnxruntime | tensorrt | aoti."""

from __future__ import annotations

from pathlib import Path

from server.engines.base import Engines, LoadedModel

BACKENDS = ("torch", "onnxruntime", "tensorrt", "aoti")


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


__all__ = ["BACKENDS", "Engines", "LoadedModel", "load_model"]
