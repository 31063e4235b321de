"""A tune job's work, the same on every tuning worker (Celery's and the local one): copy the base into the
repository's base store, tune into a dot-directory beside the models, export its engines, and rename it into
place under the model's id. Replicas ignore dot-names and the rename is atomic, so a half-written model is never
served. The worker's hooks report progress and say when to stop: a cancel is seen within one tuning step, and
during export within a second. The export runs in a child process that is killed at the job's deadline or its
cancel, so a hung export (a store entry whose lock is never released, a native call that never returns) cannot
hold the worker past `--max-job-seconds`: the job fails with the reason and nothing of it is published. The
children come from a fork server that imported the exporter once (`_exporters`).

A worker exports what the deployment serves (`--export`, `parse_exports`): ONNX graphs (the default; the
onnxruntime backend), TensorRT plans built from them, AOTInductor packages compiled for the worker's device and
machine (the replicas must be of the same kind), each at its precision.

Publishing is fenced: the rename happens only if the job store still names this attempt (`Hooks.may_publish`), so
an attempt the store has given up on (its worker was taken for dead, the job runs again) publishes nothing and
removes its directory. A published model names its job (`PUBLISHED_BY`): an attempt that finds its job's model
published already, by an earlier attempt whose end was never recorded, ends `ready` without tuning again.

Leftovers of killed workers are dot-directories named by job id and attempt (`.job-<id>-<attempt>`), or
half-removed deleted models (`.deleted-*`); `clean_leftovers` removes those no live worker is working on. Deleting
a model renames it out of the repository first (every replica drops it at its next rescan), then removes it.
"""

from __future__ import annotations

import argparse
import errno
import logging
import multiprocessing
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from jobs.spec import EXPORTING, TUNING, Job, UnreadableRecord
from tuner.base_store import base_in_use
from tuner.hub import resolve_base
from tuner.tune import TuneSettings

log = logging.getLogger(__name__)

JOB_DIR = re.compile(r"^\.+job-([0-9a-f]{32})-(\d+)")  # the job's directory and the tuner's temporary ones
DELETED = ".deleted-"  # a model taken out of the repository, being removed
PUBLISHED_BY = ".tav-job"  # in a published model: the id of the job that made it


EXPORTS = {"onnx": ("fp32", "fp16"), "tensorrt": ("fp32", "fp16"), "aoti": ("fp32", "fp16", "bf16")}  # precisions
DEFAULT_EXPORTS = "onnx"


@dataclass(frozen=True)
class ExportTarget:
    kind: str  # a key of EXPORTS
    precision: str = "fp32"

    def __str__(self) -> str:
        return f"{self.kind}:{self.precision}"


def parse_exports(text: str) -> tuple[ExportTarget, ...]:
    """`--export`'s value, e.g. `onnx`, `onnx,aoti`, `onnx:fp16,tensorrt:fp16`: what a worker exports of every model
    it tunes (precision fp32 unless given). ValueError says what is wrong."""
    targets = []
    for item in text.split(","):
        kind, _, precision = item.strip().partition(":")
        if kind not in EXPORTS:
            raise ValueError(f"{kind!r} is not an export (one of {', '.join(EXPORTS)})")
        precision = precision or "fp32"
        if precision not in EXPORTS[kind]:
            raise ValueError(f"{kind} exports at {' or '.join(EXPORTS[kind])}, not {precision!r}")
        if any(t.kind == kind for t in targets):
            raise ValueError(f"{kind} is named twice")
        targets.append(ExportTarget(kind, precision))
    graphs = {t.precision for t in targets if t.kind in ("onnx", "tensorrt")}
    if len(graphs) > 1:
        raise ValueError("onnx and tensorrt are built from the same graphs: give them one precision")
    return tuple(targets)


