"""Small filesystem helpers shared by every writer and reader of artefacts: atomic directories, locks between the
processes that write one repository, content hashes, and the one bounded JSON parser every JSON file and record
goes through."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

MAX_JSON_BYTES = 1 << 20  # no artefact's or job record's JSON comes near this
MAX_JSON_DEPTH = 64  # nor this (the deepest, an engine manifest, nests 5 levels)
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPENERS, _CLOSERS = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)


@contextmanager
def atomic_directory(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it is renamed to `out`, on failure removed.

    An interrupted writer therefore never leaves a half-written `out` behind. With `overwrite`, an existing
    `out` is replaced only once the new one is complete.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's is private; readers (serving replicas) may run as another user
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def file_lock(path: Path, shared: bool = False, wait: bool = True) -> Iterator[bool]:
    """Hold a lock on `path` (created if missing) against every other process that takes it: a POSIX record
    lock, which NFS (a ReadWriteMany volume shared by tuning workers) carries between machines. Exclusive, or
    `shared` with other shared holders (a store entry in use, which the janitor must not remove). With `wait`
    False, yield False at once (holding nothing) where another process holds a conflicting lock; else yield True."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.lockf(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            if wait or e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            yield False
            return
        try:
            yield True
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def sha256_files(paths: list[Path], root: Path) -> str:
    """A content hash over files (their paths relative to `root` and their bytes), in sorted path order."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The SHA-256 of one file's bytes (what `sha256sum` prints): how native code is checked before it is loaded."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class JsonError(ValueError):
    """A JSON document that is unreadable, too large, too deep or not JSON; the message names it."""


def json_depth(data: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest, counted without parsing it (Python's parser recurses
    once per level, so a deep document would raise RecursionError wherever it is parsed)."""
    brackets = np.frombuffer(_JSON_STRING.sub(b"", data), np.uint8)
    steps = np.isin(brackets, _OPENERS).astype(np.int32) - np.isin(brackets, _CLOSERS)
    return int(np.cumsum(steps).max(initial=0))


def parse_json(data: bytes | str, name: str) -> Any:
    """A JSON document (UTF-8 bytes or text) of at most MAX_JSON_BYTES and MAX_JSON_DEPTH levels, or JsonError
    naming it as `name`."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if len(data) > MAX_JSON_BYTES:
        raise JsonError(f"{name} is larger than {MAX_JSON_BYTES} bytes")
    if json_depth(data) > MAX_JSON_DEPTH:
        raise JsonError(f"{name} nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise JsonError(f"{name} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise JsonError(f"{name} is not valid JSON ({e.msg} at line {e.lineno})") from None


def read_json_file(path: Path, name: str) -> Any:
    """The JSON document in the file `path` (see `parse_json`), or JsonError naming it as `name`."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise JsonError(f"{name} is missing") from None
    except OSError as e:
        raise JsonError(f"{name} cannot be read ({e.strerror})") from None
    return parse_json(data, name)


def first_line(error: Exception, limit: int = 200) -> str:
    """An exception's message as one line for a one-line error (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
