"""The model repository and the one bounded cache of ready engines that every request goes through.

A repository is a directory of tuned model directories named by their ids; dot-names (the shared engine store
`.engines/`, a tuner's half-written `.name.tmp-*`) are never models. `ModelRegistry.scan` lists what can be
served and why the rest cannot; loading, warming and evicting engines happen only on the worker thread (the
one that owns the engines), least recently used out once the loaded models pass `max_bytes`. A model whose
engines are missing, broken or mismatched is skipped and reported, never fatal.

Each loaded model keeps a measured cost (seconds per UNet call, per decoded frame) so the server can tell,
while draining, whether a queued request still finishes within the grace period.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from transformers import CLIPTokenizer

from server.engines import load_model
from server.engines.base import UNET_BATCHES, UNET_FRAMES, LoadedModel
from server.generate import (
    MAX_FRAMES,
    GenerationOptions,
    GenerationResult,
    Generator,
    InvalidRequest,
    InversionCache,
    plan_windows,
)
from tuner.artefacts import ADAPTER_FILE, ArtefactError, TunedModel

log = logging.getLogger(__name__)

MODEL_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
ENGINE_MANIFEST = Path("engines") / "manifest.json"


class ModelUnavailable(Exception):
    """A model that cannot be served (unknown, or its engines failed to load)."""


def check_model_id(model_id: str, field_name: str = "model") -> None:
    """Raise InvalidRequest unless `model_id` is a model id: a plain name, never a path."""
    if not MODEL_ID.fullmatch(model_id):
        raise InvalidRequest(field_name, f"{model_id[:80]!r} is not a model id ({MODEL_ID.pattern})")


def available_backends(run: Path) -> list[str]:
    """Backends a tuned model directory has engines for: torch always (it runs the tuned weights directly), and
    those its engine manifest lists (`tav-export`: onnxruntime; `--tensorrt`: tensorrt; `--aoti`: aoti)."""
    manifest = run / ENGINE_MANIFEST
    if not manifest.is_file():
        return ["torch"]
    try:
        listed = json.loads(manifest.read_text()).get("backends", [])
    except (OSError, ValueError, AttributeError):
        listed = []  # a broken manifest is reported when the engines load
    return ["torch", *dict.fromkeys(b for b in listed if b != "torch")]


def model_bytes(model: LoadedModel, run: Path) -> int:
    """Memory a loaded model adds: its adapter tensors and source latents. The base graphs or modules it runs are
    shared by every model of the same base (the engines load them once per process), so they do not count."""
    latents = model.source_latents
    return (run / ADAPTER_FILE).stat().st_size + latents.numel() * latents.element_size()


@dataclass
class Cost:
    """Measured seconds per UNet call and per decoded frame, to estimate how long a request will run."""

    per_call: float
    per_frame: float

    def estimate(self, options: GenerationOptions, default_steps: int) -> float:
        steps = options.steps if options.steps is not None else default_steps
        frames = min(options.frames, MAX_FRAMES)  # options not yet checked fail fast, but must not plan forever
        windows = len(plan_windows(max(frames, UNET_FRAMES), UNET_FRAMES))
        calls = steps * windows * (2 if options.invert else 1)
        return calls * self.per_call + frames * self.per_frame

    def observe(self, result: GenerationResult) -> None:
        """Blend in a finished generation's timings."""
        windows = len(plan_windows(max(len(result.frames), UNET_FRAMES), UNET_FRAMES))
        self.per_call = 0.5 * self.per_call + 0.5 * result.timings["sample"] / (result.steps * windows)
        self.per_frame = 0.5 * self.per_frame + 0.5 * result.timings["decode"] / len(result.frames)


@dataclass
class ModelEntry:
    """A servable model of the repository; `tokenizer` (a private copy, for the request thread) once loaded."""

    id: str
    path: Path
    config: dict
    backends: list[str]
    tokenizer: CLIPTokenizer | None = None
    cost: Cost | None = None
    defaults: dict = field(default_factory=dict)

    @property
    def profiles(self) -> list[tuple[int, int, int, int]]:
        """The UNet shapes (batch, frames, latent height, latent width) the model's engines serve."""
        return [(batch, UNET_FRAMES, self.config["latent_height"], self.config["latent_width"])
                for batch in UNET_BATCHES]


def _signature(path: Path) -> tuple:
    """Size and modification time of a model's files: whether it changed since it failed to load."""
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file())


