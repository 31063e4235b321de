"""The base models the tuning service tunes from.

The server accepts only the bases on the allow-list it is started with (`tav-serve --base
ID=DIR_OR_HUB_ID[@VARIANT]`, repeatable; the shipped shapes model is allowed as `shapes-sd`). A source is a local
diffusers directory or a hub id, which `huggingface_hub` resolves through its cache (offline mode honoured): only
the Stable Diffusion 1.x folders' configs, tokenizer files and ONE variant of safetensors weights are fetched,
hashed and copied (the main weights, or with `@fp16` diffusers' `variant="fp16"`: `unet/diffusion_pytorch_model.
fp16.safetensors`, `text_encoder/model.fp16.safetensors`), never a pickled `.bin` or `.ckpt`, nor the other
variants an SD 1.x repository holds beside them (`.fp16`, `.non_ema`: 2-3x the disk).

A worker copies the base into the repository's content-addressed base store, `REPO/.bases/<sha256>/`, before it
tunes; the tuned model refers to it by a path relative to its own directory, so every replica that mounts the
repository loads what a worker tuned, wherever the repository is mounted.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tuner.components import (
    VARIANT,
    BaseModelError,
    base_model_files,
    base_model_hash,
    base_sizes,
    check_base_dir,
    model_file_patterns,
    weights_variant,
)
from tuner.io_utils import atomic_directory, file_lock
from tuner.shapes import SHAPES_MODEL
from tuner.tune import TuneSettings, default_settings, max_lora_rank

log = logging.getLogger(__name__)

DEFAULT_BASES = {"shapes-sd": str(SHAPES_MODEL)}
BASE_STORE = ".bases"


@dataclass(frozen=True)
class Base:
    """An allowed base, resolved to a local directory."""

    id: str
    source: str  # as the allow-list gives it: a directory or a hub id, and `@VARIANT` where given
    path: Path
    size_multiple: int  # width and height must be multiples of this
    default_size: int  # the base's native size in pixels
    defaults: TuneSettings  # the tuner's settings for this base (`default_settings`)
    max_lora_rank: int  # the largest LoRA rank the base takes (`max_lora_rank`)


def parse_base(arg: str) -> tuple[str, str]:
    """`ID=DIR_OR_HUB_ID[@VARIANT]` -> (id, source), the source checked for a well-formed variant."""
    base_id, sep, source = arg.partition("=")
    if not sep or not base_id or not source:
        raise ValueError(f"--base {arg!r}: expected ID=DIR_OR_HUB_ID[@VARIANT]")
    try:
        split_variant(source)
    except BaseModelError as e:
        raise ValueError(f"--base {arg!r}: {e}") from None
    return base_id, source


def split_variant(source: str) -> tuple[str, str | None]:
    """`DIR_OR_HUB_ID[@VARIANT]` -> (directory or hub id, variant or None for the main weights)."""
    where, sep, variant = source.rpartition("@")
    if not sep or Path(source).is_dir():  # a directory whose name holds an @ is that directory
        return source, None
    if not where or not VARIANT.fullmatch(variant):
        raise BaseModelError(f"{source!r}: expected DIR_OR_HUB_ID[@VARIANT], VARIANT as diffusers names it (fp16)")
    return where, variant


def resolve(source: str) -> tuple[Path, str | None]:
    """A local diffusers directory for a source, and the weights variant to take from it: the directory itself,
    or a hub id's snapshot (through the cache; nothing but `model_file_patterns` of that variant)."""
    where, variant = split_variant(source)
    if Path(where).is_dir():
        path = check_base_dir(where, variant)
    else:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        try:
            path = check_base_dir(snapshot_download(where, allow_patterns=model_file_patterns(variant)), variant)
        except (HFValidationError, LocalEntryNotFoundError, OSError) as e:
            raise BaseModelError(f"base {where!r} is neither a directory nor a hub id in reach ({e})") from e
    found = weights_variant(path, variant)
    if found != variant:  # the main weights are the default, never a variant found in their place
        raise BaseModelError(f"{where} holds no main weights, only the {found} variant: give it as {where}@{found}")
    return path, variant


def load_base(base_id: str, source: str) -> Base:
    """Resolve an allowed base and read its size rules (from its configs: no weights are loaded)."""
    path, _ = resolve(source)
    size_multiple, default_size = base_sizes(path)
    return Base(base_id, source, path, size_multiple, default_size, default_settings(path), max_lora_rank(path))


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


@contextmanager
def base_in_use(source: Path, variant: str | None, repo: Path) -> Iterator[Path]:
    """The base's copy in the repository's base store, named by its content hash and holding just the hashed files
    (`base_model_files` of the one `variant`; so it loads as that variant, `weights_variant`): made once,
    atomically, under a lock shared by every worker of the repository. The copy is held in use until the block
    ends (a shared lock on `.bases/.<hash>.lock`): `tav-export --gc` never removes an entry so held, so a job holds
    it from before the copy is made until its model, which refers to it, is published."""
    store = repo / BASE_STORE
    target = store / base_model_hash(source, variant)
    with file_lock(store / f".{target.name}.lock", shared=True):
        with file_lock(store / ".lock"):
            if target.is_dir():
                os.utime(target)  # last used: the janitor's grace period counts from here
            else:
                with atomic_directory(target) as tmp:
                    for file in base_model_files(source, variant):
                        copy = tmp / file.relative_to(source)
                        copy.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(file, copy)
        yield target
