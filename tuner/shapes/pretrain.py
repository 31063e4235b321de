"""Pretrains the shapes-world Stable Diffusion from scratch on CPU; saves it as an SD-1.x diffusers directory.

No model hub is reachable, so the project ships its own small text-to-image model: a
`diffusers.AutoencoderKL` (64x64 images -> 16x16x4 latents), a `transformers.CLIPTextModel` with a CLIP BPE
tokenizer in which every word of the world is one token, and a `diffusers.UNet2DConditionModel` with
cross-attention, trained with the SD noise schedule and caption dropout (for classifier-free guidance). The
result loads through the ordinary `from_pretrained(dir, subfolder=...)` path, so everything downstream
treats it like Stable Diffusion 1.x.

    tav-pretrain-shapes --out models/shapes-sd --seed 0 --minutes 45
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from tuner.components import frames_to_pixels
from tuner.shapes import world

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
STRUCTURE_LEVEL = 4.0
NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


@dataclass(frozen=True)
class Architecture:
    vae_channels: tuple[int, ...]
    vae_groups: int
    vae_attention: bool
    text_hidden: int
    text_layers: int
    text_heads: int
    unet_channels: tuple[int, ...]
    unet_groups: int
    unet_heads: int


ARCHITECTURES = {
    # The shipped model, sized for two shared CPU cores: a light VAE (no mid-block attention) converges in
    # minutes; the UNet is (64, 128, 128) wide with 2 attention heads, because on a CPU 8 heads of width 8 spend
    # more time on attention matrices than the whole rest of a training step (measured: 0.41 vs 0.31 s per
    # batch-12 step). A (32, 64, 64) UNet trains 1.7x faster per step but, after 4000 steps, drew the prompted
    # colour in only 67% and the background in 46% of samples.
    "base": Architecture((16, 32, 64), 8, False, 64, 2, 4, (64, 128, 128), 32, 2),
    "small": Architecture((16, 32, 64), 8, False, 64, 2, 4, (32, 64, 64), 32, 2),
    # Only for tests: builds and trains in seconds, learns nothing useful.
    "tiny": Architecture((8, 16, 16), 8, False, 16, 1, 2, (16, 32, 32), 8, 2),
}


@dataclass
class PretrainConfig:
    out: Path
    seed: int = 0
    arch: str = "base"
    images: int = 12000
    motion_fraction: float = 0.3
    vae_steps: int = 2800
    vae_batch: int = 4
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6
    foreground_weight: float = 4.0
    structure_weight: float = 0.1
    unet_steps: int = 5000
    unet_batch: int = 16
    unet_lr: float = 8e-4
    weight_decay: float = 1e-2
    caption_dropout: float = 0.1
    offset_noise: float = 0.15
    high_noise_fraction: float = 0.3
    min_snr: float = 5.0
    ema_decay: float = 0.998
    minutes: float = 45.0
    threads: int = 2


# ----------------------------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of CLIP / GPT-2 byte-level BPE."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    codes = printable + [256 + i for i in range(len(others))]
    return {b: chr(c) for b, c in zip(printable + others, codes, strict=True)}


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one word: characters (the last one with '</w>'), lowest-ranked pair merged first."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        best = min(itertools.pairwise(parts), key=lambda pair: ranks.get(pair, math.inf))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def build_tokenizer(directory: Path, words: list[str], max_length: int = 77) -> CLIPTokenizer:
    """Write vocab.json / merges.txt in which every word is one token, and load them as a CLIPTokenizer.

    The vocabulary starts with CLIP's 512 byte-level symbols, so any other text still tokenizes (letter by
    letter). Merges are added one at a time, each taken from a word's current segmentation under all merges so
    far, so no merge can break another word's chain.
    """
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(parts := _bpe(word, ranks)) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            vocab.append(parts[0] + parts[1])
    vocab = list(dict.fromkeys(vocab)) + [BOS, EOS]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in ranks))
    tokenizer = CLIPTokenizer(
        vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"), model_max_length=max_length
    )
    for word in words:
        if len(tokenizer(word, add_special_tokens=False).input_ids) != 1:
            raise RuntimeError(f"tokenizer splits the world word {word!r}")
    return tokenizer


# ----------------------------------------------------------------------------------------------- models


def build_models(
    arch: Architecture, tokenizer: CLIPTokenizer
) -> tuple[AutoencoderKL, CLIPTextModel, UNet2DConditionModel]:
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(arch.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(arch.vae_channels),
        block_out_channels=arch.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=arch.vae_groups,
        mid_block_add_attention=arch.vae_attention,
        sample_size=world.SIZE,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=arch.text_hidden,
            intermediate_size=4 * arch.text_hidden,
            num_hidden_layers=arch.text_layers,
            num_attention_heads=arch.text_heads,
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=arch.text_hidden,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    levels = len(arch.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=world.SIZE // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        block_out_channels=arch.unet_channels,
        layers_per_block=1,
        norm_num_groups=arch.unet_groups,
        cross_attention_dim=arch.text_hidden,
        attention_head_dim=arch.unet_heads,
    )
    return vae, text_encoder, unet


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------- training


class ThreadGovernor:
    """Runs torch, within its `with` block, on `max_threads` while the machine's other cores are free, on fewer
    while others work; the process's own thread count again after it.

    A niced multi-threaded job stalls when one of its threads shares a core with someone else's busy process:
    every parallel region waits for the starved thread (measured here: 7.9 s per VAE step on two threads
    against 1.2 s on one). Every `every` steps this reads /proc/stat, subtracts this process's own CPU time
    and keeps one thread per core left free.
    """

    def __init__(self, max_threads: int, every: int = 20):
        self.max_threads, self.every = max_threads, every
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.mark = self._sample()
        self.callers_threads = torch.get_num_threads()

    def __enter__(self) -> ThreadGovernor:
        torch.set_num_threads(self.max_threads)
        return self

    def __exit__(self, *exc_info) -> None:
        """Give the process its thread count back: a caller in the same process (the test suite's fixture) would
        otherwise run on whatever the machine's load last left, and compute different floats."""
        torch.set_num_threads(self.callers_threads)

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        """(machine busy CPU seconds, this process's CPU seconds, wall seconds), or None off Linux."""
        try:
            values = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        except (OSError, ValueError):
            return None
        busy = sum(values) - values[3] - values[4]
        return busy / os.sysconf("SC_CLK_TCK"), time.process_time(), time.monotonic()

    def step(self, step: int) -> None:
        if self.max_threads == 1 or self.mark is None or step % self.every:
            return
        now = self._sample()
        busy, ours, wall = (a - b for a, b in zip(now, self.mark, strict=True))
        self.mark = now
        free = self.cores - max(0.0, busy - ours) / max(wall, 1e-6)
        torch.set_num_threads(max(1, min(self.max_threads, math.floor(free + 0.4))))


class Phase:
    """The steps of one training phase and their learning rate, planned in steps and bounded in time.

    Progress is the larger of (steps done / steps planned) and (time used / time allowed); the learning rate
    warms up linearly, then follows a cosine in progress down to `floor` of its peak. On an idle machine the
    steps decide and a run repeats from its seed (up to float rounding that differs between thread counts); on
    a busy one the clock decides, and the decay still completes, with fewer steps, instead of being cut off at
    a high learning rate.
    """

    def __init__(
        self,
        name: str,
        optimizer: torch.optim.Optimizer,
        steps: int,
        seconds: float,
        governor: ThreadGovernor,
        warmup: int,
        floor: float = 0.05,
    ):
        self.optimizer, self.steps, self.seconds, self.governor = optimizer, steps, seconds, governor
        self.warmup, self.floor = warmup, floor
        self.peaks = [group["lr"] for group in optimizer.param_groups]
        self.bar = tqdm(total=steps, desc=name, dynamic_ncols=True)
        self.steps_done = 0

    def __iter__(self):
        start = time.monotonic()
        for step in itertools.count():
            progress = max(step / self.steps, (time.monotonic() - start) / max(self.seconds, 1e-6))
            if progress >= 1.0:
                break
            self.governor.step(step)
            factor = (
                (step + 1) / self.warmup
                if step < self.warmup
                else self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
            )
            for group, peak in zip(self.optimizer.param_groups, self.peaks, strict=True):
                group["lr"] = peak * factor
            yield step
            self.steps_done = step + 1
            self.bar.update()
        self.bar.close()
        if self.steps_done < self.steps:
            print(f"{self.bar.desc}: time budget reached after {self.steps_done} of {self.steps} steps")

    def report(self, **values: str) -> None:
        lr = f"{self.optimizer.param_groups[0]['lr']:.2e}"
        self.bar.set_postfix(**values, lr=lr, threads=torch.get_num_threads())


def _foreground(images: np.ndarray) -> torch.Tensor:
    """[N, 1, H, W]: 1 where a pixel differs from its image's border colour (the object and its edge)."""
    border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1)
    background = np.median(border, axis=1)[:, None, None, :]
    mask = np.abs(images.astype(np.int16) - background).max(-1) > 12
    return torch.from_numpy(mask[:, None]).float()


