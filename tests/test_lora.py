"""LoRA adapters (tuner/lora.py): what a LoRA tuning writes, that serving merges it onto W0 exactly as a full adapter
would hold it, that LoRA and full models of one base are served side by side, and that bad settings and broken
LoRA models are refused or skipped with their reason."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from clients import Client, ServerError
from exporter.cli import export
from server.generate import GenerationOptions
from server.registry import ModelRegistry, ModelUnavailable
from server.serve import BackgroundServer, ServerConfig
from tuner import lora
from tuner.artefacts import ADAPTER_FILE, CONFIG_FILE, TunedModel
from tuner.io_utils import file_sha256, sha256_files
from tuner.tune import TRAINABLE_MODULES, adapter_defaults, default_settings, is_tuned, main, tune

PROMPT = "a red square is moving right"
OPTIONS = GenerationOptions(PROMPT, steps=2, guidance=3.0, seed=5, invert=False)


def lora_settings(tiny_base, **changes):
    """The tiny base's defaults for a LoRA at 32x32 (the session's engine store's architecture), 2 steps."""
    base = replace(default_settings(tiny_base), frames=8, width=32, height=32, steps=2)
    return replace(adapter_defaults(base, "lora"), **changes)


def merged_by_hand(run: Path, out: Path) -> Path:
    """The LoRA model `run` as a full model: W0 + B @ A * alpha / r written out, computed here, not by tuner.lora."""
    config = json.loads((run / CONFIG_FILE).read_text())
    record = config["adapter"]
    w0 = load_file(run / record["w0"]["path"])
    factors = load_file(run / ADAPTER_FILE)
    full = dict(w0)
    for name, tensor in factors.items():
        if name.endswith(".lora_A.weight"):
            module = name.removesuffix(".lora_A.weight")
            b = factors[f"{module}.lora_B.weight"]
            full[f"{module}.weight"] = w0[f"{module}.weight"] + (b @ tensor) * (record["alpha"] / record["rank"])
        elif not name.endswith(".lora_B.weight"):
            full[name] = tensor
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("engines"))
    save_file(full, out / ADAPTER_FILE)
    config["adapter"] = {"kind": "full"}
    config["adapter_sha256"] = sha256_files([out / ADAPTER_FILE], out)
    (out / CONFIG_FILE).write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def repo(tiny_base, clip_path, seed_engines, engine_store, tmp_path_factory) -> Path:
    """Two LoRA models (ranks 4 and 8, other seeds), the first merged by hand into a full model, the session's full
    seed model, a LoRA model whose W0 hash differs and one whose factor file is corrupt; all exported (ONNX)."""
    repo = seed_engines(tmp_path_factory.mktemp("lora") / "repo")
    for name, rank, seed in (("lora-a", 4, 1), ("lora-b", 8, 2)):
        tune(tiny_base, clip_path, PROMPT, repo / name, lora_settings(tiny_base, lora_rank=rank, seed=seed, lr=3e-2),
             progress=False)
    merged_by_hand(repo / "lora-a", repo / "merged-a")
    shutil.copytree(engine_store.parent / "seed", repo / "full", ignore=shutil.ignore_patterns("engines"))
    for name in ("lora-a", "lora-b", "merged-a", "full"):
        export(repo / name, progress=lambda message: None, check_tuned=False)
    shutil.copytree(repo / "lora-a", repo / "w0-differs")
    config = json.loads((repo / "w0-differs" / CONFIG_FILE).read_text())
    config["adapter"]["w0"]["sha256"] = "0" * 64
    (repo / "w0-differs" / CONFIG_FILE).write_text(json.dumps(config))
    shutil.copytree(repo / "lora-b", repo / "corrupt", ignore=shutil.ignore_patterns("engines"))
    data = bytearray((repo / "corrupt" / ADAPTER_FILE).read_bytes())
    data[-5] ^= 0xFF  # one factor value changed: still a readable file
    (repo / "corrupt" / ADAPTER_FILE).write_bytes(bytes(data))
    return repo


