"""The generation core: DDIM inversion of the source clip, then DDIM sampling with classifier-free guidance,
window by window for videos longer than the engine's 8 frames. Written once; the Python API, `tav-generate-local`
and the gRPC server all run this loop, against any `Engines`.

Long videos (DESIGN.md section 5). The UNet always sees 8 frames. The first window generates frames 0-7. Every
later window holds, in order: the anchor (frame 0) in slot 0, then context frames (already generated, the most
recent ones), then new frames. One context frame is enough for sparse-causal attention to be exact for the new
frames: the first new frame's "former frame" is the most recent generated frame and every frame's "first frame"
is the anchor, just as if the whole video were one sequence. So windows carry one context frame and six new
ones; the last window takes more context frames instead of padding, so every slot holds a real frame. At each
denoising step the anchor and context slots are reset to the latents those frames had at that same step when
they were generated, so the new frames attend to their true first and former frames' features; the context
slots' own outputs are discarded. Inversion of a long source clip runs through the same windows.

Feature reuse (`cache_interval` N > 1, DeepCache-style; docs/ARCHITECTURE.md, "Feature reuse"): in each window
the full UNet runs on sampling steps 0, N, 2N, ... and keeps its branch features; the steps between run only the
shallow layers on the kept features. Never in the inversion: it stays the exact DDIM inversion, so its cache holds
whatever the interval.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from server.engines.base import LoadedModel, Unsupported
from tuner.components import frames_to_pixels, pixels_to_frames, tokenize
from tuner.video_io import MAX_DECODED_PIXELS, VideoError, probe_video, read_video

MAX_FRAMES = 128
MAX_STEPS = 200
MIN_GUIDANCE, MAX_GUIDANCE = 1.0, 30.0
MAX_PROMPT_CHARS = 1000
MAX_SOURCE_BYTES = 64 * 1024 * 1024
MAX_SOURCE_PIXELS = MAX_DECODED_PIXELS  # frames x width x height a source clip may decode to
MAX_SEED = 2**63 - 1
MAX_CACHE_INTERVAL = 10
ProgressFn = Callable[[str, int, int], None]  # (phase, step, total)


class InvalidRequest(ValueError):
    """A request option outside its bounds; `field` names the option."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class Cancelled(Exception):
    """The caller cancelled the generation (checked before every UNet call)."""


@dataclass
class GenerationOptions:
    prompt: str
    negative_prompt: str = ""
    frames: int = 8
    steps: int | None = None  # None: the model's recommended value
    guidance: float | None = None
    seed: int | None = None  # None: drawn at random and reported
    invert: bool = True
    source_video: bytes | None = None  # an encoded clip to invert instead of the model's own source
    cache_interval: int = 1  # full UNet every N-th sampling step, the shallow part between; 1: off


@dataclass
class GenerationResult:
    frames: np.ndarray  # uint8 [F, H, W, 3]
    fps: float
    seed: int
    steps: int
    guidance: float
    prompt_truncated: bool
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase, and "total"
    cache_interval: int = 1


@dataclass(frozen=True)
class Window:
    frames: tuple[int, ...]  # the video frame held in each slot
    new: tuple[int, ...]  # the slots this window generates; the others are anchor and context


def plan_windows(total: int, slots: int = 8) -> list[Window]:
    """Cover frames 0..total-1 (total >= slots) with windows of `slots` frames; see the module docstring."""
    if total < slots:
        raise ValueError(f"plan_windows needs at least {slots} frames, got {total}")
    windows = [Window(tuple(range(slots)), tuple(range(slots)))]
    done = slots
    while done < total:
        new = min(slots - 2, total - done)
        context = slots - 1 - new
        frames = (0, *range(done - context, done), *range(done, done + new))
        windows.append(Window(frames, tuple(range(1 + context, slots))))
        done += new
    return windows


