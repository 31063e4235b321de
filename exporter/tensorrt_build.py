"""TensorRT plans for the shared base graphs of a store entry (`tav-export --tensorrt`), built on the GPU that serves.

ONNX graphs are portable; plans are not: a plan is tied to the TensorRT version and the GPU it was built on. So the
plans of a store entry live in a directory named by both (`tensorrt/trt10.8.0-sm89-nvidia-l4/`), a second model of
the same base on the same kind of machine reuses them, and the server refuses plans built elsewhere.

- Shapes are fixed: the text encoder and the VAE at their graphs' static shapes; the UNet with two optimization
  profiles, batch 1 (inversion) and batch 2 (guided sampling), each min = opt = max at 8 frames.
- The graphs are already in the store's precision, so the network is strongly typed and TensorRT keeps the graph's
  types (fp16, or fp32 with TF32 off).
- The UNet is built REFIT_INDIVIDUAL with exactly the tunable tensors marked refittable: every other weight is
  optimized as a constant, and a model's adapter tensors are refitted into the plan at load, by initializer name.
- A timing cache per (TensorRT version, GPU) beside the plans makes a rebuild fast.

`tensorrt` is imported only when a build starts; without it (or without a GPU) the build fails with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import onnx
from safetensors import safe_open

from exporter.onnx_export import GRAPHS, ExportError
from tuner import artefacts
from tuner.artefacts import TunedModel
from tuner.io_utils import atomic_directory, file_sha256
from tuner.tensorrt_support import current_gpu, require_tensorrt

PLANS_DIR = "tensorrt"
PLANS_INDEX = "plans.json"
UNET_BATCHES = (1, 2)


def plan_dir_name(tensorrt_version: str, gpu: dict) -> str:
    """The directory of a store entry's plans for one TensorRT version and GPU, e.g. `trt10.8.0-sm89-nvidia-l4`."""
    capability = gpu["compute_capability"].replace(".", "")
    name = re.sub(r"[^a-z0-9]+", "-", gpu["name"].lower()).strip("-")
    return f"trt{tensorrt_version}-sm{capability}-{name}"


def input_shapes(graph: dict, batch: int = 1) -> dict[str, tuple[int, ...]]:
    """The static input shapes of a graph as the manifest (or the store index) describes it, "B" set to `batch`."""
    shapes = {}
    for value in graph["inputs"]:
        shape = tuple(batch if d == "B" else d for d in value["shape"])
        if not all(isinstance(d, int) and d > 0 for d in shape):
            raise ExportError(f"input {value['name']} has no static shape: {value['shape']}")
        shapes[value["name"]] = shape
    return shapes


def unet_profiles(graphs: dict, batches: tuple[int, ...] = UNET_BATCHES) -> list[dict[str, tuple[int, ...]]]:
    """The UNet's optimization profiles, one per batch (min = opt = max): sample `[B, C, 8, h, w]`, timestep `[1]`,
    encoder_hidden_states `[B, L, D]`, from the graphs of a manifest or a store index."""
    return [input_shapes(graphs["unet"], batch) for batch in batches]


def initializer_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every initializer of an ONNX graph and its shape (external data is not read)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return {t.name: tuple(t.dims) for t in graph.initializer}


def build_plans(entry: Path, index: dict, model: TunedModel, precision: str, progress=print) -> dict:
    """Build (or reuse) the TensorRT plans of the store entry `entry` for this machine; return the manifest record."""
    trt = require_tensorrt(ExportError)
    gpu = current_gpu()
    name = plan_dir_name(trt.__version__, gpu)
    plan_dir = entry / PLANS_DIR / name
    refittable = index["graphs"]["unet_adapter_inputs"]["weight_inputs"]
    with safe_open(model.path / artefacts.ADAPTER_FILE, "pt") as f:
        untunable = sorted(set(f.keys()) - set(refittable))
    if untunable:
        raise ExportError(f"{model.path}: adapter tensors {untunable[:3]} are not tunable tensors of the base graph")

    record = _existing_plans(entry, plan_dir, precision)
    if record is not None:
        progress(f"reusing TensorRT plans in {plan_dir}")
        return record

    timing_cache = entry / PLANS_DIR / f"{name}.timing.cache"
    profiles = {graph: [input_shapes(index["graphs"][graph])] for graph in GRAPHS}
    profiles["unet"] = unet_profiles(index["graphs"])
    record = {
        "dir": f"{PLANS_DIR}/{name}",
        "tensorrt_version": trt.__version__,
        "gpu": gpu,
        "precision": precision,
        "profiles": {graph: [{k: list(v) for k, v in shapes.items()} for shapes in p] for graph, p in profiles.items()},
        "timing_cache": f"{PLANS_DIR}/{timing_cache.name}",
        "refittable": True,
        "cuda_graphs": ["unet"],
        "plans": {},
    }
    builder = _Builder(trt, timing_cache, precision)
    started = time.perf_counter()
    with atomic_directory(plan_dir, overwrite=True) as tmp:
        for graph in GRAPHS:
            progress(f"building the TensorRT plan of {graph} ({precision}, {gpu['name']})")
            onnx_path = entry / index["graphs"][graph]["file"]
            unet = graph == "unet"
            plan, seconds = builder.build(onnx_path, profiles["unet"] if unet else [],
                                          refittable if unet else [])
            (tmp / f"{graph}.plan").write_bytes(plan)
            record["plans"][graph] = {"file": f"{record['dir']}/{graph}.plan", "build_seconds": round(seconds, 2),
                                      "sha256": hashlib.sha256(plan).hexdigest()}
            if unet:
                record["refit_weights"] = _refit_weights(trt, plan, onnx_path, refittable, len(profiles["unet"]))
        record["build_seconds"] = round(time.perf_counter() - started, 2)
        (tmp / PLANS_INDEX).write_text(json.dumps(record, indent=2) + "\n")
    builder.save_timing_cache()
    return record


