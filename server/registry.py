"""The model repository and the one bounded cache of ready engines that every request goes through.

A repository is a directory of tuned model directories named by their ids; dot-names (the shared engine store
`.engines/`, a tuner's half-written `.name.tmp-*`) are never models. `ModelRegistry.scan` lists what can be
served and why the rest cannot. It runs off the event loop, in the background every few seconds and when a
request names an id it does not know (unless a scan started after the request came: concurrent requests share
it), so the served view follows the disk:

- every file a model is listed by (`tav_config.json`, `engines/manifest.json`) is read through the artefact
  format's checked readers; a broken one is one skipped model with a reason naming the file, never an error for
  anyone else. Files are read again only when their stat (inode, size, mtime) changed, so a scan of a large
  repository is mostly `stat` calls;
- a model's identity is the content of those two files, which carry the hashes of its adapter, base and graphs:
  a model re-tuned or re-exported in place, or deleted and re-created with other weights, is a new identity, and
  its old engines leave the cache; a model gone from the disk leaves the cache too (a request already holding
  its engines finishes). Shared bases are held weakly by the engines, so the last model of a base to go frees it.

Loading and warming happen only on the worker thread (the one that owns the engines), least recently used out
once the loaded models pass `max_bytes`. A model whose engines fail to load is skipped until its files change.
Each loaded model keeps a measured cost (seconds per UNet call, per decoded frame) so the server can tell, while
draining, whether a queued request still finishes within the grace period.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

from transformers import CLIPTokenizer

from server.engines import load_model, supports_cache_interval
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
from tuner.artefacts import (
    ADAPTER_FILE,
    CONFIG_FILE,
    ENGINE_DIR,
    MANIFEST_FILE,
    ArtefactError,
    EngineDir,
    TunedModel,
)

log = logging.getLogger(__name__)

MODEL_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


class ModelUnavailable(Exception):
    """A model that cannot be served (unknown, or its engines failed to load)."""


def check_model_id(model_id: str, field_name: str = "model") -> None:
    """Raise InvalidRequest unless `model_id` is a model id: a plain name, never a path."""
    if not MODEL_ID.fullmatch(model_id):
        raise InvalidRequest(field_name, f"{model_id[:80]!r} is not a model id ({MODEL_ID.pattern})")


def model_bytes(model: LoadedModel, run: Path) -> int:
    """Memory a loaded model adds: its adapter tensors (a LoRA model's factors) and source latents. The base graphs or
    modules it runs, a LoRA base's W0 and the tokenizer are shared by every model of the same base (the engines load
    them once per process), so they do not count."""
    return (run / ADAPTER_FILE).stat().st_size + model.source.nbytes


def full_steps(steps: int, cache_interval: int) -> int:
    """Sampling steps of a window that run the full UNet (the others run its shallow part)."""
    return -(-steps // max(cache_interval, 1))


@dataclass
class Cost:
    """Measured seconds per UNet call and per decoded frame, and a shallow pass's share of a full call's time
    (feature reuse, `cache_interval` > 1), to estimate how long a request will run. The share starts at 1, never
    an under-estimate, and is learned from the requests that reuse features."""

    per_call: float
    per_frame: float
    shallow_share: float = 1.0

    def estimate(self, options: GenerationOptions, default_steps: int) -> float:
        steps = options.steps if options.steps is not None else default_steps
        frames = min(options.frames, MAX_FRAMES)  # options not yet checked fail fast, but must not plan forever
        windows = len(plan_windows(max(frames, UNET_FRAMES), UNET_FRAMES))
        full = full_steps(steps, options.cache_interval)
        calls = windows * (full + self.shallow_share * (steps - full) + (steps if options.invert else 0))
        return calls * self.per_call + frames * self.per_frame

    def observe(self, result: GenerationResult) -> None:
        """Blend in a finished generation's timings: the time per call from a request without feature reuse,
        the shallow share from one with it."""
        windows = len(plan_windows(max(len(result.frames), UNET_FRAMES), UNET_FRAMES))
        per_window = result.timings["sample"] / windows
        full = full_steps(result.steps, result.cache_interval)
        if full == result.steps:
            self.per_call = 0.5 * self.per_call + 0.5 * per_window / result.steps
        else:
            share = (per_window / self.per_call - full) / (result.steps - full)
            self.shallow_share = 0.5 * self.shallow_share + 0.5 * min(max(share, 0.05), 1.0)
        self.per_frame = 0.5 * self.per_frame + 0.5 * result.timings["decode"] / len(result.frames)


@dataclass
class ModelEntry:
    """A servable model of the repository; `tokenizer` (a private copy, for the request thread) once loaded."""

    id: str
    path: Path
    config: dict
    backends: list[str]
    identity: str  # the content of its tav_config.json and engines/manifest.json, hashed
    base: str  # the base model's name
    tokenizer: CLIPTokenizer | None = None
    cost: Cost | None = None
    cache_supported: bool = False  # the backend serves cache_interval > 1 for it
    defaults: dict = field(default_factory=dict)

    @property
    def profiles(self) -> list[tuple[int, int, int, int]]:
        """The UNet shapes (batch, frames, latent height, latent width) the model's engines serve."""
        return [(batch, UNET_FRAMES, self.config["latent_height"], self.config["latent_width"])
                for batch in UNET_BATCHES]


