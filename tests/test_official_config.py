"""`tav-tune --config`: the official Tune-A-Video per-clip YAMLs (the team's own, in their layout) map to tav-tune's
settings, flags override them, keys without effect here warn, and anything else is a one-line error."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from tuner import artefacts
from tuner.official_config import OFFICIAL_CODE, read_official_config
from tuner.tune import TuneSettings, default_settings, main, plan

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official_configs"
RED_SQUARE = FIXTURES / "red-square.yaml"
EVERY_KEY = FIXTURES / "every-key.yaml"


@pytest.fixture
def workdir(tmp_path, tiny_base, clip_path, monkeypatch) -> Path:
    """A working directory laid out as red-square.yaml's relative paths expect it (the base and clip linked in)."""
    (tmp_path / "bases").mkdir()
    (tmp_path / "clips").mkdir()
    os.symlink(tiny_base, tmp_path / "bases" / "tiny-sd")
    os.symlink(clip_path, tmp_path / "clips" / "square.mp4")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_official_layout_maps_to_tav_tune_settings():
    config = read_official_config(RED_SQUARE)
    assert (config.base, config.out, config.video, config.prompt) == (
        "./bases/tiny-sd", "./outputs/red-square", "clips/square.mp4", "a red square is moving right")
    assert config.settings == {**OFFICIAL_CODE, "frames": 4, "width": 32, "height": 32, "start": 1, "stride": 2,
                               "lr": 5e-3, "steps": 2, "seed": 7, "gradient_checkpointing": False,
                               "mixed_precision": "no", "trainable": "paper"}  # the paper's three, reordered
    assert isinstance(config.settings["lr"], float)
    assert config.suggested_prompts == ["a blue square is moving right", "a red circle is moving right, cartoon style"]
    assert config.recommended == {"steps": 20, "guidance": 7.5}
    warned = "\n".join(config.warnings)
    for key in ("validation_steps", "enable_xformers_memory_efficient_attention", "validation_data.video_length"):
        assert f": {key}: " in warned
    assert config.warnings[-1].endswith("not read, tav-tune does the same: train_batch_size, checkpointing_steps, "
                                        "use_8bit_adam, validation_data.width, validation_data.height, "
                                        "validation_data.use_inv_latent, validation_data.num_inv_steps")


def test_every_key_of_the_official_entry_point_is_known_and_numbers_are_omegaconf_s():
    as_safe_load_reads = yaml.safe_load(EVERY_KEY.read_text())  # why OmegaConf reads them
    assert (as_safe_load_reads["learning_rate"], as_safe_load_reads["adam_epsilon"]) == ("2E-4", "1e-08")
    config = read_official_config(EVERY_KEY)
    assert config.settings == {**OFFICIAL_CODE, "frames": 8, "width": 64, "height": 48, "start": 0, "stride": 1,
                               "lr": 2e-4, "steps": 120, "seed": 1234, "gradient_checkpointing": True,
                               "mixed_precision": "fp16", "trainable": "temporal"}
    assert config.recommended == {"steps": 30, "guidance": 9.0} and config.lr_scale == 1
    warned = {line.split(": ")[1] for line in config.warnings[:-1]}
    assert warned == {"validation_steps", "use_8bit_adam", "validation_data.video_length",
                      "validation_data.use_inv_latent", "validation_data.num_inv_steps",
                      "validation_data.negative_prompt"}
    same = config.warnings[-1].split("does the same: ")[1].split(", ")
    assert set(same) == {"adam_beta1", "adam_beta2", "adam_epsilon", "adam_weight_decay", "max_grad_norm",
                         "gradient_accumulation_steps", "lr_scheduler", "lr_warmup_steps", "train_batch_size",
                         "scale_lr", "checkpointing_steps", "resume_from_checkpoint",
                         "enable_xformers_memory_efficient_attention", "validation_data.width",
                         "validation_data.height", "validation_data.num_videos_per_prompt", "validation_data.eta"}
    assert "AdamW in fp32" in next(w for w in config.warnings if ": use_8bit_adam: " in w)


