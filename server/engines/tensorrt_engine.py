"""TensorRT engines: the plans `tav-export --tensorrt` built beside a model's shared base graphs, run on torch CUDA
tensors.

- Plans are shared per base model like the graphs: one deserialized engine per plan file in the process, however
  many models of that base are loaded. A model costs its adapter tensors, kept on the GPU.
- The UNet plan is refittable in exactly the tunable tensors. Each model's engines call `activate` before every
  UNet call, which refits the shared UNet from the model's adapter only when another adapter is active: requests
  to one model refit nothing, a switch between models costs one refit (`last_refit_seconds`).
- Each optimization profile of a plan (the UNet's batch 1 and batch 2) has its own execution context and static
  I/O buffers; the contexts share one scratch buffer, as they only ever run one at a time on the plan's stream.
  The UNet's call is captured in a CUDA graph per profile after a warm-up run and replayed after; a refit drops
  the graphs, and the next call captures them again.
- Plans are checked at load against this machine (TensorRT version, GPU) and their recorded hashes.

`tensorrt` is imported only when a model loads: everything else in the project runs without it. Threading: like
every engine, these belong to the one worker thread that loads and runs models.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper

from server.engines.base import (
    Engines,
    EngineShapeError,
    LoadedModel,
    TunedTensors,
    model_from_engine_dir,
    open_engine_dir,
)
from tuner import artefacts
from tuner.artefacts import ArtefactError, EngineDir
from tuner.io_utils import sha256_files
from tuner.tensorrt_support import current_gpu, require_tensorrt


def check_plans(model: str, record: dict, tensorrt_version: str, gpu: dict) -> None:
    """Plans run only with the TensorRT version and on the GPU they were built with: raise, naming the model, if the
    manifest's TensorRT record says otherwise."""
    problems = []
    if record["tensorrt_version"] != tensorrt_version:
        problems.append(f"TensorRT {record['tensorrt_version']} (this machine has {tensorrt_version})")
    built, here = record["gpu"], gpu
    if (built["name"], built["compute_capability"]) != (here["name"], here["compute_capability"]):
        problems.append(f"GPU {built['name']} sm_{built['compute_capability']} "
                        f"(this machine has {here['name']} sm_{here['compute_capability']})")
    if problems:
        raise ArtefactError(f"model {model!r}: its TensorRT plans were built for {' and '.join(problems)}: "
                            f"rebuild them here with tav-export --tensorrt --precision {record['precision']}")