def export_argument(text: str) -> tuple[ExportTarget, ...]:
    """`parse_exports` for argparse: its message, not argparse's "invalid value"."""
    try:
        return parse_exports(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def aoti_device(device: str | None) -> str:
    """The device AOTInductor packages are compiled for: the worker's (default cuda where one is visible)."""
    import torch

    return (device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0]


def check_exports(targets: tuple[ExportTarget, ...], device: str | None) -> None:
    """Raise ValueError where this machine cannot build one of `targets`: at a worker's start, not at its first
    job (TensorRT needs its package and a GPU; AOTInductor a supported torch, and fp16/bf16 a CUDA device)."""
    for target in targets:
        if target.kind == "tensorrt":
            from tuner.tensorrt_support import require_tensorrt

            require_tensorrt(ValueError)
        elif target.kind == "aoti":
            from tuner.aoti_support import require_aoti

            on = aoti_device(device)
            require_aoti(on, ValueError)
            if target.precision != "fp32" and on != "cuda":
                raise ValueError(f"aoti:{target.precision} needs a CUDA device; on {on} it is fp32")


class ExportFailed(Exception):
    """The export process failed; the message is the reason its job's client sees."""


class Stopped(Exception):
    """The job must stop at a check point; the message says why (a cancel, or its time ran out)."""

    def __init__(self, reason: str, cancelled: bool) -> None:
        super().__init__(reason)
        self.cancelled = cancelled


class Hooks(Protocol):
    """What a worker tells the job's record, and asks it."""

    def progress(self, state: str, step: int = 0, total: int = 0, loss: float = 0.0) -> None: ...

    def stop_reason(self) -> Stopped | None:
        """A `Stopped` when the job must stop now (cancelled, or past its time), else None."""

    def may_publish(self) -> bool:
        """Whether the job store still names this attempt (atomically checked): only then may it publish."""


@dataclass
class Outcome:
    tuning_seconds: float
    export_seconds: float


def progress_fields(state: str, step: int, total: int, loss: float) -> dict:
    """What a progress report changes in a job's record: the state, and while tuning the step and loss."""
    return {"state": state, "step": step, "total_steps": total, "loss": loss} if state == TUNING else {"state": state}


def failure_reason(error: Exception) -> str:
    """Why a job failed, as its client can act on it: the tuner's and exporter's own messages say what was
    wrong with the input; anything else is the worker's fault (details in its log)."""
    from exporter.onnx_export import ExportError
    from tuner.components import BaseModelError
    from tuner.official import OfficialFormatError
    from tuner.tune import TuneError
    from tuner.video_io import VideoError

    clients = (TuneError, ExportError, BaseModelError, VideoError, ExportFailed, UnreadableRecord, OfficialFormatError)
    if isinstance(error, clients):
        return str(error)
    if isinstance(error, OSError) and error.errno in (errno.EEXIST, errno.ENOTEMPTY):
        return "the model id was taken while the job ran (a model was published under it by hand)"
    return f"the tuning worker failed ({type(error).__name__}); its log has the details"


def job_dir(repo: Path, job: Job) -> Path:
    return repo / f".job-{job.id}-{job.attempt}"


def published(repo: Path, job: Job) -> bool:
    """Whether the model in the repository under the job's model id is this job's."""
    try:
        return (repo / job.model_id / PUBLISHED_BY).read_text() == job.id
    except (OSError, UnicodeDecodeError):
        return False


def run(job: Job, clip: bytes | Path, repo: Path, hooks: Hooks, device: str | None = None,
        exports: tuple[ExportTarget, ...] = (ExportTarget("onnx"),), **worker_settings) -> Outcome:
    """Tune, export (what `exports` names: the worker's --export) and publish `job` into `repo`; raise `Stopped`, or
    the tuner's and exporter's errors. `worker_settings` are the tuning settings that belong to the worker, not the
    client (mixed_precision, gradient_checkpointing). The base's store copy is held in use (`base_in_use`) until the
    model is published."""
    if published(repo, job):
        log.info("job %s: model %s was published by an earlier attempt", job.id, job.model_id)
        return Outcome(0.0, 0.0)
    if job.import_source:
        hooks.progress(EXPORTING)
        if not job.base_source:  # the source's own networks: the import puts them in the base store itself
            return _run(job, repo, hooks, device, exports, lambda work: _import(job, work, None))
        with base_in_use(*resolve_base(job.base_source), repo) as base:
            return _run(job, repo, hooks, device, exports, lambda work: _import(job, work, base))
    settings = replace(job.tune_settings(), **worker_settings)
    hooks.progress(TUNING, 0, settings.steps)
    with base_in_use(*resolve_base(job.base_source), repo) as base:
        return _run(job, repo, hooks, device, exports, lambda work: _tune(job, work, clip, settings, base, device,
                                                                         hooks))


def _check(hooks: Hooks) -> None:
    stopped = hooks.stop_reason()
    if stopped is not None:
        raise stopped


def _tune(job: Job, work: Path, clip: bytes | Path, settings: TuneSettings, base: Path, device: str | None,
          hooks: Hooks) -> None:
    from tuner.tune import tune

    def on_step(step: int, total: int, loss: float) -> None:
        hooks.progress(TUNING, step, total, loss)
        _check(hooks)

    tune(base, clip, job.caption, work, settings, device=device, progress=False, on_step=on_step, base_id=job.base)


def _import(job: Job, work: Path, base: Path | None) -> None:
    from tuner.official import import_official

    import_official(job.import_source, work, str(base) if base else None, prompt=job.caption or None,
                    base_id=job.base or None, hub_only=not Path(job.import_source).is_absolute())


def _run(job: Job, repo: Path, hooks: Hooks, device: str | None, exports: tuple[ExportTarget, ...],
         make: Callable[[Path], None]) -> Outcome:
    """Make the model (`make(directory)`: tune or import it), export and publish it."""
    work = job_dir(repo, job)
    shutil.rmtree(work, ignore_errors=True)  # a leftover of this very attempt
    started = time.perf_counter()
    make(work)
    tuned = time.perf_counter()
    try:
        _check(hooks)
        hooks.progress(EXPORTING)
        export_in_child(work, exports, device, hooks)
        _check(hooks)
        (work / PUBLISHED_BY).write_text(job.id)
        if not hooks.may_publish():
            raise Stopped("this attempt was superseded: the job runs again elsewhere", cancelled=False)
        _publish(work, repo, job)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return Outcome(round(tuned - started, 3), round(time.perf_counter() - tuned, 3))


def _publish(work: Path, repo: Path, job: Job) -> None:
    """Rename the job's directory into place; it fails if the id was taken meanwhile (by hand): nothing is
    replaced. Taken by this very job (an earlier attempt published, then the store ran it again), it is done."""
    try:
        os.rename(work, repo / job.model_id)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not published(repo, job):
            raise
        shutil.rmtree(work, ignore_errors=True)


def export_in_child(work: Path, exports: tuple[ExportTarget, ...], device: str | None, hooks: Hooks) -> None:
    """Export the tuned model `work` with `tav-export` in a child process per backend, asking `hooks` every second
    whether to stop; a stop (the job's deadline or its cancel) kills the child and raises `Stopped`. The exporter
    writes `work/engines` whole or not at all, and killed it releases the store entry's lock with its life (a POSIX
    record lock). A failed export raises `ExportFailed` with the exporter's message."""
    kinds = {target.kind: target for target in exports}
    runs = []
    graphs = kinds.get("onnx") or kinds.get("tensorrt")
    if graphs is not None:
        runs.append(["--precision", graphs.precision, *(["--tensorrt"] if "tensorrt" in kinds else [])])
    if "aoti" in kinds:  # a second export into the same engine directory: its manifest merges the two
        runs.append(["--precision", kinds["aoti"].precision, "--aoti", "--device", aoti_device(device)])
    for args in runs:
        with tempfile.NamedTemporaryFile() as errors:
            child = _exporters().Process(target=_export_main, args=(["--model", str(work), *args], errors.name),
                                         name="tav-export", daemon=True)  # its progress goes to our output
            child.start()
            try:
                while child.exitcode is None:
                    stopped = hooks.stop_reason()
                    if stopped is not None:
                        raise stopped
                    child.join(1.0)
            finally:
                if child.exitcode is None:
                    child.kill()
                    child.join()
            text = Path(errors.name).read_text(errors="replace").strip()
        if child.exitcode != 0:
            log.error("tav-export %s failed (exit code %d):\n%s", " ".join(args), child.exitcode, text)
            last = text.splitlines()[-1] if text else ""
            raise ExportFailed(last.removeprefix("tav-export: error: ") if child.exitcode == 2 else
                               f"the tuning worker failed (its export exited {child.exitcode}); its log has the "
                               f"details")


def _exporters() -> multiprocessing.context.ForkServerContext:
    """Where export children come from: a fork server that imported the exporter once, when this worker's first
    export came (5-6 s of CPU that a fresh interpreter per export paid again), and never computes, so the children
    forked from it start their own OpenMP and CUDA cleanly. It lives as long as this process."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["exporter.cli"])
    return context


def _export_main(argv: list[str], errors: str) -> None:
    """An export child: `tav-export argv` with its error output in the file `errors` (exit 2 on a usage error,
    1 with a traceback on a crash, as the command)."""
    fd = os.open(errors, os.O_WRONLY)
    os.dup2(fd, 2)
    os.close(fd)
    from exporter.cli import main

    main(argv)


def clean_leftovers(repo: Path, running: Callable[[str, int], bool]) -> list[str]:
    """Remove the job directories (and the tuner's temporary ones) of attempts `running(job_id, attempt)` says
    no live worker runs; the names removed."""
    removed = []
    for path in _entries(repo):
        match = JOB_DIR.match(path.name)
        if path.name.startswith(DELETED) or match and not running(match.group(1), int(match.group(2))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def delete_model(repo: Path, model_id: str) -> bool:
    """Take a model out of the repository (renamed to a dot-name at once, then removed); False if it is not
    there."""
    gone = repo / f"{DELETED}{model_id}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(repo / model_id, gone)
    except FileNotFoundError:
        return False
    shutil.rmtree(gone, ignore_errors=True)
    return True


def _entries(repo: Path) -> Iterable[Path]:
    try:
        return list(repo.iterdir())
    except OSError:
        return []
