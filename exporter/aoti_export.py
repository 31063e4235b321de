"""AOTInductor packages of a base model's four networks (`tav-export --aoti`): the engine PyTorch itself compiles
ahead of time, for CPU or CUDA, served by the `aoti` backend.

A store entry `REPO/.engines/<key>/` holds, per network (text encoder, VAE encoder, VAE decoder, video UNet):

  <network>.pt2          the package, compiled without its weights (`package_constants_in_so=False`)
  <network>.safetensors  its constants, i.e. the base weights, under the names the package asks for
  aoti.json              the index: device, precision, torch version, compile target; per package its sha256, its
                         weights' sha256, inputs, constants (name -> shape, dtype), export and compile seconds;
                         the tunable tensors; the check against PyTorch

Packages hold no weights, so every tuned model of a base shares them: the server loads the base weights once and
swaps a model's tuned tensors in with `load_constants`. The key adds device, precision, torch version and compile
target to what the graphs depend on, since a package is native code for one of each. The video UNet has one
dynamic dimension, the batch (1 for inversion, 2 for guided sampling), at 8 frames.

The networks compile in two child processes side by side (the UNet, and the other three), so a compiler crash ends
a child and the UNet's compile time bounds the build's. Each package is then checked against the PyTorch module it
came from, in a child process too (`exporter.aoti_check`): a package that crashes when loaded or called fails the
export with the signal and the phase, and is kept for diagnosis beside the entry (`<key>.failed/`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from exporter import aoti_check
from exporter.onnx_export import GRAPHS, ExportError, graph_specs, random_inputs, relative_error
from tuner.aoti_support import build_metadata, compile_target, require_aoti
from tuner.artefacts import TunedModel
from tuner.components import load_components
from tuner.inflate import inflate, is_trainable
from tuner.io_utils import atomic_directory, file_sha256
from tuner.versions import versions

FORMAT = "tav-aoti"
FORMAT_VERSION = 1
INDEX = "aoti.json"
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2}
UNET_BATCHES = (1, 2)
CHECK_TIMEOUT = 1800  # seconds for the child to load and run the four packages
COMPILE_JOB = "compile_job.json"
COMPILE_GROUPS = (("unet",), ("text_encoder", "vae_encoder", "vae_decoder"))  # one child process each


def check_precision(device: str, precision: str) -> None:
    """fp32 anywhere; fp16 and bf16 on CUDA only (on the CPUs measured here fp32 is the fast path: a bf16 matmul
    runs at about half the fp32 rate)."""
    if precision not in PRECISIONS:
        raise ExportError(f"--precision must be one of {', '.join(PRECISIONS)} with --aoti")
    if precision != "fp32" and device != "cuda":
        raise ExportError(f"--precision {precision} with --aoti needs --device cuda; on cpu it is fp32")


def store_key(model: TunedModel, device: str, precision: str) -> str:
    """What the packages depend on, hashed: the base graphs' key parts (base content, size, attention mode and
    group norm) plus device, precision, torch version and compile target."""
    c = model.config
    parts = [c["base"]["sha256"], c["latent_height"], c["latent_width"], *model.architecture, FORMAT,
             FORMAT_VERSION, device, precision, torch.__version__, compile_target(device)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def load_store_entry(entry: Path) -> dict | None:
    """The index of a complete, intact AOTInductor store entry, or None."""
    try:
        index = json.loads((entry / INDEX).read_text())
        if index.get("format") != FORMAT or index.get("format_version") != FORMAT_VERSION:
            return None
        for package in index["packages"].values():
            if (file_sha256(entry / package["file"]) != package["sha256"]
                    or file_sha256(entry / package["weights"]) != package["weights_sha256"]):
                return None
        return index if set(index["packages"]) == set(GRAPHS) else None
    except (OSError, KeyError, json.JSONDecodeError):
        return None


def build_store_entry(model: TunedModel, entry: Path, device: str, precision: str, progress=print,
                      check_timeout: float = CHECK_TIMEOUT) -> dict:
    """Export, compile and check the four packages into `entry` (atomically); return its index."""
    require_aoti(device, ExportError)
    check_precision(device, precision)
    started = time.perf_counter()
    job = {"base": str(model.base_path.resolve()), "variant": model.base_variant, "device": device,
           "precision": precision, "latent_size": list(model.latent_size), "architecture": list(model.architecture)}
    components, unet, specs = _networks(job)
    text_shape = [components.tokenizer.model_max_length, int(components.text_encoder.config.hidden_size)]
    index = {"format": FORMAT, "format_version": FORMAT_VERSION, "device": device, "precision": precision,
             "torch_version": torch.__version__, "compile_target": compile_target(device), "packages": {},
             "tunable": sorted(n for n in unet.state_dict() if is_trainable(n)),
             "latent_channels": int(unet.config.in_channels), "text_shape": text_shape, "producer": versions()}
    with atomic_directory(entry, overwrite=True) as tmp:
        progress(f"compiling the four networks with AOTInductor ({device}, {precision}) in two processes")
        (tmp / COMPILE_JOB).write_text(json.dumps(job) + "\n")
        _compile_in_children(tmp, COMPILE_GROUPS)
        for spec in specs:
            index["packages"][spec.name] = json.loads((tmp / f"{spec.name}.record.json").read_text())
        progress("checking the packages against PyTorch in a child process")
        expected = _write_check_inputs(tmp, specs, index["packages"], device)
        checked = time.perf_counter()
        _run_check(tmp, entry, check_timeout)
        index["check_seconds"] = round(time.perf_counter() - checked, 2)
        constants = json.loads((tmp / aoti_check.CONSTANTS_FILE).read_text())
        index["checks"] = _compare(load_file(tmp / aoti_check.OUTPUTS_FILE), expected, precision)
        missing = sorted(set(index["tunable"]) - set(constants["unet"]))
        if missing:
            raise ExportError(f"tunable tensors {missing[:5]} are not constants of the UNet package (compiled into "
                              "its code), so tuned models could not be swapped in")
        for name, names in constants.items():
            _write_weights(tmp, index["packages"][name], names)
        for name in (aoti_check.INPUTS_FILE, aoti_check.OUTPUTS_FILE, aoti_check.PLAN_FILE, aoti_check.CONSTANTS_FILE,
                     COMPILE_JOB, *(f"{n}.record.json" for n in GRAPHS), *(f"compile-{i}.log" for i in range(2))):
            (tmp / name).unlink()
        index["build_seconds"] = round(time.perf_counter() - started, 2)
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


def _networks(job: dict):
    """The base's components on the job's device and precision, its video UNet, and the four networks' specs."""
    dtype = PRECISIONS[job["precision"]]
    components = load_components(job["base"], job["device"], dtype, job.get("variant"))
    components.text_encoder.float()  # runs once per prompt; fp32 keeps CLIP's LayerNorms exact at every precision
    with torch.random.fork_rng(devices=[]):  # the new temporal layers' initial values (drawn on the CPU): the same
        torch.manual_seed(0)  # in the compiling processes and the checking one, and the caller's RNG untouched
        unet = inflate(components.unet, *job["architecture"])
    return components, unet, graph_specs(components, unet, tuple(job["latent_size"]), dtype)


