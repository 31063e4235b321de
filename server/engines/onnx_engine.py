"""ONNX Runtime engines: the exported graphs of an engine directory, with the model's adapter tensors fed as
inputs of the shared base UNet graphs (the plain one, and for feature reuse between steps the full pass that also
outputs the branch features and the shallow pass from them, loaded on first use).

A LoRA model's tensors are merged onto its base's W0 when a call needs them; the merged sets of the models used
last are kept (`MergedSets`, least recently used out past a byte budget), so requests to one model merge once.

CPU here; with `onnxruntime-gpu` installed, the CUDA (or TensorRT) execution provider and I/O binding keep the
tensors on the GPU between calls.
"""

from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from server.engines.base import Engines, LoadedModel, TunedTensors, model_from_engine_dir, open_engine_dir
from tuner.artefacts import BRANCH_GRAPHS, EngineDir

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
# engine part -> the graph of the store it runs
SESSION_GRAPHS = {"text_encoder": "text_encoder", "vae_encoder": "vae_encoder", "vae_decoder": "vae_decoder",
                  "unet": "unet_adapter_inputs"}
# One session per (graph file, providers, threads), shared by every model of the same base: a tuned model costs
# only its adapter tensors. Held weakly: the engines of the models that use a session keep it alive.
_SESSIONS: weakref.WeakValueDictionary[tuple, object] = weakref.WeakValueDictionary()
MERGED_BYTES = 2 * 2**30  # the merged LoRA sets kept, at most (at least the last one used)


class MergedSets:
    """The merged input tensors of the LoRA models used last, by adapter key, within `max_bytes`."""

    def __init__(self, max_bytes: int = MERGED_BYTES) -> None:
        self.max_bytes = max_bytes
        self.sets: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self.merges = 0  # merges done: a request to a model whose set is kept adds none

    def get(self, key: tuple, merge) -> dict[str, torch.Tensor]:
        """The set for `key`, made with `merge()` unless kept."""
        if key in self.sets:
            self.sets.move_to_end(key)
            return self.sets[key]
        weights = self.sets[key] = merge()
        self.merges += 1
        while len(self.sets) > 1 and sum(map(_set_bytes, self.sets.values())) > self.max_bytes:
            self.sets.popitem(last=False)
        return weights


def _set_bytes(weights: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in weights.values())


MERGED = MergedSets()


def _ort():
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - a dependency of the project
        raise RuntimeError("the onnxruntime backend needs the onnxruntime package") from e
    return onnxruntime


