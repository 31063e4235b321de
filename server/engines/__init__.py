"""Runtime engines behind one interface (`base.Engines`): torch | onnxruntime | tensorrt | aoti."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from server.engines.base import Engines, LoadedModel
from tuner.artefacts import BRANCH_GRAPHS

BACKENDS = ("torch", "onnxruntime", "tensorrt", "aoti")


def check_backend(backend: str, device: str | None = None, compile_mode: str | None = None) -> None:
    """Raise ValueError saying why `backend` (with its UNet compiled by `compile_mode`, torch only) cannot run on
    this machine (checked once, at server start)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    check_compile(backend, compile_mode)
    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is visible")
    if backend == "tensorrt":
        from tuner.tensorrt_support import require_tensorrt

        require_tensorrt(ValueError)
    if backend == "aoti":
        from tuner.aoti_support import require_aoti

        require_aoti((device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0], ValueError)


def check_compile(backend: str, compile_mode: str | None) -> None:
    """Raise ValueError unless `compile_mode` is None or `backend` is torch (the only one compiled at load)."""
    if compile_mode is not None and backend != "torch":
        raise ValueError(f"--compile is an option of the torch backend, not {backend} (whose engines tav-export "
                         f"builds)")


def add_torch_engine_arguments(p: argparse.ArgumentParser) -> None:
    """`--compile [MODE]` and `--cuda-graphs on|off`, as every command that loads torch engines takes them."""
    from tuner.compiled import COMPILE_MODES

    p.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, metavar="MODE",
                   help="torch backend: compile the video UNet with torch.compile (MODE: "
                        f"{', '.join(COMPILE_MODES)}; default: default), reading the compiled code tav-export "
                        "--torch-compile left in the engine store")
    p.add_argument("--cuda-graphs", choices=("on", "off"), default="on",
                   help="torch backend on CUDA: replay the video UNet from one CUDA graph per batch (default on; "
                        "the compile modes reduce-overhead and max-autotune capture their own)")


def supports_cache_interval(backend: str, manifest: dict | None) -> bool:
    """Whether `backend` serves `cache_interval` > 1 for a model whose engine manifest is `manifest` (None: not
    exported), told without loading it: torch always, ONNX Runtime with the branch graphs, the others not yet."""
    if backend == "torch":
        return True
    if backend == "onnxruntime":
        return manifest is not None and set(BRANCH_GRAPHS) <= set(manifest.get("graphs", {}))
    return False


def load_model(path: str | Path, backend: str = "torch", device: str | None = None, name: str | None = None,
               compile_mode: str | None = None, cuda_graphs: bool = True) -> LoadedModel:
    """Load a tuned model directory for `backend` (torch: its UNet compiled by `compile_mode`, when given, and on
    CUDA replayed from CUDA graphs unless `cuda_graphs` is False)."""
    check_compile(backend, compile_mode)
    if backend == "torch":
        from server.engines.torch_engine import load_torch_model

        return load_torch_model(path, device, name, compile_mode, cuda_graphs)
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


__all__ = ["BACKENDS", "Engines", "LoadedModel", "add_torch_engine_arguments", "check_backend", "check_compile",
           "load_model", "supports_cache_interval"]
