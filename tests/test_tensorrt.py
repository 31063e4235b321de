"""The TensorRT path: what runs without a GPU (profiles, the refit weight map, the checks against the machine, the
clear error without tensorrt) on CPU, and the build + run + refit against ONNX Runtime where a GPU with tensorrt is.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import onnx
import pytest
import torch

from exporter import tensorrt_build
from exporter.cli import export
from exporter.onnx_export import ExportError, relative_error
from exporter.tensorrt_build import (
    build_plans,
    check_profile_count,
    initializer_shapes,
    input_shapes,
    plan_dir_name,
    unet_profiles,
)
from server.engines import tensorrt_engine
from server.engines.onnx_engine import load_onnx_model
from server.engines.tensorrt_engine import check_plans, check_weight_map, load_tensorrt_model, refit_weights
from tuner.artefacts import ArtefactError, EngineDir, TunedModel
from tuner.tensorrt_support import cuda_problem, release, tensorrt_cuda_majors
from tuner.tune import TuneSettings, tune

HINT = r"the tensorrt backend needs an NVIDIA GPU with the tensorrt package: pip install '\.\[gpu\]'"
GPU = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs an NVIDIA GPU and the tensorrt package (pip install '.[gpu]')")
L4 = {"name": "NVIDIA L4", "compute_capability": "8.9"}
STAND_IN_GPU = {"name": "Stand-in GPU", "compute_capability": "0.0"}


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def run(tiny_base, clip_path, tmp_path_factory) -> Path:
    """A tiny tuned model in a repository, exported in fp16 (the precision TensorRT serves); no plans."""
    out = tmp_path_factory.mktemp("trt-repo") / "m"
    tune(tiny_base, clip_path, "a square", out, TuneSettings(width=32, height=32, steps=1), progress=False)
    export(out, precision="fp16", progress=quiet)
    return out


def _store_entry(run: Path) -> tuple[Path, dict]:
    entry = EngineDir.open(run / "engines").store
    return entry, json.loads((entry / "graphs.json").read_text())


def test_unet_profiles_are_computed_from_the_manifest(run):
    manifest = EngineDir.open(run / "engines").manifest
    channels, (h, w), (length, width) = manifest["latent_channels"], manifest["latent_size"], manifest["text_shape"]
    assert (channels, h, w, length) == (4, 16, 16, 77)
    profiles = unet_profiles(manifest["graphs"])
    expected = [{"sample": (batch, channels, 8, h, w), "timestep": (1,),
                 "encoder_hidden_states": (batch, length, width)} for batch in (1, 2)]
    assert profiles == expected
    for profile, recorded in zip(profiles, manifest["unet_profiles"], strict=True):
        assert {name: list(shape) for name, shape in profile.items()} == {name: recorded[name] for name in profile}
    assert input_shapes(manifest["graphs"]["text_encoder"]) == {"input_ids": (1, length)}
    assert input_shapes(manifest["graphs"]["vae_encoder"]) == {"pixels": (1, 3, *manifest["pixel_size"])}
    assert input_shapes(manifest["graphs"]["vae_decoder"]) == {"latents": (1, channels, h, w)}
    with pytest.raises(ExportError, match="x has no static shape"):
        input_shapes({"inputs": [{"name": "x", "shape": ["N", 3]}]})


def test_refit_weight_map_fits_the_initializers_of_the_unet_graph(run):
    engines = EngineDir.open(run / "engines")
    adapter = engines.adapter()
    shapes = {name: tuple(t.shape) for name, t in adapter.items()}
    initializers = initializer_shapes(engines.graph_path("unet"))
    weight_map = engines.manifest["weight_map"]
    check_weight_map(weight_map, shapes, initializers)
    weights = refit_weights(adapter, weight_map)
    assert len(weights) == len(adapter) > 0
    assert all(tuple(t.shape) == initializers[name] for name, t in weights.items())

    name = next(iter(adapter))
    with pytest.raises(ArtefactError, match=f"{name} is not in the weight map"):
        check_weight_map({k: v for k, v in weight_map.items() if k != name}, shapes, initializers)
    with pytest.raises(ArtefactError, match=f"{name} maps to nowhere, not a"):
        check_weight_map({**weight_map, name: {**weight_map[name], "initializer": "nowhere"}}, shapes, initializers)
    with pytest.raises(ArtefactError, match=f"{name} has shape"):
        check_weight_map(weight_map, {**shapes, name: (*shapes[name], 1)}, initializers)


def test_refit_weight_map_applies_transposes():
    adapter = {"w": torch.arange(6.0).reshape(2, 3)}
    weight_map = {"w": {"initializer": "graph.w", "input": "w", "transpose": [1, 0]}}
    check_weight_map(weight_map, {"w": (2, 3)}, {"graph.w": (3, 2)})
    assert torch.equal(refit_weights(adapter, weight_map)["graph.w"], adapter["w"].T)
    with pytest.raises(ArtefactError, match=r"w has shape \(2, 3\), its initializer graph.w \(3, 2\)"):
        check_weight_map({"w": {**weight_map["w"], "transpose": None}}, {"w": (2, 3)}, {"graph.w": (3, 2)})


def test_plans_are_checked_against_the_machine_that_loads_them():
    record = {"tensorrt_version": "10.8.0.43", "gpu": L4, "precision": "fp16"}
    check_plans("m", record, "10.8.0.43", dict(L4))
    with pytest.raises(ArtefactError, match=r"model 'm'.*TensorRT 10\.8\.0\.43 \(this machine has 10\.9\.0\.1\)"):
        check_plans("m", record, "10.9.0.1", L4)
    with pytest.raises(ArtefactError, match=r"model 'm'.*GPU NVIDIA L4 sm_8\.9 \(this machine has NVIDIA H100 sm_9\.0"):
        check_plans("m", record, "10.8.0.43", {"name": "NVIDIA H100", "compute_capability": "9.0"})
    assert plan_dir_name("10.8.0.43", L4) == "trt10.8.0.43-sm89-nvidia-l4"


def test_tensorrt_cuda_major_torch_and_driver_are_matched():
    assert release("10.8.0.43") == (10, 8, 0, 43) and release("13.0") == (13, 0)
    assert release("2.11.0+cu130") == (2, 11, 0)
    installed = ["numpy", "tensorrt", "tensorrt-cu13", "tensorrt_cu13_libs", "tensorrt-cu13-bindings", "torch"]
    assert tensorrt_cuda_majors(installed) == {13}
    assert tensorrt_cuda_majors(["tensorrt", "onnxruntime-gpu"]) == set()
    assert cuda_problem({13}, "13.0", 13000) is None
    assert cuda_problem({12}, "12.8", 13000) is None  # a newer driver runs older CUDA
    assert cuda_problem(set(), None, None) is None  # nothing known, nothing judged
    assert cuda_problem({13}, "13.0", 12080) == ("the NVIDIA driver runs CUDA up to 12.8, and TensorRT for CUDA 13 "
                                                 "needs driver r580 or newer")
    assert cuda_problem({12}, "13.0", 13000) == ("TensorRT is built for CUDA 12, torch for CUDA 13: "
                                                 "pip install '.[gpu]' instead")
    assert cuda_problem({13}, "12.6", 13000) == ("TensorRT is built for CUDA 13, torch for CUDA 12: "
                                                 "pip install '.[gpu-cu12]' instead")
    assert "are both installed" in cuda_problem({12, 13}, "13.0", 13000)


def test_a_unet_plan_must_keep_both_profiles():
    check_profile_count(2, 2, "unet")
    with pytest.raises(ExportError, match=r"the unet plan has 1 optimization profile\(s\), 2 were asked for"):
        check_profile_count(1, 2, "unet")


def test_without_tensorrt_build_and_load_fail_clearly(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(RuntimeError, match=HINT):
        load_tensorrt_model(run)
    with pytest.raises(RuntimeError, match=HINT):
        build_plans(*_store_entry(run), TunedModel.open(run), "fp16", quiet)
    manifest = (run / "engines" / "manifest.json").read_text()
    with pytest.raises(ExportError, match=HINT):  # tav-export --tensorrt: an error the CLI reports, engines kept
        export(run, precision="fp16", tensorrt=True, progress=quiet)
    assert (run / "engines" / "manifest.json").read_text() == manifest


def test_without_a_gpu_or_with_an_old_tensorrt_build_and_load_fail_clearly(run, monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.8.0.43"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=HINT + r" \(no CUDA device is visible\)"):
        load_tensorrt_model(run)
    with pytest.raises(RuntimeError, match=HINT + r" \(no CUDA device is visible\)"):
        build_plans(*_store_entry(run), TunedModel.open(run), "fp16", quiet)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fake.__version__ = "8.6.1"
    with pytest.raises(RuntimeError, match=r"10\.2 or newer; found 8\.6\.1"):
        load_tensorrt_model(run)
    fake.__version__ = "10.1.0"  # no REFIT_INDIVIDUAL yet
    with pytest.raises(RuntimeError, match=r"10\.2 or newer; found 10\.1\.0"):
        load_tensorrt_model(run)


def test_load_names_the_model_whose_plans_are_missing_or_were_built_elsewhere(run, tmp_path, monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.9.0.1"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tensorrt_engine, "current_gpu", lambda: dict(L4))
    with pytest.raises(ArtefactError, match=r"model 'm' has no TensorRT plans: run tav-export --tensorrt"):
        load_tensorrt_model(run)
    engines = shutil.copytree(run / "engines", tmp_path / "other" / "engines")
    manifest = json.loads((engines / "manifest.json").read_text())
    manifest["tensorrt"] = {"tensorrt_version": "10.8.0.43", "gpu": L4, "precision": "fp16"}
    (engines / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtefactError, match=r"model 'other': its TensorRT plans were built for TensorRT 10\.8\.0\.43"):
        load_tensorrt_model(tmp_path / "other")


def fake_tensorrt() -> types.ModuleType:
    """A stand-in for the `tensorrt` builder API that records what it is asked for: each "plan" is the JSON of the
    profiles, flags and refittable weights it was built with. It checks the builder's logic, not TensorRT."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99.0"
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    trt.BuilderFlag = types.SimpleNamespace(TF32="tf32", REFIT_INDIVIDUAL="refit_individual")

    class Logger:
        WARNING = "warning"

        def __init__(self, severity: str) -> None:
            pass

    class Network:
        def __init__(self) -> None:
            self.inputs, self.initializers, self.refittable = [], set(), []
            self.num_inputs = 0

        def get_input(self, i: int):
            return self.inputs[i]

        def mark_weights_refittable(self, name: str) -> bool:
            self.refittable.append(name)
            return name in self.initializers

    class OnnxParser:
        num_errors = 0

        def __init__(self, network: Network, logger: Logger) -> None:
            self.network = network

        def parse_from_file(self, path: str) -> bool:
            graph = onnx.load(path, load_external_data=False).graph
            self.network.inputs = [types.SimpleNamespace(name=i.name, shape=tuple(
                d.dim_value or -1 for d in i.type.tensor_type.shape.dim)) for i in graph.input]
            self.network.num_inputs = len(self.network.inputs)
            self.network.initializers = {t.name for t in graph.initializer}
            return True

    class Profile:
        def __init__(self) -> None:
            self.shapes = {}

        def set_shape(self, name: str, low: tuple, opt: tuple, high: tuple) -> None:
            self.shapes[name] = [list(low), list(opt), list(high)]

    class Config:
        def __init__(self) -> None:
            self.flags, self.profiles = set(), []

        def create_timing_cache(self, data: bytes):
            return types.SimpleNamespace(serialize=lambda: data + b"+timings")

        def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
            return True

        def set_flag(self, flag: str) -> None:
            self.flags.add(flag)

        def clear_flag(self, flag: str) -> None:
            self.flags.discard(flag)

        def add_optimization_profile(self, profile: Profile) -> int:
            self.profiles.append(profile.shapes)
            return len(self.profiles) - 1

    class Builder:
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int) -> Network:
            return Network()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes:
            plan = {"profiles": config.profiles, "flags": sorted(config.flags), "refittable": network.refittable}
            return json.dumps(plan).encode()

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, plan: bytes):
            recorded = json.loads(plan)
            return types.SimpleNamespace(num_optimization_profiles=len(recorded["profiles"]), **recorded)

    class Refitter:
        def __init__(self, engine, logger: Logger) -> None:
            self.engine = engine

        def get_all_weights(self) -> list[str]:
            return self.engine.refittable

    trt.Logger, trt.OnnxParser, trt.Builder, trt.Runtime, trt.Refitter = Logger, OnnxParser, Builder, Runtime, Refitter
    return trt


