"""A seeded, randomly initialised Stable Diffusion 1.x-layout model directory, small enough for fast tests.

Built from the real diffusers / transformers classes and saved with `save_pretrained`, so it loads through the
same `from_pretrained` path as a user's Stable Diffusion directory. The tokenizer is a CLIP BPE tokenizer over
single bytes (no merges): any prompt tokenizes, one token per character.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from tuner.io_utils import atomic_directory

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)
MAX_TOKENS = 77
# Stable Diffusion 1.x's DDIM configuration.
SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def make_tiny(
    out: str | Path, seed: int = 0, prediction_type: str = "epsilon", unet_config: dict | None = None
) -> Path:
    """Write the tiny model directory to `out` (which must not exist) and return its path. `unet_config`
    replaces the tiny UNet's configuration (e.g. a larger UNet for memory measurements)."""
    out = Path(out)
    torch.manual_seed(seed)
    with atomic_directory(out) as tmp:
        UNet2DConditionModel(**(unet_config or UNET_CONFIG)).save_pretrained(tmp / "unet")
        AutoencoderKL(**VAE_CONFIG).save_pretrained(tmp / "vae")
        tokenizer = _byte_tokenizer(tmp / "tokenizer")
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        CLIPTextModel(text_config).save_pretrained(tmp / "text_encoder")
        DDIMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": prediction_type}).save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps(_model_index(), indent=2) + "\n")
    return out


def _byte_tokenizer(directory: Path) -> CLIPTokenizer:
    """Write a tokenizer folder laid out like Stable Diffusion 1.x's (vocab, merges, configs) and load it."""
    directory.mkdir(parents=True)
    symbols = sorted(ByteLevel.alphabet())
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    files = {
        "vocab.json": {token: i for i, token in enumerate(vocab)},
        "special_tokens_map.json": special,
        "tokenizer_config.json": {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_TOKENS, **special},
    }
    for name, content in files.items():
        (directory / name).write_text(json.dumps(content))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(directory)


def _model_index() -> dict:
    import diffusers

    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tav-make-tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to create")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default="epsilon")
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} already exists", file=sys.stderr)
        raise SystemExit(2)
    print(make_tiny(args.out, args.seed, args.prediction_type))


if __name__ == "__main__":
    main()