def _child_env() -> dict[str, str]:
    """The environment of a child process that imports this project, however the parent found it."""
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


def _compile_in_children(directory: Path, groups: tuple[tuple[str, ...], ...]) -> None:
    """Compile the networks in one child process per group, side by side (`python -m exporter.aoti_export`): the
    UNet alone takes about as long as the other three together. A compiler crash ends a child, not the export."""
    env = _child_env()
    children = []
    for i, names in enumerate(groups):
        with open(directory / f"compile-{i}.log", "w") as log:
            command = [sys.executable, "-m", "exporter.aoti_export", str(directory), *names]
            children.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))
    for i, (names, child) in enumerate(zip(groups, children, strict=True)):
        if child.wait() != 0:
            tail = "\n".join((directory / f"compile-{i}.log").read_text().strip().splitlines()[-15:])
            raise ExportError(f"compiling {', '.join(names)} with AOTInductor ended with "
                              f"{aoti_check.describe_exit(child.returncode)}:\n{tail}")


def compile_networks(directory: Path, names: list[str]) -> None:
    """In a child: export and compile the named networks of the job in `directory` (see `_compile`)."""
    job = json.loads((directory / COMPILE_JOB).read_text())
    _, _, specs = _networks(job)
    for spec in specs:
        if spec.name in names:
            record = _compile(spec, directory, job["device"])
            (directory / f"{spec.name}.record.json").write_text(json.dumps(record) + "\n")