def test_a_lora_tuning_writes_only_the_factors_and_the_biases_lora_does_not_cover(repo):
    model = TunedModel.open(repo / "lora-a")
    adapter = model.adapter()
    modules = {name.removesuffix(".weight") for name in model.tuned_tensors() if name.endswith(".weight")
               and name.split(".transformer_blocks.0.")[1].removesuffix(".weight") in TRAINABLE_MODULES["temporal"]}
    extras = {f"{m}.bias" for m in modules if m.endswith("to_out.0")}
    assert modules and len(extras) == len(modules) // 4
    assert set(adapter) == {f"{m}{part}" for m in modules for part in (lora.LORA_A, lora.LORA_B)} | extras
    assert all(adapter[f"{m}{lora.LORA_A}"].shape[0] == 4 and adapter[f"{m}{lora.LORA_B}"].shape[1] == 4
               for m in modules)
    assert not any("default" in name or "base_layer" in name for name in adapter)  # peft's names never leak
    assert any(adapter[f"{m}{lora.LORA_B}"].abs().max() > 0 for m in modules)  # it trained
    full_size = (repo / "full" / ADAPTER_FILE).stat().st_size
    assert (repo / "lora-a" / ADAPTER_FILE).stat().st_size < full_size
    assert model.config["format_version"] == 5 and model.config["adapter"]["rank"] == 4
    # one W0 per base, whatever the tuning seed: both models record the same stored file
    records = [TunedModel.open(repo / name).lora["w0"] for name in ("lora-a", "lora-b")]
    assert records[0]["sha256"] == records[1]["sha256"]
    assert (repo / "lora-a" / records[0]["path"]).resolve() == (repo / "lora-b" / records[1]["path"]).resolve()
    assert [p.name for p in (repo / ".bases").iterdir() if p.is_dir()] == [Path(records[0]["path"]).parent.name]
    engines = json.loads((repo / "lora-a" / "engines" / "manifest.json").read_text())
    assert engines["lora"]["w0"]["sha256"] == records[0]["sha256"]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_lora_model_generates_what_its_weights_merged_by_hand_do(repo, backend):
    registry = ModelRegistry(repo, backend)
    lora_model, full_model = registry.load("lora-a").model, registry.load("merged-a").model
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(lora_model.engines.unet_input_shape(2), generator=generator)
    text = torch.randn((2, *lora_model.engines.text_shape), generator=generator)
    t = torch.tensor([500.0])
    a, b = lora_model.engines.unet(sample, t, text), full_model.engines.unet(sample, t, text)
    assert (a - b).abs().max() <= 1e-5
    frames = [registry.load(name).generate(OPTIONS).frames for name in ("lora-a", "merged-a", "lora-b", "lora-a")]
    assert np.abs(frames[0].astype(int) - frames[1]).max() <= 1
    assert not np.array_equal(frames[0], frames[2]) and np.array_equal(frames[0], frames[3])  # switched back


def test_lora_and_full_models_of_one_base_served_side_by_side(repo, tiny_base, clip_path, tmp_path):
    server = BackgroundServer(ServerConfig(repo=repo, port=0, bases={"tiny": str(tiny_base)}))
    try:
        server.wait_ready()
        with Client(server.target, retries=0) as client:
            videos = [client.generate(name, PROMPT, steps=2, guidance=3.0, seed=5, invert=False, format="png").files
                      for name in ("lora-a", "lora-b", "full", "lora-a")]
            assert videos[0] != videos[1] and videos[0] != videos[2] and videos[1] != videos[2]
            assert videos[3] == videos[0]  # switching back: bit-identical
            listing = client.list_models()
            kinds = {m.id: (m.adapter_kind, m.lora_rank) for m in listing.models}
            assert (kinds["lora-a"], kinds["lora-b"], kinds["full"]) == (("lora", 4), ("lora", 8), ("full", 0))
            assert "W0" in listing.skipped["w0-differs"] and "differs" in listing.skipped["w0-differs"]
            assert "adapter.safetensors does not match its recorded hash" in listing.skipped["corrupt"]
            for name in ("w0-differs", "corrupt"):
                with pytest.raises(ServerError) as e:
                    client.generate(name, PROMPT, steps=1, invert=False, format="png")
                assert e.value.code == grpc.StatusCode.NOT_FOUND and listing.skipped[name] in e.value.details
            # bad LoRA settings: refused at create time, naming the field; nothing queued
            for change in (dict(adapter_kind="lora", lora_rank=0), dict(adapter_kind="lora", lora_rank=-3),
                           dict(adapter_kind="lora", lora_rank=100_000), dict(lora_rank=4),
                           dict(adapter_kind="lora", lora_alpha=-1.0)):
                with pytest.raises(ServerError) as e:
                    client.create_tune_job("fresh", clip_path.read_bytes(), PROMPT, base="tiny", **change)
                field = "settings.lora_alpha" if "lora_alpha" in change else "settings.lora_rank"
                assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details, change
            with pytest.raises(ServerError) as e:
                client.create_tune_job("fresh", clip_path.read_bytes(), PROMPT, base="tiny", adapter_kind="dora")
            assert "settings.adapter_kind" in e.value.details
            assert client.list_tune_jobs() == []
    finally:
        server.stop()


