"""The aoti backend on CPU: `tav-export --aoti` on the tiny model (its four packages built once for the session, in
the session's inductor cache directory: conftest's `inductor_cache`), the packages against PyTorch, generation, two
tuned models of one base through one package without recompiling, refusing packages built elsewhere or changed, and
serving over gRPC."""

from __future__ import annotations

import io
import json
import re
import shutil
import zipfile
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from conftest import MODELS
from grpc_helpers import ServerThread, files, kinds, request, stub
from PIL import Image
from safetensors.torch import load_file, save_file

from exporter import aoti_check, aoti_export
from exporter.aoti_export import INDEX
from exporter.cli import export, main
from exporter.onnx_export import ExportError, relative_error
from server.engines import aoti_engine, load_model
from server.generate import GenerationOptions, Generator
from server.registry import read_entry
from server.serve import ServerConfig
from tuner.aoti_support import TORCH_KEY, compile_target, require_aoti
from tuner.artefacts import ArtefactError
from tuner.io_utils import file_sha256, sha256_files

OPTIONS = dict(steps=3, guidance=5.0, seed=7, invert=True)
PROMPT = "a blue square is moving right"


def manifest(run: Path) -> dict:
    return json.loads((run / "engines" / "manifest.json").read_text())


def test_export_writes_weightless_packages_shared_by_the_models_of_a_base(aoti_repo):
    repo, messages = aoti_repo
    a, b = manifest(repo / "square-a"), manifest(repo / "square-b")
    assert a["backends"] == ["aoti"] and read_entry(repo / "square-a", "torch").backends == ["torch", "aoti"]
    record = a["aoti"]["cpu"]
    assert record["store"] == b["aoti"]["cpu"]["store"] and any("reusing" in m for m in messages)
    assert record["torch_version"] == torch.__version__ and record["precision"] == "fp32"
    entry = (repo / "square-a" / "engines" / record["store"]["path"]).resolve()
    assert entry.parent == repo / ".engines" and json.loads((entry / INDEX).read_text())["packages"]
    for name, package in record["packages"].items():
        assert file_sha256(entry / package["file"]) == package["sha256"]
        assert file_sha256(entry / package["weights"]) == package["weights_sha256"]
        # no weights inside: the package holds code and metadata; its constants are all in the weights file
        with zipfile.ZipFile(entry / package["file"]) as archive:
            assert not [n for n in archive.namelist() if "/weights/" in n or n.endswith((".bin", "constants"))]
        assert len(package["constants"]) > 0, name
    assert set(record["tunable"]) <= set(record["packages"]["unet"]["constants"])
    assert all(error < 1e-4 for checks in record["checks"].values() for error in checks.values())


def test_unet_matches_pytorch_at_batch_1_and_2(aoti_repo):
    run = aoti_repo[0] / "square-a"
    aoti, eager = load_model(run, "aoti", "cpu"), load_model(run, "torch", "cpu")
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 2):
        sample = torch.randn(aoti.engines.unet_input_shape(batch), generator=generator)
        text = torch.randn(batch, *aoti.engines.text_shape, generator=generator)
        t = torch.tensor([321.0])
        error = relative_error(aoti.engines.unet(sample, t, text).numpy(), eager.engines.unet(sample, t, text).numpy())
        assert error <= 1e-4, (batch, error)


def test_generation_is_within_2_grey_levels_of_the_torch_backend(aoti_repo):
    run = aoti_repo[0] / "square-a"
    options = GenerationOptions(PROMPT, **OPTIONS)
    aoti = Generator(load_model(run, "aoti", "cpu")).generate(options).frames
    eager = Generator(load_model(run, "torch", "cpu")).generate(options).frames
    assert aoti.shape == eager.shape == (8, 32, 32, 3)
    assert np.abs(aoti.astype(int) - eager.astype(int)).max() <= 2


def test_two_models_of_one_base_are_served_by_one_process_through_one_package(aoti_repo):
    """Both models through tav-serve (in this process): each gives its own frames, requests alternate between them,
    and no package is loaded (let alone compiled) again after the first."""
    repo, _ = aoti_repo
    alone = {name: Generator(load_model(repo / name, "aoti", "cpu")).generate(GenerationOptions(PROMPT, **OPTIONS))
             .frames for name in MODELS}
    assert np.abs(alone["square-a"].astype(int) - alone["square-b"].astype(int)).max() > 10  # two distinct models
    loads = aoti_engine.Package.loads
    server = ServerThread(ServerConfig(repo=repo, port=0, backend="aoti", device="cpu"))
    try:
        server.wait_ready()
        with grpc.insecure_channel(server.target) as channel:
            for name in ["square-a", "square-b", "square-a", "square-b"]:
                responses = list(stub(channel).Generate(request(model=name, prompt=PROMPT, **OPTIONS), timeout=300))
                assert kinds(responses)[-1] == "chunk"
                served = np.stack([np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in files(responses)])
                np.testing.assert_array_equal(served, alone[name])
        switches = [server.server.registry.ready(n).engines.last_switch_seconds for n in MODELS]
    finally:
        server.stop()
    assert aoti_engine.Package.loads == loads  # the four packages of the base, loaded once for the session
    assert all(s is not None and s < 1.0 for s in switches)