def read_entry(path: Path, backend: str) -> ModelEntry:
    """The repository entry of the tuned model directory `path` for `backend`; ArtefactError says why it cannot be
    served. Backends: torch always (it runs the tuned weights directly), and those `tav-export` listed in the
    engine manifest."""
    tuned = TunedModel.open(path)
    manifest = None
    if (path / ENGINE_DIR / MANIFEST_FILE).exists():
        try:
            manifest = EngineDir.open(path / ENGINE_DIR).manifest
        except ArtefactError:
            if backend != "torch":  # the torch backend does not read the engines
                raise
    backends = ["torch", *dict.fromkeys(manifest["backends"] if manifest else ())]
    if backend not in backends:
        if manifest is None:
            raise ArtefactError(f"no {backend} engines (run tav-export)")
        export = {"onnxruntime": "onnx"}.get(backend, backend)
        raise ArtefactError(f"no {backend} engines: it was exported for {', '.join(backends[1:])} only (tune "
                            f"workers export what their --export names: add {export}; or run tav-export)")
    identity = hashlib.sha256(json.dumps([tuned.config, manifest], sort_keys=True).encode()).hexdigest()
    return ModelEntry(path.name, path, tuned.config, backends, identity, tuned.base_id,
                      defaults=dict(tuned.config.get("recommended", {})),
                      cache_supported=supports_cache_interval(backend, manifest))


