"""The ONNX Runtime UNet's graph rewrite (attention fused into MultiHeadAttention) and `tav-bench backends`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from benchmarks.cli import main as bench
from exporter.cli import export
from exporter.onnx_export import GraphSpec, export_graph, has_sdpa_pattern, relative_error
from exporter.optimize import fuse_attention, op_counts
from server.engines import load_model
from tuner.artefacts import EngineDir
from tuner.inflate import attention


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def exported(tuned_run, tmp_path_factory):
    """A copy of the tuned tiny model, exported (the session's `tuned_run` stays as it was)."""
    run = tmp_path_factory.mktemp("repo") / "square"
    shutil.copytree(tuned_run, run)
    export(run, progress=quiet)
    return run


class TwoAttentions(torch.nn.Module):
    """Sparse-causal-like attention (keys twice as long as queries), then self-attention giving the graph output."""

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        x = attention(q, kv, kv * 0.5, heads=4)
        return attention(x, x, x, heads=2)


def test_fuse_attention_replaces_the_exported_sdpa_pattern_and_keeps_the_numbers(tmp_path):
    q, kv = torch.randn(3, 8, 16), torch.randn(3, 16, 16)
    path = tmp_path / "attention.onnx"
    export_graph(GraphSpec("attention", TwoAttentions(), {"q": q, "kv": kv}, ["out"], batch_axis=True), path)
    model = onnx.load(str(path))
    assert fuse_attention(model) == 2
    counts = {n.op_type for n in model.graph.node}
    assert "Softmax" not in counts and "MatMul" not in counts
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        q, kv = torch.randn(batch, 8, 16), torch.randn(batch, 16, 16)
        expected = TwoAttentions()(q, kv).numpy()
        assert relative_error(session.run(None, {"q": q.numpy(), "kv": kv.numpy()})[0], expected) < 1e-5


def test_ort_unet_has_every_attention_fused_and_the_tensorrt_graph_is_untouched(exported):
    engines = EngineDir.open(exported / "engines")
    ort_graph, trt_graph = op_counts(engines.graph_path("unet_adapter_inputs")), op_counts(engines.graph_path("unet"))
    attentions = trt_graph["Softmax"]
    assert attentions == 4 * 3  # (down, mid, 2 up) transformer blocks x (attn1, attn2, attn_temp)
    assert ort_graph["MultiHeadAttention"] == attentions and "Softmax" not in ort_graph
    assert "MultiHeadAttention" not in trt_graph and has_sdpa_pattern(engines.graph_path("unet"))
    record = engines.manifest["graphs"]["unet_adapter_inputs"]["ort_optimization"]
    assert record["multihead_attention"] == attentions and record["nodes_after"] < record["nodes_before"]


def test_fused_graph_matches_pytorch(exported):
    checks = EngineDir.open(exported / "engines").manifest["checks"]
    assert all(e < 1e-4 for e in checks["base"]["unet_adapter_inputs"].values())
    assert all(e < 1e-4 for e in checks["tuned_unet"].values())
    # and as the engines run it: the ONNX Runtime engine against the PyTorch engine, with the tuned tensors
    torch_engines = load_model(exported, "torch").engines
    ort_engines = load_model(exported, "onnxruntime").engines
    generator = torch.Generator().manual_seed(3)
    for batch in (1, 2):
        sample = torch.randn(torch_engines.unet_input_shape(batch), generator=generator)
        text = torch.randn(batch, *torch_engines.text_shape, generator=generator)
        t = torch.tensor([321.0])
        expected = torch_engines.unet(sample, t, text).numpy()
        assert relative_error(ort_engines.unet(sample, t, text).numpy(), expected) < 1e-4


def test_backends_study_writes_json_and_plot(exported, tmp_path, capsys):
    bench(["backends", "--out", str(tmp_path), "--model", str(exported), "--steps", "1", "--repeats", "1",
           "--unet-repeats", "1"])
    result = json.loads((tmp_path / "backends.json").read_text())
    assert (tmp_path / "backends.png").stat().st_size > 0
    assert result["fastest_backend"] in ("torch", "onnxruntime") and "machine" in result
    for key in ("torch/batch1", "torch/batch2", "onnxruntime/batch1", "onnxruntime/batch2"):
        assert np.isfinite(result["unet_ms"][key]["median_ms"])
    assert set(result["ms_per_frame"]) == {"torch", "onnxruntime"}
    assert set(result["speedup_vs_torch"]["onnxruntime"]) == {"batch1", "batch2", "per_frame"}
    assert json.loads(capsys.readouterr().out)["study"] == "backends"
