"""The official Tune-A-Video per-clip configs, read for `tav-tune --config FILE.yaml`.

People who already use Tune-A-Video describe a clip with a YAML file of showlab/Tune-A-Video's `configs/` layout,
whose top-level keys are the keyword arguments of that repository's training entry point (with `train_data` and
`validation_data` mappings). This module turns such a file into what `tav-tune` takes: the base, clip, caption and
output, the `TuneSettings` fields the file sets, the suggested prompts and recommended sampling of the tuned model,
and warnings for the keys that have no effect here. The file is read with OmegaConf, as the official code reads it,
so its numbers are OmegaConf's (`3e-5` is a float, which PyYAML's `safe_load` leaves a string).

Every key the official entry point accepts is known here, and each is either mapped, accepted with a warning
(harmless here: it changes output the official run writes beside the model, or a value tav-tune cannot honour that
does not change the tuned weights), or refused when its value would change the tuned weights and tav-tune cannot
honour it (an optimiser or schedule setting other than tav-tune's). Unknown keys, at any depth, and values of the
wrong type are refused naming the key's path. A key left out takes tav-tune's default for the base, as a flag left
out does (not the official entry point's default); what the official code fixes in code, not in its config (its
UNet's architecture, `OFFICIAL_CODE`), a config implies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.artefacts import CONFIG_SCHEMA
from tuner.io_utils import first_line

# The trainable sets tav-tune has (`tuner.tune.TRAINABLE_MODULES`), as the official config names them: module-name
# suffixes, so `attn_temp` is the whole temporal attention.
TRAINABLE_SETS = {"paper": ("attn1.to_q", "attn2.to_q", "attn_temp"), "temporal": ("attn_temp",)}
MIXED_PRECISIONS = ("no", "fp16", "bf16")
# What tav-tune's optimiser and loop do (`tuner.tune.tune`): the official defaults, which it cannot change.
ADAM = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "adam_weight_decay": 1e-2}
MAX_GRAD_NORM = 1.0
_RECOMMENDED = CONFIG_SCHEMA["properties"]["recommended"]["properties"]  # the bounds tav_config.json takes
RECOMMENDED_STEPS = (_RECOMMENDED["steps"]["minimum"], _RECOMMENDED["steps"]["maximum"])
RECOMMENDED_GUIDANCE = (_RECOMMENDED["guidance"]["minimum"], _RECOMMENDED["guidance"]["maximum"])
# What the official code fixes rather than reads from its config, as `TuneSettings` fields: its UNet's sparse-causal
# attention and clip-wide ResNet GroupNorm, no frame positions, uniformly drawn timesteps. A config implies them (so
# a model tuned from one is one the official UNet runs), whatever the base's defaults; flags override them.
OFFICIAL_CODE = {"attention_mode": "sparse_causal", "group_norm": "per_clip", "frame_positions": "none",
                 "timestep_power": 0.0}
# The official dataset's size when train_data gives none; only compared with validation_data's.
OFFICIAL_SIZE = 512


class ConfigError(ValueError):
    """A config `tav-tune` cannot follow; the message names the file and the key's path."""


@dataclass
class OfficialConfig:
    """What an official config asks of `tav-tune`. Each field is None (or empty) where the file does not say."""

    base: str | None = None  # pretrained_model_path: a directory (relative to the working directory) or a hub id
    out: str | None = None  # output_dir
    video: str | None = None  # train_data.video_path
    prompt: str | None = None  # train_data.prompt
    settings: dict[str, Any] = field(default_factory=dict)  # TuneSettings fields (OFFICIAL_CODE's, and the file's)
    suggested_prompts: list[str] | None = None  # validation_data.prompts
    recommended: dict[str, int | float] = field(default_factory=dict)  # {"steps", "guidance"}: validation_data's
    inverted_steps: int | None = None  # validation_data.num_inv_steps: the steps of the run's inv_latents
    lr_scale: float = 1.0  # scale_lr: the factor the official code multiplies learning_rate by
    warnings: list[str] = field(default_factory=list)  # one line each, without the program's prefix