def _stat(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _listing_signature(path: Path) -> tuple:
    """What a model is listed by: the stat of its directory's two JSON files."""
    return _stat(path / CONFIG_FILE), _stat(path / ENGINE_DIR / MANIFEST_FILE)


def _files_signature(path: Path) -> tuple:
    """Size and modification time of all of a model's files: whether it changed since its engines failed to load."""
    signature = []
    for root, _, names in os.walk(path):
        signature += [(os.path.join(root, name), _stat(Path(root, name))) for name in sorted(names)]
    return tuple(signature)


def client_reason(error: Exception) -> str:
    """Why a model's engines failed to load, as a client may read it: the artefact's own message (it names the
    file relative to the model), else no detail (paths and exception types stay in the log)."""
    if isinstance(error, ArtefactError):
        return f"engines failed to load: {error}"
    return "engines failed to load (details in the server log)"


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
        compile_mode: str | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        self.repo = Path(repo)
        if not self.repo.is_dir():
            raise FileNotFoundError(f"model repository {self.repo} is not a directory")
        self.backend = backend
        self.device = device
        self.compile_mode = compile_mode  # torch: the UNet compiled (`torch.compile` mode), None: eager
        self.cuda_graphs = cuda_graphs  # torch on CUDA: the UNet replayed from CUDA graphs
        self.max_bytes = max_bytes
        self.cache = cache if cache is not None else InversionCache()
        self.models: dict[str, ModelEntry] = {}
        self.skipped: dict[str, str] = {}
        self._ready: OrderedDict[str, tuple[str, Generator]] = OrderedDict()  # id -> (identity, generator), LRU first
        self._bytes: dict[str, int] = {}
        self._lock = threading.Lock()  # guards models, skipped, _ready, _bytes
        self._scan_lock = threading.Lock()  # one scan at a time
        self._listed: dict[str, tuple[tuple, ModelEntry | str]] = {}  # id -> (listing signature, entry or reason)
        self._failed: dict[str, tuple[tuple, str]] = {}  # id -> (files signature, why its engines failed to load)
        self._scan_started = 0.0
        self._withdrawn: frozenset[str] = frozenset()  # ids whose deletion is pending: not served
        # the engines' (shared) tokenizer -> the request thread's copy of it
        self._tokenizers: weakref.WeakKeyDictionary[CLIPTokenizer, CLIPTokenizer] = weakref.WeakKeyDictionary()
        self.scan()

    def scan(self, since: float | None = None) -> None:
        """Look at the repository again: see the module docstring. Safe from any thread; never raises. With
        `since` (a `time.monotonic()`), only if no scan started after it: concurrent callers share one scan."""
        with self._scan_lock:
            if since is not None and self._scan_started >= since:
                return
            self._scan_started = time.monotonic()
            try:
                names = sorted(p.name for p in self.repo.iterdir() if not p.name.startswith("."))
            except OSError as e:
                log.error("model repository %s cannot be listed (%s): serving no models", self.repo, e.strerror)
                names = []
            models: dict[str, ModelEntry] = {}
            skipped: dict[str, str] = {}
            listed = {}
            for name in names:
                path = self.repo / name
                if not path.is_dir():
                    continue
                if not MODEL_ID.fullmatch(name):
                    skipped[name] = f"not a model id ({MODEL_ID.pattern})"
                    continue
                if name in self._withdrawn:
                    skipped[name] = "being deleted (a tuning worker removes it)"
                    continue
                signature = _listing_signature(path)
                known = self._listed.get(name)
                if known is not None and known[0] == signature:
                    found = known[1]
                else:
                    try:
                        found = read_entry(path, self.backend)
                    except ArtefactError as e:
                        found = str(e)
                    except Exception:  # a bug reading one model must not hide the others
                        log.exception("model %s cannot be read", name)
                        found = "its files cannot be read (details in the server log)"
                listed[name] = (signature, found)
                if isinstance(found, str):
                    skipped[name] = found
                    continue
                failed = self._failed.get(name)
                if failed is not None and failed[0] == _files_signature(path):
                    skipped[name] = failed[1]  # its engines failed to load and nothing changed since
                    continue
                current = self.models.get(name)
                models[name] = current if current is not None and current.identity == found.identity else found
            with self._lock:
                for name, reason in skipped.items():
                    if self.skipped.get(name) != reason:
                        log.warning("model %s skipped: %s", name, reason)
                for name in self.models.keys() - models.keys() - skipped.keys():
                    log.info("model %s removed from the repository", name)
                for name, (identity, _) in list(self._ready.items()):
                    if name not in models or models[name].identity != identity:
                        self._unload(name, "its files changed" if name in models else "it is gone")
                self.models, self.skipped = models, skipped
                self._listed = listed
                self._failed = {name: failed for name, failed in self._failed.items() if name in listed}

    def withdraw(self, model_ids: set[str]) -> bool:
        """Serve none of `model_ids` (their deletion is pending) from the next scan on; whether that changed."""
        changed = frozenset(model_ids) != self._withdrawn
        self._withdrawn = frozenset(model_ids)
        return changed

    def refresh(self, asked: float) -> None:
        """Make sure the view is no older than `asked` (a `time.monotonic()`: when a request named an id it does
        not know): scan unless a scan started since. A model published just before the request is found."""
        self.scan(since=asked)

    def _skip(self, name: str, path: Path, reason: str) -> None:
        """Take a model whose engines failed to load out of service until its files change."""
        with self._lock:
            self.models.pop(name, None)
            self.skipped[name] = reason
            self._failed[name] = (_files_signature(path), reason)

    def entry(self, model_id: str) -> ModelEntry:
        """The servable model `model_id`, or ModelUnavailable saying why not."""
        with self._lock:
            if model_id in self.models:
                return self.models[model_id]
            reason = self.skipped.get(model_id)
        raise ModelUnavailable(f"model {model_id!r} is " + (f"not available: {reason}" if reason else "unknown"))

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return list(self.models.values())

    def skipped_models(self) -> dict[str, str]:
        with self._lock:
            return dict(self.skipped)

    def ready(self, model_id: str) -> LoadedModel | None:
        """The loaded model if its engines are in the cache (a read-only peek: no loading, no reordering)."""
        with self._lock:
            ready = self._ready.get(model_id)
        return ready[1].model if ready else None

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
                with self._lock:
                    self._unload(entry.id, "the engine cache is full")
                log.info("engine cache full: %s and later models load on first use", entry.id)
                return

    def load(self, model_id: str) -> Generator:
        """The model's generator, loading and warming its engines first if needed (least recently used out)."""
        entry = self.entry(model_id)
        with self._lock:
            ready = self._ready.get(model_id)
            if ready is not None and ready[0] == entry.identity:
                self._ready.move_to_end(model_id)
                return ready[1]
        try:
            model = load_model(entry.path, self.backend, self.device, model_id, self.compile_mode, self.cuda_graphs)
            generator = Generator(model, self.cache)
            entry.cost = self._warm_up(generator, entry)
            size = model_bytes(model, entry.path)
        except Exception as e:  # missing, broken or mismatched engines: skip this model, keep serving the others
            reason = client_reason(e)
            log.warning("model %s skipped: %s", model_id, reason, exc_info=not isinstance(e, ArtefactError))
            self._skip(model_id, entry.path, reason)
            raise ModelUnavailable(f"model {model_id!r} is not available: {reason}") from e
        if entry.tokenizer is None:  # one copy per base (engines share a base's tokenizer), not per model
            entry.tokenizer = self._tokenizers.get(model.tokenizer)
            if entry.tokenizer is None:
                entry.tokenizer = self._tokenizers[model.tokenizer] = copy.deepcopy(model.tokenizer)
        entry.defaults = dict(model.defaults)
        with self._lock:
            if self.models.get(model_id) is entry:  # not replaced or removed while it loaded
                self._ready[model_id] = (entry.identity, generator)
                self._bytes[model_id] = size
                while len(self._ready) > 1 and sum(self._bytes.values()) > self.max_bytes:
                    self._unload(next(iter(self._ready)), "the engine cache is full")
        log.info("model %s ready (%s, %.1f MB)", model_id, self.backend, size / 1e6)
        return generator

    def _unload(self, model_id: str, why: str) -> None:
        """Drop a model's engines from the cache (under the lock); a request holding them finishes."""
        self._ready.pop(model_id)
        self._bytes.pop(model_id)
        log.info("model %s unloaded from the engine cache: %s", model_id, why)

    @staticmethod
    def _warm_up(generator: Generator, entry: ModelEntry) -> Cost:
        """One short generation through every engine (UNet at batch 1 and 2, VAE decoder); returns its cost. A
        model without its clip (imported from inverted latents or none) has no inversion to run the UNet at batch 1:
        one unguided step does."""
        clip = generator.model.source.kind == "clip"
        options = GenerationOptions(entry.config["prompt"], steps=1, guidance=2.0, seed=0, invert=clip)
        result = generator.generate(options)
        if not clip:
            generator.generate_latents(replace(options, guidance=1.0))
        per_call = max(result.timings.get("invert", 0.0), result.timings["sample"])
        return Cost(per_call, result.timings["decode"] / len(result.frames))