def _copy_model(repo: Path, name: str, to: Path) -> Path:
    """A copy of a model and its store entry, to tamper with."""
    record = manifest(repo / name)["aoti"]["cpu"]
    shutil.copytree(repo / name, to / "repo" / name)
    shutil.copytree(repo / ".engines" / record["store"]["key"], to / "repo" / ".engines" / record["store"]["key"])
    return to / "repo" / name


def _package_path(run: Path, package: str) -> Path:
    record = manifest(run)["aoti"]["cpu"]
    return (run / "engines" / record["store"]["path"]).resolve() / record["packages"][package]["file"]


def _rewrite_package_metadata(run: Path, package: str, **changes: str) -> None:
    """Change what a package's metadata says it was built for, and record its new hash (so that only the metadata
    check can refuse it)."""
    path = _package_path(run, package)
    with zipfile.ZipFile(io.BytesIO(path.read_bytes())) as source, zipfile.ZipFile(path, "w") as target:
        for item in source.infolist():
            content = source.read(item)
            if item.filename.endswith("_metadata.json"):
                content = json.dumps({**json.loads(content), **changes}).encode()
            target.writestr(item, content)
    data = manifest(run)
    data["aoti"]["cpu"]["packages"][package]["sha256"] = file_sha256(path)
    (run / "engines" / "manifest.json").write_text(json.dumps(data))


def _misfit_adapter(run: Path) -> None:
    """One adapter tensor of another shape than the UNet's constant (the adapter's hash recorded anew)."""
    path = run / "engines" / "adapter.safetensors"
    adapter = load_file(path)
    adapter[sorted(adapter)[0]] = torch.zeros(3, 3)
    save_file(adapter, path)
    data = manifest(run)
    data["adapter_sha256"] = sha256_files([path], path.parent)
    (run / "engines" / "manifest.json").write_text(json.dumps(data))


# A vector instruction set other than this machine's (an AVX2-only CPU picks AVX-512 as the foreign one).
FOREIGN_TARGET = "cpu-avx512" if compile_target("cpu") == "cpu-avx2" else "cpu-avx2"
TAMPERING = {
    "hash": (lambda run: _package_path(run, "unet").write_bytes(_package_path(run, "unet").read_bytes() + b"\0"),
             "unet.pt2 does not match its recorded hash"),
    "torch": (lambda run: _rewrite_package_metadata(run, "vae_decoder", **{TORCH_KEY: "2.12.0"}),
              "vae_decoder.pt2 was built for torch 2.12.0 (this is torch "),
    "device": (lambda run: _rewrite_package_metadata(run, "text_encoder", tav_device="cuda", AOTI_DEVICE_KEY="cuda"),
               "text_encoder.pt2 was built for device cuda (this engine runs on cpu)"),
    "target": (lambda run: _rewrite_package_metadata(run, "unet", tav_compile_target=FOREIGN_TARGET),
               f"unet.pt2 was built for compile target {FOREIGN_TARGET} (this machine is {compile_target('cpu')})"),
}


@pytest.mark.parametrize("change", TAMPERING)
def test_a_package_built_elsewhere_or_changed_is_refused_before_any_is_loaded(aoti_repo, tmp_path, change):
    run = _copy_model(aoti_repo[0], "square-a", tmp_path)
    tamper, message = TAMPERING[change]
    tamper(run)
    loads = aoti_engine.Package.loads
    with pytest.raises(ArtefactError, match=re.escape(message)):
        load_model(run, "aoti", "cpu")
    assert aoti_engine.Package.loads == loads  # refused before any package of the model was loaded


def test_tuned_tensors_that_do_not_fit_the_package_are_refused(aoti_repo, tmp_path):
    run = _copy_model(aoti_repo[0], "square-a", tmp_path)
    _misfit_adapter(run)
    with pytest.raises(ArtefactError, match=r"the adapter does not fit its package: .* is \[3, 3\] torch.float32"):
        load_model(run, "aoti", "cpu")


