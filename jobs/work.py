"""A tune job's work, the same on every tuning worker (Celery's and the local one): copy the base into the
repository's base store, tune into a dot-directory beside the models, export its engines, and rename it into
place under the model's id. Replicas ignore dot-names and the rename is atomic, so a half-written model is never
served. The worker's hooks report progress and say when to stop: a cancel is seen within one tuning step, and
during export at the next stage boundary.

Publishing is fenced: the rename happens only if the job store still names this attempt (`Hooks.may_publish`), so
an attempt the store has given up on (its worker was taken for dead, the job runs again) publishes nothing and
removes its directory. A published model names its job (`PUBLISHED_BY`): an attempt that finds its job's model
published already, by an earlier attempt whose end was never recorded, ends `ready` without tuning again.

Leftovers of killed workers are dot-directories named by job id and attempt (`.job-<id>-<attempt>`), or
half-removed deleted models (`.deleted-*`); `clean_leftovers` removes those no live worker is working on. Deleting
a model renames it out of the repository first (every replica drops it at its next rescan), then removes it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from jobs.bases import base_in_use, resolve
from jobs.spec import EXPORTING, TUNING, Job
from tuner.tune import TuneSettings

log = logging.getLogger(__name__)

JOB_DIR = re.compile(r"^\.+job-([0-9a-f]{32})-(\d+)")  # the job's directory and the tuner's temporary ones
DELETED = ".deleted-"  # a model taken out of the repository, being removed
PUBLISHED_BY = ".tav-job"  # in a published model: the id of the job that made it


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
    from tuner.tune import TuneError
    from tuner.video_io import VideoError

    if isinstance(error, TuneError | ExportError | BaseModelError | VideoError):
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


def run(job: Job, clip: bytes, repo: Path, hooks: Hooks, device: str | None = None, **worker_settings) -> Outcome:
    """Tune, export and publish `job` into `repo`; raise `Stopped`, or the tuner's and exporter's errors.
    `worker_settings` are the tuning settings that belong to the worker, not the client (mixed_precision,
    gradient_checkpointing). The base's store copy is held in use (`base_in_use`) until the model is published."""
    if published(repo, job):
        log.info("job %s: model %s was published by an earlier attempt", job.id, job.model_id)
        return Outcome(0.0, 0.0)
    settings = replace(job.tune_settings(), **worker_settings)
    hooks.progress(TUNING, 0, settings.steps)
    with base_in_use(*resolve(job.base_source), repo) as base:
        return _run(job, clip, repo, hooks, device, settings, base)


def _run(job: Job, clip: bytes, repo: Path, hooks: Hooks, device: str | None, settings: TuneSettings,
         base: Path) -> Outcome:
    from exporter.cli import export
    from tuner.tune import tune

    def check() -> None:
        stopped = hooks.stop_reason()
        if stopped is not None:
            raise stopped

    work = job_dir(repo, job)
    shutil.rmtree(work, ignore_errors=True)  # a leftover of this very attempt
    started = time.perf_counter()

    def on_step(step: int, total: int, loss: float) -> None:
        hooks.progress(TUNING, step, total, loss)
        check()

    tune(base, clip, job.caption, work, settings, device=device, progress=False, on_step=on_step, base_id=job.base)
    tuned = time.perf_counter()
    try:
        check()
        hooks.progress(EXPORTING)
        export(work, progress=lambda message: log.info("job %s: %s", job.id, message))
        check()
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
