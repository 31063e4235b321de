"""AOTInductor engines (`backend = "aoti"`): the packages `tav-export --aoti` compiled for a model's base, run in
this process on CPU or CUDA.

A package is native code, so it is checked before it is loaded:
- the torch version is one the engine is supported on for the device (`tuner.aoti_support`);
- the package's sha256 is the one the manifest recorded, and its own metadata (read without loading it) says it
  was built for this torch version, device and compile target;
- its weights file matches its hash, and every tensor's name, shape and dtype is what the package was compiled
  against (`load_constants` checks none of that);
- inputs are checked against the shapes and dtypes the package was compiled for before every call (the package
  does not check them).
A package holds no weights and must never be called before they are loaded: a `Package` loads them, with a check
that every constant was set, before it is returned to anyone.

Packages are shared per base like the other engines' graphs: one `Package` per file in the process, however many
models of that base are loaded. Each model holds its tuned tensors; `activate` swaps them into the shared UNet with
`load_constants` when another model's were active (`last_switch_seconds`): a model switch recompiles nothing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from server.engines.base import (
    Engines,
    EngineShapeError,
    LoadedModel,
    TunedTensors,
    model_from_engine_dir,
    open_engine_dir,
)
from tuner import artefacts
from tuner.aoti_support import build_metadata, package_problems, read_package_metadata, require_aoti
from tuner.artefacts import ArtefactError, EngineDir
from tuner.io_utils import file_sha256, sha256_files


def check_constants(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, list], what: str) -> None:
    """Every tensor must be one the package has (`expected`: name -> [shape, dtype]) with that shape and dtype;
    raise listing what is not."""
    problems = []
    for name, tensor in tensors.items():
        if name not in expected:
            problems.append(f"{name} is not a constant of the package")
            continue
        shape, dtype = expected[name]
        if list(tensor.shape) != list(shape) or str(tensor.dtype).removeprefix("torch.") != dtype:
            problems.append(f"{name} is {list(tensor.shape)} {tensor.dtype}, the package's is {shape} {dtype}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ArtefactError(f"{what} does not fit its package: {'; '.join(problems[:5])}{more}")


def check_package(model: str, path: Path, record: dict, device: torch.device) -> None:
    """Before any of a package's code is loaded: its bytes and its weights' are those the manifest recorded, and
    its metadata says it was built for this torch version, device and compile target."""
    if file_sha256(path) != record["sha256"]:
        raise ArtefactError(f"model {model!r}: package {path} does not match its recorded hash: "
                            "re-run tav-export --aoti")
    problems = package_problems(read_package_metadata(path), device.type, build_metadata(device.type))
    if problems:
        raise ArtefactError(f"model {model!r}: package {path.name} was built for {' and '.join(problems)}: "
                            f"rebuild it here with tav-export --aoti --device {device.type}")
    weights = path.with_name(record["weights"])
    if file_sha256(weights) != record["weights_sha256"]:
        raise ArtefactError(f"model {model!r}: {weights} does not match its recorded hash: re-run tav-export --aoti")


class Package:
    """One loaded AOTInductor package with its constants set (checked first by `check_package`); the tuned tensors
    of `active` in it (UNet)."""

    loads = 0  # packages loaded in this process: model switches must not add to it

    def __init__(self, model: str, path: Path, record: dict, device: torch.device) -> None:
        self.path = path
        self.inputs = record["inputs"]
        self.constants = record["constants"]
        self.device = device
        weights_path = path.with_name(record["weights"])
        weights = load_file(weights_path, device=str(device))
        if set(weights) != set(self.constants):
            raise ArtefactError(f"model {model!r}: {weights_path.name} does not hold the package's constants")
        check_constants(weights, self.constants, f"model {model!r}: {weights_path.name}")
        index = device.index if device.type == "cuda" and device.index is not None else -1
        self._runner = torch._inductor.aoti_load_package(str(path), device_index=index)
        Package.loads += 1
        if set(self._runner.get_constant_fqns()) != set(self.constants):
            raise ArtefactError(f"model {model!r}: package {path.name} asks for other constants than its record")
        self._runner.load_constants(weights, check_full_update=True)
        self.active: str | None = None  # the key of the tuned tensors now in the package

    def swap(self, key: str, tensors: Mapping[str, torch.Tensor]) -> float | None:
        """Load `tensors` (checked at the model's load) unless they are active already; the seconds it took."""
        if self.active == key:
            return None
        started = time.perf_counter()
        self.active = None  # until the swap succeeds
        self._runner.load_constants(dict(tensors), check_full_update=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.active = key
        return time.perf_counter() - started

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        self._check(inputs)
        return self._runner(*inputs)

    def _check(self, inputs: tuple[torch.Tensor, ...]) -> None:
        if len(inputs) != len(self.inputs):
            raise EngineShapeError(f"{self.path.name} takes {len(self.inputs)} inputs, got {len(inputs)}")
        batch = None
        for spec, tensor in zip(self.inputs, inputs, strict=True):
            shape = list(tensor.shape)
            if spec["shape"][:1] == ["B"]:
                batch = shape[0] if batch is None else batch
                expected = [batch, *spec["shape"][1:]]
                ok = batch in (1, 2) and shape == expected
            else:
                ok = shape == spec["shape"]
            if not ok or str(tensor.dtype).removeprefix("torch.") != spec["dtype"] or tensor.device != self.device \
                    or not tensor.is_contiguous():
                raise EngineShapeError(f"{self.path.name}: input {spec['name']} must be a contiguous {spec['dtype']} "
                                       f"tensor {spec['shape']} on {self.device}, got {tensor.dtype} {shape} on "
                                       f"{tensor.device}")


# Packages by (file, device), shared by every model of their base in this process.
_PACKAGES: dict[tuple[str, str], Package] = {}


def _key(path: Path, device: torch.device) -> tuple[str, str]:
    return str(path.resolve()), str(device)


def _package(model: str, path: Path, record: dict, device: torch.device) -> Package:
    key = _key(path, device)
    if key not in _PACKAGES:
        _PACKAGES[key] = Package(model, path, record, device)
    return _PACKAGES[key]


class AotiEngines(Engines):
    backend = "aoti"

    def __init__(self, engine_dir: EngineDir, record: dict, model: str, device: torch.device) -> None:
        manifest = engine_dir.manifest
        super().__init__((manifest["latent_channels"], *manifest["latent_size"]), tuple(manifest["text_shape"]))
        self.device = device
        store = (engine_dir.path / record["store"]["path"]).resolve()
        paths = {name: store / entry["file"] for name, entry in record["packages"].items()}
        for name, entry in record["packages"].items():  # every package, before any is loaded
            if _key(paths[name], device) not in _PACKAGES:
                check_package(model, paths[name], entry, device)
        self.packages = {name: _package(model, paths[name], entry, device)
                         for name, entry in record["packages"].items()}
        unet = self.packages["unet"]
        self.dtype = _dtype(next(i["dtype"] for i in unet.inputs if i["name"] == "sample"))
        self.vae_dtype = _dtype(self.packages["vae_decoder"].inputs[0]["dtype"])
        # a LoRA model keeps its factors and merges them onto W0 on each swap into the package
        self.tensors = TunedTensors.of_engine_dir(engine_dir, device, self.dtype)
        names = self.tensors.w0.tensors if self.tensors.is_lora else self.tensors.stored
        if set(names) != set(record["tunable"]):
            raise ArtefactError(f"model {model!r}: its adapter's tensors are not the UNet package's tunable tensors")
        check_constants({n: t.to(_dtype(unet.constants[n][1])) for n, t in names.items()}, unet.constants,
                        f"model {model!r}: the adapter")
        self.adapter = None if self.tensors.is_lora else self._adapter()
        self.adapter_key = manifest["adapter_sha256"]
        self.last_switch_seconds: float | None = None
        self.activate()  # swap in now, so that the first request does not pay for it

    def _adapter(self) -> dict[str, torch.Tensor]:
        """The tuned tensors in the UNet package's constants' dtypes (a LoRA model's merged now)."""
        constants = self.packages["unet"].constants
        return {n: t.to(_dtype(constants[n][1])).contiguous() for n, t in self.tensors.merged().items()}

    def activate(self) -> None:
        """Make this model's tuned tensors the shared UNet's (a swap only if another model's are active)."""
        unet = self.packages["unet"]
        if unet.active == self.adapter_key:
            return
        seconds = unet.swap(self.adapter_key, self.adapter if self.adapter is not None else self._adapter())
        if seconds is not None:
            self.last_switch_seconds = seconds

    def _input(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return tensor.to(self.device, dtype).contiguous()

    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.packages["text_encoder"](self._input(input_ids, torch.int64))

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.packages["vae_encoder"](self._input(pixels, self.vae_dtype))

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.packages["vae_decoder"](self._input(latents, self.vae_dtype))

    @torch.inference_mode()
    def run_unet(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        self.activate()
        out = self.packages["unet"](self._input(sample, self.dtype), self._input(timestep, torch.float32),
                                    self._input(text, self.dtype))
        return out.float()


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def load_aoti_model(run: str | Path, device: str | None = None, name: str | None = None) -> LoadedModel:
    """Load a tuned model's engine directory (`RUN/engines`, or an engine directory itself) for AOTInductor on
    `device` (default: cuda when available): its base's packages (shared), checked, with its tuned tensors in."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    require_aoti(device.type)
    if device.type == "cuda" and device.index is None:  # tensors say cuda:N; inputs are compared with this device
        device = torch.device("cuda", torch.cuda.current_device())
    engine_dir, default_name = open_engine_dir(run)
    name = name or default_name
    record = engine_dir.manifest.get("aoti", {}).get(device.type)
    if record is None:
        raise ArtefactError(f"model {name!r} has no AOTInductor packages for {device.type}: run tav-export --aoti "
                            f"--device {device.type}")
    adapter_file = engine_dir.path / artefacts.ENGINE_ADAPTER_FILE
    if sha256_files([adapter_file], engine_dir.path) != engine_dir.manifest["adapter_sha256"]:
        raise ArtefactError(f"model {name!r}: {adapter_file} does not match its recorded hash")
    engines = AotiEngines(engine_dir, record, name, device)
    aoti = {"device": device.type, "torch_version": record["torch_version"],
            "compile_target": record["compile_target"], "switch_seconds": engines.last_switch_seconds}
    return model_from_engine_dir(engine_dir, engines, name, precision=record["precision"], aoti=aoti)
