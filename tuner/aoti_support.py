"""What both AOTInductor paths (the exporter's build, the server's `aoti` engine) must agree on: the torch versions
the engine is supported on, the compile target of this machine, and what a package says it was built for.

A package is native code compiled for one torch build, one device type and one instruction set (CPU) or compute
capability (CUDA). It records all three in its own metadata, which is read here without loading the package, so
a package built elsewhere is refused with a message before any of its code runs.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

# Where AOTInductor packages were shown to build, load and run for this project: CPU with torch 2.13 (measured);
# CUDA from torch 2.11, where export and compile were measured and loading is the open question (docs/ARCHITECTURE.md).
MIN_TORCH = {"cpu": (2, 13), "cuda": (2, 11)}
DEVICES = tuple(MIN_TORCH)
# The package metadata keys this project writes at compile time (AOTInductor's own: AOTI_DEVICE_KEY, AOTI_CPU_ISA).
TORCH_KEY, DEVICE_KEY, TARGET_KEY = "tav_torch_version", "tav_device", "tav_compile_target"


def torch_release(version: str = torch.__version__) -> tuple[int, int]:
    """(major, minor) of a torch version string such as `2.13.0+cpu` or `2.11.0a0+git1234`."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"not a torch version: {version!r}")
    return int(match.group(1)), int(match.group(2))


def require_aoti(device: str, error: type[Exception] = RuntimeError, version: str = torch.__version__) -> None:
    """Raise `error` unless the aoti engine is supported here on `device` (a torch version at or above the floor,
    and a CUDA device when asked for one)."""
    if device not in MIN_TORCH:
        raise error(f"the aoti engine runs on {' or '.join(DEVICES)}, not {device!r}")
    floor = MIN_TORCH[device]
    if torch_release(version) < floor:
        raise error(f"the aoti engine on {device} needs torch {floor[0]}.{floor[1]} or newer (this is torch "
                    f"{version}): use another backend or upgrade torch")
    if device == "cuda" and not torch.cuda.is_available():
        raise error("the aoti engine on cuda needs a CUDA device, and none is visible")


def compile_target(device: str) -> str:
    """What a package compiled here is tied to besides torch: the CPU's vector instruction set, or the GPU's
    compute capability, e.g. `cpu-avx512-avx512_vnni` or `cuda-sm90`."""
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        return f"cuda-sm{major}{minor}"
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return "cpu-" + (re.sub(r"\s+", "-", str(pick_vec_isa()).strip().lower()) or "scalar")


def build_metadata(device: str) -> dict[str, str]:
    """What every package records of the machine it was compiled on (`aot_inductor.metadata`)."""
    return {TORCH_KEY: torch.__version__, DEVICE_KEY: device, TARGET_KEY: compile_target(device)}


def read_package_metadata(path: str | Path) -> dict[str, str]:
    """A package's metadata, read from the archive without loading its shared library."""
    return dict(torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(str(path), "model"))


def package_problems(metadata: dict[str, str], device: str, here: dict[str, str]) -> list[str]:
    """How a package's metadata differs from this machine (`here`: `build_metadata(device)`); empty if it fits."""
    problems = []
    built_device = metadata.get(DEVICE_KEY, metadata.get("AOTI_DEVICE_KEY"))
    if built_device != device:
        problems.append(f"device {built_device} (this engine runs on {device})")
    if metadata.get(TORCH_KEY) != here[TORCH_KEY]:
        problems.append(f"torch {metadata.get(TORCH_KEY, 'unknown')} (this is torch {here[TORCH_KEY]})")
    if metadata.get(TARGET_KEY) != here[TARGET_KEY]:
        problems.append(f"compile target {metadata.get(TARGET_KEY, 'unknown')} (this machine is {here[TARGET_KEY]})")
    return problems
