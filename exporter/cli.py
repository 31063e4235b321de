"""`tav-export`: tuned model directory -> engine directory (DESIGN.md section 4).

The base graphs depend only on (base model, size, precision, attention mode): they are exported and checked once
into the shared store `REPO/.engines/<key>/` and reused by every tuned model of that base. A tuned model costs
its engine directory: manifest, tokenizer, scheduler config, source latents and its adapter tensors, which the
runtimes apply at load (ONNX Runtime inputs, TensorRT refit, AOTInductor `load_constants`). Export is idempotent:
a complete store entry is reused, a missing one is re-created, and every directory is written whole or not at all.

`tav-export` builds the ONNX graphs (and with `--tensorrt` the plans); `--aoti` builds only the AOTInductor
packages. Either way the manifest keeps what an earlier export of the same model built for the other backends:
its `backends` list is merged, never rewritten.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from safetensors.torch import save_file

from exporter import gc
from exporter.onnx_export import (
    GRAPHS,
    OPSET,
    ExportError,
    branch_graph_specs,
    check_graph,
    export_graph,
    graph_files,
    graph_io,
    graph_specs,
    has_sdpa_pattern,
    with_weights_as_inputs,
)
from exporter.optimize import REWRITE_VERSION, optimize_unet_for_ort
from tuner import artefacts
from tuner.aoti_support import DEVICES, require_aoti
from tuner.artefacts import BRANCH_GRAPHS, STORE_DIR, ArtefactError, TunedModel, apply_adapter
from tuner.compiled import COMPILE_MODES
from tuner.components import BaseModelError, is_same_base, load_components
from tuner.inflate import inflate, is_trainable
from tuner.io_utils import atomic_directory, file_lock, sha256_files
from tuner.versions import versions

STORE_INDEX = "graphs.json"
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}  # of the ONNX graphs; --aoti adds bf16 on CUDA
# The manifest fields that describe the ONNX graphs (TensorRT's plans are built from them).
ONNX_FIELDS = ("precision", "opset", "store", "graphs", "sdpa_pattern", "checks", "weight_map")


def store_key(model: TunedModel, precision: str) -> str:
    """What the base graphs depend on, hashed: base model content, size, precision, the video UNet's architecture
    (attention mode, group norm, frame positions), opset, and the version of the ONNX Runtime graph rewrite.

    Graphs the entry format gained later (the feature-reuse graphs, `BRANCH_GRAPHS`) are not part of the key: an
    entry without them is completed in place by `add_branch_graphs`, its existing graphs untouched, so the key
    (and `REWRITE_VERSION`) changes only when the graphs an entry already holds would come out differently."""
    c = model.config
    parts = [c["base"]["sha256"], c["latent_height"], c["latent_width"], precision, *model.architecture, OPSET,
             REWRITE_VERSION]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def ort_session(path: Path):
    """A CPU ONNX Runtime session for checks."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def adapter_arrays(adapter: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, np.ndarray]:
    return {name: tensor.to(dtype).contiguous().numpy() for name, tensor in adapter.items()}