def check_weight_map(weight_map: dict, adapter_shapes: Mapping[str, tuple[int, ...]],
                     initializer_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Every adapter tensor must map (through `weight_map`, after its transpose if any) onto an initializer of the
    UNet graph of the same shape, and the map must name no other tensor; raise listing what does not."""
    problems = [f"{name} is not in the weight map" for name in adapter_shapes if name not in weight_map]
    problems += [f"{name} is not an adapter tensor" for name in weight_map if name not in adapter_shapes]
    for name, entry in weight_map.items():
        if name not in adapter_shapes:
            continue
        shape = tuple(adapter_shapes[name])
        if entry["transpose"]:
            shape = tuple(shape[i] for i in entry["transpose"])
        target = initializer_shapes.get(entry["initializer"])
        if target is None:
            problems.append(f"{name} maps to {entry['initializer']}, not a (refittable) initializer of the UNet graph")
        elif tuple(target) != shape:
            problems.append(f"{name} has shape {shape}, its initializer {entry['initializer']} {tuple(target)}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ArtefactError(f"the adapter does not fit the UNet plan: {'; '.join(problems[:5])}{more}")


def refit_weights(adapter: Mapping[str, torch.Tensor], weight_map: dict) -> dict[str, torch.Tensor]:
    """The adapter's tensors under their initializer names in the UNet graph, transposed where the map says so."""
    weights = {}
    for name, tensor in adapter.items():
        entry = weight_map[name]
        weights[entry["initializer"]] = tensor.permute(*entry["transpose"]) if entry["transpose"] else tensor
    return weights


@functools.cache
def _runtime():
    """One TensorRT runtime (and its logger) for the process."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    return trt.Runtime(logger), logger


def _torch_dtypes(trt) -> dict:
    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
            trt.int64: torch.int64, trt.int32: torch.int32, trt.int8: torch.int8, trt.uint8: torch.uint8,
            trt.bool: torch.bool}


@dataclass
class _Profile:
    """One optimization profile of a plan: its execution context, static I/O buffers and captured CUDA graph."""

    context: object
    buffers: dict[str, torch.Tensor]
    graph: torch.cuda.CUDAGraph | None = None

    def execute(self, stream: torch.cuda.Stream, cuda_graph: bool) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        # Also the warm-up before a capture: TensorRT finishes lazy setup on a first call, which must not be captured.
        self._enqueue(stream)
        if cuda_graph:
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                self._enqueue(stream)  # recorded, not run: the buffers already hold this call's outputs
            self.graph = graph

    def _enqueue(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT failed to enqueue the plan (its log above says why)")


class Plan:
    """One deserialized plan with one single-output network; `run` feeds it torch tensors of a profile's shapes."""

    def __init__(self, path: Path, data: bytes, cuda_graphs: bool) -> None:
        trt = require_tensorrt()
        self.path = path
        self.engine = _runtime()[0].deserialize_cuda_engine(data)
        if self.engine is None:
            raise ArtefactError(f"{path}: TensorRT cannot deserialize this plan (its log above says why)")
        self.cuda_graphs = cuda_graphs
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        if len(self.outputs) != 1:
            raise ArtefactError(f"{path}: a plan of one output was expected, this one has {self.outputs}")
        # One scratch buffer for every profile's context (at least a byte: a valid address even when none is needed).
        self._scratch = torch.empty(max(self.engine.device_memory_size_v2, 1), dtype=torch.uint8, device="cuda")
        self.profiles = [self._profile(trt, i) for i in range(self.engine.num_optimization_profiles)]
        self.stream.synchronize()

    def _profile(self, trt, index: int) -> _Profile:
        context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise ArtefactError(f"{self.path}: TensorRT cannot create an execution context (its log above says why)")
        context.set_device_memory(self._scratch.data_ptr(), self._scratch.numel())
        if not context.set_optimization_profile_async(index, self.stream.cuda_stream):
            raise ArtefactError(f"{self.path}: TensorRT refuses optimization profile {index}")
        dtypes = _torch_dtypes(trt)
        buffers = {}
        for name in self.inputs:
            shape = tuple(self.engine.get_tensor_shape(name))
            if -1 in shape:  # the batch axis, which each profile pins (min = opt = max)
                shape = tuple(self.engine.get_tensor_profile_shape(name, index)[0])
            if not context.set_input_shape(name, shape):
                raise ArtefactError(f"{self.path}: TensorRT refuses shape {shape} for {name} in profile {index}")
            buffers[name] = torch.empty(shape, dtype=dtypes[self.engine.get_tensor_dtype(name)], device="cuda")
        for name in self.outputs:
            shape = tuple(context.get_tensor_shape(name))
            buffers[name] = torch.empty(shape, dtype=dtypes[self.engine.get_tensor_dtype(name)], device="cuda")
        for name, buffer in buffers.items():
            if not context.set_tensor_address(name, buffer.data_ptr()):
                raise ArtefactError(f"{self.path}: TensorRT refuses the address of {name} in profile {index}")
        return _Profile(context, buffers)

    def run(self, feeds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Copy `feeds` into the static inputs of the profile of their shapes, run it, return a copy of the output."""
        profile = self._match(feeds)
        caller = torch.cuda.current_stream()
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            for name, tensor in feeds.items():
                profile.buffers[name].copy_(tensor, non_blocking=True)
            profile.execute(self.stream, self.cuda_graphs)
        caller.wait_stream(self.stream)
        return profile.buffers[self.outputs[0]].clone()

    def _match(self, feeds: Mapping[str, torch.Tensor]) -> _Profile:
        if set(feeds) != set(self.inputs):
            raise ValueError(f"{self.path.name} takes inputs {self.inputs}, got {sorted(feeds)}")
        for profile in self.profiles:
            if all(tuple(t.shape) == tuple(profile.buffers[n].shape) for n, t in feeds.items()):
                return profile
        shapes = [{n: tuple(p.buffers[n].shape) for n in self.inputs} for p in self.profiles]
        got = {n: tuple(t.shape) for n, t in feeds.items()}
        raise EngineShapeError(f"{self.path.name} runs at {shapes}, got {got}")


class Adapter:
    """A model's refit weights by the UNet plan's weight names, on the GPU in the plan's dtypes. `key` (the adapter's
    content hash) tells adapters apart: models with equal adapters never refit between them. A LoRA model keeps its
    factors and merges them onto W0 each time its weights are asked for (a refit); a full one keeps its weights."""

    def __init__(self, key: str, tensors: TunedTensors, weight_map: dict, dtypes: dict[str, torch.dtype]) -> None:
        self.key = key
        self._tensors, self._weight_map, self._dtypes = tensors, weight_map, dtypes
        self._weights = None if tensors.is_lora else self._merged()

    def _merged(self) -> dict[str, torch.Tensor]:
        weights = refit_weights(self._tensors.merged(), self._weight_map)
        return {name: tensor.to(self._dtypes[name]).contiguous() for name, tensor in weights.items()}

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        return self._weights if self._weights is not None else self._merged()


class RefittablePlan(Plan):
    """The shared UNet plan: whichever model's adapter is active is what it runs with."""

    def __init__(self, path: Path, data: bytes, cuda_graphs: bool) -> None:
        super().__init__(path, data, cuda_graphs)
        trt = require_tensorrt()
        refitter = trt.Refitter(self.engine, _runtime()[1])
        dtypes = _torch_dtypes(trt)
        self.weight_dtypes = {n: dtypes[refitter.get_weights_prototype(n).dtype] for n in refitter.get_all_weights()}
        self.base_weights: dict[str, torch.Tensor] = {}  # refittable weights no adapter holds, read once from ONNX
        self.active: str | None = None  # the key of the adapter the engine holds

    def activate(self, adapter: Adapter) -> float | None:
        """Run with `adapter` from now on: refit unless it is already active. The refit's seconds, or None."""
        if self.active == adapter.key:
            return None
        self.active = None  # until the refit succeeds
        seconds = self.refit(adapter.weights)
        self.active = adapter.key
        return seconds

    def refit(self, weights: Mapping[str, torch.Tensor]) -> float:
        """Set every refittable weight (from `weights`, else the base weights) and refit; return the seconds."""
        trt = require_tensorrt()
        started = time.perf_counter()
        self.stream.synchronize()  # a refit must not overlap enqueued work
        refitter = trt.Refitter(self.engine, _runtime()[1])
        types = {torch_dtype: trt_dtype for trt_dtype, torch_dtype in _torch_dtypes(trt).items()}
        for name in self.weight_dtypes:
            tensor = weights[name] if name in weights else self.base_weights[name]
            tensor_weights = trt.Weights(types[tensor.dtype], tensor.data_ptr(), tensor.numel())
            if not refitter.set_named_weights(name, tensor_weights, trt.TensorLocation.DEVICE):
                raise ArtefactError(f"{self.path}: TensorRT rejects {name} {tuple(tensor.shape)} {tensor.dtype}")
        if refitter.get_missing_weights() or not refitter.refit_cuda_engine():
            raise RuntimeError(f"{self.path}: refit failed (missing {refitter.get_missing_weights()[:3]})")
        for profile in self.profiles:
            profile.graph = None  # captured with the old weights: capture again on the next call
        torch.cuda.synchronize()
        return time.perf_counter() - started

    def load_base_weights(self, names: set[str], onnx_path: Path) -> None:
        """Read the refittable weights that adapters do not hold from the base UNet graph, once. The build marks only
        the tunable tensors refittable, so there are none unless TensorRT made more of them refittable."""
        names = names - set(self.base_weights)
        if not names:
            return
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        for tensor in graph.initializer:
            if tensor.name in names:
                array = numpy_helper.to_array(tensor, base_dir=str(onnx_path.parent))
                self.base_weights[tensor.name] = torch.from_numpy(array.copy()).to(
                    "cuda", self.weight_dtypes[tensor.name]).contiguous()
        if names - set(self.base_weights):
            raise ArtefactError(f"{onnx_path}: no initializers {sorted(names - set(self.base_weights))[:3]}")


# Plans by file, shared by every model of their base in this process.
_PLANS: dict[str, Plan] = {}


def _plan(model: str, path: Path, sha256: str | None, refittable: bool) -> Plan:
    key = str(path.resolve())
    if key not in _PLANS:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ArtefactError(f"model {model!r}: TensorRT plan {path} is unreadable ({e.strerror}): "
                                "re-run tav-export --tensorrt") from e
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise ArtefactError(f"model {model!r}: TensorRT plan {path} does not match its recorded hash: "
                                "re-run tav-export --tensorrt")
        _PLANS[key] = (RefittablePlan if refittable else Plan)(path, data, cuda_graphs=refittable)
    return _PLANS[key]


class TensorRTEngines(Engines):
    backend = "tensorrt"

    def __init__(self, engine_dir: EngineDir, model: str, verify: bool = True) -> None:
        manifest = engine_dir.manifest
        super().__init__((manifest["latent_channels"], *manifest["latent_size"]), tuple(manifest["text_shape"]))
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = torch.float16 if manifest["precision"] == "fp16" else torch.float32
        self.pixel_size = tuple(manifest["pixel_size"])
        record = manifest["tensorrt"]
        self.plans = {graph: _plan(model, engine_dir.store / entry["file"], entry["sha256"] if verify else None,
                                   refittable=graph == "unet")
                      for graph, entry in record["plans"].items()}
        self.unet_plan: RefittablePlan = self.plans["unet"]
        if len(self.unet_plan.profiles) != len(record["profiles"]["unet"]):
            raise ArtefactError(f"model {model!r}: the UNet plan has {len(self.unet_plan.profiles)} optimization "
                                f"profile(s), its manifest records {len(record['profiles']['unet'])}")
        dtypes = self.unet_plan.weight_dtypes
        if set(dtypes) != set(record["refit_weights"]):
            raise ArtefactError(f"model {model!r}: the UNet plan's refittable weights are not those its manifest "
                                "records: re-run tav-export --tensorrt")
        # a LoRA model's weight map keys on the merged tensors' names (W0's), as a full model's on its adapter's
        tensors = TunedTensors.of_engine_dir(engine_dir, self.device, self.dtype)
        shapes = {n: tuple(t.shape) for n, t in (tensors.w0.tensors if tensors.is_lora else tensors.stored).items()}
        weight_map = manifest["weight_map"]
        check_weight_map(weight_map, shapes, record["refit_weights"])
        refitted = {weight_map[n]["initializer"] for n in shapes}
        self.unet_plan.load_base_weights(set(dtypes) - refitted, engine_dir.graph_path("unet"))
        self.adapter = Adapter(manifest["adapter_sha256"], tensors, weight_map, dtypes)
        self.last_refit_seconds: float | None = None
        self.activate()  # refit now, so that the first request does not pay for it

    def activate(self) -> None:
        """Make this model's adapter the shared UNet's weights (a refit only if another adapter is active)."""
        seconds = self.unet_plan.activate(self.adapter)
        if seconds is not None:
            self.last_refit_seconds = seconds

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.plans["text_encoder"].run({"input_ids": input_ids})

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.plans["vae_encoder"].run({"pixels": pixels})

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.plans["vae_decoder"].run({"latents": latents})

    def run_unet(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        self.activate()
        return self.unet_plan.run({"sample": sample, "timestep": timestep, "encoder_hidden_states": text}).float()


def load_tensorrt_model(run: str | Path, name: str | None = None, verify: bool = True) -> LoadedModel:
    """Load a tuned model's engine directory (`RUN/engines`, or an engine directory itself) for TensorRT: its plans
    (shared with the other models of its base), checked against this machine, with its adapter refitted."""
    trt = require_tensorrt()
    engine_dir, default_name = open_engine_dir(run)
    name = name or default_name
    manifest = engine_dir.manifest
    record = manifest.get("tensorrt")
    if record is None:
        raise ArtefactError(f"model {name!r} has no TensorRT plans: run tav-export --tensorrt on the GPU that "
                            "serves it")
    check_plans(name, record, trt.__version__, current_gpu())
    adapter_file = engine_dir.path / artefacts.ENGINE_ADAPTER_FILE
    if verify and sha256_files([adapter_file], engine_dir.path) != manifest["adapter_sha256"]:
        raise ArtefactError(f"model {name!r}: {adapter_file} does not match its recorded hash")
    engines = TensorRTEngines(engine_dir, name, verify)
    tensorrt = {"version": record["tensorrt_version"], "gpu": record["gpu"],
                "refit_seconds": engines.last_refit_seconds}
    return model_from_engine_dir(engine_dir, engines, name, tensorrt=tensorrt)