def test_build_plans_sets_profiles_and_refittable_weights_and_reuses_plans(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tensorrt_build, "current_gpu", lambda: dict(STAND_IN_GPU))
    out = export(run, out=tmp_path / "engines", precision="fp16", tensorrt=True, progress=quiet)
    engines = EngineDir.open(out)
    manifest, record = engines.manifest, engines.manifest["tensorrt"]
    assert manifest["backends"] == ["onnxruntime", "tensorrt"]
    assert record["dir"] == "tensorrt/trt10.99.0-sm00-stand-in-gpu" and record["gpu"] == STAND_IN_GPU
    assert record["tensorrt_version"] == "10.99.0" and record["precision"] == "fp16" and record["refittable"]
    plans = {graph: json.loads((engines.store / p["file"]).read_bytes()) for graph, p in record["plans"].items()}
    assert plans["unet"]["profiles"] == [{"sample": [[b, 4, 8, 16, 16]] * 3, "encoder_hidden_states": [[b, 77, 32]] * 3}
                                         for b in (1, 2)]
    assert plans["unet"]["flags"] == ["refit_individual"]
    assert sorted(plans["unet"]["refittable"]) == sorted(manifest["weight_map"]) == sorted(record["refit_weights"])
    for graph in ("text_encoder", "vae_encoder", "vae_decoder"):
        assert plans[graph] == {"profiles": [], "flags": [], "refittable": []}
    adapter = {name: tuple(t.shape) for name, t in engines.adapter().items()}
    check_weight_map(manifest["weight_map"], adapter, record["refit_weights"])
    assert (engines.store / record["timing_cache"]).read_bytes() == b"+timings"

    messages = []
    export(run, out=tmp_path / "engines", precision="fp16", tensorrt=True, progress=messages.append)
    assert any(m.startswith("reusing TensorRT plans") for m in messages)
    assert EngineDir.open(out).manifest["tensorrt"] == record


