"""The server's view of the job registry: one interface, two stores with the same semantics. `RedisJobStore`
(`jobs.redis_store`) when the server is given a broker, shared by every replica and every Celery worker;
`LocalJobStore` (`jobs.local`) otherwise, in the repository's `.tune-jobs/` directory with one local worker process
of the server's own (the embedded default, so `make demo` needs nothing else installed).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from jobs.spec import Job


class StoreUnavailable(Exception):
    """The registry cannot be reached (Redis is down); the call may be retried."""


class JobNotFound(Exception):
    """No job has this id (or it was deleted, or its retention passed)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"tune job {job_id[:80]!r} is unknown (or its retention passed)")


class ModelNotFound(Exception):
    def __init__(self, model_id: str) -> None:
        super().__init__(f"model {model_id!r} is not in the repository")


class IdTaken(Exception):
    """A job already holds this model id, or it is being deleted."""

    def __init__(self, model_id: str, holder: str) -> None:
        what = {"deleting": "is being deleted", "repository": "is a model in the repository already"}.get(
            holder, f"is reserved by tune job {holder}")
        super().__init__(f"model id {model_id!r} {what}")


class QueueFull(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"{limit} tune jobs are queued already; retry later")


class DeleteRefused(Exception):
    """The job or model is in a state that does not allow deleting it."""


class JobStore(ABC):
    @abstractmethod
    async def ping(self) -> bool:
        """Whether the registry is reachable."""

    @abstractmethod
    async def create(self, job: Job, clip: bytes, max_queued: int) -> Job:
        """Store and queue a job (atomically reserving its model id); from its return the job is not lost.
        Raises QueueFull or IdTaken."""

    @abstractmethod
    async def get(self, job_id: str) -> Job:
        """Raises JobNotFound."""

    @abstractmethod
    async def position(self, job: Job) -> int:
        """Queued jobs that go before `job`."""

    @abstractmethod
    async def list(self, page_size: int, page_token: str) -> tuple[list[Job], str]:
        """A page of jobs, newest first, and the next page's token ("" on the last)."""

    @abstractmethod
    async def cancel(self, job_id: str) -> Job:
        """End a queued job now; ask a running one to stop (see the Tuning service). Raises JobNotFound."""

    @abstractmethod
    async def delete(self, job_id: str) -> None:
        """Forget an ended job. Raises JobNotFound or DeleteRefused."""

    @abstractmethod
    async def delete_model(self, model_id: str, timeout: float, present: bool) -> bool:
        """Have a worker take a model out of the repository (replicas mount it read-only; `present`: whether the
        caller sees it there). The deletion is accepted (recorded, the id reserved) or refused (nothing recorded) at
        once; then True once a worker has done it within `timeout`, or False: accepted and pending, a worker does it
        when one runs, and the id stays reserved until then. Raises DeleteRefused while a live job holds the id or
        it is being deleted, ModelNotFound when it is not `present` (or the worker found none), StoreUnavailable
        when the store is unreachable (nothing recorded)."""

    @abstractmethod
    async def pending_deletions(self) -> set[str]:
        """The model ids whose accepted deletion no worker has done yet (replicas stop serving them)."""

    @abstractmethod
    async def sweep(self, dead_after: float, max_attempts: int, retention: float) -> list[Job]:
        """Housekeeping, every few seconds: jobs whose worker stopped beating for `dead_after` seconds (while the
        store was reachable from here: an outage of the store is not a worker death) run again (up to
        `max_attempts`) or fail; ended jobs older than `retention` seconds are forgotten. Returns the jobs
        that ended since the last sweep, each once."""

    @abstractmethod
    async def counts(self) -> dict[str, int]:
        """Jobs by state."""

    @abstractmethod
    async def close(self) -> None: ...
