"""The first thing both TensorRT paths (the exporter's plan build, the server's runtime) must know: whether TensorRT
is usable on this machine, and which GPU plans are built for. `tensorrt` is imported only when asked, so the rest
of the project runs without it."""

from __future__ import annotations

import re

import torch

INSTALL_HINT = "the tensorrt backend needs an NVIDIA GPU with the tensorrt package: pip install '.[gpu]'"
# REFIT_INDIVIDUAL refitting, and per-profile execution contexts sharing user-managed device memory
MIN_TENSORRT = (10, 1)


def require_tensorrt(error: type[Exception] = RuntimeError):
    """The `tensorrt` module, once it and a CUDA GPU are known to be there; else `error` saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise error(f"{INSTALL_HINT} (tensorrt is not installed)") from e
    if not torch.cuda.is_available():
        raise error(f"{INSTALL_HINT} (no CUDA device is visible)")
    if tuple(int(p) for p in re.findall(r"\d+", trt.__version__)[:2]) < MIN_TENSORRT:
        raise error(f"{INSTALL_HINT} (TensorRT {'.'.join(map(str, MIN_TENSORRT))} or newer; found {trt.__version__})")
    return trt


def current_gpu() -> dict:
    """This machine's GPU as plans record it: name and compute capability."""
    major, minor = torch.cuda.get_device_capability()
    return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
