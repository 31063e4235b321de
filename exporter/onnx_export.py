"""Export the four networks of a model to ONNX at the fixed shapes of DESIGN.md section 4, and check them.

Graphs and their I/O (latent size h x w, pixel size H x W, text length L, width D):
  text_encoder  input_ids int64 [1, L]                          -> text_embeddings [1, L, D]
  vae_encoder   pixels [1, 3, H, W]                             -> latent_mean [1, C, h, w]   (unscaled)
  vae_decoder   latents [1, C, h, w]                            -> pixels [1, 3, H, W]
  unet          sample [B, C, 8, h, w], timestep float32 [1],
                encoder_hidden_states [B, L, D]                 -> noise_pred [B, C, 8, h, w]   (B = 1 or 2)

and for feature reuse between denoising steps (`branch_graph_specs`; `tuner.inflate.VideoUNet.forward`):
  unet_full_branch  the unet's inputs                           -> noise_pred, branch [B, C', 8, h, w]
  unet_shallow      the unet's inputs, branch [B, C', 8, h, w]  -> noise_pred

The TorchScript exporter is used with constant folding off: every initializer keeps its PyTorch parameter name
(the dynamo exporter folds the linear layers' weight transposes into renamed initializers), so a tuned model's
adapter tensors map onto the graph by name, as ONNX Runtime initializer overrides and TensorRT refit weights,
with no transposes to track. ONNX Runtime and TensorRT fold the transposes themselves when they build.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from tuner.components import Components
from tuner.inflate import VideoUNet

OPSET = 17
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB; stay clear of it
GRAPHS = ("text_encoder", "vae_encoder", "vae_decoder", "unet")
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


class ExportError(RuntimeError):
    """An export that failed or whose graph disagrees with PyTorch."""


class TextEncoderGraph(nn.Module):
    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, return_dict=False)[0]


class VaeEncoderGraph(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(pixels).latent_dist.mean


class VaeDecoderGraph(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).sample


@dataclass
class GraphSpec:
    """One graph to export: the module, named example inputs, output names, and the UNet's batch axis."""

    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    batch_axis: bool = False


def graph_specs(
    components: Components, unet: VideoUNet, latent_size: tuple[int, int], dtype: torch.dtype, frames: int = 8
) -> list[GraphSpec]:
    """The four graphs of a model at a latent size (example inputs of batch 2 for the UNet)."""
    h, w = latent_size
    factor = components.vae_factor
    channels = int(unet.config.in_channels)
    length = components.tokenizer.model_max_length
    width = int(components.text_encoder.config.hidden_size)
    return [
        GraphSpec("text_encoder", TextEncoderGraph(components.text_encoder),
                  {"input_ids": torch.zeros(1, length, dtype=torch.int64)}, ["text_embeddings"]),
        GraphSpec("vae_encoder", VaeEncoderGraph(components.vae),
                  {"pixels": torch.zeros(1, 3, h * factor, w * factor, dtype=dtype)}, ["latent_mean"]),
        GraphSpec("vae_decoder", VaeDecoderGraph(components.vae),
                  {"latents": torch.zeros(1, channels, h, w, dtype=dtype)}, ["pixels"]),
        GraphSpec("unet", unet,
                  {"sample": torch.zeros(2, channels, frames, h, w, dtype=dtype),
                   "timestep": torch.ones(1, dtype=torch.float32),
                   "encoder_hidden_states": torch.zeros(2, length, width, dtype=dtype)},
                  ["noise_pred"], batch_axis=True),
    ]


class UNetFullBranchGraph(VideoUNet):
    """The full UNet pass that also outputs its branch features."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(sample, timestep, encoder_hidden_states, return_branch=True)


class UNetShallowGraph(VideoUNet):
    """The shallow UNet pass from kept branch features."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                branch: torch.Tensor) -> torch.Tensor:
        return super().forward(sample, timestep, encoder_hidden_states, branch=branch)


def _as(unet: VideoUNet, cls: type[VideoUNet]) -> VideoUNet:
    """A view of `unet` (the same modules and tensors, so the same initializer names) whose forward is `cls`'s."""
    view = copy.copy(unet)
    view.__class__ = cls
    return view


def branch_graph_specs(unet_spec: GraphSpec) -> list[GraphSpec]:
    """The two feature-reuse graphs of the UNet of `unet_spec`, at its shapes (batch axis B)."""
    unet = unet_spec.module
    with torch.no_grad():
        _, branch = unet(*unet_spec.inputs.values(), return_branch=True)
    return [
        GraphSpec("unet_full_branch", _as(unet, UNetFullBranchGraph), dict(unet_spec.inputs),
                  ["noise_pred", "branch"], batch_axis=True),
        GraphSpec("unet_shallow", _as(unet, UNetShallowGraph), {**unet_spec.inputs, "branch": torch.zeros_like(branch)},
                  ["noise_pred"], batch_axis=True),
    ]


