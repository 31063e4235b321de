"""A tuned model written back in the official Tune-A-Video format (`tav-export-official`), for the tools built on
official checkpoints (the official `TuneAVideoPipeline`, Video-P2P).

The output is an official output directory: `unet/` as a `UNet3DConditionModel` (its config, with only the keys
the official class takes, and the video UNet's full state dict as safetensors), the base's VAE, text encoder,
tokenizer and scheduler, the pipeline's `model_index.json`, `inv_latents/ddim_latent-<steps>.pt` (the source clip
DDIM-inverted from an empty prompt, as the official code saves it: `[1, C, F, h, w]`) and a `config.yaml` of the
official layout describing the tuning. Only models the official UNet runs are written: sparse-causal attention,
GroupNorm over the clip (`per_clip`) and no frame positions; any other is refused naming the setting.

It lives in `server/` because the inversion is the one DDIM loop (`server.generate`), which `tuner/` and
`exporter/` never import.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from server.engines.torch_engine import load_torch_model
from server.generate import Generator
from tuner.artefacts import ArtefactError, TunedModel
from tuner.components import BaseModelError
from tuner.io_utils import atomic_directory
from tuner.official import BLOCKS_3D, OFFICIAL_UNET

OFFICIAL_ARCHITECTURE = {"attention_mode": "sparse_causal", "group_norm": "per_clip", "frame_positions": "none"}
# The keyword arguments of the official UNet3DConditionModel (showlab/Tune-A-Video, tuneavideo/models/unet.py).
OFFICIAL_UNET_KEYS = (
    "sample_size", "in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift",
    "down_block_types", "mid_block_type", "up_block_types", "only_cross_attention", "block_out_channels",
    "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps",
    "cross_attention_dim", "attention_head_dim", "dual_cross_attention", "use_linear_projection", "class_embed_type",
    "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
)
OFFICIAL_DIFFUSERS = "0.11.1"  # the version the official code pins, as its saved configs record it
BLOCKS_2D = {image: video for video, image in BLOCKS_3D.items()}


class OfficialExportError(ValueError):
    """A model the official format cannot hold, or an output that cannot be written (one line, exit 2)."""


def official_unet_config(image_config: dict) -> dict:
    """The official `UNet3DConditionModel` config of the video UNet inflated from `image_config`."""
    config = {"_class_name": OFFICIAL_UNET, "_diffusers_version": OFFICIAL_DIFFUSERS}
    config.update({k: image_config[k] for k in OFFICIAL_UNET_KEYS if k in image_config})
    for key in ("down_block_types", "up_block_types"):
        config[key] = [BLOCKS_2D[b] for b in image_config[key]]
    config["mid_block_type"] = BLOCKS_2D[image_config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"]
    return config


def export_official(run: str | Path, out: str | Path, steps: int | None = None, overwrite: bool = False) -> Path:
    """Write the tuned model `run` as the official output directory `out`, its source inverted at `steps` steps
    (default: the model's recommended sampling steps)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OfficialExportError(f"--out {out} already exists (use --overwrite to replace it)")
    try:
        model = TunedModel.open(run)
        for (setting, official), value in zip(OFFICIAL_ARCHITECTURE.items(), model.architecture, strict=True):
            if value != official:
                raise OfficialExportError(f"{run}: {setting} {value} is not the official UNet's ({official}): the "
                                          "official format cannot hold it")
        loaded = load_torch_model(run, "cpu")  # fp32: the weights are written as they are tuned
    except (ArtefactError, BaseModelError) as e:
        raise OfficialExportError(f"{run}: {e}") from None
    config = model.config
    steps = steps or config.get("recommended", {}).get("steps", 50)
    source = loaded.source
    inverted = None
    if source.kind == "clip":
        inverted = Generator(loaded).invert_source(steps, min(config["frames"], source.latents.shape[1])).cpu()
    elif source.kind == "inverted":
        inverted, steps = source.inverted[None], source.inverted_steps or steps
    unet = loaded.engines.tuned_unet()

    base = model.base_path
    with atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / "unet").mkdir()
        (tmp / "unet" / "config.json").write_text(json.dumps(official_unet_config(dict(unet.config)), indent=2) + "\n")
        state = {k: v.float().contiguous() for k, v in unet.state_dict().items()}
        save_file(state, tmp / "unet" / "diffusion_pytorch_model.safetensors")
        for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
            shutil.copytree(base / part, tmp / part)
        scheduler = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
        index = {"_class_name": "TuneAVideoPipeline", "_diffusers_version": OFFICIAL_DIFFUSERS,
                 "unet": ["tuneavideo.models.unet", OFFICIAL_UNET], "vae": ["diffusers", "AutoencoderKL"],
                 "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                 "scheduler": ["diffusers", scheduler.get("_class_name", "DDIMScheduler")]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if inverted is not None:
            (tmp / "inv_latents").mkdir()
            torch.save(inverted.contiguous(), tmp / "inv_latents" / f"ddim_latent-{config.get('steps', 0)}.pt")
        OmegaConf.save(OmegaConf.create(official_config(config, base, out, steps)), tmp / "config.yaml")
    return out


def official_config(config: dict, base: Path, out: Path, inverted_steps: int) -> dict:
    """The official `config.yaml` describing how the model was tuned (tav_config.json in the official layout)."""
    recommended = {"steps": 50, "guidance": 12.5, **config.get("recommended", {})}
    trainable = ["attn_temp"] if config.get("settings", {}).get("trainable") == "temporal" else \
        ["attn1.to_q", "attn2.to_q", "attn_temp"]
    return {
        "pretrained_model_path": str(base.resolve()),
        "output_dir": str(out.resolve()),
        "train_data": {"video_path": config.get("video") or "", "prompt": config["prompt"],
                       "n_sample_frames": config["frames"], "width": config["width"], "height": config["height"],
                       "sample_start_idx": config.get("start", 0), "sample_frame_rate": config.get("stride", 1)},
        "validation_data": {"prompts": config.get("suggested_prompts") or [config["prompt"]],
                            "video_length": config["frames"], "width": config["width"], "height": config["height"],
                            "num_inference_steps": recommended["steps"], "guidance_scale": recommended["guidance"],
                            "use_inv_latent": True, "num_inv_steps": inverted_steps},
        "learning_rate": config.get("lr", 3e-5),
        "train_batch_size": 1,
        "max_train_steps": config.get("steps", 0),
        "checkpointing_steps": 1000,
        "validation_steps": 100,
        "trainable_modules": trainable,
        "seed": config.get("seed", 33),
        "mixed_precision": "no",
        "use_8bit_adam": False,
        "gradient_checkpointing": False,
        "enable_xformers_memory_efficient_attention": False,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tav-export-official", description="Write a tuned model in the official "
                                "Tune-A-Video format (a saved TuneAVideoPipeline with inv_latents/ and config.yaml).")
    p.add_argument("--model", required=True, help="tuned model directory")
    p.add_argument("--out", required=True, help="official output directory to write")
    p.add_argument("--steps", type=int, help="DDIM inversion steps (default: the model's recommended steps)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if args.steps is not None and not 1 <= args.steps <= 1000:
        p.error("--steps must be within 1..1000")
    try:
        print(export_official(args.model, args.out, args.steps, args.overwrite))
    except OfficialExportError as e:
        print(f"tav-export-official: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