def _compile(spec, directory: Path, device: str) -> dict:
    """Export one network (batch dynamic 1..2 for the UNet) and compile it to `<name>.pt2` without its weights;
    write every tensor it might ask for as a constant to `<name>.safetensors`; return its index record."""
    example = tuple(v.to(device) for v in spec.inputs.values())
    dynamic = None
    if spec.batch_axis:
        batch = torch.export.Dim("batch", min=1, max=max(UNET_BATCHES))
        dynamic = tuple(None if name == "timestep" else {0: batch} for name in spec.inputs)
    started = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(spec.module, example, dynamic_shapes=dynamic, strict=False)
    exported = time.perf_counter()
    path = directory / f"{spec.name}.pt2"
    torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs={
        "aot_inductor.package_constants_in_so": False, "aot_inductor.metadata": build_metadata(device)})
    compiled = time.perf_counter()
    tensors = {name: t.detach() for name, t in {**program.state_dict, **program.constants}.items()
               if isinstance(t, torch.Tensor)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / f"{spec.name}.safetensors")
    return {
        "file": path.name, "sha256": file_sha256(path), "weights": f"{spec.name}.safetensors",
        "inputs": [{"name": name, "dtype": str(v.dtype).removeprefix("torch."),
                    "shape": ["B", *v.shape[1:]] if spec.batch_axis and name != "timestep" else list(v.shape)}
                   for name, v in spec.inputs.items()],
        "export_seconds": round(exported - started, 2), "compile_seconds": round(compiled - exported, 2),
    }


def _write_check_inputs(directory: Path, specs, records: dict, device: str) -> dict[str, torch.Tensor]:
    """Random inputs of each network (both batches of the UNet) and the plan for the check child; return what
    PyTorch outputs for them."""
    generator = torch.Generator().manual_seed(0)
    plan: dict = {"device": device, "packages": {}}
    inputs, expected = {}, {}
    for spec in specs:
        plan["packages"][spec.name] = {"file": records[spec.name]["file"], "weights": records[spec.name]["weights"],
                                       "batches": {}}
        for batch in UNET_BATCHES if spec.batch_axis else (1,):
            example = {k: v.to(device) for k, v in random_inputs(spec, batch, generator).items()}
            keys = [f"{spec.name}/batch{batch}/{k}" for k in example]
            inputs.update(zip(keys, example.values(), strict=True))
            plan["packages"][spec.name]["batches"][str(batch)] = keys
            with torch.inference_mode():
                expected[f"{spec.name}/batch{batch}"] = spec.module(*example.values()).float().cpu()
    save_file({k: v.contiguous() for k, v in inputs.items()}, directory / aoti_check.INPUTS_FILE)
    (directory / aoti_check.PLAN_FILE).write_text(json.dumps(plan, indent=2) + "\n")
    return expected


def _run_check(directory: Path, entry: Path, timeout: float = CHECK_TIMEOUT) -> None:
    """Run `exporter.aoti_check` on `directory` in a child; if it crashes or hangs (loading a package on an H200
    did not return), keep the packages for diagnosis and raise, naming the phase it was in."""
    command = [sys.executable, "-m", "exporter.aoti_check", str(directory)]
    try:
        child = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_child_env())
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        ending = f"did not finish within {timeout:g} s"
    else:
        if child.returncode == 0:
            return
        stderr, ending = child.stderr, f"ended the checking process with {aoti_check.describe_exit(child.returncode)}"
    failed = entry.with_name(entry.name + ".failed")
    shutil.rmtree(failed, ignore_errors=True)
    os.replace(directory, failed)
    tail = "\n".join(stderr.strip().splitlines()[-15:])
    raise ExportError(
        f"the check of the AOTInductor packages {ending} while {aoti_check.last_phase(stderr) or 'starting'}; the "
        f"packages are kept in {failed} (rerun the check with: {sys.executable} -m exporter.aoti_check {failed}). "
        f"Its last output:\n{tail}")


def _compare(outputs: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], precision: str) -> dict:
    """Relative errors (by norm) of each package against PyTorch; raise past the precision's tolerance."""
    checks: dict[str, dict[str, float]] = {}
    for key, reference in expected.items():
        name, batch = key.split("/")
        error = relative_error(outputs[key].numpy(), reference.numpy())
        checks.setdefault(name, {})[batch] = error
        if not error <= TOLERANCE[precision]:
            raise ExportError(f"{name}: the AOTInductor package differs from PyTorch by {error:.2e} (relative, by "
                              f"norm) at {batch}; the tolerance for {precision} is {TOLERANCE[precision]:.0e}")
    return checks


def _write_weights(directory: Path, record: dict, names: list[str]) -> None:
    """Keep exactly the constants the package asks for in its weights file; record their shapes and dtypes."""
    path = directory / record["weights"]
    tensors = load_file(path)
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise ExportError(f"{record['file']} asks for constants the exported program does not hold: {missing[:5]}")
    save_file({n: tensors[n].contiguous() for n in sorted(names)}, path.with_name(path.name + ".tmp"))
    os.replace(path.with_name(path.name + ".tmp"), path)
    record["weights_sha256"] = file_sha256(path)
    record["constants"] = {n: [list(tensors[n].shape), str(tensors[n].dtype).removeprefix("torch.")]
                           for n in sorted(names)}


if __name__ == "__main__":
    compile_networks(Path(sys.argv[1]), sys.argv[2:])
