"""The base models the tuning service tunes from.

The server accepts only the bases on the allow-list it is started with (`tav-serve --base
ID=DIR_OR_HUB_ID[@VARIANT]`, repeatable; the shipped shapes model is allowed as `shapes-sd`). A source is a local
diffusers directory or a hub id, resolved as everywhere else (`tuner.hub.resolve_base`: through the cache, one
weights variant, nothing pickled); only the files loading it reads are hashed and copied.

A worker copies the base into the repository's content-addressed base store (`tuner.base_store`) before it tunes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tuner.components import BaseModelError, base_sizes
from tuner.hub import resolve_base, split_variant
from tuner.shapes import SHAPES_MODEL
from tuner.tune import TuneSettings, default_settings, max_lora_rank

log = logging.getLogger(__name__)

DEFAULT_BASES = {"shapes-sd": str(SHAPES_MODEL)}


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


def load_base(base_id: str, source: str) -> Base:
    """Resolve an allowed base and read its size rules (from its configs: no weights are loaded)."""
    path, _ = resolve_base(source)
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
