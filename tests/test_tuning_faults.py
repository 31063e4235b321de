"""The tuning service keeps its promises under faults and autoscaling, with a real redis-server (append-only, as
deployed), real tuning workers (`tav-tune-worker`) and a real replica: a Redis outage or a network partition longer
than `--worker-dead-after` still ends each job once (the publish is fenced; a published model makes its job
ready); `DeleteModel` answers truly at zero workers (an accepted deletion is recorded and done by the next worker);
KEDA's documented arithmetic on the list it reads asks for one worker per live job, waiting or running; SIGTERM to
a busy worker (a scale-down) finishes and publishes its job.

The replica here declares a worker dead after 10 s without a heartbeat (a worker beats every 2 s: 5x that);
outages and partitions last until what they must cover has happened (a revival, a worker waiting to publish),
not for a guessed time, except the Redis outage, which lasts 2.5x `--worker-dead-after`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import select
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import redis
import yaml
from grpc_helpers import ServeProcess
from test_tuning import (
    ADMIN,
    CAPTION,
    CODE,
    SMALL,
    TIMEOUT,
    RedisServer,
    TuneWorker,
    free_port,
    leftovers,
    needs_redis,
    wait_until,
)
from tools import require_tool

from clients import Client, ServerError
from jobs.celery_app import QUEUE
from jobs.redis_store import ACTIVE, DELETIONS, RedisJobStore, RedisWorkerStore
from jobs.spec import Job

DEAD_AFTER = 10.0
KEDA = Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "keda" / "scaledobject.yaml"


class Partition:
    """A TCP proxy in front of Redis that a test can cut and heal: a network partition between one worker and
    Redis, while the replica still reaches Redis directly. Cut, it closes every connection and refuses new ones."""

    def __init__(self, port: int) -> None:
        self.upstream, self.port = port, free_port()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.heal()

    def heal(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def cut(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (a close alone would not)
        self._listener.close()
        with self._lock:
            for pair in self._pairs:
                for end in pair:
                    with contextlib.suppress(OSError):
                        end.shutdown(socket.SHUT_RDWR)
                    end.close()
            self._pairs.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 1.0)
                for source in ready:
                    data = source.recv(65536)
                    if not data:
                        return
                    (b if source is a else a).sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for end in (a, b):
                with contextlib.suppress(OSError):
                    end.close()


@pytest.fixture(scope="module")
def faults(tiny_base, tmp_path_factory):
    """Redis and one replica (no worker: each test starts the workers it needs) over one repository."""
    require_tool("redis-server")
    root = tmp_path_factory.mktemp("faults")
    repo = root / "repo"
    repo.mkdir()
    (root / "redis").mkdir()
    (root / "admin").write_text(ADMIN + "\n")
    broker = RedisServer(root / "redis")
    (root / "broker").write_text(broker.url + "\n")
    replica = None
    try:
        replica = ServeProcess("--repo", str(repo), "--admin-token-file", str(root / "admin"), "--base",
                               f"tiny={tiny_base}", "--worker-dead-after", str(DEAD_AFTER), "--rescan-seconds", "0.5",
                               "--broker-file", str(root / "broker"))
        replica.wait_for("tuning service serving")
        yield type("Faults", (), dict(repo=repo, redis=broker, replica=replica, root=root))
    finally:
        if replica is not None:
            replica.proc.kill()
            replica.proc.wait(30)
        broker.kill()


@contextlib.contextmanager
def workers(faults, *names: str, broker: str | None = None):
    """Tuning workers on the module's Redis (or `broker`), stopped at the end."""
    started = [TuneWorker(broker or faults.redis.url, faults.repo, name, faults.root / f"{name}.log")
               for name in names]
    try:
        yield started
    finally:
        for worker in started:
            worker.stop()


def admin(faults) -> Client:
    return Client(f"127.0.0.1:{faults.replica.port}", token=ADMIN, retries=0)


def raw_redis(faults, db: int = 0) -> redis.Redis:
    return redis.Redis.from_url(re.sub(r"/0$", f"/{db}", faults.redis.url))


def model_served(client: Client, model_id: str) -> bool:
    with contextlib.suppress(ServerError):
        return client.get_model(model_id).id == model_id
    return False


def ended_once(client: Client, job_id: str, model_id: str):
    """The job, ended; and it is the only job that names `model_id`."""
    ended = client.wait_tune_job(job_id, timeout=TIMEOUT)
    assert [job.id for job in client.list_tune_jobs() if job.model_id == model_id] == [job_id]
    return ended