class InversionCache:
    """Inverted latents by (model, source clip, steps, size, frames), least recently used out past `max_bytes`."""

    def __init__(self, max_bytes: int = 512 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
            return self._entries[key]

    def put(self, key: tuple, latents: torch.Tensor) -> None:
        size = latents.numel() * latents.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            self._entries[key] = latents
            self._entries.move_to_end(key)
            while sum(t.numel() * t.element_size() for t in self._entries.values()) > self.max_bytes:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def check_options(options: GenerationOptions) -> None:
    """The checks that need no model: sizes first, so an oversized field costs nothing before it is refused."""
    for name in ("prompt", "negative_prompt"):
        value = getattr(options, name)
        if not isinstance(value, str):
            raise InvalidRequest(name, "must be a string")
        if len(value) > MAX_PROMPT_CHARS:
            raise InvalidRequest(name, f"must be at most {MAX_PROMPT_CHARS} characters")
    if not options.prompt.strip():
        raise InvalidRequest("prompt", "must not be empty")
    if not 1 <= options.frames <= MAX_FRAMES:
        raise InvalidRequest("frames", f"must be between 1 and {MAX_FRAMES}, got {options.frames}")
    if options.steps is not None and not 1 <= options.steps <= MAX_STEPS:
        raise InvalidRequest("steps", f"must be between 1 and {MAX_STEPS}, got {options.steps}")
    if options.guidance is not None and not MIN_GUIDANCE <= options.guidance <= MAX_GUIDANCE:
        raise InvalidRequest("guidance", f"must be between {MIN_GUIDANCE:g} and {MAX_GUIDANCE:g}, got "
                                         f"{options.guidance}")
    if options.seed is not None and not 0 <= options.seed <= MAX_SEED:
        raise InvalidRequest("seed", f"must be between 0 and {MAX_SEED}")
    if not (isinstance(options.cache_interval, int) and 1 <= options.cache_interval <= MAX_CACHE_INTERVAL):
        raise InvalidRequest("cache_interval", f"must be between 1 and {MAX_CACHE_INTERVAL}, got "
                                               f"{options.cache_interval!r}")
    if options.source_video is not None:
        if len(options.source_video) > MAX_SOURCE_BYTES:
            raise InvalidRequest("source_video", f"must be at most {MAX_SOURCE_BYTES // 2**20} MiB")
        if not options.invert:
            raise InvalidRequest("source_video", "is only used with inversion (invert = true)")


def check_source_video(video: bytes) -> None:
    """Refuse a source clip that cannot be decoded within the bounds, decoding its first frame only."""
    try:
        probe_video(video, max_frames=MAX_FRAMES, max_pixels=MAX_SOURCE_PIXELS)
    except VideoError as e:
        raise InvalidRequest("source_video", str(e)) from e


def resolve(options: GenerationOptions, model: LoadedModel) -> GenerationOptions:
    """Check every option against its bounds (InvalidRequest names the field) and fill in the defaults;
    Unsupported when the model's backend cannot serve the cache interval, or it has no source to invert."""
    check_options(options)
    steps = model.defaults.get("steps", 50) if options.steps is None else options.steps
    guidance = model.defaults.get("guidance", 12.5) if options.guidance is None else options.guidance
    seed = secrets.randbelow(MAX_SEED + 1) if options.seed is None else options.seed
    engines = model.engines
    if options.cache_interval > 1 and (reason := engines.cache_unsupported()) is not None:
        raise Unsupported(f"cache_interval: {reason}")
    latents = model.source.latents if model.source.latents is not None else model.source.inverted
    if latents is not None and (latents.shape[0] != engines.latent_shape[0]
                                or tuple(latents.shape[2:]) != tuple(engines.latent_shape[1:])):
        raise InvalidRequest("model", f"source latents {tuple(latents.shape)} do not fit the engine's "
                                      f"latent shape {engines.latent_shape}")
    if options.invert and options.source_video is None and model.source.kind == "none":
        raise Unsupported("invert: this model has no source clip to invert (it was imported without one): send "
                          "source_video, or set invert = false to generate from noise")
    return GenerationOptions(options.prompt, options.negative_prompt, options.frames, int(steps), float(guidance),
                             int(seed), options.invert, options.source_video, options.cache_interval)


class Generator:
    """Runs generations for one loaded model; share an `InversionCache` between generators to reuse inversions."""

    def __init__(self, model: LoadedModel, cache: InversionCache | None = None) -> None:
        self.model = model
        self.engines = model.engines
        self.cache = cache if cache is not None else InversionCache()

    def generate(
        self,
        options: GenerationOptions,
        progress: ProgressFn | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Generate and decode a video."""
        opts = resolve(options, self.model)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        latents, truncated = self.generate_latents(opts, progress, cancelled, timings)
        clock = time.perf_counter()
        frames = self._decode(latents[:, :, : opts.frames])
        timings["decode"] = time.perf_counter() - clock
        timings["total"] = time.perf_counter() - started
        return GenerationResult(frames, self.model.fps, opts.seed, opts.steps, opts.guidance, truncated, timings,
                                opts.cache_interval)

    def generate_latents(
        self,
        options: GenerationOptions,
        progress: ProgressFn | None = None,
        cancelled: Callable[[], bool] | None = None,
        timings: dict[str, float] | None = None,
    ) -> tuple[torch.Tensor, bool]:
        """The sampled latents `[1, C, max(frames, 8), h, w]` (scaled) and whether the prompt was truncated."""
        opts = resolve(options, self.model)
        self._progress = progress or (lambda phase, step, total: None)
        self._cancelled = cancelled or (lambda: False)
        timings = {} if timings is None else timings
        clock = time.perf_counter()

        def lap(phase: str) -> None:
            nonlocal clock
            if self.engines.device.type == "cuda":
                torch.cuda.synchronize(self.engines.device)  # GPU work is asynchronous: charge it to its phase
            now = time.perf_counter()
            timings[phase] = timings.get(phase, 0.0) + now - clock
            clock = now

        cond, truncated = self._encode_text(opts.prompt)
        uncond, _ = self._encode_text(opts.negative_prompt)
        lap("text")
        total = max(opts.frames, self.engines.frames)
        c, h, w = self.engines.latent_shape
        generator = torch.Generator().manual_seed(opts.seed)
        noise = torch.randn((1, c, total, h, w), generator=generator).to(self.engines.device)
        start = noise * DDIMScheduler.from_config(self.model.scheduler_config).init_noise_sigma
        if opts.invert and opts.source_video is None and self.model.source.kind == "inverted":
            inverted = self.model.source.inverted[:, :total][None].to(self.engines.device)
            start[:, :, : inverted.shape[2]] = inverted  # inverted once, at the model's own step count
        elif opts.invert:
            source, source_hash = self._source(opts.source_video)
            lap("encode")
            inverted = self._invert(source, source_hash, opts.steps, total)
            start[:, :, : inverted.shape[2]] = inverted
            lap("invert")
        sampler = DDIMScheduler.from_config(self.model.scheduler_config)
        sampler.set_timesteps(opts.steps)
        text = torch.cat([uncond, cond]) if opts.guidance > 1 else cond
        latents = self._denoise(start, sampler, text, opts.guidance, "sample", opts.cache_interval)
        lap("sample")
        return latents, truncated

    def invert_source(self, steps: int, frames: int) -> torch.Tensor:
        """The model's source clip, its first `frames` frames DDIM-inverted at `steps` steps (empty prompt, no
        guidance), `[1, C, frames, h, w]`: what an edit from the inversion starts from."""
        self._progress = lambda phase, step, total: None
        self._cancelled = lambda: False
        if self.model.source.latents is None:
            raise Unsupported("the model holds no source clip to invert")
        return self._invert(self.model.source.latents, self.model.source_hash, steps, frames)

    def _encode_text(self, prompt: str) -> tuple[torch.Tensor, bool]:
        ids, truncated = tokenize(self.model.tokenizer, prompt)
        return self.engines.encode_text(ids).float(), truncated

    def _source(self, video: bytes | None) -> tuple[torch.Tensor, str]:
        """Scaled latents `[C, N, h, w]` of the clip to invert, and its content hash."""
        if video is None:
            return self.model.source.latents, self.model.source_hash
        height, width = self.model.pixel_size
        try:
            frames = read_video(video, MAX_FRAMES, MAX_SOURCE_PIXELS, (width, height), self._stop_if_cancelled).frames
        except VideoError as e:
            raise InvalidRequest("source_video", str(e)) from e
        latents = [self.engines.encode_image(frames_to_pixels(frame[None])) for frame in frames]
        scaled = torch.cat(latents).float().transpose(0, 1) * self.model.scaling_factor
        return scaled.cpu(), hashlib.sha256(video).hexdigest()

    def _stop_if_cancelled(self) -> None:
        if self._cancelled():
            raise Cancelled("cancelled while decoding the source clip")

    def _invert(self, source: torch.Tensor, source_hash: str, steps: int, total: int) -> torch.Tensor:
        """DDIM-invert up to `total` frames of the source (empty prompt, no guidance), through the cache."""
        count = min(total, source.shape[1])
        key = (self.model.model_hash, source_hash, steps, tuple(source.shape[2:]), count)
        cached = self.cache.get(key)
        if cached is not None:
            return cached.to(self.engines.device)
        clip = source[:, :count]
        if count < self.engines.frames:  # a source shorter than the engine: repeat its last frame
            clip = torch.cat([clip, clip[:, -1:].expand(-1, self.engines.frames - count, -1, -1)], dim=1)
        inverse = DDIMInverseScheduler.from_config(self.model.scheduler_config)
        inverse.set_timesteps(steps)
        empty, _ = self._encode_text("")
        inverted = self._denoise(clip[None].to(self.engines.device), inverse, empty, 1.0, "invert")
        inverted = inverted[:, :, :count]
        self.cache.put(key, inverted.cpu())
        return inverted

    def _denoise(
        self, x: torch.Tensor, scheduler, text: torch.Tensor, guidance: float, phase: str, cache_interval: int = 1
    ) -> torch.Tensor:
        """Step `x` `[1, C, N, h, w]` through all of `scheduler`'s timesteps, window by window; with
        `cache_interval` > 1 the full UNet runs on every `cache_interval`-th step of a window, the shallow part on
        the branch features it kept in between."""
        plan = plan_windows(x.shape[2], self.engines.frames)
        reused = {w.frames[s] for w in plan for s in range(len(w.frames)) if s not in w.new}
        history: dict[int, list[torch.Tensor]] = {}  # frame -> its latents at every step, for reused frames
        out = x.clone()
        # on the engines' device once: a tensor made from a Python float each step would be a host sync per step
        timesteps = scheduler.timesteps.to(self.engines.device, torch.float32)
        total, done = len(plan) * len(scheduler.timesteps), 0
        for window in plan:
            latents = x[:, :, list(window.frames)].clone()
            known = [s for s in range(len(window.frames)) if s not in window.new]
            branch = None  # the features the last full pass of this window kept
            for step, t in enumerate(scheduler.timesteps):
                if self._cancelled():
                    raise Cancelled(f"cancelled during {phase} at step {done} of {total}")
                for slot in known:
                    latents[:, :, slot] = history[window.frames[slot]][step]
                for slot in window.new:
                    if window.frames[slot] in reused:
                        history.setdefault(window.frames[slot], []).append(latents[:, :, slot].clone())
                timestep = timesteps[step : step + 1]
                if cache_interval == 1:
                    prediction, _ = self._predict(latents, timestep, text, guidance)
                elif step % cache_interval == 0:
                    prediction, branch = self._predict(latents, timestep, text, guidance, keep=True)
                else:
                    prediction, _ = self._predict(latents, timestep, text, guidance, branch=branch)
                latents = scheduler.step(prediction, t, latents).prev_sample
                done += 1
                self._progress(phase, done, total)
            for slot in window.new:
                out[:, :, window.frames[slot]] = latents[:, :, slot]
        return out

    def _predict(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, guidance: float,
                 branch: torch.Tensor | None = None, keep: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The UNet's prediction at `timestep` (float32 `[1]`); with guidance > 1, one batch-2 call for the
        unconditional and conditional. With `keep`, also the branch features of the pass; with `branch`, only the
        shallow pass from such features."""
        if guidance > 1:
            latents = torch.cat([latents, latents])
        else:
            text = text[-1:]
        out = self.engines.unet(latents, timestep, text, branch=branch, return_branch=keep)
        out, features = out if keep else (out, None)
        if guidance <= 1:
            return out, features
        uncond, cond = out.chunk(2)
        return uncond + guidance * (cond - uncond), features

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        """Decode frame by frame (bounded memory) to uint8 `[F, H, W, 3]`."""
        frames = []
        for i in range(latents.shape[2]):
            if self._cancelled():
                raise Cancelled("cancelled during decode")
            pixels = self.engines.decode_latents(latents[:, :, i] / self.model.scaling_factor)
            frames.append(pixels_to_frames(pixels))
            self._progress("decode", i + 1, latents.shape[2])
        return np.concatenate(frames)
