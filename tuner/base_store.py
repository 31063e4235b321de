"""The repository's content-addressed base store, `REPO/.bases/<sha256>/`: the copies of base models that tuned
models in the repository refer to (a tuning worker's base, an imported official model's own 2-D weights).

A tuned model refers to its store entry by a path relative to its own directory, so every replica that mounts the
repository loads what a worker tuned or imported, wherever the repository is mounted.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tuner.components import base_model_files, base_model_hash
from tuner.io_utils import atomic_directory, file_lock

BASE_STORE = ".bases"


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