# A Redis outage or a partition longer than --worker-dead-after


@needs_redis
def test_a_redis_outage_longer_than_worker_dead_after_ends_each_job_once(faults, clip_path):
    """Redis goes down mid-job and stays down past 2.5x `--worker-dead-after` and until the worker has tuned and
    exported and waits for Redis to publish (or, before the fix, to record the end of a job it published). An outage
    is not a worker death: the replica sees Redis back before the worker does (the worker is held still, SIGSTOP,
    until the replica's Tuning health says SERVING again: a worker slower to reconnect, deterministically), and still
    does not run the job again: it counts only heartbeats it could have seen. The job ends once, ready, its model
    served (before: run again, the second attempt failed on the id the first had published)."""
    with workers(faults, "outage") as (worker,), admin(faults) as client:
        job = client.create_tune_job("through-outage", clip_path.read_bytes(), CAPTION, base="tiny",
                                     **{**SMALL, "steps": 8})
        wait_until(lambda: client.get_tune_job(job.id).step >= 2, TIMEOUT)
        faults.redis.kill()
        down = time.monotonic()
        wait_until(lambda: re.search(r"waiting to (publish|record the end of) job", worker.log.read_text()), TIMEOUT)
        time.sleep(max(0.0, down + 2.5 * DEAD_AFTER - time.monotonic()))
        worker.proc.send_signal(signal.SIGSTOP)
        try:
            faults.redis.start()
            wait_until(lambda: client.health("tuneavideo.v1.Tuning") == "SERVING", 60)
        finally:
            worker.proc.send_signal(signal.SIGCONT)
        ended = ended_once(client, job.id, "through-outage")
        assert (ended.state, ended.failure_reason, ended.attempt) == ("ready", "", 1), ended
        assert wait_until(lambda: model_served(client, "through-outage"), 30)
    assert leftovers(faults.repo) == []


@needs_redis
def test_a_partitioned_worker_taken_for_dead_publishes_nothing(faults, clip_path):
    """A worker cut off from Redis (the replica still reaches it) is taken for dead and its job queued again; when
    the partition heals, the old attempt has finished tuning and asks to publish: the fence refuses (the store names
    the next attempt), its directory is removed, and the next attempt publishes. One outcome: ready, served."""
    partition = Partition(faults.redis.port)
    url = faults.redis.url.replace(f":{faults.redis.port}/", f":{partition.port}/")
    with workers(faults, "partitioned", broker=url) as (worker,), admin(faults) as client:
        job = client.create_tune_job("through-partition", clip_path.read_bytes(), CAPTION, base="tiny",
                                     **{**SMALL, "steps": 8})
        wait_until(lambda: client.get_tune_job(job.id).step >= 2, TIMEOUT)
        partition.cut()
        revived = wait_until(lambda: (j := client.get_tune_job(job.id)).attempt == 2 and j, TIMEOUT)
        assert revived.state == "queued"
        wait_until(lambda: "waiting to publish job" in worker.log.read_text(), TIMEOUT)
        partition.heal()
        ended = ended_once(client, job.id, "through-partition")
        assert (ended.state, ended.failure_reason, ended.attempt) == ("ready", "", 2), ended
        assert wait_until(lambda: model_served(client, "through-partition"), 30)
        wait_until(lambda: leftovers(faults.repo) == [], 60)
    log = worker.log.read_text()
    assert log.count("model through-partition published") == 1 and "superseded" in log, log[-3000:]