def build_store_entry(model: TunedModel, entry: Path, precision: str, progress) -> dict:
    """Export and check the base graphs into `entry` (atomically); return its index."""
    dtype = PRECISIONS[precision]
    components = load_components(model.base_path, "cpu", dtype, model.base_variant)
    # The text encoder stays fp32 at every precision: it runs once per prompt, and CLIP traced in fp16 mixes
    # fp16 and fp32 inputs in its LayerNorm, which ONNX Runtime refuses.
    components.text_encoder.float()
    unet = inflate(components.unet, *model.architecture)
    _distinct_adapter_placeholders(unet)
    specs = graph_specs(components, unet, model.latent_size, dtype)
    index = {"format_version": 1, "precision": precision, "opset": OPSET, "graphs": {}, "checks": {},
             "producer": versions()}
    with atomic_directory(entry, overwrite=True) as tmp:
        for spec in specs:
            progress(f"exporting {spec.name}")
            started = time.perf_counter()
            path = tmp / f"{spec.name}.onnx"
            export_graph(spec, path)
            files = graph_files(path)
            index["graphs"][spec.name] = {
                "file": path.name, "files": [f.name for f in files], "sha256": sha256_files(files, tmp),
                "export_seconds": round(time.perf_counter() - started, 2), **graph_io(path),
            }
            if precision == "fp32" or spec.name == "text_encoder":
                index["checks"][spec.name] = check_graph(spec, ort_session(path), "fp32")
            else:
                index["checks"][spec.name] = check_dtypes(path)
        progress("writing the UNet variant that takes the tuned tensors as inputs, attention fused (ONNX Runtime)")
        names = [n for n in unet.state_dict() if is_trainable(n)]
        ort_path = tmp / "unet_adapter_inputs.onnx"
        with_weights_as_inputs(tmp / "unet.onnx", ort_path, names)
        ort_optimization = optimize_unet_for_ort(ort_path)
        files = graph_files(ort_path)
        unet_spec = specs[-1]
        index["graphs"]["unet_adapter_inputs"] = {
            "file": ort_path.name, "files": [f.name for f in files], "sha256": sha256_files(files, tmp),
            **graph_io(tmp / "unet.onnx"), "weight_inputs": names, "ort_optimization": ort_optimization,
        }
        if precision == "fp32":
            placeholders = adapter_arrays({n: t for n, t in unet.state_dict().items() if n in set(names)})
            index["checks"]["unet_adapter_inputs"] = check_graph(unet_spec, ort_session(ort_path), precision,
                                                                 weights=placeholders)
        index["sdpa_pattern"] = has_sdpa_pattern(tmp / "unet.onnx")
        build_branch_graphs(unet_spec, tmp, index, precision, progress)
        (tmp / STORE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


def build_branch_graphs(unet_spec, directory: Path, index: dict, precision: str, progress) -> None:
    """Export the two feature-reuse graphs of `unet_spec`'s UNet (`BRANCH_GRAPHS`) into `directory` like
    `unet_adapter_inputs`: the tunable tensors they hold as inputs, attention fused, checked against PyTorch at fp32;
    record them in `index`."""
    unet = unet_spec.module
    tunable = adapter_arrays({n: t for n, t in unet.state_dict().items() if is_trainable(n)})
    for spec in branch_graph_specs(unet_spec):
        progress(f"exporting {spec.name} (feature reuse between denoising steps, ONNX Runtime)")
        started = time.perf_counter()
        path = directory / f"{spec.name}.onnx"
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            raw = Path(tmp) / "graph.onnx"
            export_graph(spec, raw)
            io = graph_io(raw)
            held = onnx.load(str(raw), load_external_data=False).graph.initializer
            names = [t.name for t in held if is_trainable(t.name)]
            with_weights_as_inputs(raw, path, names)
        ort_optimization = optimize_unet_for_ort(path)
        files = graph_files(path)
        index["graphs"][spec.name] = {
            "file": path.name, "files": [f.name for f in files], "sha256": sha256_files(files, directory),
            "export_seconds": round(time.perf_counter() - started, 2), **io, "weight_inputs": names,
            "ort_optimization": ort_optimization,
        }
        if precision == "fp32":
            index["checks"][spec.name] = check_graph(spec, ort_session(path), precision, weights=tunable)
        else:
            index["checks"][spec.name] = check_dtypes(path)


def add_branch_graphs(model: TunedModel, entry: Path, index: dict, precision: str, progress) -> dict:
    """Add the feature-reuse graphs to a store entry exported before them, leaving its graphs as they are: the new
    files are built beside it and moved in, then the index is replaced (readers see the old index or the new)."""
    components = load_components(model.base_path, "cpu", PRECISIONS[precision], model.base_variant)
    unet = inflate(components.unet, *model.architecture)
    _distinct_adapter_placeholders(unet)
    unet_spec = next(s for s in graph_specs(components, unet, model.latent_size, PRECISIONS[precision])
                     if s.name == "unet")
    index = json.loads(json.dumps(index))
    with tempfile.TemporaryDirectory(dir=entry.parent) as tmp:
        build_branch_graphs(unet_spec, Path(tmp), index, precision, progress)
        for name in BRANCH_GRAPHS:
            for file in index["graphs"][name]["files"]:
                os.replace(Path(tmp) / file, entry / file)
        (Path(tmp) / STORE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        os.replace(Path(tmp) / STORE_INDEX, entry / STORE_INDEX)
    return index


def _distinct_adapter_placeholders(unet) -> None:
    """Give every tunable tensor of the base graph a distinct seeded random value. Each model's adapter replaces
    them at load; but identical tensors (a fresh inflation's zero output weights) would be merged into one
    initializer by the exporter, and the adapter could no longer address each by name."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in unet.state_dict().items():
            if is_trainable(name):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)


def check_dtypes(path: Path) -> dict:
    """Where fp16 cannot be run (no GPU here): the graph's float inputs and its float weights are fp16."""
    io = graph_io(path)
    wrong = [f"{v['name']} is {v['dtype']}" for v in io["inputs"]
             if v["name"] not in ("timestep", "input_ids") and v["dtype"] != "float16"]
    weights = [t.data_type for t in onnx.load(str(path), load_external_data=False).graph.initializer]
    fp16, fp32 = weights.count(onnx.TensorProto.FLOAT16), weights.count(onnx.TensorProto.FLOAT)
    if wrong or fp16 == 0 or fp32 > fp16:
        raise ExportError(f"{path.name}: not an fp16 graph ({'; '.join(wrong) or 'weights are not fp16'})")
    return {"fp16_weights": fp16, "fp32_weights": fp32, "outputs": {v["name"]: v["dtype"] for v in io["outputs"]}}


def load_store_entry(entry: Path) -> dict | None:
    """The index of a complete, intact store entry, or None."""
    try:
        index = json.loads((entry / STORE_INDEX).read_text())
        for graph in index["graphs"].values():
            if sha256_files([entry / f for f in graph["files"]], entry) != graph["sha256"]:
                return None
        required = {*GRAPHS, "unet_adapter_inputs"}
        return index if required <= set(index["graphs"]) <= {*required, *BRANCH_GRAPHS} else None
    except (OSError, KeyError, json.JSONDecodeError):
        return None


def export(
    run: str | Path,
    out: str | Path | None = None,
    precision: str = "fp32",
    tensorrt: bool = False,
    store: str | Path | None = None,
    progress=print,
    check_tuned: bool = True,
    aoti: bool = False,
    device: str | None = None,
    aoti_check_timeout: float | None = None,
) -> Path:
    """Export a tuned model directory to an engine directory; return its path. The base graphs are always
    checked when they are built; `check_tuned` also checks this model's UNet with its adapter (fp32 only).
    `aoti` builds AOTInductor packages for `device` (default: cuda when available) instead of ONNX graphs; their
    check fails the export if it has not finished within `aoti_check_timeout` seconds (default: 30 minutes)."""
    try:
        model = TunedModel.open(run)
    except ArtefactError as e:
        raise ExportError(f"{run}: {e}") from e
    onnx_graphs = tensorrt or not aoti
    if onnx_graphs and precision not in PRECISIONS:
        raise ExportError(f"--precision must be one of {', '.join(PRECISIONS)} for ONNX graphs (bf16 is --aoti only)")
    if aoti:
        from exporter import aoti_export

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        require_aoti(device, ExportError)
        aoti_export.check_precision(device, precision)
    base = model.base_path
    try:
        if not is_same_base(base, model.config["base"]["sha256"], model.base_variant):
            raise ExportError(f"the base model {base} changed since {run} was tuned (content hash differs)")
    except BaseModelError as e:
        raise ExportError(f"the base model of {run} is unusable: {e}") from e
    try:
        source = model.source(with_frames=False)  # checked against the size tav_config.json gives
    except ArtefactError as e:
        raise ExportError(f"{run}: {e}") from e
    out = Path(out) if out else model.path / "engines"
    store_root = Path(store) if store else model.path.parent / STORE_DIR
    for directory in (out.parent, store_root):
        _check_writable(directory)

    try:  # every tuned tensor (a LoRA model's merged onto W0): what the graphs' tunable inputs are checked against
        adapter = model.tuned_tensors()
    except ArtefactError as e:
        raise ExportError(f"{run}: {e}") from e
    built: dict = {}
    if onnx_graphs:
        built, index = export_onnx(model, adapter, store_root, out, precision, check_tuned, progress)
        if tensorrt:
            from exporter.tensorrt_build import build_plans

            built["tensorrt"] = build_plans(store_root / built["store"]["key"], index, model, precision, progress)
    if aoti:
        key = aoti_export.store_key(model, device, precision)
        entry = store_root / key
        with file_lock(store_root / f".{key}.lock"):  # tuning workers sharing the store build an entry once
            index = aoti_export.load_store_entry(entry)
            if index is None:
                progress(f"building shared AOTInductor packages in {entry}")
                index = aoti_export.build_store_entry(model, entry, device, precision, progress,
                                                      aoti_check_timeout or aoti_export.CHECK_TIMEOUT)
            else:
                progress(f"reusing shared AOTInductor packages in {entry}")
                os.utime(entry)  # last used: `--gc` keeps it through its grace period, until the manifest names it
        if set(adapter) != set(index["tunable"]):
            raise ExportError(f"{run}: the adapter's tensors are not the UNet package's tunable tensors "
                              f"({len(adapter)} vs {len(index['tunable'])})")
        built["aoti"] = {device: {**index, "store": {"key": key, "path": os.path.relpath(entry, out)}}}
        built.setdefault("latent_channels", index["latent_channels"])
        built.setdefault("text_shape", index["text_shape"])

    with atomic_directory(out, overwrite=True) as tmp:
        # fp32, the tuned values exactly: each runtime casts them to the precision it runs at. A LoRA model's are
        # its factors: the runtimes merge them onto the W0 the manifest names
        stored = model.adapter() if model.lora else adapter
        save_file({k: v.float().contiguous() for k, v in stored.items()}, tmp / artefacts.ENGINE_ADAPTER_FILE)
        save_file(source.tensors(), tmp / artefacts.ENGINE_SOURCE_FILE)
        shutil.copytree(model.base_path / "tokenizer", tmp / "tokenizer")
        shutil.copy(model.base_path / "scheduler" / "scheduler_config.json",
                    tmp / artefacts.SCHEDULER_FILE)
        manifest = {**model_manifest(model, built.pop("latent_channels"), built.pop("text_shape")), **built}
        manifest["adapter_sha256"] = sha256_files([tmp / artefacts.ENGINE_ADAPTER_FILE], tmp)
        manifest["source_sha256"] = sha256_files([model.path / artefacts.SOURCE_FILE], model.path)
        manifest["source"] = model.config.get("source", {"kind": "clip"})
        if model.lora:
            w0 = model.path / model.lora["w0"]["path"]
            manifest["lora"] = {"rank": model.lora["rank"], "alpha": model.lora["alpha"],
                                "w0": {"path": os.path.relpath(w0.resolve(), out.resolve()),
                                       "sha256": model.lora["w0"]["sha256"]}}
        manifest = merge_manifest(_previous_manifest(out, model), manifest)
        (tmp / artefacts.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    progress(f"engines: {out}")
    return out


def export_onnx(model: TunedModel, adapter: dict[str, torch.Tensor], store_root: Path, out: Path, precision: str,
                check_tuned: bool, progress) -> tuple[dict, dict]:
    """Build (or reuse) the ONNX store entry and check the tuned UNet; return the manifest's ONNX fields (with the
    shapes every backend reads) and the store entry's index."""
    key = store_key(model, precision)
    entry = store_root / key
    with file_lock(store_root / f".{key}.lock"):  # tuning workers sharing the store build an entry once
        index = load_store_entry(entry)
        if index is None:
            progress(f"building shared base graphs in {entry}")
            index = build_store_entry(model, entry, precision, progress)
        else:
            progress(f"reusing shared base graphs in {entry}")
            os.utime(entry)  # last used: `--gc` keeps it through its grace period, until the manifest names it
            if not set(BRANCH_GRAPHS) <= set(index["graphs"]):
                progress(f"adding the feature-reuse graphs to {entry}")
                index = add_branch_graphs(model, entry, index, precision, progress)

    unet_path = entry / index["graphs"]["unet_adapter_inputs"]["file"]
    graph = onnx.load(str(entry / index["graphs"]["unet"]["file"]), load_external_data=False).graph
    initializers = {t.name: tuple(t.dims) for t in graph.initializer}
    weight_map = {}  # adapter tensor -> its initializer in unet.onnx (TensorRT refit) and input of the ORT variant
    for name, tensor in adapter.items():
        if initializers.get(name) != tuple(tensor.shape):
            raise ExportError(f"adapter tensor {name} has no initializer of shape {tuple(tensor.shape)} in the graph")
        weight_map[name] = {"initializer": name, "input": name, "transpose": None}
    if not check_tuned:
        tuned_check = {"skipped": "not asked for"}
    elif precision == "fp32":
        progress("checking the tuned UNet: ONNX Runtime with the adapter vs PyTorch")
        tuned_check = check_tuned_unet(model, unet_path, adapter)
    else:
        tuned_check = {"skipped": "fp16 numeric checks run where a GPU is present"}
    unet_io = index["graphs"]["unet"]
    sample = next(i for i in unet_io["inputs"] if i["name"] == "sample")["shape"]
    text = next(i for i in unet_io["inputs"] if i["name"] == "encoder_hidden_states")["shape"]
    return {
        "precision": precision,
        "opset": index["opset"],
        "store": {"key": key, "path": os.path.relpath(entry, out)},
        "graphs": index["graphs"],
        "sdpa_pattern": index["sdpa_pattern"],
        "checks": {"base": index["checks"], "tuned_unet": tuned_check},
        "weight_map": weight_map,
        "latent_channels": sample[1],
        "text_shape": text[1:],
    }, index


def merge_manifest(old: dict | None, new: dict) -> dict:
    """`new` plus what `old` (the same model's previous manifest, or None) recorded for backends not built now:
    the ONNX graphs (with their TensorRT plans), TensorRT plans of the same graphs, AOTInductor packages of other
    devices. `backends` lists what the result holds."""
    merged = dict(new)
    if old is not None:
        if "graphs" not in new and "graphs" in old:
            merged.update({k: old[k] for k in (*ONNX_FIELDS, "tensorrt") if k in old})
        elif "tensorrt" not in new and "tensorrt" in old and old.get("store", {}).get("key") == new["store"]["key"]:
            merged["tensorrt"] = old["tensorrt"]
        if old.get("aoti") or new.get("aoti"):
            merged["aoti"] = {**old.get("aoti", {}), **new.get("aoti", {})}
    present = {"onnxruntime": "graphs" in merged, "tensorrt": "tensorrt" in merged, "aoti": bool(merged.get("aoti"))}
    merged["backends"] = [backend for backend, there in present.items() if there]
    return merged


def _previous_manifest(out: Path, model: TunedModel) -> dict | None:
    """The manifest an earlier export of this same model wrote to `out`, if any."""
    try:
        old = json.loads((out / artefacts.MANIFEST_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = (old.get("format"), old.get("format_version"), old.get("model", {}).get("model_hash")) == (
        artefacts.ENGINE_FORMAT, artefacts.ENGINE_FORMAT_VERSION, model.model_hash)
    return old if same else None


def check_tuned_unet(model: TunedModel, unet_path: Path, adapter: dict[str, torch.Tensor]) -> dict:
    """The base UNet graph with the adapter as initializer overrides must match the tuned PyTorch UNet."""
    components = load_components(model.base_path, variant=model.base_variant)
    unet = inflate(components.unet, *model.architecture)
    apply_adapter(unet, adapter)
    spec = next(s for s in graph_specs(components, unet, model.latent_size, torch.float32) if s.name == "unet")
    return check_graph(spec, ort_session(unet_path), "fp32", seed=1, weights=adapter_arrays(adapter))


def model_manifest(model: TunedModel, latent_channels: int, text_shape: list[int]) -> dict:
    """The manifest fields every backend reads: the model, its shapes and the UNet's profiles."""
    c = model.config
    h, w = c["latent_height"], c["latent_width"]
    return {
        "format": artefacts.ENGINE_FORMAT,
        "format_version": artefacts.ENGINE_FORMAT_VERSION,
        "unet_profiles": [{"batch": b, "sample": [b, latent_channels, 8, h, w],
                           "encoder_hidden_states": [b, *text_shape], "timestep": [1]} for b in (1, 2)],
        "model": {"model_hash": model.model_hash, "base_path": model.base_id, "base_sha256": c["base"]["sha256"],
                  "prompt": c["prompt"], "attention_mode": c["attention_mode"],
                  "group_norm": model.architecture[1], "frame_positions": model.architecture[2],
                  "frames": c["frames"]},
        "latent_channels": latent_channels,
        "latent_size": [h, w],
        "pixel_size": [c["height"], c["width"]],
        "text_shape": list(text_shape),
        "scaling_factor": _scaling_factor(model.base_path),
        "fps": c["fps"],
        "defaults": c.get("recommended", {"guidance": 12.5, "steps": 50}),
        "producer": versions(),
    }


def _scaling_factor(base: Path) -> float:
    return float(json.loads((Path(base) / "vae" / "config.json").read_text()).get("scaling_factor", 0.18215))


def _check_writable(directory: Path) -> None:
    """Fail before any work when `directory` (or the nearest existing ancestor) takes no new files."""
    probe = directory
    while not probe.exists():
        probe = probe.parent
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ExportError(f"cannot write to {directory}: {e.strerror}") from e


def compile_torch(run: str | Path, mode: str = "default", device: str | None = None, progress=print,
                  batches: tuple[int, ...] = (1, 2)) -> Path:
    """`tav-export --torch-compile`: compile `run`'s video UNet as the torch engine does (`torch.compile` in
    `mode`, at each UNet batch) and write the compiled code into the engine store, where replicas started with
    `--compile` read it; return the store entry. The torch engine itself compiles, so the code is the one it runs."""
    from server.engines.torch_engine import load_torch_model

    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda: no CUDA device is visible")
    try:
        loaded = load_torch_model(run, device, compile_mode=mode)
        progress(f"compiling the video UNet of {run} (torch.compile, mode {mode}) at batch "
                 f"{', '.join(map(str, batches))} on {loaded.engines.device}")
        entry = loaded.engines.save_compiled(TunedModel.open(run), batches)
    except (BaseModelError, ValueError) as e:
        raise ExportError(f"{run}: {e}") from e
    progress(f"wrote the compiled code to {entry}")
    return entry


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tav-export", description=__doc__.splitlines()[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="tuned model directory (RUN)")
    what.add_argument("--gc", type=Path, metavar="REPO",
                      help="remove the .engines/ and .bases/ entries no model or job of REPO uses (exporter/gc.py)")
    p.add_argument("--grace", type=float, default=gc.DEFAULT_GRACE,
                   help="--gc: keep entries made or used within this many seconds (default %(default)s)")
    p.add_argument("--out", help="engine directory (default RUN/engines)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="fp32 | fp16 (ONNX, or --aoti on cuda) | bf16 (--aoti on cuda)")
    p.add_argument("--tensorrt", action="store_true", help="also build TensorRT plans (needs a GPU and tensorrt)")
    p.add_argument("--aoti", action="store_true",
                   help="build AOTInductor packages (backend aoti) instead of ONNX graphs; the manifest keeps both")
    p.add_argument("--device", choices=list(DEVICES),
                   help="--aoti, --torch-compile: device to compile for (default: cuda if present)")
    p.add_argument("--store", help="shared graph store (default: REPO/.engines beside the model)")
    p.add_argument("--torch-compile", nargs="?", const="default", choices=COMPILE_MODES, metavar="MODE",
                   help="instead of exporting graphs, compile the video UNet for the torch backend's --compile MODE "
                        f"({', '.join(COMPILE_MODES)}; default: default) on --device, into the engine store")
    args = p.parse_args(argv)
    if args.gc:
        if not args.grace >= 0:
            p.error(f"--grace must be a number of seconds >= 0, got {args.grace}")
        try:
            gc.collect(args.gc, args.grace)
        except gc.GcError as e:
            print(f"tav-export: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        return
    if args.torch_compile and (args.aoti or args.tensorrt or args.out or args.store or args.precision != "fp32"):
        p.error("--torch-compile compiles into the model's repository store, at the torch engine's precision "
                "(fp32 on CPU, fp16 on CUDA): no --aoti, --tensorrt, --out, --store or --precision")
    if args.device and not (args.aoti or args.torch_compile):
        p.error("--device goes with --aoti or --torch-compile (ONNX graphs are not compiled for a device)")
    try:
        if args.torch_compile:
            compile_torch(args.model, args.torch_compile, args.device)
            return
        export(args.model, args.out, args.precision, args.tensorrt, args.store, aoti=args.aoti, device=args.device)
    except (ExportError, ArtefactError) as e:
        print(f"tav-export: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