def export_graph(spec: GraphSpec, path: Path, opset: int = OPSET) -> None:
    """Export one graph to `path` (external data in `path`.data when it would pass protobuf's limit)."""
    dynamic_axes = None
    if spec.batch_axis:
        dynamic_axes = {name: {0: "B"} for name in (*spec.inputs, *spec.outputs) if name != "timestep"}
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter
        raw = Path(tmp) / "graph.onnx"
        with torch.no_grad():
            torch.onnx.export(
                spec.module, tuple(spec.inputs.values()), str(raw), dynamo=False, opset_version=opset,
                input_names=list(spec.inputs), output_names=spec.outputs, dynamic_axes=dynamic_axes,
                do_constant_folding=False,
            )
        model = onnx.load(str(raw))
        external = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
        onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=path.name + ".data")
    onnx.checker.check_model(str(path))


def with_weights_as_inputs(source: Path, path: Path, names: list[str]) -> None:
    """Write a copy of the graph at `source` in which the initializers `names` are graph inputs instead.

    ONNX Runtime's constant folding bakes an initializer into folded nodes (the linear layers' weight transposes)
    before initializer overrides apply, so a tuned model's tensors cannot be swapped in as overrides. Fed as inputs
    they can, at no copy: one session of the base graph serves every tuned model of that base.
    """
    model = onnx.load(str(source))
    graph = model.graph
    wanted = set(names)
    moved = [t for t in graph.initializer if t.name in wanted]
    if len(moved) != len(wanted):
        missing = sorted(wanted - {t.name for t in moved})
        raise ExportError(f"{source.name} lacks initializers for {missing[:3]}{'...' if len(missing) > 3 else ''}")
    for tensor in moved:
        graph.initializer.remove(tensor)
        graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    external = sum(t.ByteSize() for t in graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=path.name + ".data")
    onnx.checker.check_model(str(path))


def graph_io(path: Path) -> dict:
    """The graph's inputs and outputs as the manifest records them: names, shapes ("B" for the batch axis), dtypes."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(value) -> dict:
        tensor = value.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        return {"name": value.name, "shape": shape,
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name}

    return {"inputs": [describe(v) for v in graph.input], "outputs": [describe(v) for v in graph.output]}


def graph_files(path: Path) -> list[Path]:
    """The graph file and its external data file, if any."""
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]


def random_inputs(spec: GraphSpec, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Fresh random inputs in each input's natural range, with the UNet's batch set to `batch`."""
    inputs = {}
    for name, example in spec.inputs.items():
        shape = (batch, *example.shape[1:]) if spec.batch_axis and name != "timestep" else tuple(example.shape)
        if name == "input_ids":
            inputs[name] = torch.randint(0, 400, shape, generator=generator)
        elif name == "timestep":
            inputs[name] = torch.randint(1, 1000, shape, generator=generator).float()
        elif name == "pixels":
            inputs[name] = (torch.rand(shape, generator=generator) * 2 - 1).to(example.dtype)
        else:
            inputs[name] = torch.randn(shape, generator=generator).to(example.dtype)
    return inputs


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    expected = expected.astype(np.float64)
    return float(np.linalg.norm(actual.astype(np.float64) - expected) / max(np.linalg.norm(expected), 1e-12))


def check_graph(
    spec: GraphSpec,
    session,
    precision: str,
    batches: tuple[int, ...] = (1, 2),
    seed: int = 0,
    weights: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Compare an ONNX Runtime session with the PyTorch module on fresh random inputs (plus those of `weights`
    the graph takes as inputs), every output; raise past tolerance."""
    generator = torch.Generator().manual_seed(seed)
    wanted = {i.name for i in session.get_inputs()}
    weights = {k: v for k, v in (weights or {}).items() if k in wanted}
    errors = {}
    for batch in batches if spec.batch_axis else (1,):
        inputs = random_inputs(spec, batch, generator)
        with torch.no_grad():
            expected = spec.module(*inputs.values())
        expected = expected if isinstance(expected, tuple) else (expected,)
        feeds = {k: v.numpy() for k, v in inputs.items()}
        actual = session.run(None, {**feeds, **weights})
        for name, ours, theirs in zip(spec.outputs, actual, expected, strict=True):
            key = f"batch{batch}" if len(spec.outputs) == 1 else f"{name}_batch{batch}"
            errors[key] = error = relative_error(ours, theirs.float().numpy())
            if not np.isfinite(error) or error > TOLERANCE[precision]:
                raise ExportError(f"{spec.name}: ONNX Runtime differs from PyTorch by {error:.2e} (relative, by "
                                  f"norm) in {name} at batch {batch}; the tolerance for {precision} is "
                                  f"{TOLERANCE[precision]:.0e}")
    return errors


def has_sdpa_pattern(path: Path) -> bool:
    """Whether every attention in the graph is the fusable SDPA pattern: Softmax(MatMul(Mul(Q, s), Mul(K^T, s)))
    followed by a MatMul with V, the scale applied to Q and K before the first MatMul."""
    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    softmaxes = [n for n in graph.node if n.op_type == "Softmax"]
    if not softmaxes:
        return False
    for softmax in softmaxes:
        scores = producer.get(softmax.input[0])
        if scores is None or scores.op_type != "MatMul":
            return False
        if any(producer.get(i) is None or producer[i].op_type != "Mul" for i in scores.input):
            return False
        if not any(c.op_type == "MatMul" for c in consumers.get(softmax.output[0], [])):
            return False
    return True
