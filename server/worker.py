"""The worker: one thread that owns the engines and runs generations one at a time from a fair, bounded queue.

The gRPC handlers live on the asyncio loop; the generation core is blocking, CPU-bound code. They meet here:
a handler puts a `Job` in the `FairQueue` (one FIFO per model, served round-robin, so a burst on one model
does not starve the others); the worker thread takes jobs in turn, runs `Generator.generate`, and sends each
progress step and the outcome back with `loop.call_soon_threadsafe` into the job's asyncio queue. Cancelling
sets the job's threading event, which the core checks before every UNet call, so a cancelled request or an
expired deadline frees the worker within one denoising step.

While the server drains, the worker starts a queued job only if its measured cost says it finishes before the
grace period ends; the others are answered UNAVAILABLE before their work starts (no `Started` event: the
client may retry them elsewhere).

A failure of one request or one model is that request's or model's error. A failure of the worker itself (an
exception outside a job, or an error that poisons the CUDA context) ends the thread: every waiting job is answered
UNAVAILABLE, not started, and `on_fatal` tells the server, which reports NOT_SERVING and exits non-zero so its
supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import torch

from server.engines.base import Unsupported
from server.generate import Cancelled, GenerationOptions, GenerationResult, InvalidRequest
from server.registry import ModelRegistry, ModelUnavailable

log = logging.getLogger(__name__)


@dataclass
class Started:
    """The worker took the job; it waited `queued` seconds."""

    queued: float


@dataclass
class Progress:
    phase: str
    step: int
    total: int


@dataclass
class Done:
    result: GenerationResult


@dataclass
class Failed:
    code: grpc.StatusCode
    message: str


Event = Started | Progress | Done | Failed


@dataclass(eq=False)
class Job:
    """One accepted request: what to generate, and the channel back to its handler on the asyncio loop."""

    id: str
    model: str
    options: GenerationOptions
    loop: asyncio.AbstractEventLoop
    deadline: float | None = None  # time.monotonic() past which the request is dropped
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    stop: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)

    def emit(self, event: Event) -> None:
        """Hand an event to the handler (from any thread)."""
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def cancelled(self) -> bool:
        """The core's cancellation check: the handler gave up (client cancel, disconnect) or the deadline passed."""
        return self.stop.is_set() or self.expired()


class QueueFull(Exception):
    """The queue holds its maximum of waiting jobs."""


class QueueClosed(Exception):
    """The server is draining and takes no new jobs."""


