"""Versions of the libraries an artefact was produced with, recorded in every artefact and benchmark."""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("tuneavideo-serve", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "tensorrt")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found