class OnnxEngines(Engines):
    backend = "onnxruntime"

    def __init__(self, engine_dir: EngineDir, providers: list[str] | None = None, threads: int | None = None) -> None:
        manifest = engine_dir.manifest
        super().__init__((manifest["latent_channels"], *manifest["latent_size"]), tuple(manifest["text_shape"]))
        ort = _ort()
        available = ort.get_available_providers()
        self.providers = providers or [p for p in (*GPU_PROVIDERS, "CPUExecutionProvider") if p in available]
        self.on_gpu = self.providers[0] != "CPUExecutionProvider"
        self.device = torch.device("cuda" if self.on_gpu else "cpu")
        self.dtype = torch.float16 if manifest["precision"] == "fp16" else torch.float32
        self.pixel_size = tuple(manifest["pixel_size"])
        self._threads = threads or len(os.sched_getaffinity(0))
        # The tuned tensors are inputs of the shared base UNet graph, fed with every call.
        self.tensors = TunedTensors.of_engine_dir(engine_dir, self.device, self.dtype)
        self._weight_map = manifest["weight_map"]
        self._weights = None if self.tensors.is_lora else self._merged()
        self.sessions = {name: self._session(engine_dir.graph_path(graph)) for name, graph in SESSION_GRAPHS.items()}
        self.branch_graphs = {name: engine_dir.graph_path(name) for name in BRANCH_GRAPHS
                              if name in manifest["graphs"]}
        self._branch_weights: dict[str, dict[str, torch.Tensor]] = {}  # graph -> the adapter inputs it takes

    def _merged(self) -> dict[str, torch.Tensor]:
        return {self._weight_map[name]["input"]: tensor.contiguous()
                for name, tensor in self.tensors.merged(self.dtype).items()}

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The UNet graph's tuned-tensor inputs: a full model's own, a LoRA model's merged set (`MERGED`)."""
        if self._weights is not None:
            return self._weights
        return MERGED.get((self.tensors.key, self.tensors.w0.sha256, self.dtype, str(self.device)), self._merged)

    def _session(self, path: Path):
        key = (str(path), tuple(self.providers), self._threads)
        session = _SESSIONS.get(key)
        if session is None:
            ort = _ort()
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = self._threads
            # Idle workers sleep instead of spinning: on CPUs shared with other work a spinning pool burns the time
            # slices it then waits for (measured on 2 shared cores: UNet calls 1.5-2x slower with spinning).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = _SESSIONS[key] = ort.InferenceSession(str(path), options, providers=self.providers)
        return session

    def _run(self, name: str, inputs: dict[str, torch.Tensor], *out_shapes: tuple[int, ...]) -> torch.Tensor:
        """The graph's first output (its outputs, in order, when given more than one shape)."""
        session = self.sessions[name]
        if not self.on_gpu:
            feeds = {k: v.detach().cpu().numpy() for k, v in inputs.items()}
            outs = [torch.from_numpy(out) for out in session.run(None, feeds)[: len(out_shapes)]]
            return outs[0] if len(outs) == 1 else outs
        binding = session.io_binding()  # GPU: inputs and output stay in device memory
        for key, tensor in inputs.items():
            tensor = tensor.to(self.device).contiguous()
            inputs[key] = tensor
            binding.bind_input(key, "cuda", 0, _np_of(tensor.dtype), tuple(tensor.shape), tensor.data_ptr())
        outs = [torch.empty(shape, dtype=self.dtype, device=self.device) for shape in out_shapes]
        for output, out in zip(session.get_outputs(), outs, strict=False):
            binding.bind_output(output.name, "cuda", 0, _np_of(out.dtype), tuple(out.shape), out.data_ptr())
        session.run_with_iobinding(binding)
        return outs[0] if len(outs) == 1 else outs

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._run("text_encoder", {"input_ids": input_ids.to(torch.int64)}, (1, *self.text_shape))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run("vae_encoder", {"pixels": pixels.to(self.dtype)}, (1, *self.latent_shape))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self._run("vae_decoder", {"latents": latents.to(self.dtype)}, (1, 3, *self.pixel_size))

    def run_unet(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        inputs = {"sample": sample.to(self.dtype), "timestep": timestep.float(),
                  "encoder_hidden_states": text.to(self.dtype), **self.weights}
        return self._run("unet", inputs, tuple(sample.shape)).float()

    def cache_unsupported(self) -> str | None:
        if len(self.branch_graphs) == len(BRANCH_GRAPHS):
            return None
        return "the onnxruntime engines of this model were exported without the feature-reuse graphs: re-run tav-export"

    def run_unet_branch(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                        branch: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        name = "unet_full_branch" if branch is None else "unet_shallow"
        if name not in self.sessions:  # first use: the session, and the adapter tensors it takes (the shallow
            self.sessions[name] = session = self._session(self.branch_graphs[name])  # graph has a few only)
            wanted = {i.name for i in session.get_inputs()}
            self._branch_weights[name] = {k: v for k, v in self.weights.items() if k in wanted}
        session = self.sessions[name]
        inputs = {"sample": sample.to(self.dtype), "timestep": timestep.float(),
                  "encoder_hidden_states": text.to(self.dtype), **self._branch_weights[name]}
        if branch is not None:
            inputs["branch"] = branch.to(self.dtype)
        if branch is not None:
            return self._run(name, inputs, tuple(sample.shape)).float(), None
        features = [sample.shape[0], *session.get_outputs()[1].shape[1:]]
        out, kept = self._run(name, inputs, tuple(sample.shape), tuple(features))
        return out.float(), kept


def _np_of(dtype: torch.dtype):
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[dtype]


def load_onnx_model(run: str | Path, name: str | None = None, verify: bool = True) -> LoadedModel:
    """Load a tuned model's engine directory (`RUN/engines`, or an engine directory itself) for ONNX Runtime."""
    engine_dir, default_name = open_engine_dir(run)
    if verify:
        engine_dir.verify()
    return model_from_engine_dir(engine_dir, OnnxEngines(engine_dir), name or default_name)