class FairQueue:
    """Waiting jobs, one FIFO per model, taken round-robin across models; at most `max_size` in all.

    Thread-safe: handlers put and remove on the asyncio loop, the worker takes on its thread.
    """

    def __init__(self, max_size: int) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        self.max_size = max_size
        self._queues: OrderedDict[str, deque[Job]] = OrderedDict()  # in turn order: the next model first
        self._size = 0
        self._closed = False
        self._changed = threading.Condition()

    def __len__(self) -> int:
        return self._size

    def put(self, job: Job) -> int:
        """Add a job; returns how many jobs will be taken before it (0: next)."""
        with self._changed:
            if self._closed:
                raise QueueClosed
            if self._size >= self.max_size:
                raise QueueFull
            self._queues.setdefault(job.model, deque()).append(job)
            self._size += 1
            self._changed.notify()
            return next(i for i, queued in enumerate(self._order()) if queued is job)

    def get(self) -> Job | None:
        """The next job in turn, waiting for one; None once the queue is closed and empty."""
        with self._changed:
            while not self._size and not self._closed:
                self._changed.wait()
            if not self._size:
                return None
            model, jobs = next(iter(self._queues.items()))
            job = jobs.popleft()
            self._size -= 1
            del self._queues[model]
            if jobs:  # the model goes to the back of the turn order
                self._queues[model] = jobs
            return job

    def remove(self, job: Job) -> bool:
        """Take a waiting job out (its request was cancelled); False if it is not waiting."""
        with self._changed:
            jobs = self._queues.get(job.model)
            if jobs is None or job not in jobs:
                return False
            jobs.remove(job)
            self._size -= 1
            if not jobs:
                del self._queues[job.model]
            return True

    def take_all(self) -> list[Job]:
        """Take every waiting job out, in turn order."""
        with self._changed:
            jobs = list(self._order())
            self._queues.clear()
            self._size = 0
            return jobs

    def close(self) -> None:
        """Take no new jobs; `get` returns the waiting ones, then None."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _order(self) -> Iterator[Job]:
        """The waiting jobs in the order `get` will return them: one per model in turn."""
        queues = [list(jobs) for jobs in self._queues.values()]
        for depth in range(max(map(len, queues), default=0)):
            yield from (jobs[depth] for jobs in queues if depth < len(jobs))


class WorkerFailed(Exception):
    """The worker cannot go on (the device is unusable); the server must restart."""


def poisons_the_device(error: BaseException) -> bool:
    """Whether an error leaves the device unusable for every later request: CUDA errors are sticky (an illegal
    memory access or a device-side assert fails every later call in the process)."""
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(error, accelerator_error) or (isinstance(error, RuntimeError) and "CUDA error" in str(error))


NOT_STARTED = "the server is shutting down and did not start this request; retry on another replica"


class Worker:
    """The thread that owns the engines: warms the registry's models, then runs jobs until the queue closes."""

    def __init__(self, registry: ModelRegistry, queue: FairQueue, on_ready: Callable[[], None],
                 on_fatal: Callable[[str], None]) -> None:
        self.registry = registry
        self.queue = queue
        self.on_ready = on_ready
        self.on_fatal = on_fatal
        self.drain_deadline: float | None = None  # time.monotonic(); set when the server starts draining
        self._thread = threading.Thread(target=self._run, name="tav-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def drain(self, deadline: float) -> None:
        """Finish the running job and the queued ones that fit before `deadline`, then stop."""
        self.drain_deadline = deadline
        self.queue.close()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to stop; True if it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            self.registry.warm()
            self.on_ready()
            while (job := self.queue.get()) is not None:
                job.emit(self._run_job(job))
        except BaseException as e:  # the worker itself failed: nothing more can run in this process
            log.critical("the worker failed: %s", e, exc_info=not isinstance(e, WorkerFailed))
            self.queue.close()
            for job in self.queue.take_all():
                job.emit(Failed(grpc.StatusCode.UNAVAILABLE, NOT_STARTED))
            self.on_fatal(f"the worker failed: {e}")

    def _run_job(self, job: Job) -> Event:
        if job.cancelled():
            return self._stopped(job)
        if self.drain_deadline is not None:
            estimate = self.registry.estimate(job.model, job.options)
            if estimate is None or time.monotonic() + estimate > self.drain_deadline:
                log.info("request %s not started: it would not finish within the grace period", job.id)
                return Failed(grpc.StatusCode.UNAVAILABLE, NOT_STARTED)
        job.emit(Started(time.monotonic() - job.enqueued))
        log.info("request %s started on model %s", job.id, job.model)
        try:
            generator = self.registry.load(job.model)
            result = generator.generate(
                job.options, progress=lambda phase, step, total: job.emit(Progress(phase, step, total)),
                cancelled=job.cancelled,
            )
        except InvalidRequest as e:
            return Failed(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Unsupported as e:
            return Failed(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except ModelUnavailable as e:
            return Failed(grpc.StatusCode.NOT_FOUND, str(e))
        except Cancelled:
            return self._stopped(job)
        except Exception as e:  # a bug or a runtime failure: report it on this request, keep serving
            log.exception("request %s failed", job.id)
            failed = Failed(grpc.StatusCode.INTERNAL, "generation failed (details in the server log)")
            if poisons_the_device(e):
                job.emit(failed)
                raise WorkerFailed(f"the device is unusable after request {job.id}: {e}") from e
            return failed
        self.registry.observe(job.model, result)
        log.info("request %s done in %.2fs", job.id, result.timings["total"])
        return Done(result)

    @staticmethod
    def _stopped(job: Job) -> Failed:
        log.info("request %s stopped (%s)", job.id, "deadline" if job.expired() else "cancelled")
        if job.expired():
            return Failed(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed")
        return Failed(grpc.StatusCode.CANCELLED, "the request was cancelled")