@needs_redis
def test_a_model_published_by_an_earlier_attempt_makes_its_job_ready(faults, tmp_path):
    """An attempt that published and died before recording its end (here the test is that worker: it claims the
    attempt, takes the fence and renames a model into place): the sweep runs the job again, and the next attempt,
    on a real worker, finds the job's own model published and ends the job ready without tuning again."""
    url = re.sub(r"/0$", "/2", faults.redis.url)
    repo = tmp_path / "repo"
    repo.mkdir()

    async def create_and_revive() -> Job:
        store = RedisJobStore(url, max_job_seconds=600)
        try:
            job = Job(id="a" * 32, model_id="published-early", base="tiny", base_source="unused", caption=CAPTION,
                      settings={"steps": 3}, total_steps=3)
            await store.create(job, b"clip", 4)
            worker = RedisWorkerStore(url)
            claimed, _ = worker.claim(job.id, 1, "died-after-publishing")
            assert worker.fence(claimed)
            model = repo / job.model_id
            model.mkdir()
            (model / ".tav-job").write_text(job.id)  # what the rename put in place
            (model / "tuned").write_text("the earlier attempt's model")
            raw_redis(faults, 2).hset(f"tav:job:{job.id}", "heartbeat", 0)  # its worker died long ago
            time.sleep(0.1)
            await store.sweep(0.05, 3, 3600)
            return await store.get(job.id)
        finally:
            await store.close()

    revived = asyncio.run(create_and_revive())
    assert (revived.state, revived.attempt) == ("queued", 2)
    worker = TuneWorker(url, repo, "next-attempt", tmp_path / "worker.log")
    try:
        db = raw_redis(faults, 2)
        wait_until(lambda: db.hget(f"tav:job:{revived.id}", "state") == b"ready", TIMEOUT)
        record = Job.from_fields(db.hgetall(f"tav:job:{revived.id}"))
    finally:
        worker.stop()
    assert (record.attempt, record.failure_reason, record.tuning_seconds) == (2, "", 0.0)
    assert (repo / "published-early" / "tuned").read_text() == "the earlier attempt's model"
    assert db.llen(ACTIVE) == 0 and db.get("tav:model:published-early") == revived.id.encode()


# DeleteModel at any worker count


@needs_redis
def test_delete_model_at_zero_workers_is_accepted_pending_and_done_by_the_next_worker(faults, clip_path):
    with workers(faults, "before-zero"), admin(faults) as client:
        job = client.tune("deleted-at-zero", clip_path.read_bytes(), CAPTION, base="tiny", timeout=TIMEOUT, **SMALL)
        assert job.state == "ready"
        wait_until(lambda: model_served(client, "deleted-at-zero"), 30)
    db = raw_redis(faults)
    with admin(faults) as client:  # no worker runs now
        started = time.monotonic()
        assert client.delete_model("deleted-at-zero") is False  # accepted, pending
        assert time.monotonic() - started < 30, "answered without waiting for a worker that is not there"
        assert (faults.repo / "deleted-at-zero").is_dir() and db.smembers(DELETIONS) == {b"deleted-at-zero"}
        assert not model_served(client, "deleted-at-zero"), "hidden from serving while its deletion is pending"
        with pytest.raises(ServerError) as e:  # the id stays reserved: nothing re-creates it meanwhile
            client.create_tune_job("deleted-at-zero", clip_path.read_bytes(), CAPTION, base="tiny")
        assert e.value.code == CODE.ALREADY_EXISTS
        with pytest.raises(ServerError) as e:
            client.delete_model("deleted-at-zero")
        assert e.value.code == CODE.FAILED_PRECONDITION and "being deleted already" in e.value.details
        with pytest.raises(ServerError) as e:  # refused: nothing recorded, nothing happens later
            client.delete_model("never-existed")
        assert e.value.code == CODE.NOT_FOUND and db.smembers(DELETIONS) == {b"deleted-at-zero"}
        with workers(faults, "after-zero"):
            wait_until(lambda: not (faults.repo / "deleted-at-zero").exists(), TIMEOUT)
            wait_until(lambda: not db.smembers(DELETIONS) and not db.exists("tav:model:deleted-at-zero"), 30)
            assert db.llen("tav:control") == 0, "no stale wake-up left behind"
            with pytest.raises(ServerError) as e:
                client.delete_model("deleted-at-zero")
            assert e.value.code == CODE.NOT_FOUND
            # with a worker running, a deletion is done before the answer
            again = client.tune("deleted-at-once", clip_path.read_bytes(), CAPTION, base="tiny", timeout=TIMEOUT,
                                **SMALL)
            assert again.state == "ready" and client.delete_model("deleted-at-once") is True
            assert not (faults.repo / "deleted-at-once").exists()


# KEDA and scale-down


def keda_desired(metric: int, trigger: dict, spec: dict) -> int:
    """What KEDA documents for a redis trigger: the HPA's AverageValue target is `listLength` per replica, so it asks
    for ceil(metric / listLength) replicas, within [minReplicaCount, maxReplicaCount]; 0 below the activation."""
    if metric <= int(trigger["metadata"].get("activationListLength", "0")):
        return spec["minReplicaCount"]
    wanted = math.ceil(metric / int(trigger["metadata"]["listLength"]))
    return max(spec["minReplicaCount"], min(spec["maxReplicaCount"], wanted))


