"""The embedded default, with no broker: the job registry on disk in the repository, and one local worker process
that the server starts itself when the first job or deletion comes (spawned: a fresh interpreter that imports the
tuner and the exporter; the server process never does). The same semantics as the Redis registry: ids reserved at
create, a bounded FIFO queue with positions, progress, cancel within one tuning step, a job whose worker died run
again up to the bound on attempts (the dead process is seen at once and a new one started), ended jobs kept for
the retention period.

Each job is a directory `REPO/.tune-jobs/<id>/`: its record (`job.json`, the Redis hash's fields) and, until the
job ends, its clip (`clip`). Both are written beside and renamed into place (fsynced), so a record is whole or absent;
the clip is on disk before the record names the job, and `CreateTuneJob` returns after both. The server keeps
only the records in memory, never a clip (the worker reads it from disk), and it writes a record at every change
of state. A server started on the repository again (after a crash, `kill -9`, a reboot) reads the records back:
queued jobs keep their place, a job that was tuning or exporting runs again under its next attempt (or fails past
the bound on attempts), ended jobs keep their retention. Progress within a state (step, loss) is not written.

Server and worker talk over one `multiprocessing` pipe: the server sends `run` (with the clip's path), `cancel`
and `delete_model`; the worker sends a job's progress and its end, and the answers to deletions. The worker ends
when the pipe closes, so a killed server's worker does not run on beside its successor's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

from jobs import work
from jobs.spec import CANCELLED, ENDED, FAILED, QUEUED, READY, RUNNING, TUNING, InvalidField, Job
from jobs.store import (
    DeleteRefused,
    IdTaken,
    JobNotFound,
    JobStore,
    ModelNotFound,
    QueueFull,
    StoreUnavailable,
)
from tuner.threads import tuning_environment

log = logging.getLogger(__name__)

JOBS_DIR = ".tune-jobs"  # in the repository: a dot-name, never served
RECORD, CLIP = "job.json", "clip"
# What the store relies on in a record (every value a string, as `Job.to_fields` writes them).
RECORD_SCHEMA = {"type": "object", "required": ["id", "model_id", "state", "sequence", "attempt"],
                 "additionalProperties": {"type": "string"}}


def _write_file(path: Path, data: bytes) -> None:
    """`path` with `data`, whole or not at all: written beside, fsynced, renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class LocalJobStore(JobStore):
    def __init__(self, repo: Path, device: str | None, max_job_seconds: float, max_attempts: int = 3,
                 exports: str = work.DEFAULT_EXPORTS) -> None:
        self.repo, self.device, self.max_job_seconds, self.max_attempts = repo, device, max_job_seconds, max_attempts
        self.exports = ",".join(map(str, work.parse_exports(exports)))  # the local worker's, recorded in each job
        self.root = repo / JOBS_DIR
        self._jobs: dict[str, Job] = {}
        self._models: dict[str, str] = {}  # model id -> the job holding it, or "deleting"
        self._deletions: dict[str, tuple[str, concurrent.futures.Future]] = {}  # reply -> (model id, answer)
        self._observed: set[str] = set()
        self._sequence = 0
        self._lock = threading.RLock()
        self._running: str | None = None  # the job the worker runs
        self._closed = False
        self._process = None
        self._load()

    # The records on disk.

    def _load(self) -> None:
        """Read the records a previous server left; run again (or fail) the jobs it was running."""
        from tuner.artefacts import ArtefactError, read_json

        self.root.mkdir(exist_ok=True)
        for directory in sorted(self.root.iterdir()):
            name = f"{JOBS_DIR}/{directory.name}/{RECORD}"
            if not (directory / RECORD).exists():  # its create never returned: the client was told nothing
                shutil.rmtree(directory, ignore_errors=True)
                continue
            try:
                job = Job.from_fields(read_json(directory / RECORD, name, RECORD_SCHEMA))
                if job.id != directory.name:
                    raise ArtefactError(f"{name}: id: is not the directory's name")
            except (ArtefactError, ValueError, TypeError) as e:
                log.error("tune job record skipped: %s", e)
                continue
            self._jobs[job.id] = job
            self._sequence = max(self._sequence, job.sequence)
            if job.state not in (FAILED, CANCELLED):
                self._models[job.model_id] = job.id
            if job.state in RUNNING:
                log.warning("tune job %s was %s when the server stopped", job.id, job.state)
                if job.cancel_requested:
                    self._end(job, CANCELLED)
                else:
                    self._revive(job)
        if self._jobs:
            log.info("tune jobs read back from %s: %s", self.root, ", ".join(
                f"{count} {state}" for state, count in sorted(_count(self._jobs.values()).items())))
        self._dispatch()

    def _save(self, job: Job) -> None:
        _write_file(self.root / job.id / RECORD, json.dumps(job.to_fields()).encode())

    def _clip(self, job_id: str) -> Path:
        return self.root / job_id / CLIP

    @staticmethod
    def _write_clip(directory: Path, clip: bytes) -> None:
        directory.mkdir()
        _write_file(directory / CLIP, clip)

    # The worker process.

    def _start_worker(self) -> None:
        tuning_environment()  # read when the child's torch loads (this process's OpenMP has long read its own)
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=worker_main, args=(child, str(self.repo), self.device,
                                                                  self.max_job_seconds, self.exports),
                                        name="tav-local-worker", daemon=True)
        self._process.start()
        child.close()
        self._send_lock = threading.Lock()
        threading.Thread(target=self._read, args=(self._conn,), name="tav-local-worker-reader", daemon=True).start()
        log.info("local tuning worker started (pid %d)", self._process.pid)

    def _send(self, message: dict) -> bool:
        """Send to the worker (started on first use); False if it has just died (its reader thread restarts it,
        and a job it was to run stays queued)."""
        if self._process is None:
            self._start_worker()
        try:
            with self._send_lock:
                self._conn.send(message)
            return True
        except OSError as e:
            log.warning("the local tuning worker is gone (%s)", e)
            return False

    def _read(self, conn) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                self._apply(message)
        self._worker_died()

    def _apply(self, message: dict) -> None:
        if "deleted" in message:
            model_id, future = self._deletions.pop(message["reply"], (None, None))
            if future is not None:
                future.set_result(message["deleted"])
                if self._models.get(model_id) == "deleting":  # the id is free again
                    del self._models[model_id]
            return
        job = self._jobs.get(message["job"])
        if job is None or job.attempt != message["attempt"] or job.state not in RUNNING:
            return
        job.updated = job.heartbeat = time.time()
        if "progress" in message:
            state = job.state
            for name, value in message["progress"].items():
                setattr(job, name, value)
            if job.state != state:
                self._save(job)
            return
        job.state, job.ended = message["state"], time.time()
        for name, value in message["values"].items():
            setattr(job, name, value)
        self._save(job)
        self._clip(job.id).unlink(missing_ok=True)
        if job.state != READY and self._models.get(job.model_id) == job.id:
            del self._models[job.model_id]
        self._running = None
        self._dispatch()

    def _worker_died(self) -> None:
        with self._lock:
            if self._closed:
                return
            log.error("the local tuning worker died (exit code %s); starting another", self._process.exitcode)
            job = self._jobs.get(self._running) if self._running else None
            self._running = None
            if job is not None:
                self._revive(job)
            self._start_worker()
            for reply, (model_id, _) in self._deletions.items():  # accepted deletions it had not answered
                self._send({"delete_model": model_id, "reply": reply})
            self._dispatch()

    def _revive(self, job: Job) -> None:
        """Queue a job whose worker died again under its next attempt, or fail it past the bound."""
        if job.attempt >= self.max_attempts:
            self._end(job, FAILED, f"its tuning worker died {job.attempt} times; the clip or the settings may crash "
                                   f"the tuner (try fewer frames or a smaller size)")
            return
        job.attempt += 1
        job.state, job.worker, job.step, job.loss, job.updated = QUEUED, "", 0, 0.0, time.time()
        self._save(job)

    def _end(self, job: Job, state: str, reason: str = "") -> None:
        job.state, job.failure_reason, job.ended = state, reason, time.time()
        job.updated = job.ended
        self._save(job)
        self._clip(job.id).unlink(missing_ok=True)
        if self._models.get(job.model_id) == job.id:
            del self._models[job.model_id]

    def _dispatch(self) -> None:
        """Hand the next queued job to the worker when it is idle (under the lock)."""
        if self._running is not None or self._closed:
            return
        queued = sorted((j for j in self._jobs.values() if j.state == QUEUED), key=lambda j: j.sequence)
        if not queued:
            return
        job = queued[0]
        if not self._send({"run": {**job.to_fields(), "state": TUNING}, "clip": str(self._clip(job.id))}):
            return
        job.state, job.worker, job.started = TUNING, f"local-{self._process.pid}", time.time()
        job.updated = job.heartbeat = job.started
        self._save(job)  # a server started after this one stops runs it again under its next attempt
        self._running = job.id

    # The JobStore interface.

    async def ping(self) -> bool:
        return True  # the registry is in this process

    async def create(self, job: Job, clip: bytes, max_queued: int) -> Job:
        directory = self.root / job.id
        await asyncio.to_thread(self._write_clip, directory, clip)  # off the event loop: up to 64 MiB
        try:
            with self._lock:
                if sum(j.state == QUEUED for j in self._jobs.values()) >= max_queued:
                    raise QueueFull(max_queued)
                if job.model_id in self._models:
                    raise IdTaken(job.model_id, self._models[job.model_id])
                job.sequence, job.exports = self._sequence + 1, self.exports
                self._save(job)  # from here the job is stored
                self._sequence = job.sequence
                self._models[job.model_id] = job.id
                self._jobs[job.id] = job
                self._dispatch()
                return Job.from_fields(job.to_fields())
        finally:
            if job.id not in self._jobs:
                shutil.rmtree(directory, ignore_errors=True)

    async def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise JobNotFound(job_id)
            return Job.from_fields(job.to_fields())  # a copy: the reader thread changes the original

    async def position(self, job: Job) -> int:
        with self._lock:
            return sum(j.state == QUEUED and j.sequence < job.sequence for j in self._jobs.values())

    async def list(self, page_size: int, page_token: str) -> tuple[list[Job], str]:
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: (j.created, j.sequence), reverse=True)
            if not page_token.isdigit() and page_token:
                raise InvalidField("page_token", "is not a token this server gave")
            start = int(page_token or 0)
            page = [Job.from_fields(j.to_fields()) for j in jobs[start : start + page_size]]
            return page, str(start + page_size) if start + page_size < len(jobs) else ""

    async def cancel(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise JobNotFound(job_id)
            if job.state == QUEUED:
                job.cancel_requested = True
                self._end(job, CANCELLED)
            elif job.state in RUNNING:
                job.cancel_requested, job.updated = True, time.time()
                self._save(job)
                self._send({"cancel": job.id})
        return await self.get(job_id)

    async def delete(self, job_id: str) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise JobNotFound(job_id)
            if job.state not in ENDED:
                raise DeleteRefused(f"job {job_id} is {job.state}: cancel it first, or wait for it to end")
            self._forget(job)

    def _forget(self, job: Job) -> None:
        del self._jobs[job.id]
        shutil.rmtree(self.root / job.id, ignore_errors=True)
        if self._models.get(job.model_id) == job.id:
            del self._models[job.model_id]

    async def delete_model(self, model_id: str, timeout: float, present: bool) -> bool:
        with self._lock:
            holder = self._models.get(model_id)
            if holder == "deleting":
                raise DeleteRefused(f"model {model_id!r} is being deleted already")
            if holder is not None and self._jobs.get(holder) and self._jobs[holder].state not in ENDED:
                raise DeleteRefused(f"tune job {holder} is making model {model_id!r}; cancel it first")
            if not present:
                raise ModelNotFound(model_id)
            reply = uuid.uuid4().hex
            if not self._send({"delete_model": model_id, "reply": reply}):
                raise StoreUnavailable("the local tuning worker is restarting; retry shortly")
            self._models[model_id] = "deleting"  # until the worker answers
            future = concurrent.futures.Future()
            self._deletions[reply] = (model_id, future)
        try:
            if not await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout):
                raise ModelNotFound(model_id)
        except asyncio.TimeoutError:
            return False  # accepted: the worker does it when it gets to it (a restarted one is asked again)
        return True

    async def pending_deletions(self) -> set[str]:
        with self._lock:
            return {model_id for model_id, _ in self._deletions.values()}

    async def sweep(self, dead_after: float, max_attempts: int, retention: float) -> list[Job]:
        now, ended = time.time(), []
        with self._lock:
            for job in list(self._jobs.values()):
                if job.state not in ENDED:
                    continue
                if job.ended < now - retention:
                    self._forget(job)
                elif job.id not in self._observed:
                    self._observed.add(job.id)
                    ended.append(Job.from_fields(job.to_fields()))
            self._observed &= set(self._jobs)
        return ended

    async def counts(self) -> dict[str, int]:
        with self._lock:
            return _count(self._jobs.values())

    async def close(self) -> None:
        with self._lock:
            self._closed = True
        if self._process is not None:
            self._process.terminate()
            await asyncio.to_thread(self._process.join, 30)
            self._conn.close()


