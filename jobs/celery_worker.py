"""`tav-tune-worker --broker redis://... --repo DIR`: a tuning worker. One Celery worker with the solo pool runs one
tune job at a time on this machine's GPU (or CPU), in its own process (never forked after CUDA is initialised;
see `jobs.celery_app` for the queue settings). Beside it, a control thread takes model deletions for the
repository (those accepted while no worker ran included), and the janitor removes what killed workers left
behind and the store entries no model or job uses (`tav-export --gc`), at start and after every job.

A job's progress, heartbeat and end go to the job registry in Redis (`jobs.redis_store`); the server's sweep
runs a job again under a new attempt when its heartbeat stops, which turns the stale message of the dead attempt
into a no-op, and the publish of the superseded attempt, should it still run, into a refusal (the fence).

SIGTERM (a scale-down) is Celery's warm shutdown: the running job is finished and published, its message
acknowledged, then the worker exits.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from jobs import work
from jobs.celery_app import QUEUE, TUNE_TASK, make_app
from jobs.redis_store import RedisWorkerStore
from jobs.spec import CANCELLED, FAILED, READY, Job

log = logging.getLogger("tav-tune-worker")

HEARTBEAT_SECONDS = 2.0
DEAD_AFTER = 60.0  # seconds without a heartbeat before a job counts as orphaned (the server's default too)
REDIS_RETRY_SECONDS = 600.0  # how long a worker waits for Redis to take or end a job


@dataclass
class Worker:
    store: RedisWorkerStore
    repo: Path
    name: str
    device: str | None
    max_job_seconds: float
    settings: dict  # the tuning settings that belong to the worker (precision, gradient checkpointing)
    exports: tuple[work.ExportTarget, ...] = (work.ExportTarget("onnx"),)  # what it exports of each model

    def clean_leftovers(self) -> None:
        removed = work.clean_leftovers(self.repo, lambda job_id, attempt: self.store.running(job_id, attempt,
                                                                                               DEAD_AFTER))
        if removed:
            log.info("removed what killed workers left: %s", ", ".join(removed))
        from exporter import gc  # not at the top: the exporter package sets OMP_WAIT_POLICY before torch would load

        try:
            gc.collect(self.repo, progress=log.info)  # store entries no model or job uses any more
        except gc.GcError as e:
            log.warning("store entries not collected: %s", e)

    def run(self, job_id: str, attempt: int) -> None:
        """The `tav.tune` task: claim the job's attempt (a stale message claims nothing), run it, record its end."""
        claimed = self._retrying("claim", lambda: self.store.claim(job_id, attempt, self.name), job_id)
        if claimed is None:
            log.info("job %s attempt %d: nothing to do (cancelled, done, or run again under a later attempt)",
                     job_id, attempt)
            return
        job, clip = claimed
        log.info("job %s (attempt %d): tuning model %s", job.id, job.attempt, job.model_id)
        hooks = RedisHooks(self.store, job, time.monotonic() + self.max_job_seconds)
        hooks.record(exports=",".join(map(str, self.exports)))
        try:
            outcome = work.run(job, clip, self.repo, hooks, self.device, self.exports, **self.settings)
            self._finish(job, READY, tuning_seconds=outcome.tuning_seconds, export_seconds=outcome.export_seconds)
            log.info("job %s: model %s published", job.id, job.model_id)
        except work.Stopped as e:
            if not hooks.superseded:
                self._finish(job, CANCELLED if e.cancelled else FAILED, failure_reason="" if e.cancelled else str(e))
            log.info("job %s stopped: %s", job.id, e)
        except Exception as e:  # noqa: BLE001 - every failure ends the job with a reason; the worker goes on
            reason = work.failure_reason(e)
            log.exception("job %s failed: %s", job.id, reason)
            self._finish(job, FAILED, failure_reason=reason)
        finally:
            hooks.close()
            self.clean_leftovers()

    def _finish(self, job: Job, state: str, **values) -> None:
        self._retrying("record the end of", lambda: self.store.finish(job, state, **values), job.id)

    @staticmethod
    def _retrying(what: str, call, job_id: str = ""):
        """`call()`, tried again every 2 s while Redis is unreachable, for up to `REDIS_RETRY_SECONDS`: a worker
        that loses Redis in the middle of taking or ending a job waits for it rather than drop the job."""
        deadline = time.monotonic() + REDIS_RETRY_SECONDS
        while True:
            try:
                return call()
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                log.warning("Redis is unreachable; waiting to %s job %s", what, job_id)
                time.sleep(2.0)

    def serve_control(self, stop: threading.Event) -> None:
        """Do the accepted model deletions until `stop`: at once when a wake-up comes, and within 2 s those
        recorded while no worker ran (or Redis was away). The waiting server is told once the model is gone."""
        while not stop.is_set():
            try:
                request = self.store.next_control(timeout=2)
                for model_id in self.store.pending_deletions():
                    deleted = work.delete_model(self.repo, model_id)
                    self.store.deleted_model(model_id)
                    log.info("model %s %s", model_id, "deleted" if deleted else "gone already, nothing deleted")
                if request is not None:
                    self.store.reply(request["reply"], {"deleted": True})
            except redis.ConnectionError:
                time.sleep(2.0)
            except Exception:  # a bad request or a failed deletion must not end the loop: it logs and goes on
                log.exception("a control request failed")
                time.sleep(2.0)