def test_flags_override_the_config_and_the_rest_comes_from_it(workdir, tiny_base):
    call = plan(["--config", str(RED_SQUARE), "--frames", "3", "--lr", "1e-2", "--prompt", "a square",
                 "--out", "elsewhere", "--gradient-checkpointing", "--trainable", "temporal", "--group-norm",
                 "per_frame"])
    assert (call.base.resolve(), call.video, call.prompt, call.out) == (
        tiny_base.resolve(), "clips/square.mp4", "a square", "elsewhere")
    assert call.settings == TuneSettings(**{
        **asdict(default_settings(tiny_base)), **OFFICIAL_CODE, "frames": 3, "width": 32, "height": 32, "start": 1,
        "stride": 2, "lr": 1e-2, "steps": 2, "seed": 7, "gradient_checkpointing": True, "mixed_precision": "no",
        "trainable": "temporal", "group_norm": "per_frame"})
    assert call.suggested_prompts[0] == "a blue square is moving right"
    assert call.recommended == {"steps": 20, "guidance": 7.5}
    checkpointing = workdir / "checkpointing.yaml"
    checkpointing.write_text(RED_SQUARE.read_text().replace("gradient_checkpointing: False",
                                                            "gradient_checkpointing: True"))
    assert not plan(["--config", str(checkpointing), "--no-gradient-checkpointing"]).settings.gradient_checkpointing


def test_scale_lr_scales_the_config_s_rate_as_the_official_code_does_but_not_a_flag_s(workdir):
    scaled = workdir / "scaled.yaml"
    scaled.write_text(RED_SQUARE.read_text().replace("train_batch_size: 1", "train_batch_size: 3\nscale_lr: true"))
    assert plan(["--config", str(scaled)]).settings.lr == pytest.approx(1.5e-2)
    assert plan(["--config", str(scaled), "--lr", "1e-3"]).settings.lr == 1e-3


TEXT = RED_SQUARE.read_text()
TRAIN_DATA = TEXT[TEXT.index("train_data:"): TEXT.index("validation_data:")]


def edited(workdir: Path, *replacements: tuple[str, str]) -> str:
    """red-square.yaml with each (old, new) replaced, written into the working directory."""
    text = TEXT
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    (workdir / "edited.yaml").write_text(text)
    return "edited.yaml"


