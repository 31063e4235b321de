"""The official Tune-A-Video format: a checkpoint the official code tuned imports and generates what the official
pipeline generates (tests/fixtures/official_tav, made by the official code itself: its README), a model tuned here
goes to the official format and back unchanged, hub ids resolve through the cache, and bad checkpoints are one-line
refusals that write nothing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from conftest import hub_cache_repository
from PIL import Image
from safetensors.torch import load_file, save_file

from exporter.cli import export
from server.engines import load_model
from server.engines.base import Unsupported
from server.generate import GenerationOptions, Generator
from server.official_export import export_official
from server.official_export import main as export_official_main
from tuner.artefacts import EngineDir, TunedModel
from tuner.official import import_official
from tuner.official import main as import_main
from tuner.tune import TuneSettings, tune

FIXTURE = Path(__file__).parent / "fixtures" / "official_tav"
OUTPUTS = json.loads((FIXTURE / "outputs.json").read_text()) if (FIXTURE / "outputs.json").is_file() else {}
needs_fixture = pytest.mark.skipif(not (FIXTURE / "official").is_dir(), reason="official fixture missing")


def official_latents(model: Path, backend: str, prompt: str) -> torch.Tensor:
    """The final latents of the fixture's sampling settings (steps, guidance) from the model's inverted source."""
    sampling = OUTPUTS["sampling"]
    options = GenerationOptions(prompt=prompt, steps=sampling["num_inference_steps"],
                                guidance=sampling["guidance_scale"], seed=0, frames=sampling["video_length"])
    latents, _ = Generator(load_model(model, backend)).generate_latents(options)
    return latents.cpu()


def relative_gap(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """The official fixture imported with its own networks as the base."""
    repo = tmp_path_factory.mktemp("official-repo")
    return import_official(str(FIXTURE / "official"), repo / "skiing")


@needs_fixture
def test_an_official_checkpoint_generates_what_the_official_pipeline_generates(imported):
    model = TunedModel.open(imported)
    config = model.config
    assert model.architecture == ("sparse_causal", "per_clip", "none")
    assert config["prompt"] == "a man is skiing" and config["suggested_prompts"] == ["a panda is skiing"]
    assert config["recommended"] == {"guidance": 7.5, "steps": 3}
    source = model.source()
    assert source.kind == "inverted" and source.inverted_steps == 3 and source.inverted.shape == (4, 8, 16, 16)
    official = load_file(FIXTURE / "official" / "unet" / "diffusion_pytorch_model.safetensors") \
        if (FIXTURE / "official" / "unet" / "diffusion_pytorch_model.safetensors").is_file() else \
        torch.load(FIXTURE / "official" / "unet" / "diffusion_pytorch_model.bin", weights_only=True)
    adapter = model.adapter()
    assert adapter and all(torch.equal(adapter[k], official[k]) for k in adapter)
    outputs = load_file(FIXTURE / "outputs.safetensors")
    export(imported, progress=lambda message: None)  # ONNX Runtime engines, with the inverted source
    assert EngineDir.open(imported / "engines").source().kind == "inverted"
    for key, prompt in OUTPUTS["sampling"]["prompts"].items():
        for backend, bound in (("torch", 1e-4), ("onnxruntime", 1e-3)):
            gap = relative_gap(official_latents(imported, backend, prompt), outputs[f"{key}.final_latents"])
            print(f"{backend} {key}: {gap:.2e} of the official latents' largest magnitude")
            assert gap <= bound, f"{backend} {key}: {gap:.2e} from the official pipeline"


@needs_fixture
def test_an_official_checkpoint_imports_onto_its_named_base(imported, tmp_path):
    """With --base, the base is the one named (its untuned tensors checked equal), and the model is the same."""
    out = import_official(str(FIXTURE / "official"), tmp_path / "skiing", base=str(FIXTURE / "base"))
    config = TunedModel.open(out).config
    assert Path(out / config["base"]["path"]).resolve() == (FIXTURE / "base").resolve()
    assert TunedModel.open(out).adapter().keys() == TunedModel.open(imported).adapter().keys()
    assert all(torch.equal(a, b) for a, b in zip(TunedModel.open(out).adapter().values(),
                                                 TunedModel.open(imported).adapter().values(), strict=True))
    outputs = load_file(FIXTURE / "outputs.safetensors")
    gap = relative_gap(official_latents(out, "torch", OUTPUTS["sampling"]["prompts"]["edit"]),
                       outputs["edit.final_latents"])
    assert gap <= 1e-4


@needs_fixture
def test_an_official_checkpoint_imported_with_its_clip_inverts_as_the_official_code(tmp_path):
    """Given the clip (`--video`), the model inverts it itself: from the frames the official run tuned on, the same
    source latents and the same DDIM inversion as the official `ddim_inversion`."""
    outputs = load_file(FIXTURE / "outputs.safetensors")
    frames = tmp_path / "frames"  # each frame twice: the official config's sample_frame_rate 2 takes every second
    frames.mkdir()
    for i, frame in enumerate(outputs["inversion.frames"].numpy()):
        for copy in (2 * i, 2 * i + 1):
            Image.fromarray(frame).save(frames / f"{copy:03d}.png")
    out = import_official(str(FIXTURE / "official"), tmp_path / "repo" / "skiing", video=str(frames))
    source = TunedModel.open(out).source()
    assert source.kind == "clip" and (source.frames == outputs["inversion.frames"].numpy()).all()
    assert relative_gap(source.latents[None], outputs["inversion.source_latents"]) <= 1e-5
    steps = OUTPUTS["inversion"]["num_inv_steps"]
    inverted = Generator(load_model(out, "torch")).invert_source(steps, 8).cpu()
    assert relative_gap(inverted, outputs["inversion.latents"][-1]) <= 1e-4


@pytest.fixture(scope="module")
def per_clip_run(tiny_base, clip_path, tmp_path_factory) -> Path:
    """A model tuned here that the official UNet runs (GroupNorm per clip, no frame positions)."""
    settings = TuneSettings(frames=8, width=32, height=32, steps=2, lr=1e-3, seed=1, group_norm="per_clip")
    return tune(tiny_base, clip_path, "a red square is moving right", tmp_path_factory.mktemp("repo") / "square",
                settings, progress=False)


def test_a_model_goes_to_the_official_format_and_back_unchanged(per_clip_run, tmp_path):
    official = export_official(per_clip_run, tmp_path / "official", steps=4)
    unet_config = json.loads((official / "unet" / "config.json").read_text())
    assert unet_config["_class_name"] == "UNet3DConditionModel"
    assert unet_config["down_block_types"][0] == "CrossAttnDownBlock3D"
    inverted = torch.load(next((official / "inv_latents").glob("ddim_latent-*.pt")), weights_only=True)
    assert inverted.shape == (1, 4, 8, 16, 16)
    back = import_official(str(official), per_clip_run.parent / "back")
    ours, theirs = TunedModel.open(per_clip_run).adapter(), TunedModel.open(back).adapter()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the imported model starts its edits from the exported inversion: the same video as the model it came from
    options = GenerationOptions(prompt="a blue square", steps=4, guidance=3.0, seed=5)
    original = Generator(load_model(per_clip_run, "torch")).generate_latents(options)[0]
    imported = Generator(load_model(back, "torch")).generate_latents(options)[0]
    assert torch.allclose(original, imported, atol=1e-5)


def test_only_models_the_official_unet_runs_are_written(tuned_run, tmp_path, capsys):
    """The shared tuned model normalises per frame (the default here): refused naming the setting, nothing
    written."""
    with pytest.raises(SystemExit) as e:
        export_official_main(["--model", str(tuned_run), "--out", str(tmp_path / "official")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "group_norm per_frame" in err
    assert not (tmp_path / "official").exists()


@pytest.fixture(scope="module")
def official_dir(per_clip_run, tmp_path_factory) -> Path:
    return export_official(per_clip_run, tmp_path_factory.mktemp("exported") / "official", steps=2)


def _refused(tmp_path: Path, capsys, args: list[str], *needles: str) -> None:
    out = tmp_path / "model"
    with pytest.raises(SystemExit) as e:
        import_main([*args, "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tav-import: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


class Evil:
    def __reduce__(self):
        return (os.system, ("echo should never run",))


def test_bad_checkpoints_are_one_line_refusals_that_write_nothing(official_dir, tiny_base, tmp_path, capsys):
    def variant(name: str) -> Path:
        copy = tmp_path / "sources" / name
        shutil.copytree(official_dir, copy)
        return copy

    weights = Path("unet") / "diffusion_pytorch_model.safetensors"
    other = variant("layout")  # a UNet of another layout
    config = json.loads((other / "unet" / "config.json").read_text())
    (other / "unet" / "config.json").write_text(json.dumps({**config, "_class_name": "UNetSpatioTemporalModel"}))
    _refused(tmp_path, capsys, ["--from", str(other)], "unet/config.json", "does not serve")

    shapes = variant("shapes")  # weights that do not fit the config
    (shapes / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 48}))
    _refused(tmp_path, capsys, ["--from", str(shapes)], "has shape")

    truncated = variant("truncated")
    data = (truncated / weights).read_bytes()
    (truncated / weights).write_bytes(data[: len(data) // 2])
    _refused(tmp_path, capsys, ["--from", str(truncated)], "unet/diffusion_pytorch_model.safetensors",
             "not a readable weights file")

    pickled = variant("pickle")  # a .bin that runs code when unpickled
    state = load_file(pickled / weights)
    (pickled / weights).unlink()
    torch.save({**state, "extra": Evil()}, pickled / "unet" / "diffusion_pytorch_model.bin")
    _refused(tmp_path, capsys, ["--from", str(pickled)], "pickle that needs code", "refused")

    truncated_bin = variant("truncated-bin")
    (truncated_bin / weights).unlink()
    torch.save(state, truncated_bin / "unet" / "diffusion_pytorch_model.bin")
    data = (truncated_bin / "unet" / "diffusion_pytorch_model.bin").read_bytes()
    (truncated_bin / "unet" / "diffusion_pytorch_model.bin").write_bytes(data[:-200])
    _refused(tmp_path, capsys, ["--from", str(truncated_bin)], "diffusion_pytorch_model.bin", "not a readable")

    outside = variant("outside")  # a tensor tuned outside the adapter's set (a custom trainable_modules)
    name = next(k for k in state if k.endswith("ff.net.2.weight"))
    save_file({**state, name: state[name] + 0.01}, outside / weights)
    _refused(tmp_path, capsys, ["--from", str(outside), "--base", str(tiny_base)], name, "outside the adapter")

    unknown = variant("config")  # config.yaml with a key the official code does not take
    text = (unknown / "config.yaml").read_text()
    (unknown / "config.yaml").write_text(text + "train_steps_per_epoch: 3\n")
    _refused(tmp_path, capsys, ["--from", str(unknown)], "config.yaml", "train_steps_per_epoch", "unknown key")

    custom = variant("trainable")  # a config tuning modules the adapter does not hold
    (custom / "config.yaml").write_text(text.replace("- attn_temp", "- attn_temp\n- ff"))
    _refused(tmp_path, capsys, ["--from", str(custom)], "trainable_modules")


def test_hub_ids_resolve_through_the_cache_offline(official_dir, tiny_base, tmp_path, monkeypatch, capsys):
    """The official directory as a whole hub repository, and as `unet/` alone beside a base that is a hub id too;
    an id the cache lacks, offline, is a one-line refusal."""
    cache = tmp_path / "hub"
    hub_cache_repository(cache, "tav-test/square-official", official_dir)
    unet_only = tmp_path / "unet-only"
    shutil.copytree(official_dir / "unet", unet_only / "unet")
    hub_cache_repository(cache, "tav-test/square-unet", unet_only)
    hub_cache_repository(cache, "tav-test/tiny-sd", tiny_base)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    whole = import_official("tav-test/square-official", tmp_path / "repo" / "whole")
    assert TunedModel.open(whole).source().kind == "inverted"
    alone = import_official("tav-test/square-unet", tmp_path / "repo" / "alone", base="tav-test/tiny-sd",
                            prompt="a red square is moving right")
    model = TunedModel.open(alone)
    assert model.source().kind == "none" and model.base_id == "tav-test/tiny-sd"
    assert all(torch.equal(a, b) for a, b in zip(model.adapter().values(), TunedModel.open(whole).adapter().values(),
                                                 strict=True))
    loaded = load_model(alone, "torch")  # no source: generation from noise only
    with pytest.raises(Unsupported, match="no source clip"):
        Generator(loaded).generate_latents(GenerationOptions(prompt="a square", steps=2, seed=1))
    Generator(loaded).generate_latents(GenerationOptions(prompt="a square", steps=2, seed=1, invert=False))

    _refused(tmp_path, capsys, ["--from", "tav-test/not-cached"], "tav-test/not-cached", "hub id")
    _refused(tmp_path, capsys, ["--from", "tav-test/square-unet"], "--prompt")
    _refused(tmp_path, capsys, ["--from", "tav-test/square-unet", "--prompt", "a square"], "needs --base")
