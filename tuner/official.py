"""Models tuned with the official Tune-A-Video implementation (showlab/Tune-A-Video), brought in (`tav-import`).

An official output directory holds the saved `TuneAVideoPipeline` (`model_index.json`; `unet/` as a
`UNet3DConditionModel`; `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/` of the base), the run's `config.yaml`
and its DDIM-inverted source, `inv_latents/ddim_latent-<step>.pt`; a model published on the hub is often `unet/`
alone, beside a named base. The official UNet's state dict is this project's inflated UNet's key for key (sparse-
causal attention, GroupNorm over the whole clip, no frame positions), so importing is checking, not converting:
the UNet layout and every tensor are accounted for, and the tuned tensors must be the set this project's adapter
holds (`tuner.inflate.is_trainable`). Weights are read without running code: safetensors, or a pickled `.bin`
through `torch.load(weights_only=True)`, which refuses a pickle that needs more than tensors.

The base is the `--base` given (the official UNet's untuned tensors must equal it, the VAE and text encoder match
it within fp16 rounding), or the official directory's own networks, written as a base of their own into the
repository's base store. The source an edit starts from is the clip given with `--video`, else the official
inverted latents (`artefacts.Source`), else none (the model generates from noise).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pickle
import re
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from tuner import artefacts
from tuner.base_store import base_in_use
from tuner.components import BaseModelError, base_model_hash, encode_frames, load_components, weights_file
from tuner.hub import HubError, resolve_base, snapshot
from tuner.inflate import inflate, is_trainable
from tuner.io_utils import JsonError, atomic_directory, first_line, read_json_file
from tuner.official_config import ConfigError, OfficialConfig, read_official_config
from tuner.tune import TRAINABLE_MODULES, TuneSettings
from tuner.versions import versions
from tuner.video_io import VideoError, read_video

OFFICIAL_UNET = "UNet3DConditionModel"
# The official UNet's blocks and the image blocks this project inflates in their place.
BLOCKS_3D = {"CrossAttnDownBlock3D": "CrossAttnDownBlock2D", "DownBlock3D": "DownBlock2D",
             "CrossAttnUpBlock3D": "CrossAttnUpBlock2D", "UpBlock3D": "UpBlock2D",
             "UNetMidBlock3DCrossAttn": "UNetMidBlock2DCrossAttn"}
# The official `trainable_modules` this project's adapter holds: the paper's three (its default configs).
PAPER_MODULES = {"attn1.to_q", "attn2.to_q", "attn_temp"}
# What of a hub repository an import reads: configs, the networks' weights (one of the two formats), the inversion.
HUB_PATTERNS = ["model_index.json", "config.yaml", "inv_latents/*.pt", "unet/*.json", "unet/*.safetensors",
                "unet/*.bin", "vae/*", "text_encoder/*", "tokenizer/*", "scheduler/*"]
WEIGHT_FILES = {"unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
                "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
                "text_encoder": ("model.safetensors", "pytorch_model.bin")}
# diffusers < 0.15 named the VAE's attention projections so; `AutoencoderKL` names them to_q/to_k/to_v/to_out.0
LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
INVERSION = re.compile(r"ddim_latent-(\d+)\.pt")
SAMPLE_FPS = 8.0  # what the official code writes its sample GIFs at; the fps of a model imported without its clip


class OfficialFormatError(ValueError):
    """An official checkpoint or config that cannot be imported, as one line (exit 2; INVALID_ARGUMENT)."""


def locate(source: str, hub_only: bool = False) -> Path:
    """The official output directory `source` names: a directory, or a hub id through the cache (`tuner.hub`);
    with `hub_only`, a hub id even where a directory of that name exists (a name a client gave a server)."""
    if not hub_only and Path(source).is_dir():
        return Path(source)
    try:
        return snapshot(source, HUB_PATTERNS)
    except HubError as e:
        raise OfficialFormatError(f"--from {e}") from None


def check_layout(source: str, hub_only: bool = False) -> bool:
    """Check, without reading weights or fetching anything, that `source` (a directory, or a hub id in the cache;
    `locate`) holds a UNet this project serves; False when it is a hub id the cache does not hold (nothing to check
    yet)."""
    if not hub_only and Path(source).is_dir():
        config_file = Path(source) / "unet" / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "unet/config.json")
        if not isinstance(cached, str):
            return False
        config_file = Path(cached)
    image_unet_config(read_config(config_file, "unet/config.json"))
    return True


def read_weights(folder: Path, part: str) -> dict[str, torch.Tensor]:
    """A network's tensors from `folder` (`part`: unet, vae or text_encoder), safetensors first, else the pickled
    `.bin` as plain tensors only."""
    safe, pickled = (folder / name for name in WEIGHT_FILES[part])
    shown = f"{part}/{safe.name if safe.is_file() else pickled.name}"
    try:
        if safe.is_file():
            state = load_file(safe)
        elif pickled.is_file():
            state = torch.load(pickled, map_location="cpu", weights_only=True)
        else:
            raise OfficialFormatError(f"{part}/ holds no weights ({safe.name} or {pickled.name})")
    except pickle.UnpicklingError as e:
        reason = next((line for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        raise OfficialFormatError(f"{shown} is a pickle that needs code to load, refused ({reason.strip()})") from None
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise OfficialFormatError(f"{shown} is not a readable weights file (truncated or corrupt: "
                                  f"{first_line(e, 120)})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise OfficialFormatError(f"{shown} is not a state dict of named tensors")
    return state


def read_config(path: Path, name: str) -> dict:
    try:
        config = read_json_file(path, name)
    except JsonError as e:
        raise OfficialFormatError(str(e)) from None
    if not isinstance(config, dict):
        raise OfficialFormatError(f"{name} is not a JSON object")
    return config


def image_unet_config(config: dict) -> dict:
    """The `UNet2DConditionModel` config whose inflation is the official `UNet3DConditionModel` of `config`."""
    if config.get("_class_name") != OFFICIAL_UNET:
        raise OfficialFormatError(f"unet/config.json: a {config.get('_class_name')}, not the official "
                                  f"{OFFICIAL_UNET}: a UNet layout this project does not serve")
    blocks = [*config.get("down_block_types", []), *config.get("up_block_types", []),
              config.get("mid_block_type", "UNetMidBlock3DCrossAttn")]
    unknown = sorted({b for b in blocks if b not in BLOCKS_3D})
    if unknown or not config.get("down_block_types"):
        raise OfficialFormatError(f"unet/config.json: blocks {', '.join(unknown) or '(none)'}: a UNet layout this "
                                  "project does not serve")
    image = {k: v for k, v in config.items() if not k.startswith("_")}
    image["down_block_types"] = [BLOCKS_3D[b] for b in config["down_block_types"]]
    image["up_block_types"] = [BLOCKS_3D[b] for b in config["up_block_types"]]
    image["mid_block_type"] = BLOCKS_3D[config.get("mid_block_type", "UNetMidBlock3DCrossAttn")]
    return image


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> torch.nn.Module:
    """`module` (built on the meta device) holding `state`, every key matched both ways and every shape equal."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = (f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which this layout does not")
        raise OfficialFormatError(f"{name} does not match its config ({len(missing)} missing, {len(unexpected)} "
                                  f"unexpected tensors; it {what})")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise OfficialFormatError(f"{name}: {key} has shape {tuple(tensor.shape)}, its config gives "
                                      f"{tuple(expected[key].shape)}")
    module.load_state_dict(state, strict=True, assign=True)
    return module