def structure_target(images: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """[N, 1, *size]: what latent channel 0 is trained to hold: the object's cover of each latent cell, from
    -STRUCTURE_LEVEL (background) to +STRUCTURE_LEVEL (object), whatever the object's colour or the background."""
    cover = F.adaptive_avg_pool2d(_foreground(images), size)
    return STRUCTURE_LEVEL * (2.0 * cover - 1.0)


def train_vae(
    vae: AutoencoderKL,
    images: np.ndarray,
    cfg: PretrainConfig,
    generator: torch.Generator,
    governor: ThreadGovernor,
    seconds: float,
) -> dict:
    """L1 + MSE reconstruction (L1 keeps the flat-colour edges sharp) with a small KL term.

    The object covers 4-30% of a frame; its pixels weigh `1 + foreground_weight`, or the VAE spends its first
    hundreds of steps on the background and learns the object's colour last (measured: grey-green shapes).

    Latent channel 0 is also pulled (weight `structure_weight`) towards the object's cover of each latent cell
    (`structure_target`), the same for every colour and background. Left free, this small VAE marked the object
    along colour-specific latent directions (red and green on white: cosine -0.93 between their latent
    signatures), so an inverted clip's layout was tied to its colour; Tune-A-Video's edits from the inversion
    left the source path by 9 px on average, colour swaps between opposite colours by 16-19 px. With this channel
    every colour marks where the object is alike, and the shipped model's edits keep the path far better
    (benchmarks/README.md, edit quality).
    """
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    phase = Phase("vae", optimizer, cfg.vae_steps, seconds, governor, warmup=30)
    vae.train()
    for step in phase:
        chosen = images[torch.randint(len(images), (cfg.vae_batch,), generator=generator).numpy()]
        batch = frames_to_pixels(chosen)
        weight = 1.0 + cfg.foreground_weight * _foreground(chosen)
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        error = recon - batch
        l1, mse = (weight * error.abs()).mean(), (weight * error.square()).mean()
        structure = F.mse_loss(posterior.mean[:, :1], structure_target(chosen, posterior.mean.shape[-2:]))
        loss = l1 + mse + cfg.structure_weight * structure + cfg.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 10 == 0:
            phase.report(l1=f"{l1.item():.4f}")
    vae.eval()
    return {"vae_steps_done": phase.steps_done}


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Posterior means of all images; sets the VAE's scaling factor to 1 / their std (as SD does)."""
    means = [
        vae.encode(frames_to_pixels(images[i : i + batch])).latent_dist.mean for i in range(0, len(images), batch)
    ]
    latents = torch.cat(means)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return latents * vae.config.scaling_factor


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: np.ndarray) -> float:
    batch = frames_to_pixels(images)
    recon = vae.decode(vae.encode(batch).latent_dist.mean).sample.clamp(-1, 1)
    return 10 * math.log10(4.0 / F.mse_loss(recon, batch).item())


