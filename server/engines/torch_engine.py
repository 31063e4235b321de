"""PyTorch engines: the video UNet, VAE and text encoder as PyTorch modules under `torch.inference_mode`, eager or
with the UNet compiled (`compile_mode`: `torch.compile`, its code read from the engine store where `tav-export
--torch-compile` put it; `tuner.compiled`), and on CUDA the UNet call replayed from CUDA graphs (`cuda_graphs`).

fp32 on CPU; fp16 on CUDA. The reference every other backend is checked against (eager). Models of one base share one
set of modules (`SharedBase`); each model holds only its adapter tensors (a LoRA model its factors; the base's W0
is shared and kept apart from the UNet, whose tensors a switch overwrites), copied (or merged) into the shared UNet
in place when a request for it starts and another model's were active. The compiled UNet takes the weights as graph
inputs (Inductor's default: nothing frozen into the code), so that in-place switch changes what it computes and
compiles nothing; one graph per UNet batch shape, as for the CUDA graphs, whose captured weights the switch's copy
updates in place. Feature reuse (`run_unet_branch`) runs the UNet eager. The engines
hold their base; the process-wide index of bases holds them weakly, so a base is freed once no loaded model uses it.
"""

from __future__ import annotations

import time
import weakref
from pathlib import Path

import torch

from server.engines.base import UNET_BATCHES, Engines, LoadedModel, TunedTensors
from tuner import compiled
from tuner.aoti_support import compile_target
from tuner.artefacts import STORE_DIR, TunedModel, apply_adapter
from tuner.components import Components, load_components
from tuner.inflate import VideoUNet, inflate
from tuner.io_utils import sha256_files