def video_unet_state(official: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The official UNet's image config and its state dict, checked against this project's inflated UNet."""
    config = image_unet_config(read_config(official / "unet" / "config.json", "unet/config.json"))
    state = read_weights(official / "unet", "unet")
    try:
        with torch.device("meta"):
            unet = inflate(UNet2DConditionModel.from_config(config), "sparse_causal", "per_clip", "none")
    except (ValueError, TypeError) as e:
        raise OfficialFormatError(f"unet/config.json: a UNet layout this project does not serve ({e})") from None
    load_strict(unet, state, "unet/ weights")
    return config, state


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal at the lower of the two precisions (an fp16 copy of an fp32 tensor is the same tensor)."""
    low = a.dtype if a.element_size() <= b.element_size() else b.dtype
    return a.shape == b.shape and torch.equal(a.to(low), b.to(low))


def check_against_base(base: Path, variant: str | None, official: Path, unet_state: dict[str, torch.Tensor]) -> None:
    """The official model was tuned from `base`: its UNet's untuned tensors equal the base's (a differing one was
    tuned outside the adapter's set: refused, naming it) and its VAE and text encoder, where it has them, match."""
    base_unet = load_file(base / weights_file("unet", variant))
    for key, tensor in base_unet.items():
        if key not in unet_state:
            raise OfficialFormatError(f"the base's UNet tensor {key} is not in unet/: not a model of this base")
        if not is_trainable(key) and not _same(unet_state[key], tensor):
            raise OfficialFormatError(f"unet/ tensor {key} differs from the base's: tuned outside the adapter's set "
                                      "(attn1.to_q, attn2.to_q, attn_temp), or another base")
    for part in ("vae", "text_encoder"):
        if not (official / part).is_dir():
            continue
        ours = {_plain_name(key): tensor for key, tensor in read_weights(official / part, part).items()}
        theirs = load_file(base / weights_file(part, variant))
        for key, tensor in theirs.items():
            mine = ours.get(_plain_name(key))
            if mine is None and key.endswith("position_ids"):
                continue  # a buffer some versions save and others do not
            if mine is None:
                raise OfficialFormatError(f"{part}/ lacks the base's tensor {key}: not a model of this base")
            if not _same(mine, tensor):
                raise OfficialFormatError(f"{part}/ tensor {key} differs from the base's beyond fp16 rounding: "
                                          "another base")


def _plain_name(key: str) -> str:
    """A VAE or text encoder tensor's name as every version agrees on it: diffusers >= 0.15's attention names,
    without transformers 4's `text_model.` prefix."""
    head, _, leaf = key.rpartition(".")
    stem, _, module = head.rpartition(".")
    if module in LEGACY_VAE_ATTENTION:
        key = f"{stem}.{LEGACY_VAE_ATTENTION[module]}.{leaf}"
    return key.removeprefix("text_model.")


def write_own_base(official: Path, unet_config: dict, unet_state: dict[str, torch.Tensor], out: Path) -> None:
    """A Stable Diffusion 1.x diffusers directory in `out` from the official pipeline's own networks: the UNet's
    image tensors (its queries as tuned: the adapter holds them too, so the model is exact), the VAE and text
    encoder as stored (fp16 under the official configs' mixed precision), tokenizer and scheduler files copied."""
    missing = [p for p in ("vae", "text_encoder", "tokenizer", "scheduler") if not (official / p).is_dir()]
    if missing:
        raise OfficialFormatError(f"{', '.join(missing)} missing: a unet/-only model needs --base")
    transformers.utils.logging.disable_progress_bar()  # keep the CLI's output to its own result and errors
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    image_keys = set(unet.state_dict())
    load_strict(unet, {k: v for k, v in unet_state.items() if k in image_keys}, "unet/ image tensors")
    unet.save_pretrained(out / "unet", safe_serialization=True)

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(read_config(official / "vae" / "config.json", "vae/config.json"))
    state = {_plain_name(key): tensor for key, tensor in read_weights(official / "vae", "vae").items()}
    load_strict(vae, state, "vae/ weights").save_pretrained(out / "vae", safe_serialization=True)

    try:
        text_config = CLIPTextConfig.from_pretrained(official / "text_encoder")
    except (OSError, ValueError) as e:
        raise OfficialFormatError(f"text_encoder/config.json: {e}") from None
    with torch.device("meta"):
        text_encoder = CLIPTextModel(text_config)
    expected = text_encoder.state_dict()
    state = {}  # transformers 5 names the tensors without 4.x's `text_model.` prefix; either file loads in either
    for key, tensor in read_weights(official / "text_encoder", "text_encoder").items():
        name = next((k for k in (key, key.removeprefix("text_model."), f"text_model.{key}") if k in expected), key)
        if not name.endswith("embeddings.position_ids") or name in expected:  # a buffer older versions saved
            state[name] = tensor
    load_strict(text_encoder, state, "text_encoder/ weights").save_pretrained(out / "text_encoder",
                                                                              safe_serialization=True)
    shutil.copytree(official / "tokenizer", out / "tokenizer")
    shutil.copytree(official / "scheduler", out / "scheduler")
    scheduler = read_config(out / "scheduler" / "scheduler_config.json", "scheduler/scheduler_config.json")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", scheduler.get("_class_name", "DDIMScheduler")]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def inverted_latents(official: Path) -> tuple[torch.Tensor, str] | None:
    """The latest official inversion (`inv_latents/ddim_latent-<step>.pt`, `[1, C, F, h, w]`) as `[C, F, h, w]`."""
    found = sorted((int(m.group(1)), p) for p in (official / "inv_latents").glob("*.pt")
                   if (m := INVERSION.fullmatch(p.name)))
    if not found:
        return None
    path = found[-1][1]
    name = f"inv_latents/{path.name}"
    try:
        latents = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise OfficialFormatError(f"{name} is a pickle that needs code to load, refused") from None
    except (RuntimeError, EOFError, OSError, ValueError):
        raise OfficialFormatError(f"{name} is not a readable tensor file (truncated or corrupt)") from None
    if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or latents.shape[0] != 1:
        raise OfficialFormatError(f"{name} is not a latent video [1, C, F, h, w]")
    return latents[0].float(), name


def import_official(
    source: str,
    out: str | Path,
    base: str | None = None,
    video: str | Path | None = None,
    prompt: str | None = None,
    overwrite: bool = False,
    base_id: str | None = None,
    hub_only: bool = False,
) -> Path:
    """Write the tuned model directory `out` from the official output directory (or hub id) `source`: tuned from
    `base` (a directory or hub id `ID[@VARIANT]`; default the official directory's own networks, put in the base
    store of `out`'s repository), its edits starting from `video` (default: the official inversion, if any), its
    caption `prompt` (default: config.yaml's). `base_id` names the base in the model's config (default: `base`, or
    the source's name for its own networks); `hub_only`: see `locate`."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OfficialFormatError(f"--out {out} already exists (use --overwrite to replace it)")
    official = locate(source, hub_only)
    config_file = official / "config.yaml"
    try:
        settings = read_official_config(config_file) if config_file.is_file() else OfficialConfig()
    except ConfigError as e:
        raise OfficialFormatError(str(e).replace(f"--config {config_file}", "config.yaml")) from None
    caption = prompt or settings.prompt
    if not caption or not caption.strip():
        raise OfficialFormatError("--prompt is needed: no config.yaml gives the caption (train_data.prompt)")
    unet_config, state = video_unet_state(official)
    inverted = None if video is not None else inverted_latents(official)
    out.parent.mkdir(parents=True, exist_ok=True)

    with contextlib.ExitStack() as stack:
        if base is not None:
            try:
                base_dir, variant = resolve_base(base)
            except BaseModelError as e:
                raise OfficialFormatError(f"--base {e}") from None
            check_against_base(base_dir, variant, official, state)
        else:
            # beside `out`, named after it: a tuning worker killed meanwhile leaves it to `clean_leftovers` (`.job-*`)
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.")))
            write_own_base(official, unet_config, state, scratch / "base")
            base_dir, variant = stack.enter_context(base_in_use(scratch / "base", None, out.parent)), None
        config, model_source = _model_config(official, source, base_dir, base, settings, caption, video, inverted,
                                             unet_config)
        config["base"]["sha256"] = base_model_hash(base_dir, variant)
        config["base"]["path"] = artefacts.base_reference(base_dir, out)
        config["base"]["id"] = base_id or config["base"]["id"]
        if variant:
            config["base"]["variant"] = variant
        adapter = {k: v.float().contiguous() for k, v in state.items() if is_trainable(k)}
        with atomic_directory(out, overwrite=overwrite) as tmp:
            artefacts.write_tuned_model(tmp, config, adapter, model_source)
    return out


def _model_config(official: Path, source: str, base_dir: Path, base: str | None, settings: OfficialConfig,
                  caption: str, video: str | Path | None, inverted: tuple[torch.Tensor, str] | None,
                  unet_config: dict) -> tuple[dict, artefacts.Source]:
    """The imported model's tav_config.json (less its base's path and hash) and its source."""
    s = settings.settings
    vae_factor = 2 ** (len(read_config(base_dir / "vae" / "config.json", "vae/config.json")["block_out_channels"]) - 1)
    latent = tuple(inverted[0].shape[2:]) if inverted else (unet_config["sample_size"],) * 2
    width, height = s.get("width", latent[1] * vae_factor), s.get("height", latent[0] * vae_factor)
    if width % vae_factor or height % vae_factor:
        raise OfficialFormatError(f"config.yaml: train_data.width/height {width}x{height} are not multiples of "
                                  f"{vae_factor}")
    latent_size = (height // vae_factor, width // vae_factor)
    start, stride = s.get("start", 0), s.get("stride", 1)
    if video is not None:
        try:
            clip = read_video(video, max_frames=start + stride * artefacts.MAX_SOURCE_FRAMES, size=(width, height),
                              start=start, stride=stride)
        except VideoError as e:
            raise OfficialFormatError(f"--video: {e}") from None
        if len(clip) < s.get("frames", 1):
            raise OfficialFormatError(f"--video gives only {len(clip)} frames from index {start} at stride {stride}; "
                                      f"config.yaml's train_data.n_sample_frames asks for {s['frames']}")
        latents, _ = encode_frames(load_components(base_dir).vae, clip.frames)
        model_source, fps = artefacts.Source(latents=latents, frames=clip.frames), clip.fps
    elif inverted is not None:
        latents, name = inverted
        if latents.shape[0] != unet_config["in_channels"] or tuple(latents.shape[2:]) != latent_size:
            raise OfficialFormatError(f"{name}: latents {tuple(latents.shape)} do not fit the model "
                                      f"({unet_config['in_channels']} channels, {latent_size[0]}x{latent_size[1]})")
        if latents.shape[1] > artefacts.MAX_SOURCE_FRAMES:
            raise OfficialFormatError(f"{name}: {latents.shape[1]} frames, over {artefacts.MAX_SOURCE_FRAMES}")
        model_source, fps = artefacts.Source(inverted=latents, inverted_steps=settings.inverted_steps), SAMPLE_FPS
    else:
        model_source, fps = artefacts.Source(), SAMPLE_FPS
    count = next((latents.shape[1] for latents in model_source.tensors().values()), 0)
    tune_settings = TuneSettings(**{**s, "width": width, "height": height, "attention_mode": "sparse_causal",
                                    "group_norm": "per_clip", "frame_positions": "none"})
    config = {
        "base": {"path": "", "sha256": "", "id": base or f"{Path(source).name}-base"},
        "attention_mode": "sparse_causal",
        "group_norm": "per_clip",
        "frame_positions": "none",
        "prompt": caption,
        "video": str(video) if video is not None else None,
        "frames": s.get("frames", count or 8),
        "width": width,
        "height": height,
        "latent_width": latent_size[1],
        "latent_height": latent_size[0],
        "fps": fps,
        "start": start,
        "stride": stride,
        "source_frames": count,
        "trainable_modules": list(TRAINABLE_MODULES[tune_settings.trainable]),
        "settings": asdict(tune_settings),
        "recommended": {"guidance": 12.5, "steps": 50, **settings.recommended},
        **({"suggested_prompts": settings.suggested_prompts} if settings.suggested_prompts else {}),
        "adapter": {"kind": "full"},
        "imported": {"from": source, "format": "showlab/Tune-A-Video",
                     "config_yaml": (official / "config.yaml").is_file(),
                     "inverted_latents": inverted[1] if inverted else None},
        "versions": versions(),
    }
    return config, model_source


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tav-import", description="Import a model tuned with the official Tune-A-Video "
                                "implementation (an output directory or a hub id) as a tuned model directory.")
    p.add_argument("--from", dest="source", required=True, metavar="DIR_OR_HUB_ID",
                   help="the official output directory (a saved pipeline, or unet/ alone with --base), or a hub id")
    p.add_argument("--out", required=True, help="tuned model directory to write (e.g. REPO/<model-id>)")
    p.add_argument("--base", metavar="DIR_OR_HUB_ID[@VARIANT]",
                   help="the base it was tuned from (default: the official directory's own networks)")
    p.add_argument("--variant", help="the base's weights variant (diffusers' variant=, e.g. fp16); default the main")
    p.add_argument("--video", help="the source clip (default: the official inverted latents, inv_latents/)")
    p.add_argument("--prompt", help="the clip's caption (default: config.yaml's train_data.prompt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = p.parse_args(argv)
    if args.variant and not args.base:
        p.error("--variant names a weights variant of --base: give --base")
    base = f"{args.base}@{args.variant}" if args.variant else args.base
    try:
        print(import_official(args.source, args.out, base, args.video, args.prompt, args.overwrite))
    except (OfficialFormatError, BaseModelError, artefacts.ArtefactError) as e:
        print(f"tav-import: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