def test_unsupported_torch_versions_and_precisions_are_refused_clearly(aoti_repo, capsys):
    with pytest.raises(RuntimeError, match=r"needs torch 2\.13 or newer \(this is torch 2\.12\.1\)"):
        require_aoti("cpu", version="2.12.1")
    require_aoti("cpu", version="2.13.0+cpu")
    with pytest.raises(RuntimeError, match=r"cuda needs torch 2\.11 or newer"):
        require_aoti("cuda", version="2.10.0+cu128")
    run = aoti_repo[0] / "square-a"
    with pytest.raises(ExportError, match="needs --device cuda"):
        export(run, aoti=True, device="cpu", precision="bf16")
    with pytest.raises(ExportError, match="bf16 is --aoti only"):
        export(run, precision="bf16")
    with pytest.raises(SystemExit) as exit_status:
        main(["--model", str(run), "--aoti", "--device", "cpu", "--precision", "fp16"])
    assert exit_status.value.code == 2 and "needs --device cuda" in capsys.readouterr().err


def test_a_package_that_fails_its_check_fails_the_export_and_is_kept(aoti_repo, tmp_path):
    """The check runs in a child process: its failure (here, weights that lack the package's constants) becomes an
    error naming the phase, and the packages stay beside the entry for a rerun of the check."""
    record = manifest(aoti_repo[0] / "square-a")["aoti"]["cpu"]
    store = aoti_repo[0] / ".engines" / record["store"]["key"]
    checked = tmp_path / ".key.tmp"
    checked.mkdir()
    shutil.copy(store / "vae_decoder.pt2", checked / "vae_decoder.pt2")
    save_file({"unrelated": torch.zeros(1)}, checked / "vae_decoder.safetensors")
    save_file({"latents": torch.zeros(1, 4, 16, 16)}, checked / aoti_check.INPUTS_FILE)
    (checked / aoti_check.PLAN_FILE).write_text(json.dumps({"device": "cpu", "packages": {"vae_decoder": {
        "file": "vae_decoder.pt2", "weights": "vae_decoder.safetensors", "batches": {"1": ["latents"]}}}}))
    with pytest.raises(ExportError, match=r"packages ended the checking process with exit code 1 while reading the "
                                          r"\d+ constants of vae_decoder; the packages are kept in .*key\.failed"):
        aoti_export._run_check(checked, tmp_path / "key")
    assert (tmp_path / "key.failed" / "vae_decoder.pt2").is_file() and not checked.exists()


def test_a_package_whose_loading_hangs_fails_the_export_and_is_kept(hanging_aoti_check, tmp_path):
    """On an H200 loading a package did not return: the check's timeout names the phase it hung in and keeps the
    packages, as a crash does."""
    with pytest.raises(ExportError, match=r"did not finish within 12 s while loading vae_decoder\.pt2; the "
                                          r"packages are kept in .*key\.failed"):
        aoti_export._run_check(hanging_aoti_check, tmp_path / "key", timeout=12)
    assert (tmp_path / "key.failed" / "vae_decoder.pt2").is_fifo() and not hanging_aoti_check.exists()


def test_an_exported_model_is_served_without_its_base_directory(aoti_repo, tmp_path):
    run = _copy_model(aoti_repo[0], "square-a", tmp_path)
    data = manifest(run)
    data["model"]["base_path"] = str(tmp_path / "no-such-base")
    (run / "engines" / "manifest.json").write_text(json.dumps(data))
    copied = Generator(load_model(run, "aoti", "cpu")).generate(GenerationOptions(PROMPT, **OPTIONS)).frames
    original = Generator(load_model(aoti_repo[0] / "square-a", "aoti", "cpu")).generate(
        GenerationOptions(PROMPT, **OPTIONS)).frames
    np.testing.assert_array_equal(copied, original)


def test_exports_for_other_backends_merge_into_the_manifest(aoti_repo, tmp_path):
    run = _copy_model(aoti_repo[0], "square-b", tmp_path)
    aoti = manifest(run)["aoti"]
    export(run, progress=lambda message: None, check_tuned=False)  # ONNX graphs: the aoti record stays
    merged = manifest(run)
    assert merged["backends"] == ["onnxruntime", "aoti"] and merged["aoti"] == aoti and "graphs" in merged
    messages: list[str] = []
    export(run, aoti=True, device="cpu", progress=messages.append)  # packages reused: the ONNX fields stay
    again = manifest(run)
    assert any(m.startswith("reusing shared AOTInductor") for m in messages)
    assert again["backends"] == ["onnxruntime", "aoti"]
    assert {k: again[k] for k in ("graphs", "store", "weight_map")} == {k: merged[k] for k in ("graphs", "store",
                                                                                                 "weight_map")}
    assert read_entry(run, "torch").backends == ["torch", "onnxruntime", "aoti"]
