"""The Celery application both sides share: the server sends `tav.tune` tasks by name (it never imports the
worker's code), `tav-tune-worker` runs them. The settings that make a tune job safe to queue:

- `task_acks_late` + `task_reject_on_worker_lost`: a task is acknowledged when it ends, not when it starts, so a
  worker that dies mid-job leaves its message to be delivered again (and a prefork child killed mid-task has its
  message requeued at once);
- `worker_prefetch_multiplier = 1`: a worker holds one job at a time, never a backlog another worker could run;
- the broker's `visibility_timeout` is longer than the longest job (`max_job_seconds` + 10 minutes), so a running
  job's message is never handed to a second worker while the first still works; a dead worker is found much
  sooner by its job's heartbeat (`jobs.redis_store`), and the job runs again under a new attempt number, which
  makes the old message a no-op when it comes back;
- JSON only (no pickle on the wire); reconnect to the broker for ever, at start and after a Redis restart.

Workers run with the solo pool (`tav-tune-worker`): the job runs in the worker's own process, which never forks,
so a process that has initialised CUDA is never forked.
"""

from __future__ import annotations

from celery import Celery

TUNE_TASK = "tav.tune"
QUEUE = "tav-tune"
VISIBILITY_MARGIN = 600  # seconds past the longest job


def make_app(broker: str, max_job_seconds: float, transport_options: dict | None = None) -> Celery:
    app = Celery("tav", broker=broker)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=False,  # a Redis blip must not stop a tuning job
        broker_transport_options={"visibility_timeout": int(max_job_seconds + VISIBILITY_MARGIN),
                                  **(transport_options or {})},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
    )
    return app


def task_id(job_id: str, attempt: int) -> str:
    """One message per attempt of a job; its id names both."""
    return f"{job_id}-{attempt}"