def read_official_config(path: str | Path) -> OfficialConfig:
    """Read and check an official Tune-A-Video config file; ConfigError (one line) for anything tav-tune cannot
    follow."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    path = Path(path)
    try:
        loaded = OmegaConf.load(path)
        values = OmegaConf.to_container(loaded, resolve=True, throw_on_missing=True)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path}: is a directory, not a YAML file") from None
    except (YAMLError, OmegaConfBaseException, OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"--config {path}: not a config OmegaConf reads ({first_line(e)})") from None
    return parse_official_config(values, str(path))


def parse_official_config(values: object, name: str = "config") -> OfficialConfig:
    """`values` (an official config as plain Python, as OmegaConf resolves it) as an `OfficialConfig`; `name` is
    how messages call the file."""
    return _Parser(name).parse(values)


class _Parser:
    def __init__(self, name: str) -> None:
        self.name = name
        self.config = OfficialConfig(settings=dict(OFFICIAL_CODE))
        self.same: list[str] = []  # keys not read whose value is what tav-tune does anyway

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"--config {self.name}: {key}: {message}")

    def warn(self, key: str, message: str) -> None:
        self.config.warnings.append(f"--config {self.name}: {key}: {message}")

    # Types, as the official entry point's annotations and its reader's use of each value require.
    def check(self, key: str, value: object, kind: str) -> Any:
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
            "mapping": isinstance(value, dict),
            "strings": isinstance(value, list) and all(isinstance(v, str) for v in value),
        }[kind]
        if not ok:
            wanted = {"int": "a whole number", "number": "a number", "bool": "true or false", "str": "a string",
                      "mapping": "a mapping of keys", "strings": "a list of strings"}[kind]
            raise self.error(key, f"must be {wanted}, got {_show(value)}")
        return float(value) if kind == "number" else value

    def at_least(self, key: str, value: object, kind: str, low: int | float) -> Any:
        value = self.check(key, value, kind)
        if value < low:
            raise self.error(key, f"must be at least {low}, got {value}")
        return value

    def unknown(self, mapping: dict, known: tuple[str, ...], prefix: str = "") -> None:
        for key in mapping:
            if not isinstance(key, str) or key not in known:
                raise self.error(f"{prefix}{key}", "unknown key (not one the official train_tuneavideo.py takes"
                                 f"{' there' if prefix else ''})")

    def parse(self, values: object) -> OfficialConfig:
        if not isinstance(values, dict):
            raise ConfigError(f"--config {self.name}: must be a mapping of keys, got {_show(values)}")
        self.unknown(values, TOP_LEVEL)
        c = self.config
        if "pretrained_model_path" in values:
            c.base = self.nonempty("pretrained_model_path", values["pretrained_model_path"])
        if "output_dir" in values:
            c.out = self.nonempty("output_dir", values["output_dir"])
        if "train_data" in values:
            self.train_data(self.check("train_data", values["train_data"], "mapping"))
        self.top_level(values)
        if "validation_data" in values:
            self.validation_data(self.check("validation_data", values["validation_data"], "mapping"), values)
        if self.same:
            self.config.warnings.append(f"--config {self.name}: not read, tav-tune does the same: "
                                        f"{', '.join(self.same)}")
        return c

    def nonempty(self, key: str, value: object) -> str:
        if not self.check(key, value, "str").strip():
            raise self.error(key, "must not be empty")
        return value

    def train_data(self, data: dict) -> None:
        self.unknown(data, TRAIN_DATA, "train_data.")
        c, s = self.config, self.config.settings
        if "video_path" in data:
            c.video = self.nonempty("train_data.video_path", data["video_path"])
        if "prompt" in data:
            c.prompt = self.nonempty("train_data.prompt", data["prompt"])
        for key, setting, low in (("n_sample_frames", "frames", 1), ("width", "width", 1), ("height", "height", 1),
                                  ("sample_start_idx", "start", 0), ("sample_frame_rate", "stride", 1)):
            if key in data:
                s[setting] = self.at_least(f"train_data.{key}", data[key], "int", low)

    def top_level(self, v: dict) -> None:
        s = self.config.settings
        if "learning_rate" in v:
            lr = self.check("learning_rate", v["learning_rate"], "number")
            if not lr > 0:
                raise self.error("learning_rate", f"must be > 0, got {lr}")
            s["lr"] = lr
        if "max_train_steps" in v:
            s["steps"] = self.at_least("max_train_steps", v["max_train_steps"], "int", 0)
        if "seed" in v:
            if v["seed"] is None:
                self.warn("seed", "null (the official run is unseeded): tav-tune always seeds, with its default")
            else:
                s["seed"] = self.check("seed", v["seed"], "int")
        if "gradient_checkpointing" in v:
            s["gradient_checkpointing"] = self.check("gradient_checkpointing", v["gradient_checkpointing"], "bool")
        if "mixed_precision" in v:
            precision = v["mixed_precision"]
            if precision is None:  # accelerate's default without a launch config
                precision = "no"
            if precision is False:
                raise self.error("mixed_precision", 'must be a string, got false: YAML reads an unquoted no as false, '
                                 'write "no"')
            if self.check("mixed_precision", precision, "str") not in MIXED_PRECISIONS:
                raise self.error("mixed_precision", f"must be one of {', '.join(MIXED_PRECISIONS)}, got {precision!r}")
            s["mixed_precision"] = precision
        if "trainable_modules" in v:
            s["trainable"] = self.trainable(v["trainable_modules"])
        self.optimiser(v)
        self.harmless(v)

    def trainable(self, value: object) -> str:
        modules = self.check("trainable_modules", value, "strings")
        for name, allowed in TRAINABLE_SETS.items():
            if set(modules) == set(allowed):
                return name
        raise self.error("trainable_modules", f"{modules} is not a set tav-tune tunes: "
                         f"{list(TRAINABLE_SETS['paper'])} in any order (the paper's) or ['attn_temp']")

    def optimiser(self, v: dict) -> None:
        """The keys that change the tuned weights: honoured where tav-tune does the same, refused where not."""
        for key, value in ADAM.items():
            if key in v:
                given = self.check(key, v[key], "number")
                if not math.isclose(given, value, rel_tol=1e-9):
                    raise self.error(key, f"{given:g} is not supported: tav-tune's AdamW uses {value:g}")
                self.same.append(key)
        if "max_grad_norm" in v:
            if not math.isclose(self.check("max_grad_norm", v["max_grad_norm"], "number"), MAX_GRAD_NORM):
                raise self.error("max_grad_norm", f"{v['max_grad_norm']:g} is not supported: tav-tune clips the "
                                 f"gradient norm at {MAX_GRAD_NORM:g}")
            self.same.append("max_grad_norm")
        if "gradient_accumulation_steps" in v:
            if self.at_least("gradient_accumulation_steps", v["gradient_accumulation_steps"], "int", 1) != 1:
                raise self.error("gradient_accumulation_steps", f"{v['gradient_accumulation_steps']} is not "
                                 "supported: tav-tune takes one optimiser step per noised sample of the clip (1)")
            self.same.append("gradient_accumulation_steps")
        scheduler = "constant"
        if "lr_scheduler" in v:
            scheduler = self.check("lr_scheduler", v["lr_scheduler"], "str")
            if scheduler not in ("constant", "constant_with_warmup"):
                raise self.error("lr_scheduler", f"{scheduler!r} is not supported: tav-tune keeps the learning rate "
                                 "constant (constant, or constant_with_warmup with lr_warmup_steps 0)")
        warmup = self.at_least("lr_warmup_steps", v["lr_warmup_steps"], "int", 0) if "lr_warmup_steps" in v else 0
        if warmup and scheduler == "constant_with_warmup":
            raise self.error("lr_warmup_steps", f"{warmup} is not supported: tav-tune has no warm-up (0)")
        if "lr_scheduler" in v:
            self.same.append("lr_scheduler")
        if warmup:
            self.warn("lr_warmup_steps", f"{warmup} ignored, as the official code's constant schedule ignores it")
        elif "lr_warmup_steps" in v:
            self.same.append("lr_warmup_steps")
        batch = self.at_least("train_batch_size", v["train_batch_size"], "int", 1) if "train_batch_size" in v else 1
        if batch != 1:
            self.warn("train_batch_size", f"{batch}: every step trains on the one clip once, as the official "
                      "loader's batch of its one-clip dataset does")
        elif "train_batch_size" in v:
            self.same.append("train_batch_size")
        if "scale_lr" in v:
            if self.check("scale_lr", v["scale_lr"], "bool") and batch != 1:
                self.config.lr_scale = float(batch)  # x gradient_accumulation_steps (1) x processes (1)
                self.warn("scale_lr", f"true: learning_rate scaled by train_batch_size {batch} (one process), as "
                          "the official code does; --lr is taken as given")
            else:
                self.same.append("scale_lr")

    def harmless(self, v: dict) -> None:
        """The keys whose effect is outside the tuned weights: warnings, or nothing where tav-tune does the same."""
        steps = v.get("max_train_steps", 500)
        if "validation_steps" in v:
            self.at_least("validation_steps", v["validation_steps"], "int", 1)
            self.warn("validation_steps", "no samples are generated while tuning: generate from the tuned model "
                      "(validation_data.prompts are its suggested prompts)")
        if "checkpointing_steps" in v:
            every = self.at_least("checkpointing_steps", v["checkpointing_steps"], "int", 1)
            if every <= steps:
                self.warn("checkpointing_steps", f"{every}: tav-tune writes no training-state checkpoints")
            else:
                self.same.append("checkpointing_steps")
        if "resume_from_checkpoint" in v and v["resume_from_checkpoint"] is not None:
            self.check("resume_from_checkpoint", v["resume_from_checkpoint"], "str")
            self.warn("resume_from_checkpoint", "tav-tune cannot resume the official training state: it tunes "
                      "from the first step")
        elif "resume_from_checkpoint" in v:
            self.same.append("resume_from_checkpoint")
        if "use_8bit_adam" in v:
            if self.check("use_8bit_adam", v["use_8bit_adam"], "bool"):
                self.warn("use_8bit_adam", "true: tav-tune tunes with AdamW in fp32 (torch.optim.AdamW), not "
                          "bitsandbytes' 8-bit AdamW")
            else:
                self.same.append("use_8bit_adam")
        key = "enable_xformers_memory_efficient_attention"
        if key in v:
            if self.check(key, v[key], "bool"):
                self.warn(key, "true: attention runs on PyTorch's scaled_dot_product_attention (the same result; "
                          "memory-efficient kernels where the device has them), no xformers needed")
            else:
                self.same.append(key)

    def validation_data(self, data: dict, top: dict) -> None:
        self.unknown(data, VALIDATION_DATA, "validation_data.")
        c = self.config
        if "prompts" in data:
            prompts = self.check("validation_data.prompts", data["prompts"], "strings")
            if not all(p.strip() for p in prompts):
                raise self.error("validation_data.prompts", "must not hold an empty prompt")
            c.suggested_prompts = list(prompts)
        if "num_inference_steps" in data:
            c.recommended["steps"] = self.within("validation_data.num_inference_steps", data["num_inference_steps"],
                                                 "int", RECOMMENDED_STEPS)
        if "guidance_scale" in data:
            c.recommended["guidance"] = self.within("validation_data.guidance_scale", data["guidance_scale"],
                                                    "number", RECOMMENDED_GUIDANCE)
        if "video_length" in data:
            length = self.at_least("validation_data.video_length", data["video_length"], "int", 1)
            self.warn("validation_data.video_length", f"{length}: not stored; each generation asks for its frames "
                      "(--frames, default 8; past 8, in 8-frame windows)")
        train = top.get("train_data") or {}
        for key in ("width", "height"):
            if key in data:
                size = self.at_least(f"validation_data.{key}", data[key], "int", 1)
                if size != train.get(key, OFFICIAL_SIZE):
                    self.warn(f"validation_data.{key}", f"{size}: generation runs at the tuned size")
                else:
                    self.same.append(f"validation_data.{key}")
        if "use_inv_latent" in data:
            if self.check("validation_data.use_inv_latent", data["use_inv_latent"], "bool"):
                self.same.append("validation_data.use_inv_latent")
            else:
                self.warn("validation_data.use_inv_latent", "false: generation starts from the inverted clip "
                          "unless asked not to (--no-invert)")
        if "num_inv_steps" in data:
            inv = c.inverted_steps = self.at_least("validation_data.num_inv_steps", data["num_inv_steps"], "int", 1)
            if inv != c.recommended.get("steps", 50):
                self.warn("validation_data.num_inv_steps", f"{inv}: the clip is inverted at the sampling steps")
            else:
                self.same.append("validation_data.num_inv_steps")
        if data.get("negative_prompt") is not None:
            self.check("validation_data.negative_prompt", data["negative_prompt"], "str")
            self.warn("validation_data.negative_prompt", "not stored: give it when generating (--negative-prompt)")
        elif "negative_prompt" in data:
            self.same.append("validation_data.negative_prompt")
        if "num_videos_per_prompt" in data:
            if self.at_least("validation_data.num_videos_per_prompt", data["num_videos_per_prompt"], "int", 1) != 1:
                self.warn("validation_data.num_videos_per_prompt", "each generation makes one video")
            else:
                self.same.append("validation_data.num_videos_per_prompt")
        if "eta" in data:
            if self.check("validation_data.eta", data["eta"], "number") != 0:
                self.warn("validation_data.eta", "DDIM sampling here is deterministic (eta 0)")
            else:
                self.same.append("validation_data.eta")

    def within(self, key: str, value: object, kind: str, bounds: tuple[float, float]) -> Any:
        value = self.check(key, value, kind)
        if not bounds[0] <= value <= bounds[1]:
            raise self.error(key, f"must be within {bounds[0]:g}..{bounds[1]:g}, got {value:g}")
        return value


def _show(value: object) -> str:
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:60] + '...'} ({type(value).__name__})"


# The keys the official entry point takes (its keyword arguments), its dataset's (train_data), and its validation
# pipeline's (validation_data, passed as keyword arguments to the pipeline's call beside what the loop reads).
TOP_LEVEL = (
    "pretrained_model_path", "output_dir", "train_data", "validation_data", "validation_steps", "trainable_modules",
    "train_batch_size", "max_train_steps", "learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps",
    "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "max_grad_norm", "gradient_accumulation_steps",
    "gradient_checkpointing", "checkpointing_steps", "resume_from_checkpoint", "mixed_precision", "use_8bit_adam",
    "enable_xformers_memory_efficient_attention", "seed",
)
TRAIN_DATA = ("video_path", "prompt", "width", "height", "n_sample_frames", "sample_start_idx", "sample_frame_rate")
VALIDATION_DATA = ("prompts", "video_length", "width", "height", "num_inference_steps", "guidance_scale",
                   "use_inv_latent", "num_inv_steps", "negative_prompt", "num_videos_per_prompt", "eta")
