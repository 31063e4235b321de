"""The torch engine with its video UNet compiled (`--compile`, issue 36), on CPU: the same output as eager for two
models of one base, a switch between them that recompiles nothing and moves no tensor, and the compiled code that
`tav-export --torch-compile` leaves in the engine store read by a fresh process instead of generated again.

One compile for the module (about a minute on 2 busy cores), batch 2 only; the fresh process's run compiles the
generated C++ again (an empty inductor cache), Inductor's code generation it skips."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch._dynamo.utils import counters

from exporter.cli import compile_torch
from exporter.cli import main as export_main
from server.engines import load_model
from server.local import main as generate_main
from server.serve import main as serve_main
from tuner import compiled
from tuner.artefacts import ADAPTER_FILE, CONFIG_FILE
from tuner.io_utils import sha256_files

REPO_ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, sys, torch
from torch._dynamo.utils import counters
from server.engines.torch_engine import load_torch_model
engines = load_torch_model(sys.argv[1], "cpu", compile_mode="default").engines
engines.run_unet(torch.zeros(engines.unet_input_shape(2)), torch.tensor([999.0]), torch.zeros(2, *engines.text_shape))
print(json.dumps({"loaded": engines.base.compiled_artefacts, "inductor": dict(counters["inductor"])}))
"""


def other_model(run: Path, out: Path) -> Path:
    """A second tuned model of the same base: `run` with its tuned tensors scaled (and its hash written again)."""
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("engines"))
    save_file({k: v * 1.5 for k, v in load_file(run / ADAPTER_FILE).items()}, out / ADAPTER_FILE)
    config = json.loads((out / CONFIG_FILE).read_text())
    config["adapter_sha256"] = sha256_files([out / ADAPTER_FILE], out)
    (out / CONFIG_FILE).write_text(json.dumps(config))
    return out


def relative(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out - reference).norm() / reference.norm())


def test_compiled_unet_matches_eager_switches_without_recompiling_and_restarts_from_the_store(tuned_run, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    a = repo / "square-a"
    shutil.copytree(tuned_run, a, ignore=shutil.ignore_patterns("engines"))
    b = other_model(a, repo / "square-b")
    generator = torch.Generator().manual_seed(0)
    eager = {name: load_model(run, "torch", "cpu").engines for name, run in (("a", a), ("b", b))}
    shape = eager["a"].unet_input_shape(2)
    inputs = (torch.randn(shape, generator=generator), torch.tensor([500.0]),
              torch.randn(2, *eager["a"].text_shape, generator=generator))
    reference = {name: engines.run_unet(*inputs) for name, engines in eager.items()}
    del eager

    entry = compile_torch(a, batches=(2,), progress=lambda message: None)
    index = json.loads((entry / compiled.INDEX).read_text())
    assert entry.parent == repo / ".engines" and index["batches"] == [2] and index["mode"] == "default"
    assert index["base_sha256"] == json.loads((a / CONFIG_FILE).read_text())["base"]["sha256"]

    engines = {name: load_model(run, "torch", "cpu", compile_mode="default").engines for name, run in
               (("a", a), ("b", b))}
    assert engines["a"].base is engines["b"].base and engines["a"].base.compiled_artefacts
    unet = engines["a"].base.components.unet
    pointers = {name: t.data_ptr() for name, t in unet.state_dict().items()}
    outputs = {"a": engines["a"].run_unet(*inputs)}
    graphs = counters["stats"]["unique_graphs"]
    outputs["b"] = engines["b"].run_unet(*inputs)
    outputs["a again"] = engines["a"].run_unet(*inputs)
    assert counters["stats"]["unique_graphs"] == graphs, "a model switch recompiled the UNet"
    assert {name: t.data_ptr() for name, t in unet.state_dict().items()} == pointers, "a switch moved a tensor"
    for name, want in (("a", "a"), ("b", "b"), ("a again", "a")):
        assert relative(outputs[name], reference[want]) <= 1e-4, (name, relative(outputs[name], reference[want]))
    assert relative(outputs["b"], reference["a"]) > 1e-2  # B's own weights, not A's left in the compiled code

    empty = tmp_path / "empty-inductor-cache"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(empty), "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", PROBE, str(b)], capture_output=True, text=True, env=env,
                          timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    restarted = json.loads(done.stdout.strip().splitlines()[-1])
    assert restarted["loaded"] and restarted["inductor"].get("fxgraph_cache_miss", 0) == 0, restarted
    assert restarted["inductor"].get("fxgraph_cache_hit", 0) >= 1, restarted


@pytest.mark.parametrize("command", ["tav-serve", "tav-generate-local"])
def test_compile_with_another_backend_is_a_one_line_error(command, tuned_run, tmp_path, capsys):
    args = {"tav-serve": (serve_main, ["--repo", str(tmp_path), "--port", "0"]),
            "tav-generate-local": (generate_main, ["--model", str(tuned_run), "--prompt", "x",
                                                   "--out", str(tmp_path / "x.gif")])}
    main, argv = args[command]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--backend", "onnxruntime", "--compile"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{command}: error: --compile is an option of the torch backend, not onnxruntime (whose "
                   f"engines tav-export builds)"]


def test_torch_compile_export_refuses_graph_options_and_a_missing_gpu(tuned_run, capsys):
    with pytest.raises(SystemExit) as exited:
        export_main(["--model", str(tuned_run), "--torch-compile", "--aoti"])
    assert exited.value.code == 2 and "--torch-compile compiles into" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exited:
            export_main(["--model", str(tuned_run), "--torch-compile", "--device", "cuda"])
        assert exited.value.code == 2
        assert capsys.readouterr().err.strip() == "tav-export: error: --device cuda: no CUDA device is visible"
