"""Run freshly compiled AOTInductor packages in a child process, on inputs the exporter saved beside them.

A package is native code: if loading or calling one crashes, the crash must not end `tav-export` silently (on CUDA
it did, twice, with no traceback). So the exporter runs this module as a child, `python -m exporter.aoti_check DIR`,
and reads its exit status; on a GPU the same command can run under `compute-sanitizer`. It imports only torch and
safetensors, and writes each phase to stderr before entering it (synchronising CUDA after it), so a crash names the
phase it happened in.

`--before LEAD` first does one thing a hung load may be waiting for (issue 36's leads on the CUDA load that did
not return; `tav-bench gpu`'s probe runs the check once under each): `vec-isa`, the C++ compiler probe behind
Inductor's CPU-feature check, which `aoti_load_package` runs at load (pytorch/pytorch#191715: deployments pre-warm
it with `valid_vec_isa_list()`); `codecache`, importing `torch._inductor.codecache` in the fresh process
(pytorch/pytorch#173706).

DIR holds `check_plan.json` (the device, and per package its file, weights file and the input names of each
batch), the packages, their weights and `check_inputs.safetensors`. The child writes `check_outputs.safetensors`
(one output per package and batch) and `check_constants.json` (the constant names each package asks for).
"""

from __future__ import annotations

import faulthandler
import json
import signal
import sys
from pathlib import Path

PLAN_FILE = "check_plan.json"
INPUTS_FILE = "check_inputs.safetensors"
OUTPUTS_FILE = "check_outputs.safetensors"
CONSTANTS_FILE = "check_constants.json"
PHASE_PREFIX = "aoti-check phase: "
LEADS = ("vec-isa", "codecache")


def describe_exit(returncode: int) -> str:
    """A child's exit status in words: `SIGSEGV (signal 11)` for a negative return code, else `exit code N`."""
    if returncode < 0:
        try:
            return f"{signal.Signals(-returncode).name} (signal {-returncode})"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def last_phase(stderr: str) -> str | None:
    """The last phase a child announced on stderr, or None."""
    phases = [line[len(PHASE_PREFIX):] for line in stderr.splitlines() if line.startswith(PHASE_PREFIX)]
    return phases[-1] if phases else None


def run(directory: Path, before: str | None = None) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    plan = json.loads((directory / PLAN_FILE).read_text())
    device = plan["device"]

    def phase(text: str) -> None:
        if device == "cuda":
            torch.cuda.synchronize()  # an asynchronous CUDA fault surfaces here, inside the phase that caused it
        print(PHASE_PREFIX + text, file=sys.stderr, flush=True)

    if before is not None:
        phase(f"before loading: {before}")
        if before == "vec-isa":
            from torch._inductor.cpu_vec_isa import valid_vec_isa_list

            valid_vec_isa_list()
        elif before == "codecache":
            import torch._inductor.codecache  # noqa: F401
        else:
            raise SystemExit(f"--before must be one of {', '.join(LEADS)}, got {before!r}")
    inputs = load_file(directory / INPUTS_FILE, device=device)
    outputs, constants = {}, {}
    for name, package in plan["packages"].items():
        phase(f"loading {package['file']}")
        model = torch._inductor.aoti_load_package(str(directory / package["file"]))
        names = model.get_constant_fqns()
        constants[name] = names
        phase(f"reading the {len(names)} constants of {name}")
        with safe_open(directory / package["weights"], "pt", device=device) as f:
            missing = sorted(set(names) - set(f.keys()))
            if missing:
                raise SystemExit(f"{name}: the package asks for constants its weights do not hold: {missing[:5]}")
            weights = {n: f.get_tensor(n) for n in names}
        phase(f"loading the constants of {name}")
        model.load_constants(weights, check_full_update=True)
        for batch, keys in package["batches"].items():
            phase(f"calling {name} at batch {batch}")
            with torch.inference_mode():
                outputs[f"{name}/batch{batch}"] = model(*[inputs[k] for k in keys]).float().cpu().contiguous()
        phase(f"done with {name}")
        del model, weights
    save_file(outputs, directory / OUTPUTS_FILE)
    (directory / CONSTANTS_FILE).write_text(json.dumps(constants) + "\n")


if __name__ == "__main__":
    faulthandler.enable()  # a fatal signal still prints the Python stack of where it happened
    run(Path(sys.argv[1]), sys.argv[3] if sys.argv[2:3] == ["--before"] else None)
