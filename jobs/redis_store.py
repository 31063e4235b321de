"""The job registry in Redis, which Celery alone does not give: every job's state, progress and place in the
queue, cancel flags and model-id reservations. Each change that must not be half-made is one Lua script (Redis
runs a script atomically), so two servers or workers never see a job half-changed.

Keys (prefix `tav:`):

  job:<id>        hash: the job's record (`jobs.spec.Job.to_fields`)
  clip:<id>       the clip's bytes, until the job ends
  jobs            sorted set of every job id, by creation time (listing)
  queue           sorted set of queued job ids, by queue order (a job's position is its rank)
  running         set of job ids a worker runs
  active          list of the ids of every live job, queued or running (one entry each, from create to end): what
                  the autoscaler reads (deploy/k8s/keda), as kombu's queue holds only the waiting jobs' messages
  ended           sorted set of ended job ids, by end time (retention)
  unobserved      set of ended job ids no server has counted in its metrics yet (each is popped once)
  model:<id>      who holds a model id: a job id, or "deleting"; set when a job is created, so two jobs can never
                  claim one id and a deletion cannot race a publish
  seq             the queue order counter
  deletions       set of model ids whose deletion was accepted and no worker has done yet (their `model:<id>` is
                  "deleting" until then); every worker takes them, at start and every 2 s
  control         list of wake-ups for the workers (a deletion to do now); `reply:<uuid>` carries the answer back

Redis runs with append-only persistence (`appendfsync always`, deploy/redis): a job is acknowledged when
CreateTuneJob returns, and from then on survives a worker crash and a Redis restart.

`RedisJobStore` is the server's side (redis.asyncio, never blocking the event loop); `RedisWorkerStore` the
worker's (claim a job, report progress, heartbeat, take the publish fence, finish, delete models).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
import uuid

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.retry
from kombu.exceptions import OperationalError
from redis.backoff import ExponentialBackoff

from jobs.celery_app import QUEUE as BROKER_QUEUE
from jobs.celery_app import TUNE_TASK, make_app, task_id
from jobs.spec import RUNNING, InvalidField, Job
from jobs.store import (
    DeleteRefused,
    IdTaken,
    JobNotFound,
    JobStore,
    ModelNotFound,
    QueueFull,
    StoreUnavailable,
)
from tuner.io_utils import parse_json

log = logging.getLogger(__name__)

PREFIX = "tav:"
CONTROL = PREFIX + "control"


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def clip_key(job_id: str) -> str:
    return f"{PREFIX}clip:{job_id}"


def model_key(model_id: str) -> str:
    return f"{PREFIX}model:{model_id}"


JOBS, QUEUE, RUNNING_SET, SEQ = PREFIX + "jobs", PREFIX + "queue", PREFIX + "running", PREFIX + "seq"
ENDED_SET, UNOBSERVED = PREFIX + "ended", PREFIX + "unobserved"
ACTIVE = PREFIX + "active"  # the list KEDA's redis trigger reads: one entry per queued or running job
DELETIONS = PREFIX + "deletions"


def end_keys(job: Job) -> list[str]:
    """The keys every script that may end a job takes first (END_JOB's)."""
    return [job_key(job.id), clip_key(job.id), model_key(job.model_id), ENDED_SET, UNOBSERVED, ACTIVE]
BROKER_UNACKED = "unacked"  # kombu's Redis transport: messages delivered and not yet acknowledged

# KEYS: job, clip, jobs, queue, model, seq, active. ARGV: id, created, max queued, clip, then field/value pairs.
CREATE = """
if redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[3]) then return {'full', ''} end
local holder = redis.call('GET', KEYS[5])
if holder then return {'taken', holder} end
redis.call('SET', KEYS[5], ARGV[1])
local seq = redis.call('INCR', KEYS[6])
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('HSET', KEYS[1], 'sequence', seq)
redis.call('SET', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], seq, ARGV[1])
redis.call('RPUSH', KEYS[7], ARGV[1])
return {'ok', tostring(seq)}
"""
# KEYS: job, queue, running. ARGV: id, attempt, worker, now.
CLAIM = """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' or redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[2] then
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'tuning', 'worker', ARGV[3], 'started', ARGV[4], 'heartbeat', ARGV[4],
           'updated', ARGV[4], 'step', '0', 'loss', '0.0')
return 1
"""
# KEYS: job. ARGV: attempt, then field/value pairs. Returns 0 when the attempt is no longer the job's.
UPDATE = """
local state = redis.call('HGET', KEYS[1], 'state')
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] or (state ~= 'tuning' and state ~= 'exporting') then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""
# KEYS: job. ARGV: attempt, now. The publish fence: 1 while the record still names this attempt as the running one
# (its heartbeat refreshed, so the sweep leaves the rename and the end a full `--worker-dead-after`), else 0: the job
# was run again meanwhile (its worker was taken for dead), cancelled while queued again, or ended.
FENCE = """
local state = redis.call('HGET', KEYS[1], 'state')
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] or (state ~= 'tuning' and state ~= 'exporting') then
  return 0