def _existing_plans(entry: Path, plan_dir: Path, precision: str) -> dict | None:
    """The record of complete, intact plans of this precision in `plan_dir`, or None."""
    try:
        record = json.loads((plan_dir / PLANS_INDEX).read_text())
        intact = all(file_sha256(entry / p["file"]) == p["sha256"] for p in record["plans"].values())
    except (OSError, KeyError, json.JSONDecodeError):
        return None
    return record if intact and record["precision"] == precision and set(record["plans"]) == set(GRAPHS) else None


class _Builder:
    """Builds plans from ONNX graphs with one TensorRT builder and one timing cache."""

    def __init__(self, trt, timing_cache: Path, precision: str) -> None:
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.builder = trt.Builder(self.logger)
        self.precision = precision
        self.timing_cache_path = timing_cache
        data = timing_cache.read_bytes() if timing_cache.is_file() else b""
        self.timing_cache = self.builder.create_builder_config().create_timing_cache(data)

    def build(self, onnx_path: Path, profiles: list[dict[str, tuple[int, ...]]], refittable: list[str]
              ) -> tuple[bytes, float]:
        """One serialized plan and its build seconds. `profiles`: shapes of the dynamic inputs, one dict per
        optimization profile (none for a graph of static shapes); `refittable`: the weights a refit may replace."""
        trt = self.trt
        started = time.perf_counter()
        network = self.builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"TensorRT cannot parse {onnx_path.name}: {errors}")

        config = self.builder.create_builder_config()
        if not config.set_timing_cache(self.timing_cache, ignore_mismatch=False):
            raise ExportError(f"TensorRT refuses the timing cache {self.timing_cache_path} (made by another TensorRT "
                              "or GPU?): delete it and build again")
        if self.precision == "fp32":
            config.clear_flag(trt.BuilderFlag.TF32)
        dynamic = [network.get_input(i) for i in range(network.num_inputs) if -1 in tuple(network.get_input(i).shape)]
        for shapes in profiles:
            profile = self.builder.create_optimization_profile()
            for tensor in dynamic:
                shape = shapes[tensor.name]
                profile.set_shape(tensor.name, shape, shape, shape)
            if config.add_optimization_profile(profile) < 0:
                raise ExportError(f"TensorRT refuses the optimization profile {shapes} of {onnx_path.name}")
        if refittable:
            config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
            unmarked = [name for name in refittable if not network.mark_weights_refittable(name)]
            if unmarked:
                raise ExportError(f"{onnx_path.name}: TensorRT has no weights named {unmarked[:3]} to make refittable")

        plan = self.builder.build_serialized_network(network, config)
        if plan is None:
            raise ExportError(f"TensorRT failed to build a plan from {onnx_path.name} (its log above says why)")
        return bytes(plan), time.perf_counter() - started

    def save_timing_cache(self) -> None:
        self.timing_cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.timing_cache_path.with_name(self.timing_cache_path.name + ".tmp")
        tmp.write_bytes(bytes(self.timing_cache.serialize()))
        os.replace(tmp, self.timing_cache_path)


def check_profile_count(built: int, asked: int, name: str) -> None:
    """A plan must have every optimization profile it was built with. TensorRT's headers say a refittable engine
    takes one profile, and the refittable UNet is built with two (batch 1 and 2): fail the build clearly if the
    plan lost one, rather than at the first request of the missing batch."""
    if built != asked:
        raise ExportError(f"the {name} plan has {built} optimization profile(s), {asked} were asked for (one per UNet "
                          "batch); this TensorRT does not keep them in a refittable plan")


def _refit_weights(trt, plan: bytes, onnx_path: Path, tunable: list[str], profiles: int) -> dict[str, list[int]]:
    """The refittable weights of a built UNet plan and their shapes in the graph; every tunable tensor must be one,
    and every one must be an initializer of the graph (the server refits the others from it unchanged). The plan
    must have its `profiles` optimization profiles."""
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        raise ExportError(f"TensorRT cannot deserialize the plan it just built from {onnx_path.name}")
    check_profile_count(engine.num_optimization_profiles, profiles, onnx_path.stem)
    names = set(trt.Refitter(engine, logger).get_all_weights())
    shapes = initializer_shapes(onnx_path)
    missing = sorted(set(tunable) - names)
    unknown = sorted(names - set(shapes))
    if missing or unknown:
        raise ExportError(f"the UNet plan cannot be refitted by name: not refittable {missing[:3]}, "
                          f"not initializers of {onnx_path.name} {unknown[:3]}")
    return {name: list(shapes[name]) for name in sorted(names)}