def _count(jobs) -> dict[str, int]:
    """Jobs by state."""
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.state] = counts.get(job.state, 0) + 1
    return counts


class PipeHooks:
    """The local worker's link to the server: progress over the pipe, the cancel flag set by its reader thread,
    the time limit."""

    def __init__(self, send, job: Job, cancelled: threading.Event, deadline: float) -> None:
        self.send, self.job, self.cancelled, self.deadline = send, job, cancelled, deadline

    def progress(self, state: str, step: int = 0, total: int = 0, loss: float = 0.0) -> None:
        self.send({"job": self.job.id, "attempt": self.job.attempt,
                   "progress": work.progress_fields(state, step, total, loss)})

    def may_publish(self) -> bool:
        """Always: the server runs a job again only when this process has died, so a live attempt is current."""
        return True

    def stop_reason(self) -> work.Stopped | None:
        if self.cancelled.is_set():
            return work.Stopped("cancelled", cancelled=True)
        if time.monotonic() > self.deadline:
            return work.Stopped("the job ran past the worker's maximum job time", cancelled=False)
        return None


def worker_main(conn, repo: str, device: str | None, max_job_seconds: float, exports: str = work.DEFAULT_EXPORTS
                ) -> None:
    """The local worker process: run the jobs the server sends, one at a time; delete models when asked."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s tav-local-worker: %(message)s")
    # The server stops this process with SIGTERM: end through Python's exit, so a half-written job directory is
    # removed and the locks this process made are released (killed outright, they leak: the resource tracker warns).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # The server starts this process as a daemon, so that it never waits for it at exit; multiprocessing lets only
    # non-daemons start processes, and the exports are child processes (`work.export_in_child`). This flag is read
    # in this process alone: the server's own record of it is unchanged.
    multiprocessing.current_process().daemon = False
    repo_path = Path(repo)
    removed = work.clean_leftovers(repo_path, lambda job_id, attempt: False)  # the only worker: nothing runs yet
    if removed:
        log.info("removed what a killed worker left: %s", ", ".join(removed))
    send_lock = threading.Lock()

    def send(message: dict) -> None:
        with send_lock:
            conn.send(message)

    jobs: queue.Queue = queue.Queue()
    cancelled: dict[str, threading.Event] = {}

    def read() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the server is gone (stopped, or killed): so is this worker
                os.kill(os.getpid(), signal.SIGTERM)
                jobs.put(None)
                return
            if "run" in message:
                job = Job.from_fields(message["run"])
                cancelled[job.id] = threading.Event()
                jobs.put((job, message["clip"]))
            elif "cancel" in message:
                cancelled.get(message["cancel"], threading.Event()).set()
            elif "delete_model" in message:
                send({"deleted": work.delete_model(repo_path, message["delete_model"]), "reply": message["reply"]})

    targets = work.parse_exports(exports)
    threading.Thread(target=read, name="reader", daemon=True).start()
    while (item := jobs.get()) is not None:
        job, clip = item
        hooks = PipeHooks(send, job, cancelled[job.id], time.monotonic() + max_job_seconds)
        values: dict = {}
        try:
            outcome = work.run(job, Path(clip), repo_path, hooks, device, targets)
            state, values = READY, {"tuning_seconds": outcome.tuning_seconds, "export_seconds": outcome.export_seconds}
        except work.Stopped as e:
            state = CANCELLED if e.cancelled else FAILED
            values = {"failure_reason": "" if e.cancelled else str(e)}
        except Exception as e:  # noqa: BLE001 - every failure ends the job with a reason; the worker goes on
            log.exception("job %s failed", job.id)
            state, values = FAILED, {"failure_reason": work.failure_reason(e)}
        send({"job": job.id, "attempt": job.attempt, "state": state, "values": values})
        cancelled.pop(job.id, None)