@needs_redis
def test_keda_asks_for_a_worker_per_live_job_two_busy_and_one_waiting_make_three(faults, clip_path):
    scaled = next(doc for doc in yaml.safe_load_all(KEDA.read_text()) if doc["kind"] == "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    db = raw_redis(faults, int(trigger["metadata"].get("databaseIndex", "0")))
    video = clip_path.read_bytes()
    with workers(faults, "busy-1", "busy-2"), admin(faults) as client:
        jobs = [client.create_tune_job(f"scaled-{i}", video, CAPTION, base="tiny", **{**SMALL, "steps": 2000})
                for i in range(3)]
        wait_until(lambda: sorted(client.get_tune_job(job.id).state for job in jobs) == ["queued", "tuning",
                                                                                          "tuning"], TIMEOUT)
        metric = db.llen(trigger["metadata"]["listName"])
        assert (metric, keda_desired(metric, trigger, scaled["spec"])) == (3, 3)
        # Celery's queue holds the waiting only (once, or twice after a harmless resend under load): too few workers
        assert keda_desired(db.llen(QUEUE), trigger, scaled["spec"]) < 3, "Celery's queue holds the waiting only"
        for job in jobs:
            client.cancel_tune_job(job.id)
        assert all(client.wait_tune_job(job.id, timeout=TIMEOUT).state == "cancelled" for job in jobs)
        assert keda_desired(db.llen(trigger["metadata"]["listName"]), trigger, scaled["spec"]) == 0


@needs_redis
def test_sigterm_to_a_busy_worker_finishes_and_publishes_its_job(faults, clip_path):
    """A scale-down sends SIGTERM: the worker finishes its job (tuned, exported, published, acknowledged), then
    exits 0; nothing is lost, left half-published, or left in the broker or the live-job list."""
    db = raw_redis(faults)
    with workers(faults, "scaled-down") as (worker,), admin(faults) as client:
        job = client.create_tune_job("scale-down", clip_path.read_bytes(), CAPTION, base="tiny",
                                     **{**SMALL, "steps": 20})
        wait_until(lambda: client.get_tune_job(job.id).step >= 2, TIMEOUT)  # the worker starts meanwhile
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(TIMEOUT) == 0
        ended = client.get_tune_job(job.id)
        assert (ended.state, ended.step, ended.attempt) == ("ready", 20, 1), ended
        assert wait_until(lambda: model_served(client, "scale-down"), 30)
    assert leftovers(faults.repo) == []
    assert (db.llen(QUEUE), db.hlen("unacked"), db.llen(ACTIVE)) == (0, 0, 0)


def test_delete_model_with_a_stalled_local_worker_is_accepted_pending_and_done_when_it_resumes(tiny_base, tmp_path):
    """No broker, the same contract: the server's own worker, frozen (SIGSTOP), cannot answer within the wait; the
    deletion is accepted pending, the id reserved, the model no longer served, and done once the worker resumes."""
    import psutil

    repo = tmp_path / "repo"
    for name in ("first", "second", "third"):
        (repo / name).mkdir(parents=True)
        (repo / name / "tav_config.json").write_text("{}")  # a broken model: skipped, but in the repository
    server = ServeProcess("--repo", str(repo), "--base", f"tiny={tiny_base}", "--rescan-seconds", "0.5")
    try:
        server.wait_for("tuning service serving")
        with Client(f"127.0.0.1:{server.port}", retries=0) as client:
            client.delete_model("first")  # starts the local worker (pending if it takes more than the wait)
            wait_until(lambda: not (repo / "first").exists(), TIMEOUT)
            assert client.delete_model("third") is True and not (repo / "third").exists()  # a live worker: at once
            (worker,) = [p for p in psutil.Process(server.proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
            worker.suspend()
            try:  # SIGSTOP takes effect asynchronously: on a loaded machine the worker ran on for a moment after
                wait_until(lambda: worker.status() == psutil.STATUS_STOPPED, 30)  # (and answered: a flake, seen)
                assert client.delete_model("second") is False
                assert (repo / "second").is_dir()
                assert "being deleted" in client.list_models().skipped["second"]
                with pytest.raises(ServerError) as e:
                    client.delete_model("second")
                assert e.value.code == CODE.FAILED_PRECONDITION
            finally:
                worker.resume()
            wait_until(lambda: not (repo / "second").exists(), 60)
            wait_until(lambda: "second" not in client.list_models().skipped, 30)
            with pytest.raises(ServerError) as e:
                client.delete_model("second")
            assert e.value.code == CODE.NOT_FOUND
    finally:
        server.proc.kill()
        server.proc.wait(30)