def latent_signature(vae: AutoencoderKL, colour: str, background: str) -> torch.Tensor:
    """[latent channels]: how `vae` marks an object of `colour` on `background`: the mean latent (posterior mean)
    inside a large centred circle minus the mean latent of the background around it."""
    size = world.SIZE / 4
    spec = world.ShapeSpec(colour, "circle", background, world.SIZE / 2, world.SIZE / 2, size,
                           fg_rgb=world.COLOURS[colour], bg_rgb=world.BACKGROUNDS[background])
    with torch.no_grad():
        latent = vae.encode(frames_to_pixels(world.render(spec)[None])).latent_dist.mean[0]
    factor = world.SIZE // latent.shape[-1]
    alpha = world.coverage("circle", world.SIZE / 2, world.SIZE / 2, size)
    cells = torch.from_numpy(alpha.reshape(latent.shape[-1], factor, latent.shape[-1], factor).mean((1, 3)))
    return latent[:, cells == 1].mean(1) - latent[:, cells == 0].mean(1)


class EMA:
    """Exponential moving average of parameters, with the usual (1 + t) / (10 + t) warm-up of the decay."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, modules: list[torch.nn.Module]) -> None:
        for target, value in zip([p for m in modules for p in m.parameters()], self.shadow, strict=True):
            target.copy_(value)


def train_unet(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    latents: torch.Tensor,
    token_ids: torch.Tensor,
    caption_index: torch.Tensor,
    empty_index: int,
    cfg: PretrainConfig,
    generator: torch.Generator,
    governor: ThreadGovernor,
    seconds: float,
) -> tuple[EMA, dict]:
    """Epsilon prediction with min-SNR weighting; the text encoder learns jointly; captions dropped (CFG).

    The noise gets a per-channel constant offset ("offset noise"). Without it the SD schedule leaves about 7%
    of the signal at t = 999, a flat background's mean latent shows through the noise, and the model learns to
    read the background from it instead of from the caption: sampling from pure noise then draws a random
    background (measured: 25% right at guidance 9). Offset noise alone only got that to 55%: the caption's
    background word matters only at the highest noise levels, where nothing else shows it, so a
    `high_noise_fraction` of each batch draws t from the top 20% of the schedule.
    """
    noise_scheduler = DDPMScheduler(**NOISE_SCHEDULE)
    steps = noise_scheduler.config.num_train_timesteps
    alphas_cumprod = noise_scheduler.alphas_cumprod
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    loss_weight = snr.clamp(max=cfg.min_snr) / snr

    modules = [unet, text_encoder]
    params = [p for m in modules for p in m.parameters()]
    decay, no_decay = [p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.unet_lr,
    )
    phase = Phase("unet", optimizer, cfg.unet_steps, seconds, governor, warmup=50)
    ema = EMA(modules, cfg.ema_decay)
    for m in modules:
        m.train()

    smoothed, first = None, None
    for step in phase:
        index = torch.randint(len(latents), (cfg.unet_batch,), generator=generator)
        captions = caption_index[index].clone()
        captions[torch.rand(cfg.unet_batch, generator=generator) < cfg.caption_dropout] = empty_index
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        noise += cfg.offset_noise * torch.randn((*x0.shape[:2], 1, 1), generator=generator)
        t = torch.randint(0, steps, (cfg.unet_batch,), generator=generator)
        high = torch.rand(cfg.unet_batch, generator=generator) < cfg.high_noise_fraction
        t = torch.where(high, torch.randint(int(0.8 * steps), steps, t.shape, generator=generator), t)
        context = text_encoder(token_ids[captions]).last_hidden_state
        prediction = unet(noise_scheduler.add_noise(x0, noise, t), t, context).sample
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (loss_weight[t] * per_sample).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.update(step)
        mse = per_sample.mean().item()
        smoothed = mse if smoothed is None else 0.98 * smoothed + 0.02 * mse
        first = smoothed if first is None else first
        if step % 10 == 0:
            phase.report(eps_mse=f"{smoothed:.4f}")
    for m in modules:
        m.eval()
    return ema, {"unet_steps_done": phase.steps_done, "eps_mse_first": first, "eps_mse_last": smoothed}


# ----------------------------------------------------------------------------------------------- saving


def ddim_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def save_pipeline(
    out: Path,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    tokenizer_files: Path,
    summary: dict,
) -> None:
    """Write an SD-1.x diffusers directory next to `out`, then move it into place.

    The UNet and VAE are stored in fp16 (diffusers loads them back as fp32); the small text encoder stays fp32
    because transformers would otherwise load it as fp16. vocab.json / merges.txt go next to tokenizer.json,
    as in a Stable Diffusion 1.x tokenizer folder; `summary` goes to pretrain_summary.json.
    """
    pipeline = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).half(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=copy.deepcopy(unet).half(),
        scheduler=ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    staging.chmod(0o755)
    pipeline.save_pretrained(staging, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_files / name, staging / "tokenizer" / name)
    (staging / "pretrain_summary.json").write_text(json.dumps(summary, indent=2))
    if out.exists():
        previous = out.with_name(f".{out.name}-previous")
        shutil.rmtree(previous, ignore_errors=True)
        out.rename(previous)
        staging.rename(out)
        shutil.rmtree(previous)
    else:
        staging.rename(out)


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------------------------- CLI


def pretrain(cfg: PretrainConfig) -> dict:
    """Train everything from scratch and save it to `cfg.out`; returns a summary."""
    start = time.monotonic()
    deadline = start + 60.0 * cfg.minutes
    with ThreadGovernor(cfg.threads) as governor:
        torch.manual_seed(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        arch = ARCHITECTURES[cfg.arch]

        print(f"data: {cfg.images} images (held out: {world.HELD_OUT})")
        images, captions = world.sample_dataset(cfg.images, seed=cfg.seed, motion_fraction=cfg.motion_fraction)
        unique = sorted(set(captions))
        caption_index = torch.tensor([unique.index(c) for c in captions])

        tokenizer_files = Path(tempfile.mkdtemp(prefix="shapes-tokenizer-"))
        tokenizer = build_tokenizer(tokenizer_files, world.vocabulary())
        token_ids = tokenizer(
            [*unique, ""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        vae, text_encoder, unet = build_models(arch, tokenizer)
        counts = {
            name: parameter_count(m) for name, m in [("vae", vae), ("text_encoder", text_encoder), ("unet", unet)]
        }
        print("parameters: " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in counts.items()))

        # The VAE gets at most a quarter of the budget; the UNet the rest, less a minute to save.
        stats = train_vae(vae, images, cfg, generator, governor, 15.0 * cfg.minutes)
        vae.requires_grad_(False)
        probe, _ = world.sample_dataset(256, seed=cfg.seed + 1, motion_fraction=0.0)
        stats["vae_psnr_db"] = reconstruction_psnr(vae, probe)
        latents = encode_latents(vae, images)
        stats["scaling_factor"] = vae.config.scaling_factor
        print(
            f"vae: {stats['vae_psnr_db']:.1f} dB PSNR, latents {tuple(latents.shape)}, "
            f"scaling factor {stats['scaling_factor']:.4f}"
        )

        ema, unet_stats = train_unet(
            unet,
            text_encoder,
            latents,
            token_ids,
            caption_index,
            len(unique),
            cfg,
            generator,
            governor,
            deadline - 60.0 - time.monotonic(),
        )
        stats.update(unet_stats)
        ema.copy_to([unet, text_encoder])
        stats.update(parameters=counts, minutes=(time.monotonic() - start) / 60.0)
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
        save_pipeline(cfg.out, vae, text_encoder, tokenizer, unet, tokenizer_files, {"config": config, **stats})
        shutil.rmtree(tokenizer_files)
    stats["size_bytes"] = directory_size(cfg.out)
    return stats


def main(argv: list[str] | None = None) -> None:
    defaults = PretrainConfig(out=Path("."))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (SD-1.x diffusers layout)")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default=defaults.arch)
    parser.add_argument(
        "--minutes",
        type=float,
        default=defaults.minutes,
        help="wall-clock budget; training stops early (and says so) if it runs out",
    )
    for name in ("seed", "images", "vae_steps", "vae_batch", "unet_steps", "unet_batch", "threads"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in (
        "motion_fraction",
        "vae_lr",
        "kl_weight",
        "foreground_weight",
        "structure_weight",
        "unet_lr",
        "weight_decay",
        "caption_dropout",
        "offset_noise",
        "high_noise_fraction",
        "min_snr",
        "ema_decay",
    ):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    cfg = PretrainConfig(**vars(parser.parse_args(argv)))
    stats = pretrain(cfg)
    print(
        f"saved {cfg.out} ({stats['size_bytes'] / 1e6:.1f} MB) in {stats['minutes']:.1f} min: "
        f"vae {stats['vae_steps_done']} steps, {stats['vae_psnr_db']:.1f} dB; "
        f"unet {stats['unet_steps_done']} steps, "
        f"eps-MSE {stats['eps_mse_first']:.3f} -> {stats['eps_mse_last']:.3f}"
    )


if __name__ == "__main__":
    main()