class RedisHooks:
    """A running job's link to its record: progress, a heartbeat thread, the cancel flag and the time limit."""

    def __init__(self, store: RedisWorkerStore, job: Job, deadline: float) -> None:
        self.store, self.job, self.deadline = store, job, deadline
        self.superseded = False  # the server ran the job again elsewhere: this attempt must end quietly
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._beating, name=f"heartbeat-{job.id}", daemon=True)
        self._beat.start()

    def record(self, **values) -> None:
        """Write `values` into the job's record (with the heartbeat); a lost Redis skips it."""
        try:
            if not self.store.update(self.job, **values):
                self.superseded = True
        except redis.ConnectionError:
            pass  # Redis is away: the next beat tries again

    def _beating(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            self.record()

    def progress(self, state: str, step: int = 0, total: int = 0, loss: float = 0.0) -> None:
        self.record(**work.progress_fields(state, step, total, loss))

    def may_publish(self) -> bool:
        """The publish fence (`RedisWorkerStore.fence`), waited for while Redis is away; refused, this attempt
        ends quietly."""
        if not Worker._retrying("publish", lambda: self.store.fence(self.job), self.job.id):
            self.superseded = True
        return not self.superseded

    def stop_reason(self) -> work.Stopped | None:
        if self.superseded:
            return work.Stopped("this attempt was superseded: the job runs again elsewhere", cancelled=False)
        try:
            if self.store.cancel_requested(self.job):
                return work.Stopped("cancelled", cancelled=True)
        except redis.ConnectionError:
            pass
        if time.monotonic() > self.deadline:
            return work.Stopped("the job ran past the worker's maximum job time", cancelled=False)
        return None

    def close(self) -> None:
        self._stop.set()
        self._beat.join(10)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tav-tune-worker", description="Run tune jobs from the queue, one at a time.")
    broker = p.add_mutually_exclusive_group(required=True)
    broker.add_argument("--broker", help="redis://[:PASSWORD@]HOST:PORT/DB (rediss:// for TLS)")
    broker.add_argument("--broker-file", type=Path, help="read the broker URL from this file (keeps a password "
                        "out of the process list)")
    p.add_argument("--repo", required=True, type=Path, help="the model repository (read-write)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--name", default=f"{socket.gethostname()}-{os.getpid()}", help="this worker's name")
    p.add_argument("--max-job-seconds", type=float, default=7200.0, help="a job running longer fails")
    p.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default="auto",
                   help="tuning precision (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="less GPU memory, slower steps")
    p.add_argument("--export", type=work.export_argument, default=work.parse_exports(work.DEFAULT_EXPORTS),
                   metavar="KIND[:PRECISION],...", help="what to export of every tuned model, as the replicas serve "
                   "it: onnx (onnxruntime; fp32 or fp16), tensorrt (plans; needs a GPU and tensorrt), aoti "
                   "(AOTInductor packages for --device and this machine's compile target); default onnx (fp32)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.repo.is_dir():
        p.error(f"{args.repo} is not a directory")
    if not 0 < args.max_job_seconds < math.inf:  # nan and inf too: they reach the broker's int() timeout
        p.error(f"--max-job-seconds must be positive and finite, got {args.max_job_seconds}")
    try:
        work.check_exports(args.export, args.device)
    except ValueError as e:
        p.error(f"--export: {e}")
    url = args.broker_file.read_text().strip() if args.broker_file else args.broker
    settings = {"mixed_precision": args.mixed_precision, "gradient_checkpointing": args.gradient_checkpointing}
    worker = Worker(RedisWorkerStore(url), args.repo, args.name, args.device, args.max_job_seconds, settings,
                    args.export)
    app = make_app(url, args.max_job_seconds)
    app.task(name=TUNE_TASK)(worker.run)
    try:
        worker.clean_leftovers()
    except redis.ConnectionError as e:
        log.warning("Redis is unreachable (%s); the janitor runs after the first job", e)
    stop = threading.Event()
    threading.Thread(target=worker.serve_control, args=(stop,), name="control", daemon=True).start()
    try:
        app.worker_main(["worker", "--pool", "solo", "--concurrency", "1", "--queues", QUEUE, "--hostname",
                         f"{args.name}@%h", "--without-mingle", "--without-gossip", "--loglevel", "INFO"])
    finally:
        stop.set()


if __name__ == "__main__":
    main()