BAD = {
    "unknown top-level key": ([("seed: 7", "seed: 7\nlearning_rat: 1e-4")], "learning_rat: unknown key"),
    "unknown train_data key": ([("  sample_start_idx: 1", "  sample_start_idx: 1\n  fps: 8")],
                               "train_data.fps: unknown key"),
    "unknown validation_data key": ([("  num_inv_steps: 20", "  num_inv_steps: 20\n  seed: 3")],
                                    "validation_data.seed: unknown key"),
    "another trainable set": ([('  - "attn_temp"\n', "")], "trainable_modules: ['attn1.to_q', 'attn2.to_q'] is not"),
    "trainable modules as a string": ([('trainable_modules:\n  - "attn_temp"\n  - "attn1.to_q"\n  - "attn2.to_q"',
                                        "trainable_modules: attn_temp")], "trainable_modules: must be a list"),
    "a quoted number": ([("n_sample_frames: 4", 'n_sample_frames: "4"')],
                        "train_data.n_sample_frames: must be a whole"),
    "a word for a rate": ([("learning_rate: 5e-3", "learning_rate: fast")], "learning_rate: must be a number"),
    "a quoted boolean": ([("gradient_checkpointing: False", 'gradient_checkpointing: "False"')],
                         "gradient_checkpointing: must be true or false"),
    "train_data not a mapping": ([(TRAIN_DATA, "train_data: [1]\n")], "train_data: must be a mapping"),
    "prompts as one string": ([('  prompts:\n    - "a blue square is moving right"\n    - '
                                '"a red circle is moving right, cartoon style"', '  prompts: "a blue square"')],
                              "validation_data.prompts: must be a list of strings"),
    "an unquoted no": ([('mixed_precision: "no"', "mixed_precision: no")], 'write "no"'),
    "another precision": ([('mixed_precision: "no"', "mixed_precision: fp8")], "mixed_precision: must be one of"),
    "fp16 on the CPU": ([('mixed_precision: "no"', "mixed_precision: fp16")], "give --mixed-precision no"),
    "a decaying schedule": ([("seed: 7", "seed: 7\nlr_scheduler: cosine")], "lr_scheduler: 'cosine' is not supported"),
    "a warm-up": ([("seed: 7", "seed: 7\nlr_scheduler: constant_with_warmup\nlr_warmup_steps: 10")],
                  "lr_warmup_steps: 10 is not supported"),
    "another weight decay": ([("seed: 7", "seed: 7\nadam_weight_decay: 0.0")], "adam_weight_decay: 0 is not"),
    "another clipping": ([("seed: 7", "seed: 7\nmax_grad_norm: 0.5")], "max_grad_norm: 0.5 is not supported"),
    "gradient accumulation": ([("seed: 7", "seed: 7\ngradient_accumulation_steps: 4")],
                              "gradient_accumulation_steps: 4 is not supported"),
    "guidance out of bounds": ([("guidance_scale: 7.5", "guidance_scale: 75")],
                               "validation_data.guidance_scale: must be within 1..30"),
    "not YAML": ([("seed: 7", "seed: [7")], "not a config OmegaConf reads"),
    "a list at the top": ([(TEXT, "- 1\n- 2\n")], "must be a mapping of keys, got [1, 2]"),
    "no base anywhere": ([('pretrained_model_path: "./bases/tiny-sd"\n', "")],
                         "--base is required (or pretrained_model_path in a --config file)"),
    "no clip anywhere": ([('  video_path: "clips/square.mp4"\n', "")],
                         "--video is required (or train_data.video_path in a --config file)"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_config_tav_tune_cannot_follow_is_one_line_exit_2_and_writes_nothing(case, workdir, capsys):
    replacements, message = BAD[case]
    with pytest.raises(SystemExit) as exited:
        main(["--config", edited(workdir, *replacements), "--device", "cpu"])
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1 and lines[0].startswith("tav-tune: error: "), stderr
    assert message in lines[0], lines[0]
    assert sorted(p.name for p in workdir.iterdir()) == ["bases", "clips", "edited.yaml"]


@pytest.mark.parametrize("argv, message", [
    (["--config", "absent.yaml"], "--config absent.yaml: no such file"),
    (["--video", "clips/square.mp4", "--prompt", "a square", "--out", "run"], "--base is required (or "
                                                                               "pretrained_model_path in a --config"),
    (["--base", "bases/tiny-sd", "--video", "clips/square.mp4", "--prompt", "a square"],
     "--out is required (or output_dir in a --config file)"),
])
def test_missing_input_names_the_flag_and_the_config_key(argv, message, workdir, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1 and lines[0].startswith("tav-tune: error: "), lines
    assert message in lines[0], lines[0]


def test_a_config_tunes_and_its_settings_prompts_and_sampling_reach_the_tuned_model(workdir, capsys):
    main(["--config", str(RED_SQUARE)])
    captured = capsys.readouterr()
    assert captured.out.strip() == "outputs/red-square"
    warnings = [line for line in captured.err.splitlines() if line.startswith("tav-tune: warning: ")]
    assert any(": validation_steps: " in line for line in warnings) and len(warnings) == 4
    config = json.loads((workdir / "outputs" / "red-square" / artefacts.CONFIG_FILE).read_text())
    assert (config["frames"], config["stride"], config["start"], config["lr"], config["seed"], config["prompt"]) == (
        4, 2, 1, 5e-3, 7, "a red square is moving right")
    assert (config["width"], config["height"], config["steps"], config["mixed_precision"]) == (32, 32, 2, "no")
    assert (config["attention_mode"], config["group_norm"], config["frame_positions"]) == (
        "sparse_causal", "per_clip", "none")  # the official UNet's, whatever the base's defaults
    assert config["settings"]["timestep_power"] == 0
    assert config["trainable_modules"] == ["attn1.to_q", "attn2.to_q", "attn_temp.to_q", "attn_temp.to_k",
                                           "attn_temp.to_v", "attn_temp.to_out.0"]
    assert config["suggested_prompts"] == ["a blue square is moving right",
                                           "a red circle is moving right, cartoon style"]
    assert config["recommended"] == {"guidance": 7.5, "steps": 20}
    assert artefacts.TunedModel.open(workdir / "outputs" / "red-square").config["base"]["id"] == "tiny-sd"