class CudaGraphedUNet:
    """A UNet call replayed from one CUDA graph per input shape, on static input and output buffers owned here,
    captured at the shape's first call. A replay reads the weights at the addresses they had at capture, which the
    in-place model switch keeps (`SharedBase.activate` checks it)."""

    def __init__(self, unet) -> None:
        self.unet = unet
        self.graphs: dict[tuple, tuple] = {}

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        key = (tuple(sample.shape), tuple(timestep.shape), tuple(text.shape))
        if key not in self.graphs:
            static = [sample.clone(), timestep.clone(), text.clone()]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up outside the capture (cuDNN and allocator set-up)
                    self.unet(*static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = self.unet(*static)
            self.graphs[key] = (graph, static, output)
        graph, static, output = self.graphs[key]
        for buffer, value in zip(static, (sample, timestep, text), strict=True):
            buffer.copy_(value)
        graph.replay()
        return output.clone()  # the caller keeps it past the next replay


class SharedBase:
    """A base model's modules, inflated once, with the adapter of the model most recently activated, and the UNet
    call the engines make: the module, compiled (`compile_mode`) and/or replayed from CUDA graphs."""

    def __init__(self, components: Components, compile_mode: str | None = None, cuda_graphs: bool = False,
                 compiled_entry: Path | None = None, compiled_artefacts: bool = False) -> None:
        self.components = components
        self.compile_mode = compile_mode
        self.cuda_graphs = cuda_graphs
        self.compiled_entry = compiled_entry  # the engine store entry of the compiled code (`tuner.compiled`)
        self.compiled_artefacts = compiled_artefacts  # whether that entry's compiled code was loaded
        unet = components.unet
        self.unet = unet if compile_mode is None else torch.compile(unet, mode=compile_mode, dynamic=False)
        if cuda_graphs:
            self.unet = CudaGraphedUNet(self.unet)
        # Compiled code and captured graphs read the weights where they were: a switch must not move one.
        fixed = compile_mode is not None or cuda_graphs
        self.addresses = {name: t.data_ptr() for name, t in unet.state_dict().items()} if fixed else None
        self.active = lambda: None  # a weak reference to the owner of the adapter now in the UNet
        self.last_switch_seconds = 0.0

    def activate(self, owner: object, tensors: TunedTensors) -> None:
        if self.active() is not owner:
            started = time.perf_counter()
            self.active = lambda: None  # until the copy is complete
            apply_adapter(self.components.unet, tensors.merged())
            if self.addresses is not None:
                moved = [n for n, t in self.components.unet.state_dict().items() if t.data_ptr() != self.addresses[n]]
                if moved:
                    raise RuntimeError(f"a model switch moved {len(moved)} UNet tensors ({moved[0]}, ...): the "
                                       f"compiled code and CUDA graphs would read stale memory")
            self.active = weakref.ref(owner)
            self.last_switch_seconds = time.perf_counter() - started


# (base path, base hash, architecture, device, dtype, compile mode, CUDA graphs) -> SharedBase, while some engines
# use it
_BASES: weakref.WeakValueDictionary[tuple, SharedBase] = weakref.WeakValueDictionary()


class TorchEngines(Engines):
    backend = "torch"

    def __init__(self, base: SharedBase, adapter: TunedTensors, latent_size: tuple[int, int],
                 device: torch.device, dtype: torch.dtype) -> None:
        components = base.components
        channels = int(components.unet.config.in_channels)
        text_shape = (components.tokenizer.model_max_length, int(components.text_encoder.config.hidden_size))
        super().__init__((channels, *latent_size), text_shape)
        self.base = base
        self.adapter = adapter
        self.device = device
        self.dtype = dtype

    @property
    def components(self) -> Components:
        return self.base.components

    def tuned_unet(self) -> VideoUNet:
        """The shared video UNet holding this model's tuned tensors (until another model's call activates its own)."""
        self.base.activate(self, self.adapter)
        return self.components.unet

    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.components.text_encoder(input_ids.to(self.device))[0]

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.components.vae.encode(pixels.to(self.device, self.dtype)).latent_dist.mean

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.components.vae.decode(latents.to(self.device, self.dtype)).sample

    @torch.inference_mode()
    def run_unet(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        self.base.activate(self, self.adapter)
        out = self.base.unet(sample.to(self.dtype), timestep.to(self.device), text.to(self.dtype))
        return out.float()

    def cache_unsupported(self) -> str | None:
        return None

    def save_compiled(self, model: TunedModel, batches: tuple[int, ...] = UNET_BATCHES) -> Path:
        """Compile the UNet at each of `batches` (one call on zeros each) and write the compiled code of this
        process into its engine store entry (`tuner.compiled`); return the entry."""
        if self.base.compile_mode is None:
            raise ValueError("the UNet of these engines is not compiled (load them with a compile mode)")
        started = time.perf_counter()
        for batch in batches:
            sample = torch.zeros(self.unet_input_shape(batch), device=self.device)
            self.run_unet(sample, torch.tensor([999.0]), torch.zeros(batch, *self.text_shape, device=self.device))
        artefacts = torch.compiler.save_cache_artifacts()
        if artefacts is None:
            raise RuntimeError("torch.compile left no cache artefacts to save")
        index = {"mode": self.base.compile_mode, "device": str(self.device), "dtype": str(self.dtype),
                 "torch": torch.__version__, "triton": compiled.triton_version(),
                 "compile_target": compile_target(self.device.type), "base_sha256": model.config["base"]["sha256"],
                 "batches": list(batches), "compile_seconds": round(time.perf_counter() - started, 1)}
        compiled.write_entry(self.base.compiled_entry, artefacts[0], index)
        return self.base.compiled_entry

    @torch.inference_mode()
    def run_unet_branch(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                        branch: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.base.activate(self, self.adapter)
        args = (sample.to(self.dtype), timestep.to(self.device), text.to(self.dtype))
        if branch is None:
            out, features = self.components.unet(*args, return_branch=True)
            return out.float(), features
        return self.components.unet(*args, branch=branch.to(self.dtype)).float(), None


def shared_base(model: TunedModel, device: torch.device, dtype: torch.dtype, compile_mode: str | None = None,
                cuda_graphs: bool = False) -> SharedBase:
    key = (str(model.base_path.resolve()), model.config["base"]["sha256"], *model.architecture, str(device), dtype,
           compile_mode, cuda_graphs)
    shared = _BASES.get(key)
    if shared is None:
        components = load_components(model.base_path, device, dtype, model.base_variant)
        inflate(components.unet, *model.architecture)
        entry, loaded = None, False
        if compile_mode is not None:
            entry = model.path.parent / STORE_DIR / compiled.store_key(model, device, dtype, compile_mode)
            artefacts = compiled.read_entry(entry)
            loaded = artefacts is not None and torch.compiler.load_cache_artifacts(artefacts) is not None
        shared = _BASES[key] = SharedBase(components, compile_mode, cuda_graphs, entry, loaded)
    return shared


def load_torch_model(run: str | Path, device: str | None = None, name: str | None = None,
                     compile_mode: str | None = None, cuda_graphs: bool = True) -> LoadedModel:
    """Load a tuned model directory as a `LoadedModel` with PyTorch engines (its base shared with others), the
    UNet compiled with `torch.compile(mode=compile_mode)` when one is given, and on CUDA replayed from CUDA graphs
    (`cuda_graphs`, unless the compile mode captures its own)."""
    if compile_mode is not None and compile_mode not in compiled.COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(compiled.COMPILE_MODES)}, got {compile_mode!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = TunedModel.open(run)
    graphs = cuda_graphs and device.type == "cuda" and compile_mode not in compiled.OWN_CUDA_GRAPHS
    base = shared_base(model, device, dtype, compile_mode, graphs)
    adapter = TunedTensors.of_model(model, device, dtype)
    engines = TorchEngines(base, adapter, model.latent_size, device, dtype)
    config = model.config
    return LoadedModel(
        name=name or Path(run).name,
        engines=engines,
        tokenizer=base.components.tokenizer,
        scheduler_config=base.components.scheduler_config,
        scaling_factor=base.components.scaling_factor,
        source=model.source(with_frames=False),
        source_hash=sha256_files([model.path / "source.safetensors"], model.path),
        fps=float(config["fps"]),
        model_hash=model.model_hash,
        pixel_size=(config["height"], config["width"]),
        defaults=dict(config.get("recommended", {"guidance": 12.5, "steps": 50})),
        info={"base_model": model.base_id, "prompt": config["prompt"], "frames": config["frames"],
              "attention_mode": config["attention_mode"]},
    )