@pytest.mark.parametrize("args", [["--adapter-kind", "lora", "--lora-rank", "0"],
                                  ["--adapter-kind", "lora", "--lora-rank", "-2"],
                                  ["--adapter-kind", "lora", "--lora-rank", "2.5"],
                                  ["--adapter-kind", "lora", "--lora-rank", "1000"],
                                  ["--lora-rank", "4"]])
def test_bad_lora_settings_are_a_usage_error_and_write_nothing(tiny_base, clip_path, tmp_path, args, capsys):
    out = tmp_path / "repo" / "model"
    with pytest.raises(SystemExit) as e:
        main(["--base", str(tiny_base), "--video", str(clip_path), "--prompt", PROMPT, "--out", str(out), *args])
    assert e.value.code == 2
    assert "--lora-rank" in capsys.readouterr().err.replace("lora_rank", "--lora-rank")
    assert not (tmp_path / "repo").exists()


def test_is_tuned_compares_the_adapter_settings(repo, tiny_base):
    settings = lora_settings(tiny_base, lora_rank=4, seed=1, lr=3e-2)
    assert is_tuned(repo / "lora-a", tiny_base, PROMPT, settings)
    assert not is_tuned(repo / "lora-a", tiny_base, PROMPT, replace(settings, lora_rank=8))
    assert not is_tuned(repo / "lora-a", tiny_base, PROMPT, replace(settings, lora_alpha=8.0))
    assert not is_tuned(repo / "lora-a", tiny_base, PROMPT, replace(settings, adapter_kind="full", lora_rank=None))


def test_a_registry_counts_a_lora_model_by_its_factors_and_skips_factors_that_do_not_fit(repo):
    shutil.copytree(repo / "lora-b", repo / "rank-differs", ignore=shutil.ignore_patterns("engines"))
    config = json.loads((repo / "rank-differs" / CONFIG_FILE).read_text())
    config["adapter"]["rank"] = 4  # its factors are rank 8
    (repo / "rank-differs" / CONFIG_FILE).write_text(json.dumps(config))
    try:
        registry = ModelRegistry(repo, "torch")
        registry.load("lora-a")
        registry.load("merged-a")
        assert registry._bytes["lora-a"] < registry._bytes["merged-a"]
        with pytest.raises(ModelUnavailable, match="W0"):
            registry.load("w0-differs")
        with pytest.raises(ModelUnavailable, match=r"lora_A.weight has shape \(8, \d+\), expected \(4, \d+\)"):
            registry.load("rank-differs")
    finally:
        shutil.rmtree(repo / "rank-differs")


def test_a_worker_refuses_a_job_record_with_settings_it_does_not_know():
    from jobs.spec import Job, UnreadableRecord
    from jobs.work import failure_reason

    job = Job("j1", "m", "tiny", "tiny", "a caption", {"steps": 3, "adapter_kind": "lora", "future_setting": 1})
    with pytest.raises(UnreadableRecord) as e:
        job.tune_settings()
    assert failure_reason(e.value) == ("job j1: settings future_setting are unknown to this worker (an older version "
                                       "than the server that queued the job): upgrade the worker")