# On a GPU with tensorrt: build, run, refit, compared with ONNX Runtime (fp32 graphs, CPU) as the reference.


@pytest.fixture(scope="module")
def trt_repo(run, tiny_base, clip_path) -> Path:
    """Two models of one base (`m` and `b`), each with fp16 TensorRT plans (shared) and an fp32 ONNX reference."""
    repo = run.parent
    tune(tiny_base, clip_path, "a red square", repo / "b", TuneSettings(width=32, height=32, steps=1, lr=1e-2, seed=2),
         progress=False)
    for model in (run, repo / "b"):
        export(model, out=model / "reference", progress=quiet)
        export(model, precision="fp16", tensorrt=True, progress=quiet)
    return repo


def _error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return relative_error(actual.float().cpu().numpy(), expected.float().cpu().numpy())


@needs_gpu
def test_tensorrt_plans_match_onnxruntime(trt_repo):
    manifest = EngineDir.open(trt_repo / "m" / "engines").manifest
    record = manifest["tensorrt"]
    assert "tensorrt" in manifest["backends"] and record["refittable"] is True and record["precision"] == "fp16"
    assert record["profiles"]["unet"] == [{k: p[k] for k in ("sample", "timestep", "encoder_hidden_states")}
                                          for p in manifest["unet_profiles"]]
    model, reference = load_tensorrt_model(trt_repo / "m"), load_onnx_model(trt_repo / "m" / "reference")
    trt, ort = model.engines, reference.engines
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 400, (1, 77), generator=generator)
    pixels = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    assert _error(trt.encode_text(ids), ort.encode_text(ids)) < 1e-2
    assert _error(trt.encode_image(pixels), ort.encode_image(pixels)) < 1e-2
    assert _error(trt.decode_latents(latents), ort.decode_latents(latents)) < 1e-2
    for batch in (1, 2):
        sample = torch.randn(batch, 4, 8, 16, 16, generator=generator)
        text = torch.randn(batch, 77, 32, generator=generator)
        timestep = torch.tensor([500.0])
        first = trt.unet(sample, timestep, text)  # runs, then captures the CUDA graph of this profile
        assert _error(first, ort.unet(sample, timestep, text)) < 1e-2
        assert torch.equal(trt.unet(sample, timestep, text), first)  # replayed
        assert model.engines.unet_plan.profiles[batch - 1].graph is not None


