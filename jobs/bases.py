"""The base models the tuning service tunes from.

The server accepts only the bases on the allow-list it is started with (`tav-serve --base ID=DIR_OR_HUB_ID`,
repeatable; the shipped shapes model is allowed as `shapes-sd`). A source is a local diffusers directory or a hub
id, which `huggingface_hub` resolves through its cache (offline mode honoured): only the Stable Diffusion 1.x
folders' configs, tokenizer files and safetensors weights are fetched, never a pickled `.bin` or `.ckpt`.

A worker copies the base into the repository's content-addressed base store, `REPO/.bases/<sha256>/`, before it
tunes; the tuned model refers to it by a path relative to its own directory, so every replica that mounts the
repository loads what a worker tuned, wherever the repository is mounted.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from tuner.components import (
    MODEL_FILE_PATTERNS,
    BaseModelError,
    base_model_files,
    base_model_hash,
    base_sizes,
    check_base_dir,
)
from tuner.io_utils import atomic_directory, file_lock
from tuner.shapes import SHAPES_MODEL
from tuner.tune import TuneSettings, default_settings

log = logging.getLogger(__name__)

DEFAULT_BASES = {"shapes-sd": str(SHAPES_MODEL)}
BASE_STORE = ".bases"


@dataclass(frozen=True)
class Base:
    """An allowed base, resolved to a local directory."""

    id: str
    source: str  # as the allow-list gives it: a directory or a hub id
    path: Path
    size_multiple: int  # width and height must be multiples of this
    default_size: int  # the base's native size in pixels
    defaults: TuneSettings  # the tuner's settings for this base (`default_settings`)


def parse_base(arg: str) -> tuple[str, str]:
    """`ID=DIR_OR_HUB_ID` -> (id, source)."""
    base_id, sep, source = arg.partition("=")
    if not sep or not base_id or not source:
        raise ValueError(f"--base {arg!r}: expected ID=DIR_OR_HUB_ID")
    return base_id, source


def resolve(source: str) -> Path:
    """A local diffusers directory for a source: the directory itself, or a hub id's snapshot (through the
    cache; nothing but `MODEL_FILE_PATTERNS`)."""
    if Path(source).is_dir():
        return check_base_dir(source)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return check_base_dir(snapshot_download(source, allow_patterns=MODEL_FILE_PATTERNS))
    except (HFValidationError, LocalEntryNotFoundError, OSError) as e:
        raise BaseModelError(f"base {source!r} is neither a directory nor a hub id in reach ({e})") from e


def load_base(base_id: str, source: str) -> Base:
    """Resolve an allowed base and read its size rules (from its configs: no weights are loaded)."""
    path = resolve(source)
    size_multiple, default_size = base_sizes(path)
    return Base(base_id, source, path, size_multiple, default_size, default_settings(path))


def load_bases(specs: dict[str, str]) -> dict[str, Base]:
    """The allow-list: id -> source, each resolved, plus `DEFAULT_BASES` where they are present (an installation
    without the shipped model just does not offer it). A given base that cannot be resolved is a BaseModelError
    naming it."""
    bases = {}
    for base_id, source in {**DEFAULT_BASES, **specs}.items():
        try:
            bases[base_id] = load_base(base_id, source)
        except (BaseModelError, OSError, KeyError, ValueError) as e:
            if base_id in specs:
                raise BaseModelError(f"--base {base_id}={source}: {e}") from e
            log.warning("the default base %s is not offered: %s", base_id, e)
    return bases


def materialise(source: Path, repo: Path) -> Path:
    """The base's copy in the repository's base store, named by its content hash and holding just the hashed files
    (`base_model_files`): made once, atomically, under a lock shared by every worker of the repository."""
    store = repo / BASE_STORE
    target = store / base_model_hash(source)
    with file_lock(store / ".lock"):
        if not target.is_dir():
            with atomic_directory(target) as tmp:
                for file in base_model_files(source):
                    copy = tmp / file.relative_to(source)
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, copy)
    return target