class ModelRegistry:
    """The models of a repository and the bounded cache of their ready `Generator`s (one per model, all sharing
    one `InversionCache`)."""

    def __init__(
        self,
        repo: str | Path,
        backend: str = "torch",
        device: str | None = None,
        max_bytes: int = 16 * 2**30,
        cache: InversionCache | None = None,
    ) -> None:
        self.repo = Path(repo)
        self.backend = backend
        self.device = device
        self.max_bytes = max_bytes
        self.cache = cache if cache is not None else InversionCache()
        self.models: dict[str, ModelEntry] = {}
        self.skipped: dict[str, str] = {}
        self._ready: OrderedDict[str, Generator] = OrderedDict()  # least recently used first
        self._bytes: dict[str, int] = {}
        self._lock = threading.Lock()
        self._scanned = 0.0
        self._failed: dict[str, tuple[tuple, str]] = {}  # model -> (its files' signature, why it failed to load)
        self.scan()

    def scan(self) -> None:
        """List the repository: every non-dot subdirectory is a model or a skipped entry with its reason. Run
        again while serving, it picks up added models and drops removed ones (a request already holding a
        removed model's engines finishes; later ones get NOT_FOUND)."""
        if not self.repo.is_dir():
            raise FileNotFoundError(f"model repository {self.repo} is not a directory")
        models: dict[str, ModelEntry] = {}
        skipped: dict[str, str] = {}
        for path in sorted(self.repo.iterdir()):
            name = path.name
            if name.startswith(".") or not path.is_dir():
                continue
            if not MODEL_ID.fullmatch(name):
                skipped[name] = f"not a model id ({MODEL_ID.pattern})"
                continue
            try:
                tuned = TunedModel.open(path)
            except ArtefactError as e:
                skipped[name] = str(e)
                continue
            backends = available_backends(path)
            if self.backend not in backends:
                skipped[name] = f"no {self.backend} engines (run tav-export)"
                continue
            failed = self._failed.get(name)
            if failed is not None and failed[0] == _signature(path):
                skipped[name] = failed[1]  # its engines failed to load and nothing changed since
                continue
            known = self.models.get(name)
            if known is not None and known.config == tuned.config:
                models[name] = known  # unchanged: keep its measured cost and tokenizer
            else:
                models[name] = ModelEntry(name, path, tuned.config, backends,
                                          defaults=dict(tuned.config.get("recommended", {})))
        with self._lock:
            for name, reason in skipped.items():
                if self.skipped.get(name) != reason:
                    log.warning("model %s skipped: %s", name, reason)
            for name in set(self.models) - set(models) - set(skipped):
                log.info("model %s removed from the repository", name)
            self.models, self.skipped = models, skipped
            self._scanned = time.monotonic()

    def rescan(self, min_interval: float = 1.0) -> None:
        """`scan` again unless the last scan is more recent than `min_interval` seconds."""
        if time.monotonic() - self._scanned >= min_interval:
            self.scan()

    def _skip(self, name: str, reason: str, exc_info: bool = False) -> None:
        """Take a model whose engines failed to load out of service until its files change."""
        log.warning("model %s skipped: %s", name, reason, exc_info=exc_info)
        with self._lock:
            entry = self.models.pop(name, None)
            self.skipped[name] = reason
            if entry is not None:
                self._failed[name] = (_signature(entry.path), reason)

    def entry(self, model_id: str) -> ModelEntry:
        """The servable model `model_id`, or ModelUnavailable saying why not (after a fresh look at the
        repository for an id it does not know)."""
        if model_id not in self.models:
            self.rescan()
        with self._lock:
            if model_id in self.models:
                return self.models[model_id]
            reason = self.skipped.get(model_id)
        raise ModelUnavailable(f"model {model_id!r} is " + (f"not available: {reason}" if reason else "unknown"))

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return list(self.models.values())

    def ready(self, model_id: str) -> LoadedModel | None:
        """The loaded model if its engines are in the cache (a read-only peek: no loading, no reordering)."""
        generator = self._ready.get(model_id)
        return generator.model if generator else None

    def estimate(self, model_id: str, options: GenerationOptions) -> float | None:
        """Seconds a generation would run, or None before the model has been measured."""
        entry = self.models.get(model_id)
        if entry is None or entry.cost is None:
            return None
        return entry.cost.estimate(options, entry.defaults.get("steps", 50))

    def observe(self, model_id: str, result: GenerationResult) -> None:
        entry = self.models.get(model_id)
        if entry is not None and entry.cost is not None:
            entry.cost.observe(result)

    # The methods below run on the worker thread only.

    def warm(self) -> None:
        """Load and warm the models in id order while they fit in `max_bytes`; the rest load on demand."""
        for entry in self.entries():
            try:
                self.load(entry.id)
            except ModelUnavailable:
                continue
            if sum(self._bytes.values()) > self.max_bytes:
                self._unload(entry.id)
                log.info("engine cache full: %s and later models load on first use", entry.id)
                return

    def load(self, model_id: str) -> Generator:
        """The model's generator, loading and warming its engines first if needed (least recently used out)."""
        entry = self.entry(model_id)
        if model_id in self._ready:
            self._ready.move_to_end(model_id)
            return self._ready[model_id]
        try:
            model = load_model(entry.path, self.backend, self.device, model_id)
            generator = Generator(model, self.cache)
            entry.cost = self._warm_up(generator, entry)
        except Exception as e:  # missing, broken or mismatched engines: skip this model, keep serving the others
            self._skip(model_id, f"engines failed to load: {type(e).__name__}: {e}", exc_info=True)
            raise ModelUnavailable(f"model {model_id!r} is not available: {self.skipped[model_id]}") from e
        if entry.tokenizer is None:
            entry.tokenizer = copy.deepcopy(model.tokenizer)
        entry.defaults = dict(model.defaults)
        self._bytes[model_id] = model_bytes(model, entry.path)
        self._ready[model_id] = generator
        while len(self._ready) > 1 and sum(self._bytes.values()) > self.max_bytes:
            self._unload(next(iter(self._ready)))
        log.info("model %s ready (%s, %.1f MB)", model_id, self.backend, self._bytes[model_id] / 1e6)
        return generator

    def _unload(self, model_id: str) -> None:
        self._ready.pop(model_id)
        self._bytes.pop(model_id)
        log.info("model %s unloaded from the engine cache", model_id)

    @staticmethod
    def _warm_up(generator: Generator, entry: ModelEntry) -> Cost:
        """One short generation through every engine (UNet at batch 1 and 2, VAE decoder); returns its cost."""
        options = GenerationOptions(entry.config["prompt"], steps=1, guidance=2.0, seed=0, invert=True)
        result = generator.generate(options)
        per_call = max(result.timings["invert"], result.timings["sample"])
        return Cost(per_call, result.timings["decode"] / len(result.frames))
