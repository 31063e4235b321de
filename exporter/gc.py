"""`tav-export --gc REPO`: remove the engine and base store entries (`REPO/.engines/<key>/`,
`REPO/.bases/<sha256>/`) that nothing refers to any more, safely while replicas serve and workers tune.

Deleting a model leaves its store entries behind (other models may share them), and a base or export that
changed leaves the old ones; nothing else ever removes them. An entry is kept when

- a model or a job in progress names it: its name appears in a `tav_config.json` or `manifest.json` anywhere
  under a directory of the repository (models, `.job-*` directories, the tuner's and exporter's temporary ones),
  read as text, so a file that does not parse still protects what it names; a compiled torch UNet's entry
  (`tuner.compiled`), which no manifest names, is kept while its base's hash appears there (a model of its base);
- it is in use: its lock `.<name>.lock` is held (exclusively while an export builds it; shared by a tune job for
  its base from before the copy is made until its model is published, `tuner.base_store.base_in_use`);
- it was made or last used (its mtime: an export that reuses an entry touches it under the lock, as does a job
  that reuses a base) within the grace period, which covers the moment between an export's use of an entry and
  the manifest that names it.

Each removal takes the entry's lock without waiting, looks again, renames the entry to a dot-name (replicas never
see half of it under its name) and removes it. Writers' leftovers in the stores (`.<name>.tmp-*`, `.old-*`,
`.gc-*`, an AOTInductor `<key>.failed/` kept for diagnosis) go the same way once past the grace period. Lock files
stay: removing one while another process opens it would let two processes hold "the" lock. An engine directory
written outside the repository (`tav-export --out`) is not seen: its store entries are kept only while young.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from tuner import compiled
from tuner.io_utils import JsonError, file_lock, read_json_file

STORES = (".engines", ".bases")
REFERRING = ("tav_config.json", "manifest.json")
DEFAULT_GRACE = 3600.0  # seconds
_OWNER = re.compile(r"^\.?([^.]+)(\..*)?$")  # `<key>`, `<key>.failed`, `.<key>.tmp-*`: the entry `<key>`


class GcError(Exception):
    """The repository could not be read well enough to tell what is in use; nothing more is removed."""


def collect(repo: Path, grace: float = DEFAULT_GRACE, progress: Callable[[str], None] = print) -> list[str]:
    """Remove the unused store entries of `repo` (see the module's docstring); return them as `store/name`."""
    if not repo.is_dir():
        raise GcError(f"{repo} is not a directory")
    removed = []
    named = referring_text(repo)
    for store in STORES:
        root = repo / store
        for entry in _listing(root):
            match = _OWNER.match(entry.name)
            if not match or entry.name.endswith(".lock") or not entry.is_dir():
                continue
            owner = match.group(1)
            if _young(entry, grace) or _named(entry, named):
                continue
            with file_lock(root / f".{owner}.lock", wait=False) as held:
                if not held or _young(entry, grace) or _named(entry, referring_text(repo)):
                    continue
                size = _size(entry)
                gone = root / f".{owner}.gc-{uuid.uuid4().hex[:8]}"
                os.rename(entry, gone)
                shutil.rmtree(gone, ignore_errors=True)
            removed.append(f"{store}/{entry.name}")
            progress(f"removed {store}/{entry.name} ({size / 2**20:.1f} MiB)")
    return removed


def referring_text(repo: Path) -> str:
    """Every `tav_config.json` and `manifest.json` under the repository's directories (but the stores), as one
    text. A directory renamed while it is read (a job's being published) starts the reading again."""
    for _ in range(20):
        texts: list[str] = []
        tops = [top for top in _listing(repo) if top.name not in STORES and top.is_dir()]
        for top in tops:
            for folder, _, files in os.walk(top):
                for name in set(files).intersection(REFERRING):
                    try:
                        texts.append(Path(folder, name).read_text(errors="replace"))
                    except FileNotFoundError:
                        pass
                    except OSError as e:
                        raise GcError(f"cannot read {Path(folder, name)}: {e.strerror}") from e
        if all(top.exists() for top in tops):
            return "\n".join(texts)
    raise GcError(f"{repo} kept changing while it was read; run again")


def _named(entry: Path, named: str) -> bool:
    """Whether `named` (the referring text) names `entry`, or for a compiled UNet's entry, its base's hash."""
    if entry.name in named:
        return True
    try:
        base = read_json_file(entry / compiled.INDEX, compiled.INDEX).get("base_sha256")
    except (JsonError, AttributeError):
        return False
    return isinstance(base, str) and len(base) == 64 and base in named


def _listing(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except FileNotFoundError:
        return []
    except OSError as e:
        raise GcError(f"cannot list {directory}: {e.strerror}") from e


def _young(entry: Path, grace: float) -> bool:
    try:
        return time.time() - entry.stat().st_mtime < grace
    except FileNotFoundError:
        return True  # gone meanwhile: nothing to do


def _size(entry: Path) -> int:
    return sum(os.path.getsize(Path(folder, f)) for folder, _, files in os.walk(entry) for f in files)
