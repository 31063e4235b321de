"""The exporter: graphs match PyTorch, shared base graphs, adapters applied at load, bad input, ORT engines."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from exporter.cli import STORE_DIR, export
from exporter.cli import main as export_main
from exporter.onnx_export import ExportError, has_sdpa_pattern
from server.engines import load_model
from server.generate import GenerationOptions, Generator
from server.registry import ModelRegistry, read_entry
from tuner.artefacts import ArtefactError, EngineDir, TunedModel
from tuner.tune import TuneSettings, tune


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def repo(tiny_base, clip_path, tmp_path_factory):
    """A model repository with two tuned models of the same base, both exported; their temporal attentions see
    the frames' positions (the graphs carry the sinusoidal encoding)."""
    repo = tmp_path_factory.mktemp("repo")
    for name, prompt, seed in (("square-a", "a red square is moving right", 1), ("square-b", "a square", 2)):
        tune(tiny_base, clip_path, prompt, repo / name,
             TuneSettings(width=32, height=32, steps=3, lr=1e-2, seed=seed, frame_positions="sinusoidal"),
             progress=False)
        export(repo / name, progress=quiet)
    return repo


def test_engine_directory_is_complete_and_graphs_match_pytorch(repo):
    engines = EngineDir.open(repo / "square-a" / "engines")
    engines.verify()
    m = engines.manifest
    assert m["backends"] == ["onnxruntime"] and m["precision"] == "fp32" and m["opset"] >= 17
    assert m["model"]["frame_positions"] == "sinusoidal"
    for name in ("text_encoder", "vae_encoder", "vae_decoder", "unet", "unet_adapter_inputs"):
        for batch, error in m["checks"]["base"][name].items():
            assert error < 1e-4, (name, batch, error)
    assert set(m["checks"]["tuned_unet"]) == {"batch1", "batch2"}
    assert all(e < 1e-4 for e in m["checks"]["tuned_unet"].values())
    assert m["unet_profiles"] == [
        {"batch": 1, "sample": [1, 4, 8, 16, 16], "encoder_hidden_states": [1, 77, 32], "timestep": [1]},
        {"batch": 2, "sample": [2, 4, 8, 16, 16], "encoder_hidden_states": [2, 77, 32], "timestep": [1]},
    ]
    assert m["sdpa_pattern"] is True and has_sdpa_pattern(engines.graph_path("unet"))
    graph = onnx.load(str(engines.graph_path("unet")), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["sample", "timestep", "encoder_hidden_states"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "B"
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]] == [4, 8, 16, 16]


def test_refit_weight_map_covers_every_adapter_tensor_by_initializer_name(repo):
    engines = EngineDir.open(repo / "square-a" / "engines")
    adapter = engines.adapter()
    graph = onnx.load(str(engines.graph_path("unet")), load_external_data=False).graph
    initializers = {t.name: tuple(t.dims) for t in graph.initializer}
    weight_map = engines.manifest["weight_map"]
    assert set(weight_map) == set(adapter)
    for name, tensor in adapter.items():
        assert initializers[weight_map[name]["initializer"]] == tuple(tensor.shape)
    inputs = {i.name for i in onnx.load(str(engines.graph_path("unet_adapter_inputs")),
                                         load_external_data=False).graph.input}
    assert {m["input"] for m in weight_map.values()} <= inputs


def test_second_model_of_the_same_base_reuses_the_store(repo):
    store = repo / STORE_DIR
    entries = [p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(entries) == 1
    a = EngineDir.open(repo / "square-a" / "engines")
    b = EngineDir.open(repo / "square-b" / "engines")
    assert a.store == b.store
    assert a.manifest["adapter_sha256"] != b.manifest["adapter_sha256"]


def test_adapter_inputs_session_matches_a_fresh_export_of_the_tuned_model(repo, tmp_path):
    """The shared base graph fed with model B's tensors equals a full export of model B alone."""
    import onnxruntime as ort

    from exporter.onnx_export import export_graph, graph_specs
    from tuner.artefacts import load_tuned

    engines = EngineDir.open(repo / "square-b" / "engines")
    _, components = load_tuned(repo / "square-b")
    spec = next(s for s in graph_specs(components, components.unet, (16, 16), torch.float32) if s.name == "unet")
    fresh = tmp_path / "fresh_unet.onnx"
    export_graph(spec, fresh)
    shared = ort.InferenceSession(str(engines.graph_path("unet_adapter_inputs")), providers=["CPUExecutionProvider"])
    alone = ort.InferenceSession(str(fresh), providers=["CPUExecutionProvider"])
    weights = {n: t.numpy() for n, t in engines.adapter().items()}
    g = np.random.default_rng(0)
    feeds = {"sample": g.standard_normal((2, 4, 8, 16, 16), dtype=np.float32),
             "timestep": np.array([321.0], np.float32),
             "encoder_hidden_states": g.standard_normal((2, 77, 32), dtype=np.float32)}
    a = shared.run(None, {**feeds, **weights})[0]
    b = alone.run(None, feeds)[0]
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5


def test_onnxruntime_generation_matches_pytorch(repo):
    options = GenerationOptions("a blue square", frames=8, steps=4, guidance=5.0, seed=7)
    torch_frames = Generator(load_model(repo / "square-a", "torch")).generate(options).frames.astype(int)
    onnx_frames = Generator(load_model(repo / "square-a", "onnxruntime")).generate(options).frames.astype(int)
    difference = np.abs(torch_frames - onnx_frames)
    # stated tolerance: at most 2 grey levels anywhere, and essentially none on average
    assert difference.max() <= 2 and difference.mean() < 0.05, (difference.max(), difference.mean())


def test_export_is_idempotent_and_recreates_a_missing_store_entry(repo):
    engines = EngineDir.open(repo / "square-a" / "engines")
    before = engines.manifest["graphs"]["unet"]["sha256"]
    shutil.rmtree(engines.store)
    with pytest.raises(ArtefactError, match="missing"):
        EngineDir.open(repo / "square-a" / "engines").verify()
    export(repo / "square-a", progress=quiet)
    again = EngineDir.open(repo / "square-a" / "engines")
    again.verify()
    assert again.manifest["graphs"]["unet"]["sha256"] == before
    EngineDir.open(repo / "square-b" / "engines").verify()  # the other model finds its graphs again


def test_tampered_graph_is_refused_at_load(repo, tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy, symlinks=True)
    engines = EngineDir.open(copy / "square-a" / "engines")
    path = engines.graph_path("vae_decoder")
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ArtefactError, match="hash"):
        load_model(copy / "square-a", "onnxruntime")


