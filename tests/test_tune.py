"""One-shot tuning: what changes, what gets gradients, that it learns, the artefact, and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file

from tuner import artefacts
from tuner.artefacts import TunedModel, load_tuned
from tuner.base_store import base_in_use
from tuner.components import base_model_files, base_model_hash, encode_prompt, is_same_base, load_components
from tuner.inflate import inflate, is_trainable
from tuner.io_utils import sha256_files
from tuner.tune import (
    SMALL_BASE_SETTINGS,
    TuneError,
    TuneSettings,
    default_settings,
    diffusion_loss,
    draw_timestep,
    invalid_choice,
    is_tuned,
    main,
    mark_trainable,
    tune,
    unet_parameters,
)

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "shapes-sd"


def test_exactly_the_trainable_tensors_change(tiny_base, tuned_run):
    base = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet").state_dict()
    _, components = load_tuned(tuned_run)
    tuned = components.unet.state_dict()
    adapter = load_file(tuned_run / artefacts.ADAPTER_FILE)
    assert set(adapter) == {k for k in tuned if is_trainable(k)}
    for name, tensor in tuned.items():
        if name in base and not is_trainable(name):
            assert torch.equal(tensor, base[name]), f"frozen tensor {name} changed"
        elif name in base:
            assert not torch.equal(tensor, base[name]), f"trainable tensor {name} did not change"


def test_temporal_tuning_changes_only_the_temporal_attentions_but_the_adapter_keeps_every_tunable_tensor(
        tiny_base, clip_path, tmp_path):
    settings = TuneSettings(width=32, height=32, steps=2, lr=1e-2, trainable="temporal")
    run = tune(tiny_base, clip_path, "a red square", tmp_path / "run", settings, progress=False)
    base = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet").state_dict()
    adapter = load_file(run / artefacts.ADAPTER_FILE)
    _, components = load_tuned(run)
    assert set(adapter) == {k for k in components.unet.state_dict() if is_trainable(k)}
    changed = {k for k, v in adapter.items() if k not in base or not torch.equal(v, base[k])}
    assert changed == {k for k in adapter if ".attn_temp." in k}
    assert TunedModel.open(run).config["trainable_modules"] == [
        "attn_temp.to_q", "attn_temp.to_k", "attn_temp.to_v", "attn_temp.to_out.0"]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_every_trainable_tensor_gets_a_gradient(tiny_base, checkpointing):
    components = load_components(tiny_base)
    unet = inflate(components.unet)
    trainable = mark_trainable(unet)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    scheduler = DDPMScheduler.from_config(components.scheduler_config)
    latents, noise = torch.randn(2, 1, 4, 4, 16, 16)
    text = encode_prompt(components, "a man is skiing").clone()
    # attn_temp's output weight starts at zero, so its q/k/v get a gradient only from the second step on
    optimizer = torch.optim.SGD(trainable.values(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        diffusion_loss(unet, scheduler, latents, text, torch.tensor([500]), noise).backward()
        optimizer.step()
    missing = [n for n, p in trainable.items() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient for {missing}"
    assert any(n.startswith("down_blocks") for n in trainable)
    frozen = [n for n, p in unet.named_parameters() if n not in trainable and p.grad is not None]
    assert not frozen


def test_tuning_lowers_the_loss_on_the_clip(tiny_base, clip_path, tmp_path):
    settings = TuneSettings(frames=8, width=32, height=32, steps=30, lr=2e-3, seed=3)
    run = tune(tiny_base, clip_path, "a red square is moving right", tmp_path / "run", settings, progress=False)
    model = TunedModel.open(run)
    clean = model.source().latents[:, :8][None]
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.tensor([t]), torch.randn(clean.shape, generator=g)) for t in (50, 250, 500, 750, 950)]

    def loss_of(components):
        scheduler = DDPMScheduler.from_config(components.scheduler_config)
        text = encode_prompt(components, model.config["prompt"])
        with torch.no_grad():
            return sum(diffusion_loss(components.unet, scheduler, clean, text, t, n).item() for t, n in pairs)

    before = load_components(tiny_base)
    torch.manual_seed(settings.seed)
    inflate(before.unet)
    _, after = load_tuned(run)
    assert loss_of(after) < 0.9 * loss_of(before)


def test_round_trip_reloads_to_the_same_outputs(tiny_base, clip_path, tmp_path):
    settings = TuneSettings(frames=8, width=32, height=32, steps=2, lr=1e-3, seed=5)
    run = tune(tiny_base, clip_path, "a red square", tmp_path / "run", settings, progress=False)
    _, first = load_tuned(run)
    _, second = load_tuned(run)
    sample, text = torch.randn(1, 4, 8, 16, 16), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.equal(first.unet(sample, 100, text), second.unet(sample, 100, text))


def test_is_tuned_only_for_the_same_base_content_prompt_and_settings(tiny_base, clip_path, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    settings = TuneSettings(frames=8, width=32, height=32, steps=1, lr=1e-3, seed=2)
    run = tune(base, clip_path, "a red square", tmp_path / "run", settings, progress=False)
    assert is_tuned(run, base, "a red square", settings)
    assert not is_tuned(run, base, "a blue square", settings)
    assert not is_tuned(run, base, "a red square", TuneSettings(frames=8, width=32, height=32, steps=2, lr=1e-3,
                                                                seed=2))
    assert not is_tuned(tmp_path / "absent", base, "a red square", settings)
    config = base / "unet" / "config.json"
    config.write_text(config.read_text().replace("{", '{"edited": true, ', 1))
    assert not is_tuned(run, base, "a red square", settings)  # same path, other content


def test_the_base_hash_covers_what_loading_reads_and_the_old_whole_directory_hash_still_matches(tiny_base, tmp_path):
    """A model card, a pickled checkpoint or a component never loaded do not change a base's hash (a hub snapshot
    of Stable Diffusion carries gigabytes of them), and the base store copies only the hashed files. Models tuned
    before recorded a hash over every file: it still matches the unchanged base, and neither does once a weight
    changes."""
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    recorded = base_model_hash(base)
    (base / "MODEL_CARD.md").write_text("# edited\n")
    (base / "v1-5-pruned.ckpt").write_bytes(b"pickled")
    (base / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickled")
    (base / "safety_checker").mkdir()
    (base / "safety_checker" / "model.safetensors").write_bytes(b"never loaded")
    assert base_model_hash(base) == recorded
    whole_directory = sha256_files([p for p in base.rglob("*") if p.is_file()], base)
    assert is_same_base(base, recorded) and is_same_base(base, whole_directory)

    with base_in_use(base, None, tmp_path / "repo") as copy:
        pass
    assert copy.name == recorded and base_model_hash(copy) == recorded
    assert sorted(p.relative_to(copy) for p in copy.rglob("*") if p.is_file()) == [
        p.relative_to(base) for p in base_model_files(base)]
    load_components(copy)  # the copy is a whole base

    with open(base / "unet" / "diffusion_pytorch_model.safetensors", "ab") as f:
        f.write(b"\0")
    assert not is_same_base(base, recorded) and not is_same_base(base, whole_directory)


def test_tuned_directory_contents(tuned_run, clip_path):
    model = TunedModel.open(tuned_run)
    config = json.loads((tuned_run / "tav_config.json").read_text())
    assert config["frames"] == 8 and config["width"] == 32 and config["latent_width"] == 16
    assert config["prompt"] == "a red square is moving right"
    assert len(config["base"]["sha256"]) == 64
    assert config["fps"] == pytest.approx(8.0)
    assert model.architecture == ("sparse_causal", "per_frame", "none")
    assert config["settings"]["mixed_precision"] == "auto" and config["mixed_precision"] == "no"  # fp32 on CPU
    legacy = TunedModel(model.path, {k: v for k, v in config.items() if k != "group_norm"})
    assert legacy.architecture[1] == "per_clip", "models tuned before the setting normalised per clip"
    source = model.source()
    frames, latents = source.frames, source.latents
    assert source.kind == "clip"
    assert frames.shape == (12, 32, 32, 3) and frames.dtype.name == "uint8"  # every frame of the clip
    assert latents.shape == (4, 12, 16, 16)
    assert not list(tuned_run.parent.glob(".*tmp*")), "no temporary directory left behind"


def test_format_v1_still_loads_without_frame_positions_and_v6_is_refused(tuned_run, tmp_path):
    config = json.loads((tuned_run / artefacts.CONFIG_FILE).read_text())
    assert config["format_version"] == 5 and config["frame_positions"] == "none"
    assert config["source"] == {"kind": "clip"}
    for version, loads in ((1, True), (4, True), (6, False)):
        copy = tmp_path / f"v{version}"
        shutil.copytree(tuned_run, copy)
        old = {k: v for k, v in config.items() if k not in ("frame_positions", "source")} | {"format_version": version}
        (copy / artefacts.CONFIG_FILE).write_text(json.dumps(old))
        if loads:
            model, components = load_tuned(copy)
            assert model.architecture == ("sparse_causal", "per_frame", "none")
            assert all(b.position_wavelength is None for b in components.unet.modules()
                       if hasattr(b, "position_wavelength"))
            assert model.source().kind == "clip", "a model before v5 holds its clip"
        else:
            with pytest.raises(artefacts.ArtefactError, match="v6"):
                TunedModel.open(copy)


def test_default_settings_are_the_papers_for_stable_diffusion_and_the_rules_for_small_bases(tiny_base, tmp_path):
    tiny_count = sum(p.numel() for p in UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet").parameters())
    assert unet_parameters(tiny_base) == tiny_count
    small = replace(TuneSettings(), **SMALL_BASE_SETTINGS)
    assert default_settings(tiny_base) == default_settings(SHIPPED) == small != TuneSettings()
    sd = tmp_path / "sd-config"  # Stable Diffusion 1.4's UNet config over tiny weights: only the config is read
    shutil.copytree(tiny_base, sd)
    (sd / "unet" / "config.json").write_text(json.dumps(
        {"_class_name": "UNet2DConditionModel", "sample_size": 64, "cross_attention_dim": 768,
         "attention_head_dim": 8}))
    assert unet_parameters(sd) > 800_000_000
    assert default_settings(sd) == TuneSettings()
    assert (TuneSettings().steps, TuneSettings().lr, TuneSettings().frame_positions,
            TuneSettings().timestep_power) == (300, 3e-5, "none", 0.0)  # the paper's


def test_tav_tune_takes_what_it_is_not_given_from_default_settings(tiny_base, clip_path, tmp_path, capsys):
    common = ["--base", str(tiny_base), "--video", str(clip_path), "--prompt", "a square", "--width", "32",
              "--height", "32", "--steps", "1"]
    main([*common, "--out", str(tmp_path / "defaults")])
    config = json.loads((tmp_path / "defaults" / artefacts.CONFIG_FILE).read_text())
    assert config["settings"] == asdict(replace(default_settings(tiny_base), width=32, height=32, steps=1))
    assert config["frame_positions"] == "sinusoidal_short_middle"
    assert config["default_rule"]["applied"] == "small_base"
    assert config["default_rule"]["unet_parameters"] == unet_parameters(tiny_base)
    main([*common, "--out", str(tmp_path / "paper"), "--lr", "3e-5", "--frame-positions", "none",
          "--timestep-power", "0", "--trainable", "paper"])
    config = json.loads((tmp_path / "paper" / artefacts.CONFIG_FILE).read_text())
    assert config["settings"] == asdict(replace(TuneSettings(), width=32, height=32, steps=1))
    assert TunedModel.open(tmp_path / "paper").architecture[2] == "none"


def test_timesteps_are_uniform_at_power_0_and_favour_the_noisy_end_above():
    count = 1000
    g, same = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    uniform = [draw_timestep(count, 0.0, g) for _ in range(3)]
    assert all(torch.equal(t, torch.randint(0, count, (1,), generator=same)) for t in uniform)  # the paper's draw
    g = torch.Generator().manual_seed(0)
    late = torch.cat([draw_timestep(count, 2.0, g) for _ in range(4000)]).float()
    assert late.min() >= 0 and late.max() <= count - 1
    assert abs(late.mean().item() - 0.75 * count) < 15  # density ~ t^2: mean 3/4 of the range
    assert abs((late < count / 2).float().mean().item() - 0.125) < 0.02  # P(t < T/2) = (1/2)^3


@pytest.mark.parametrize("change, setting", [
    (dict(attention_mode="sideways"), "attention_mode"), (dict(group_norm="per_batch"), "group_norm"),
    (dict(trainable="everything"), "trainable"), (dict(frame_positions="learned"), "frame_positions"),
    (dict(timestep_power=-1.0), "timestep_power"), (dict(timestep_power=float("nan")), "timestep_power"),
])
def test_a_setting_outside_its_choices_is_named_before_anything_is_read(change, setting, tiny_base, tmp_path):
    settings = replace(TuneSettings(), **change)
    assert invalid_choice(settings)[0] == setting and invalid_choice(TuneSettings()) is None
    with pytest.raises(TuneError, match=f"^--{setting.replace('_', '-')} must be"):
        tune(tiny_base, tmp_path / "no-such-clip.mp4", "a square", tmp_path / "out", settings)
    assert not (tmp_path / "out").exists()


def bad_input_args(case: str, tiny_base: Path, clip_path: Path, tmp_path: Path) -> list[str]:
    """`tav-tune` arguments that are fine but for `case`."""
    out = tmp_path / "run"
    args = {"--base": str(tiny_base), "--video": str(clip_path), "--prompt": "a square", "--out": str(out),
            "--width": "32", "--height": "32", "--steps": "1"}
    if case == "missing_video":
        args["--video"] = str(tmp_path / "nope.mp4")
    elif case == "corrupt_video":
        bad = tmp_path / "bad.mp4"
        bad.write_bytes(b"\x00not a video" * 100)
        args["--video"] = str(bad)
    elif case == "too_few_frames":
        args["--frames"] = "40"
    elif case == "not_a_model":
        args["--base"] = str(tmp_path)
    elif case == "bad_size":
        args["--width"] = "30"
    elif case == "existing_out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    return [x for kv in args.items() for x in kv]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_video", "does not exist"),
        ("corrupt_video", "not a readable video"),
        ("too_few_frames", "--frames asks for 40"),
        ("not_a_model", "not a diffusers model directory"),
        ("bad_size", "multiples of 4"),
        ("existing_out", "already exists"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, message, tiny_base, clip_path, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exited:
        main(bad_input_args(case, tiny_base, clip_path, tmp_path))
    stderr = capsys.readouterr().err
    assert exited.value.code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert message.lower() in lines[0].lower(), lines[0]
    if case == "existing_out":
        assert (out / "keep.txt").read_text() == "mine"
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]


def test_the_command_itself_prints_only_the_error_line(tiny_base, clip_path, tmp_path):
    """As a process, loading included: no warning, log line or traceback beside the one-line error."""
    args = bad_input_args("too_few_frames", tiny_base, clip_path, tmp_path)
    result = subprocess.run([sys.executable, "-m", "tuner.tune", *args], capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and result.stdout == "" and len(lines) == 1, result
    assert lines[0].startswith("tav-tune: error: ") and "--frames asks for 40" in lines[0], lines[0]
