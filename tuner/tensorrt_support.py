"""The first thing both TensorRT paths (the exporter's plan build, the server's runtime) must know: whether TensorRT
is usable on this machine, and which GPU plans are built for. `tensorrt` is imported only when asked, so the rest
of the project runs without it.

Usable means: TensorRT 10.2 or newer (REFIT_INDIVIDUAL and `mark_weights_refittable`, which the refittable UNet
needs, exist from 10.2), a CUDA device, a TensorRT built for the CUDA major torch was built for, and a driver that
runs that CUDA major (TensorRT for CUDA 13, what `tensorrt>=10.1` resolves to today, needs driver r580 or newer).
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterable
from importlib import metadata

import torch

INSTALL_HINT = "the tensorrt backend needs an NVIDIA GPU with the tensorrt package: pip install '.[gpu]'"
MIN_TENSORRT = (10, 2)
# The extra of pyproject.toml that installs TensorRT for each CUDA major, and the oldest Linux driver branch that
# runs that CUDA major.
EXTRAS = {12: "gpu-cu12", 13: "gpu"}
MIN_DRIVER = {12: "r525", 13: "r580"}


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: `10.8.0.43` -> (10, 8, 0, 43), `13.0` -> (13, 0)."""
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:4])


def tensorrt_cuda_majors(distributions: Iterable[str]) -> set[int]:
    """The CUDA majors of the TensorRT builds among installed distribution names (`tensorrt-cu13`,
    `tensorrt_cu12_libs`, ...)."""
    majors = set()
    for name in distributions:
        match = re.fullmatch(r"tensorrt[-_]cu(\d+)(?:[-_](?:libs|bindings))?", name.lower())
        if match:
            majors.add(int(match.group(1)))
    return majors


def cuda_problem(tensorrt_majors: set[int], torch_cuda: str | None, driver_cuda: int | None) -> str | None:
    """What keeps this TensorRT from running beside this torch on this driver, or None. `driver_cuda` is the
    driver's CUDA version as `cuDriverGetVersion` gives it (13000 for 13.0); unknown values are not judged."""
    if len(tensorrt_majors) > 1:
        builds = " and ".join(map(str, sorted(tensorrt_majors)))
        return f"TensorRT builds for CUDA {builds} are both installed: keep one"
    major = next(iter(tensorrt_majors), None)
    torch_major = release(torch_cuda)[0] if torch_cuda else None
    if major is not None and torch_major is not None and major != torch_major:
        return (f"TensorRT is built for CUDA {major}, torch for CUDA {torch_major}: "
                f"pip install '.[{EXTRAS.get(torch_major, f'gpu-cu{torch_major}')}]' instead")
    needed = major or torch_major
    if needed is not None and driver_cuda is not None and driver_cuda // 1000 < needed:
        return (f"the NVIDIA driver runs CUDA up to {driver_cuda // 1000}.{driver_cuda % 1000 // 10}, and TensorRT "
                f"for CUDA {needed} needs driver {MIN_DRIVER.get(needed, f'for CUDA {needed}')} or newer")
    return None


def driver_cuda_version() -> int | None:
    """The CUDA version the installed driver runs (`cuDriverGetVersion`), or None where there is no driver."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int()
    return version.value if cuda.cuDriverGetVersion(ctypes.byref(version)) == 0 else None


def require_tensorrt(error: type[Exception] = RuntimeError):
    """The `tensorrt` module, once it and a CUDA GPU are known to be there; else `error` saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise error(f"{INSTALL_HINT} (tensorrt is not installed)") from e
    if not torch.cuda.is_available():
        raise error(f"{INSTALL_HINT} (no CUDA device is visible)")
    if release(trt.__version__)[:2] < MIN_TENSORRT:
        raise error(f"{INSTALL_HINT} (TensorRT {'.'.join(map(str, MIN_TENSORRT))} or newer; found {trt.__version__})")
    majors = tensorrt_cuda_majors(d.metadata["Name"] or "" for d in metadata.distributions())
    problem = cuda_problem(majors, torch.version.cuda, driver_cuda_version())
    if problem:
        raise error(f"the tensorrt backend cannot run here: {problem}")
    return trt


def current_gpu() -> dict:
    """This machine's GPU as plans record it: name and compute capability."""
    major, minor = torch.cuda.get_device_capability()
    return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