def test_fp16_graphs_build_with_fp16_dtypes(tiny_base, clip_path, tmp_path):
    run = tune(tiny_base, clip_path, "a square", tmp_path / "repo" / "half",
               TuneSettings(width=32, height=32, steps=1), progress=False)
    out = export(run, precision="fp16", progress=quiet)
    engines = EngineDir.open(out)
    assert engines.manifest["precision"] == "fp16"
    graph = onnx.load(str(engines.graph_path("unet")), load_external_data=False).graph
    types = {i.name: i.type.tensor_type.elem_type for i in (*graph.input, *graph.output)}
    assert types["sample"] == types["noise_pred"] == types["encoder_hidden_states"] == onnx.TensorProto.FLOAT16
    assert types["timestep"] == onnx.TensorProto.FLOAT
    # the engine directory keeps the tuned tensors exactly (fp32) whatever the precision; each runtime casts them
    adapter, tuned = engines.adapter(), TunedModel.open(run).adapter()
    assert all(t.dtype == torch.float32 and torch.equal(t, tuned[name]) for name, t in adapter.items())
    assert "skipped" in engines.manifest["checks"]["tuned_unet"]
    # the text encoder stays fp32 (it runs once per prompt) and is checked numerically here
    assert engines.manifest["checks"]["base"]["text_encoder"]["batch1"] < 1e-4


def export_cli(capsys, *args: str) -> tuple[int, str]:
    """`tav-export ARGS` in this process: its exit code and what it wrote to stderr."""
    with pytest.raises(SystemExit) as exited:
        export_main(list(args))
    return exited.value.code, capsys.readouterr().err


def test_bad_input_is_refused_clearly_and_writes_nothing(repo, tmp_path, capsys):
    code, stderr = export_cli(capsys, "--model", str(tmp_path / "nope"))
    assert code == 2 and "not a tuned model directory" in stderr
    unfinished = tmp_path / "unfinished"
    shutil.copytree(repo / "square-a", unfinished, ignore=shutil.ignore_patterns("engines", "adapter.safetensors"))
    code, stderr = export_cli(capsys, "--model", str(unfinished))
    assert code == 2 and "unfinished" in stderr and "Traceback" not in stderr
    assert not (unfinished / "engines").exists()
    code, stderr = export_cli(capsys, "--model", str(repo / "square-a"), "--out", "/proc/tav-export-test/engines")
    assert code == 2 and "cannot write" in stderr, stderr


def test_the_command_itself_prints_only_the_error_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "exporter.cli", "--model", str(tmp_path / "nope")],
                            capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result
    assert lines[0].startswith("tav-export: error: ") and "not a tuned model directory" in lines[0], lines[0]


def test_size_mismatch_is_refused(repo, tmp_path):
    copy = tmp_path / "repo" / "resized"
    shutil.copytree(repo / "square-a", copy, ignore=shutil.ignore_patterns("engines"))
    config = json.loads((copy / "tav_config.json").read_text())
    config["latent_height"] = 12  # no longer what the source latents hold
    (copy / "tav_config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="latents' must be \\[C, N, 12, 16\\]"):
        export(copy, progress=quiet)
    assert not (copy / "engines").exists()


def test_registry_lists_the_backends_a_manifest_names(repo, tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy, symlinks=True)
    shutil.rmtree(copy / "square-b" / "engines")
    assert read_entry(copy / "square-a", "onnxruntime").backends == ["torch", "onnxruntime"]
    assert read_entry(copy / "square-b", "torch").backends == ["torch"]
    registry = ModelRegistry(copy, backend="onnxruntime")
    assert list(registry.models) == ["square-a"] and "no onnxruntime engines" in registry.skipped["square-b"]

    manifest = copy / "square-a" / "engines" / "manifest.json"
    listed = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**listed, "backends": ["onnxruntime", "tensorrt"]}))
    assert read_entry(copy / "square-a", "tensorrt").backends == ["torch", "onnxruntime", "tensorrt"]
    manifest.write_text(json.dumps({**listed, "backends": "onnxruntime"}))  # broken: the torch backend reads none
    assert read_entry(copy / "square-a", "torch").backends == ["torch"]
    with pytest.raises(ArtefactError, match="^engines/manifest.json: backends: 'onnxruntime' is not of type 'array'"):
        read_entry(copy / "square-a", "onnxruntime")
    # an engine directory exported before sources could be other than the clip has no `source` record: its clip
    assert listed["source"] == {"kind": "clip"}
    manifest.write_text(json.dumps({k: v for k, v in listed.items() if k != "source"}))
    source = EngineDir.open(copy / "square-a" / "engines").source()
    assert source.kind == "clip" and source.latents.shape[2:] == (16, 16)