def write_sd_lora(unet: torch.nn.Module, path: Path, seed: int) -> Path:
    """An SD 1.x-style LoRA for `unet` (peft-trained layout, diffusers' file format), with random nonzero factors."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)
    return path / "pytorch_lora_weights.safetensors"


def test_a_community_lora_on_the_base_changes_the_tuned_model_and_one_for_another_layout_is_refused(
        tiny_base, clip_path, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from tuner.artefacts import load_tuned
    from tuner.tiny import UNET_CONFIG

    style = write_sd_lora(UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet"), tmp_path / "style", 1)
    other = UNet2DConditionModel(**{**UNET_CONFIG, "block_out_channels": (16, 32), "cross_attention_dim": 16})
    foreign = write_sd_lora(other, tmp_path / "foreign", 2)
    settings = replace(default_settings(tiny_base), frames=8, width=32, height=32, steps=1)
    repo = tmp_path / "repo"
    plain = tune(tiny_base, clip_path, PROMPT, repo / "plain", settings, progress=False)
    styled = tune(tiny_base, clip_path, PROMPT, repo / "styled", settings, progress=False, base_loras=[(style, 0.8)])
    config = TunedModel.open(styled).config
    assert config["base_loras"] == [{"file": style.name, "sha256": file_sha256(style), "scale": 0.8}]
    assert config["base"]["sha256"] != TunedModel.open(plain).config["base"]["sha256"]
    assert TunedModel.open(styled).base_path.resolve().parent == (repo / ".bases").resolve()
    outputs = []
    for run in (plain, styled):
        _, components = load_tuned(run)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            outputs.append(components.unet(torch.randn((1, 4, 8, 4, 4), generator=generator), 500,
                                           torch.randn((1, 77, 32), generator=generator)))
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3
    with pytest.raises(SystemExit) as e:
        main(["--base", str(tiny_base), "--video", str(clip_path), "--prompt", PROMPT, "--out", str(repo / "bad"),
              "--base-lora", f"{foreign}:0.5"])
    error = capsys.readouterr().err
    assert e.value.code == 2 and len(error.strip().splitlines()) == 1
    assert "tensor unet.down_blocks.0.attentions.0." in error and "does not fit" in error, error
    assert not (repo / "bad").exists()


def test_the_aoti_engine_loads_a_lora_model_merged_into_the_shared_package(aoti_repo, tiny_base, clip_path, tmp_path):
    """A LoRA model exported with `--aoti` reuses its base's packages; its UNet output equals its hand-merged full
    model's, and switching between the two swaps constants only."""
    from server.engines import aoti_engine, load_model
    from tuner.tune import TuneSettings

    repo = tmp_path / "repo"
    shutil.copytree(aoti_repo[0] / ".engines", repo / ".engines", copy_function=os.link)
    settings = TuneSettings(frames=8, width=32, height=32, steps=2, lr=3e-2, seed=3, adapter_kind="lora",
                            lora_rank=4)
    tune(tiny_base, clip_path, PROMPT, repo / "lora", settings, progress=False)
    merged_by_hand(repo / "lora", repo / "merged")
    for name in ("lora", "merged"):
        export(repo / name, aoti=True, device="cpu", progress=lambda message: None)
    models = {"lora": load_model(repo / "lora", "aoti", "cpu")}
    loads = aoti_engine.Package.loads
    models["merged"] = load_model(repo / "merged", "aoti", "cpu")
    generator = torch.Generator().manual_seed(0)
    engines = models["lora"].engines
    sample = torch.randn(engines.unet_input_shape(1), generator=generator)
    text = torch.randn((1, *engines.text_shape), generator=generator)
    t = torch.tensor([500.0])
    outputs = [models[name].engines.unet(sample, t, text) for name in ("lora", "merged", "lora")]
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-5 and torch.equal(outputs[0], outputs[2])
    assert aoti_engine.Package.loads == loads  # the second model and the switches load no package: they swap constants