@needs_gpu
def test_models_of_one_base_share_the_unet_plan_and_refit_on_switch(trt_repo):
    a, b = (EngineDir.open(trt_repo / name / "engines").manifest["tensorrt"] for name in ("m", "b"))
    assert a["plans"] == b["plans"]  # the second export reused the plans
    models = {name: load_tensorrt_model(trt_repo / name) for name in ("m", "b")}
    references = {name: load_onnx_model(trt_repo / name / "reference") for name in ("m", "b")}
    assert models["m"].engines.unet_plan is models["b"].engines.unet_plan
    assert models["b"].engines.last_refit_seconds > 0  # loading b refitted the UNet that m had active
    generator = torch.Generator().manual_seed(1)
    sample, text = torch.randn(2, 4, 8, 16, 16, generator=generator), torch.randn(2, 77, 32, generator=generator)
    timestep = torch.tensor([300.0])
    outputs = {}
    for name in ("m", "b", "m"):
        engines = models[name].engines
        outputs[name] = engines.unet(sample, timestep, text)
        assert engines.unet_plan.active == engines.adapter.key
        assert _error(outputs[name], references[name].engines.unet(sample, timestep, text)) < 1e-2
    assert _error(outputs["m"], outputs["b"]) > 1e-2  # the refits made a difference
    assert models["m"].engines.unet_plan.activate(models["m"].engines.adapter) is None  # active already: no refit