end
redis.call('HSET', KEYS[1], 'heartbeat', ARGV[2], 'updated', ARGV[2])
return 1
"""
# A job ends (in the scripts below): its state and end time, its clip dropped, its model id released unless it
# published, it leaves the live jobs and joins the ended jobs (retention) and those not yet counted (metrics).
# KEYS[1] job, KEYS[2] clip, KEYS[3] model, KEYS[4] ended, KEYS[5] unobserved, KEYS[6] active.
END_JOB = """
local function end_job(id, state, now)
  redis.call('HSET', KEYS[1], 'state', state, 'ended', now, 'updated', now)
  redis.call('DEL', KEYS[2])
  if state ~= 'ready' and redis.call('GET', KEYS[3]) == id then redis.call('DEL', KEYS[3]) end
  redis.call('ZADD', KEYS[4], now, id)
  redis.call('SADD', KEYS[5], id)
  redis.call('LREM', KEYS[6], 0, id)
end
"""
# KEYS: job, clip, model, ended, unobserved, active, running. ARGV: id, attempt, state, now, then field/value
# pairs.
FINISH = END_JOB + """
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[2] then return 0 end
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'tuning' and state ~= 'exporting' then return 0 end
if #ARGV > 4 then redis.call('HSET', KEYS[1], unpack(ARGV, 5)) end
redis.call('SREM', KEYS[7], ARGV[1])
end_job(ARGV[1], ARGV[3], ARGV[4])
return 1
"""
# KEYS: job, clip, model, ended, unobserved, active, queue. ARGV: id, now. Returns the job's state after the call.
CANCEL = END_JOB + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return '' end
if state == 'queued' then
  redis.call('HSET', KEYS[1], 'cancel_requested', 'true')
  redis.call('ZREM', KEYS[7], ARGV[1])
  end_job(ARGV[1], 'cancelled', ARGV[2])
  return 'cancelled'
end
if state == 'tuning' or state == 'exporting' then
  redis.call('HSET', KEYS[1], 'cancel_requested', 'true', 'updated', ARGV[2])
end
return state
"""
# KEYS: job, clip, model, ended, unobserved, active, queue, running. ARGV: id, attempt, max attempts, now, stale before,
# reason. A running job whose heartbeat is older than `stale before`: queued again under the next attempt, or
# failed past the bound.
REVIVE = END_JOB + """
local state = redis.call('HGET', KEYS[1], 'state')
if (state ~= 'tuning' and state ~= 'exporting') or redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[2]
   or tonumber(redis.call('HGET', KEYS[1], 'heartbeat')) >= tonumber(ARGV[5]) then
  return 'alive'
end
redis.call('SREM', KEYS[8], ARGV[1])
if tonumber(ARGV[2]) >= tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'failure_reason', ARGV[6])
  end_job(ARGV[1], 'failed', ARGV[4])
  return 'failed'
end
redis.call('HSET', KEYS[1], 'state', 'queued', 'attempt', tostring(tonumber(ARGV[2]) + 1), 'worker', '',
           'step', '0', 'loss', '0.0', 'heartbeat', '0', 'updated', ARGV[4])
redis.call('ZADD', KEYS[7], redis.call('HGET', KEYS[1], 'sequence'), ARGV[1])
return 'queued'
"""
# KEYS: job, clip, model, ended, unobserved, active, jobs. ARGV: id. An ended job only.
DELETE = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state ~= 'ready' and state ~= 'failed' and state ~= 'cancelled' then return state end
redis.call('DEL', KEYS[1], KEYS[2])
if redis.call('GET', KEYS[3]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('SREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[7], ARGV[1])
return 'deleted'
"""
# KEYS: model, deletions, control. ARGV: key prefix of jobs, model id, wake-up message, present ("1" when the
# repository holds the model). Accept a deletion unless a live job holds the id or there is nothing to delete:
# reserve the id, record the deletion (durable: done by whichever worker runs, now or after a scale from zero) and
# wake a worker, all at once or not at all.
RESERVE_DELETE = """
local holder = redis.call('GET', KEYS[1])
if holder == 'deleting' then return 'deleting' end
if holder then
  local state = redis.call('HGET', ARGV[1] .. holder, 'state')
  if state == 'queued' or state == 'tuning' or state == 'exporting' then return 'busy:' .. holder end
end
if ARGV[4] ~= '1' then return 'missing' end
redis.call('SET', KEYS[1], 'deleting')
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('RPUSH', KEYS[3], ARGV[3])
return 'ok'
"""
# KEYS: model, deletions. ARGV: model id. A worker has taken the model out of the repository: the id is free again.
DELETED_MODEL = """
redis.call('SREM', KEYS[2], ARGV[1])
if redis.call('GET', KEYS[1]) == 'deleting' then redis.call('DEL', KEYS[1]) end
return 1
"""


def _retry(kind):
    """Retry a command on a fresh connection a few times: after a Redis restart the pool's old connections are
    closed, and the first command on each would otherwise fail."""
    return kind(ExponentialBackoff(cap=1.0, base=0.1), 3, supported_errors=(redis.ConnectionError, redis.TimeoutError))


def _fields(values: dict) -> list[str]:
    return [str(item) for pair in values.items() for item in pair]


class RedisJobStore(JobStore):
    """The server's side of the registry (asyncio). Celery's `send_task` is blocking I/O, so it runs in a thread."""

    def __init__(self, url: str, max_job_seconds: float, transport_options: dict | None = None) -> None:
        self.redis = redis.asyncio.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3,
                                                  health_check_interval=5, retry=_retry(redis.asyncio.retry.Retry))
        self.celery = make_app(url, max_job_seconds, transport_options)
        # When this server last failed to reach Redis (its start counts: it has seen no heartbeat before it). The
        # sweep takes a worker for dead only after watching its job `dead_after` seconds with Redis reachable: a
        # heartbeat missed while the store itself was away says nothing about the worker.
        self._unreachable_at = time.time()
        self._scripts = {name: self.redis.register_script(source) for name, source in (
            ("create", CREATE), ("cancel", CANCEL), ("revive", REVIVE), ("delete", DELETE),
            ("reserve_delete", RESERVE_DELETE))}

    async def _call(self, coroutine):
        """Run a Redis call; an unreachable Redis is StoreUnavailable."""
        try:
            return await coroutine
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            self._unreachable_at = time.time()
            raise StoreUnavailable(f"the job store (Redis) is unreachable: {e}") from None

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            self._unreachable_at = time.time()
            return False

    async def create(self, job: Job, clip: bytes, max_queued: int) -> Job:
        script = self._scripts["create"]
        keys = [job_key(job.id), clip_key(job.id), JOBS, QUEUE, model_key(job.model_id), SEQ, ACTIVE]
        verdict, detail = await self._call(script(keys, [job.id, job.created, max_queued, clip,
                                                         *_fields(job.to_fields())]))
        if verdict == b"full":
            raise QueueFull(max_queued)
        if verdict == b"taken":
            raise IdTaken(job.model_id, detail.decode())
        job.sequence = int(detail)
        try:
            await self._send(job)
        except StoreUnavailable as e:  # the job is stored: the sweep sends its message once the broker is back
            log.warning("tune job %s stored, its message not sent yet: %s", job.id, e)
        return job

    async def _send(self, job: Job) -> None:
        try:
            await asyncio.to_thread(self.celery.send_task, TUNE_TASK, args=[job.id, job.attempt],
                                    task_id=task_id(job.id, job.attempt))
        except (OperationalError, redis.ConnectionError, OSError) as e:
            raise StoreUnavailable(f"the job queue (Redis) is unreachable: {e}") from None

    async def get(self, job_id: str) -> Job:
        data = await self._call(self.redis.hgetall(job_key(job_id)))
        if not data:
            raise JobNotFound(job_id)
        return Job.from_fields(data)

    async def position(self, job: Job) -> int:
        rank = await self._call(self.redis.zrank(QUEUE, job.id))
        return int(rank or 0)

    async def list(self, page_size: int, page_token: str) -> tuple[list[Job], str]:
        try:  # the token is the creation time of the last job of the previous page
            top = f"({float(base64.urlsafe_b64decode(page_token).decode())!r}" if page_token else "+inf"
        except ValueError:
            raise InvalidField("page_token", "is not a token this server gave") from None
        ids = await self._call(self.redis.zrevrangebyscore(JOBS, top, "-inf", start=0, num=page_size + 1,
                                                           withscores=True))
        page = ids[:page_size]
        jobs = await self._jobs([job_id for job_id, _ in page])
        token = base64.urlsafe_b64encode(repr(page[-1][1]).encode()).decode() if len(ids) > page_size else ""
        return jobs, token

    async def cancel(self, job_id: str) -> Job:
        job = await self.get(job_id)
        state = (await self._call(self._scripts["cancel"]([*end_keys(job), QUEUE], [job_id, time.time()]))).decode()
        if state == "cancelled":  # was queued: its message, if a worker has not taken it yet, is dropped
            try:
                await asyncio.to_thread(self.celery.control.revoke, task_id(job_id, job.attempt))
            except (OperationalError, redis.ConnectionError, OSError) as e:  # the claim refuses it anyway
                log.warning("tune job %s: could not revoke its message: %s", job_id, e)
        return await self.get(job_id)

    async def delete(self, job_id: str) -> None:
        job = await self.get(job_id)
        verdict = await self._delete(job)
        if verdict == "missing":
            raise JobNotFound(job_id)
        if verdict != "deleted":
            raise DeleteRefused(f"job {job_id} is {verdict}: cancel it first, or wait for it to end")

    async def _delete(self, job: Job) -> str:
        return (await self._call(self._scripts["delete"]([*end_keys(job), JOBS], [job.id]))).decode()

    async def delete_model(self, model_id: str, timeout: float, present: bool) -> bool:
        reply = f"{PREFIX}reply:{uuid.uuid4().hex}"
        wake = json.dumps({"delete_model": model_id, "reply": reply})
        verdict = (await self._call(self._scripts["reserve_delete"]([model_key(model_id), DELETIONS, CONTROL],
                                                                    [PREFIX + "job:", model_id, wake,
                                                                     int(present)]))).decode()
        if verdict == "deleting":
            raise DeleteRefused(f"model {model_id!r} is being deleted already")
        if verdict.startswith("busy:"):
            raise DeleteRefused(f"tune job {verdict[5:]} is making model {model_id!r}; cancel it first")
        if verdict == "missing":
            raise ModelNotFound(model_id)
        try:
            answer = await self._call(self.redis.blpop([reply], timeout=timeout))
        except StoreUnavailable:
            return False  # accepted and recorded: a worker does it once Redis is back
        if answer is None:  # no worker now: the recorded deletion waits for one; its wake-up would only pile up
            with contextlib.suppress(StoreUnavailable):
                await self._call(self.redis.lrem(CONTROL, 1, wake))
            return False
        return True

    async def pending_deletions(self) -> set[str]:
        return {raw.decode() for raw in await self._call(self.redis.smembers(DELETIONS))}

    async def sweep(self, dead_after: float, max_attempts: int, retention: float) -> list[Job]:
        now = time.time()
        running = [] if self._unreachable_at > now - dead_after else await self._call(self.redis.smembers(RUNNING_SET))
        for job in await self._jobs(running):
            reason = (f"its tuning worker ({job.worker}) stopped answering {max_attempts} times; the clip or the "
                      f"settings may crash the tuner (try fewer frames or a smaller size)")
            verdict = (await self._call(self._scripts["revive"](
                [*end_keys(job), QUEUE, RUNNING_SET],
                [job.id, job.attempt, max_attempts, now, now - dead_after, reason]))).decode()
            if verdict == "queued":
                await self._send(await self.get(job.id))
        await self._resend_lost(now, dead_after)
        for job in await self._jobs(await self._call(self.redis.zrangebyscore(ENDED_SET, "-inf",
                                                                               now - retention))):
            await self._delete(job)
        return await self._jobs(await self._call(self.redis.spop(UNOBSERVED, 100)) or [])

    async def _resend_lost(self, now: float, after: float) -> None:
        """Send again the message of a job queued for `after` seconds that has none in the broker: its server
        stopped before sending it, or a worker took it and lost Redis before it could claim the job. A message
        sent twice is harmless: only one claim of an attempt succeeds."""
        waiting = [job for job in await self._jobs(await self._call(self.redis.zrange(QUEUE, 0, -1)))
                   if job.state == "queued" and max(job.created, job.updated) < now - after]
        if not waiting:
            return
        messages = b"\n".join([*await self._call(self.redis.lrange(BROKER_QUEUE, 0, -1)),
                               *await self._call(self.redis.hvals(BROKER_UNACKED))])
        for job in waiting:
            if task_id(job.id, job.attempt).encode() not in messages:
                await self._send(job)

    async def counts(self) -> dict[str, int]:
        """Jobs by state: the queue's and the running set's sizes, and the ended jobs' states (one field each)."""
        counts = {"queued": await self._call(self.redis.zcard(QUEUE))}
        for name in (RUNNING_SET, ENDED_SET):
            ids = await self._call(self.redis.smembers(name) if name == RUNNING_SET else self.redis.zrange(name, 0, -1))
            async with self.redis.pipeline(transaction=False) as pipe:
                for raw in ids:
                    pipe.hget(job_key(raw.decode()), "state")
                for state in await self._call(pipe.execute()):
                    if state is not None:
                        counts[state.decode()] = counts.get(state.decode(), 0) + 1
        return counts

    async def _jobs(self, ids) -> list[Job]:
        """The records of `ids` (bytes), read in one round trip; ids deleted meanwhile are left out."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for raw in ids:
                pipe.hgetall(job_key(raw.decode() if isinstance(raw, bytes) else raw))
            records = await self._call(pipe.execute())
        return [Job.from_fields(record) for record in records if record]

    async def close(self) -> None:
        await self.redis.aclose()


class RedisWorkerStore:
    """The worker's side of the registry (blocking calls; the worker has no event loop)."""

    def __init__(self, url: str) -> None:
        self.redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=5,
                                          retry=_retry(redis.retry.Retry))
        self._claim = self.redis.register_script(CLAIM)
        self._update = self.redis.register_script(UPDATE)
        self._fence = self.redis.register_script(FENCE)
        self._finish = self.redis.register_script(FINISH)
        self._deleted_model = self.redis.register_script(DELETED_MODEL)

    def claim(self, job_id: str, attempt: int, worker: str) -> tuple[Job, bytes] | None:
        """Take a queued job for this attempt, with its clip; None when the message is stale (the job was
        cancelled, ran already, or runs under a later attempt)."""
        if not self._claim([job_key(job_id), QUEUE, RUNNING_SET], [job_id, attempt, worker, time.time()]):
            return None
        return Job.from_fields(self.redis.hgetall(job_key(job_id))), self.redis.get(clip_key(job_id)) or b""

    def update(self, job: Job, **values) -> bool:
        """Record progress (and the heartbeat); False when this attempt is no longer the job's."""
        values = {**values, "heartbeat": time.time(), "updated": time.time()}
        return bool(self._update([job_key(job.id)], [job.attempt, *_fields(values)]))

    def fence(self, job: Job) -> bool:
        """Whether this attempt may publish: the record still names it (atomically; see FENCE)."""
        return bool(self._fence([job_key(job.id)], [job.attempt, time.time()]))

    def cancel_requested(self, job: Job) -> bool:
        return self.redis.hget(job_key(job.id), "cancel_requested") == b"true"

    def finish(self, job: Job, state: str, **values) -> bool:
        keys = [*end_keys(job), RUNNING_SET]
        return bool(self._finish(keys, [job.id, job.attempt, state, time.time(), *_fields(values)]))

    def running(self, job_id: str, attempt: int, dead_after: float) -> bool:
        """Whether a live worker runs this attempt of the job (its heartbeat is fresh)."""
        state, current, heartbeat = self.redis.hmget(job_key(job_id), "state", "attempt", "heartbeat")
        return (state is not None and state.decode() in RUNNING and int(current) == attempt
                and float(heartbeat) > time.time() - dead_after)

    def next_control(self, timeout: float) -> dict | None:
        item = self.redis.blpop([CONTROL], timeout=timeout)
        return parse_json(item[1], "a control request") if item else None

    def pending_deletions(self) -> list[str]:
        """The accepted deletions no worker has done yet."""
        return sorted(raw.decode() for raw in self.redis.smembers(DELETIONS))

    def deleted_model(self, model_id: str) -> None:
        """A deletion is done: forget it and free the id."""
        self._deleted_model([model_key(model_id), DELETIONS], [model_id])

    def reply(self, key: str, answer: dict) -> None:
        self.redis.rpush(key, json.dumps(answer))
        self.redis.expire(key, 60)

