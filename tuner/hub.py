"""Names of models that may be a local directory or a hub id, resolved one way everywhere (`tav-tune --base`,
`tav-import --from/--base`, the tuning service's allow-list).

A hub id is resolved through `huggingface_hub`'s cache (`HF_HUB_OFFLINE=1` honoured: then only what the cache
holds), fetching only the files the caller names: for a base, the Stable Diffusion 1.x folders' configs, tokenizer
files and ONE variant of safetensors weights (`DIR_OR_HUB_ID@fp16`: diffusers' `variant="fp16"`), never a pickled
`.bin` or `.ckpt`, nor the other variants an SD 1.x repository holds beside them (`.fp16`, `.non_ema`: 2-3x the disk).
"""

from __future__ import annotations

from pathlib import Path

from tuner.components import VARIANT, BaseModelError, check_base_dir, model_file_patterns, weights_variant
from tuner.io_utils import first_line


class HubError(ValueError):
    """A name that is neither a directory nor a hub repository the cache (or the hub) holds."""


def split_variant(source: str) -> tuple[str, str | None]:
    """`DIR_OR_HUB_ID[@VARIANT]` -> (directory or hub id, variant or None for the main weights)."""
    where, sep, variant = source.rpartition("@")
    if not sep or Path(source).is_dir():  # a directory whose name holds an @ is that directory
        return source, None
    if not where or not VARIANT.fullmatch(variant):
        raise BaseModelError(f"{source!r}: expected DIR_OR_HUB_ID[@VARIANT], VARIANT as diffusers names it (fp16)")
    return where, variant


def snapshot(repo_id: str, patterns: list[str]) -> Path:
    """The local snapshot of hub repository `repo_id` holding (at most) the files matching `patterns`."""
    from huggingface_hub import snapshot_download  # the hub client is only imported when a hub id is named
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (HFValidationError, LocalEntryNotFoundError, OSError) as e:
        raise HubError(f"{repo_id!r} is neither a directory nor a hub id in reach ({first_line(e)})") from e


def resolve_base(source: str) -> tuple[Path, str | None]:
    """A local diffusers directory for a base, and the weights variant to take from it: the directory itself, or a
    hub id's snapshot (through the cache; nothing but `model_file_patterns` of that variant)."""
    where, variant = split_variant(source)
    if Path(where).is_dir():
        path = check_base_dir(where, variant)
    else:
        try:
            path = check_base_dir(snapshot(where, model_file_patterns(variant)), variant)
        except HubError as e:
            raise BaseModelError(f"base {e}") from e
    found = weights_variant(path, variant)
    if found != variant:  # the main weights are the default, never a variant found in their place
        raise BaseModelError(f"{where} holds no main weights, only the {found} variant: give it as {where}@{found}")
    return path, variant
