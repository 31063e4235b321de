"""Tuning as a service, with a real redis-server on loopback (append-only, as deployed) and real tuning worker
processes (`tav-tune-worker`, Celery on Redis): a client tunes a clip into a new model over gRPC and a second
serving replica generates from it without a restart; two workers run two jobs at once while a third waits; a cancel
ends a job within one tuning step; a worker killed mid-job has its job run again by the other; a Redis restart
loses no acknowledged job; bad input is refused at create time, before anything is queued. Then the embedded
default (no broker: the server's own local worker), the job time limit and the retention on both queues, and the
hub resolution of a base from a cache on disk.

redis-server comes from Debian's package (.ci/run installs it); the tests that need it skip, saying so, where it
is missing (and fail under CI=true: tests/tools.py). One Redis, one pair of workers and two replicas are shared by
the module; the tiny model tunes in seconds.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, replace
from pathlib import Path

import grpc
import pytest
import redis
import torch
from grpc_helpers import ServeProcess, make_certificates
from preloaded import start_module
from prometheus_client.parser import text_string_to_metric_families
from tools import find_tool, have_tool, require_tool
from tuneavideo.v1 import tuning_pb2

from clients import Client, ServerError
from clients.cli import main as client_main
from jobs.celery_app import make_app
from tuner.artefacts import TunedModel
from tuner.components import model_file_patterns
from tuner.tune import default_settings

REDIS = find_tool("redis-server")
needs_redis = pytest.mark.needs_tool("redis-server")
ADMIN, USER = "admin-token", "generation-token"
TIMEOUT = 300
CAPTION = "a red square is moving right"
SMALL = dict(steps=3, frames=8, width=32, height=32, learning_rate=1e-3)  # seconds on the tiny model
OFFICIAL = Path(__file__).parent / "fixtures" / "official_tav" / "official"  # made by the official code
CODE = grpc.StatusCode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, seconds: float = 60.0, every: float = 0.2):
    """`condition()`'s first true value within `seconds`, else an AssertionError."""
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(every)
    return value


class RedisServer:
    """redis-server on loopback with a password, persisting to an append-only file fsynced at every write (as
    deploy/k8s/redis.yaml runs it); plain on one port (`url`) and, where the openssl CLI can make a throwaway CA,
    TLS on another (`tls_url`, rediss://), so the service is tested over both."""

    password = "tav-redis-secret"

    def __init__(self, directory: Path) -> None:
        self.directory, self.port = directory, free_port()
        self.url = f"redis://:{self.password}@127.0.0.1:{self.port}/0"
        self.tls_args: list[str] = []
        self.tls_url = None
        if have_tool("openssl"):
            (directory / "tls").mkdir()
            ca, cert, key = make_certificates(directory / "tls")
            tls_port = free_port()
            self.tls_args = ["--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                             "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
            self.tls_url = (f"rediss://:{self.password}@127.0.0.1:{tls_port}/0"
                            f"?ssl_cert_reqs=required&ssl_ca_certs={ca}")
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                                      str(self.directory), "--appendonly", "yes", "--appendfsync", "always",
                                      "--save", "", "--requirepass", self.password, *self.tls_args],
                                     stdout=subprocess.DEVNULL)
        wait_until(lambda: self._answers(), 30)

    def _answers(self) -> bool:
        with contextlib.suppress(redis.ConnectionError), redis.Redis.from_url(self.url, socket_timeout=1) as client:
            return client.ping()
        return False

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)


class TuneWorker:
    """One `tav-tune-worker` process."""

    def __init__(self, broker: str, repo: Path, name: str, log: Path, *args: str) -> None:
        self.name, self.log = name, log
        with log.open("a") as out:
            self.proc = start_module("jobs.celery_worker", ["--broker", broker, "--repo", str(repo), "--device",
                                                            "cpu", "--name", name, *args],
                                     stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


@pytest.fixture(scope="module")
def service(tiny_base, seed_engines, tmp_path_factory):
    """Redis, two workers and two replicas sharing one repository (seeded with the session's engine store);
    yields a namespace of them."""
    require_tool("redis-server")
    root = tmp_path_factory.mktemp("tuning")
    repo = root / "repo"
    repo.mkdir()
    seed_engines(repo)
    (root / "redis").mkdir()
    (root / "admin").write_text(ADMIN + "\n")
    (root / "users").write_text(USER + "\n")
    broker = RedisServer(root / "redis")
    # the first worker and replica reach Redis over TLS, the others in plain text: one registry and queue for all
    urls = [broker.tls_url or broker.url, broker.url]
    for i, url in enumerate(urls):
        (root / f"broker{i}").write_text(url + "\n")  # the password stays out of the process list
    workers = [TuneWorker(url, repo, f"w{i}", root / f"w{i}.log") for i, url in enumerate(urls, 1)]
    args = ["--repo", str(repo), "--admin-token-file", str(root / "admin"), "--auth-token-file", str(root / "users"),
            "--base", f"tiny={tiny_base}", "--worker-dead-after", "8", "--max-queued-jobs", "4",
            "--rescan-seconds", "0.5", "--import-source", f"skiing={OFFICIAL}",
            "--import-source", f"code={pickle_with_code(root / 'code')}"]
    replicas = []
    try:  # offline, as a replica without the hub in reach: hub ids come from its cache (there, none)
        replicas = [ServeProcess(*args, "--broker-file", str(root / f"broker{i}"), "--metrics-port", "0",
                                 env={"HF_HUB_OFFLINE": "1"}) for i in range(2)]
        for replica in replicas:
            replica.wait_for("tuning service serving")
        if broker.tls_url:  # the TLS worker reached the queue, not just the plain-text one
            wait_until(lambda: "Connected to rediss://" in workers[0].log.read_text(), TIMEOUT)
        yield type("Service", (), dict(repo=repo, redis=broker, workers=workers, replicas=replicas, root=root,
                                       brokers=urls))
    finally:
        for replica in replicas:
            replica.proc.kill()
            replica.proc.wait(30)
        for worker in workers:
            worker.stop()
        broker.kill()


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def pickle_with_code(directory: Path) -> Path:
    """The official fixture with its UNet weights replaced by a pickle that would run code when loaded: its layout
    checks out, so only the worker's import finds it."""
    shutil.copytree(OFFICIAL, directory)
    weights = directory / "unet" / "diffusion_pytorch_model.bin"
    torch.save({**torch.load(weights, weights_only=True), "extra": RunsCode()}, weights)
    return directory


def admin(service, replica: int = 0) -> Client:
    return Client(f"127.0.0.1:{service.replicas[replica].port}", token=ADMIN, retries=0)


def user(service, replica: int = 0) -> Client:
    return Client(f"127.0.0.1:{service.replicas[replica].port}", token=USER)


def leftovers(repo: Path) -> list[str]:
    return sorted(p.name for p in repo.iterdir() if p.name.startswith((".job", "..job")))


@needs_redis
def test_a_tuned_clip_is_served_by_another_replica_without_a_restart(service, clip_path):
    with admin(service, 0) as client:
        job = client.tune("square-tuned", clip_path.read_bytes(), CAPTION, base="tiny", timeout=TIMEOUT, **SMALL)
    assert job.state == "ready", job
    assert (job.step, job.total_steps, job.attempt) == (3, 3, 1) and job.tuning_seconds > 0
    model = TunedModel.open(service.repo / "square-tuned")
    # what the client did not choose is the tuner's default for this base (a small one: the measured rule)
    chosen = dict(steps=3, frames=8, width=32, height=32, lr=1e-3)  # SMALL, by the tuner's names
    assert model.config["settings"] == asdict(replace(default_settings(model.base_path), **chosen))
    assert model.config["default_rule"]["applied"] == "small_base"
    assert model.architecture[2] == "sinusoidal_short_middle"
    assert model.config["base"]["path"].startswith("../.bases/")  # found wherever the repository is mounted
    assert model.base_id == "tiny" and model.base_path.resolve().parent == (service.repo / ".bases").resolve()
    with user(service, 1) as client:  # found at once: an unknown id makes the replica look again
        info = client.get_model("square-tuned")
        assert info.base_model == "tiny" and info.source_prompt == CAPTION
        video = client.generate("square-tuned", "a blue square is moving right", steps=2, format="png",
                                timeout=TIMEOUT)
    assert video.frames == 8 and video.width == 32
    assert leftovers(service.repo) == []
    # every replica reports the registry's jobs by state; the finished job's durations, one replica (whichever
    # sweeps first)
    wait_until(lambda: sum(_tune_metrics(r).get(("tav_tune_seconds_count", "tuning"), 0)
                           for r in service.replicas) == 1, 60)
    assert all(_tune_metrics(r)[("tav_tune_jobs", "ready")] >= 1 for r in service.replicas)


@needs_redis
def test_an_official_checkpoint_is_imported_by_a_worker_and_served(service):
    """ImportModel: a tuning worker imports the official fixture (tests/fixtures/official_tav) from the import
    allow-list, exports and publishes it; a replica generates from its inverted latents. Bad sources, bases and ids
    are refused before anything is queued, naming the field; a hub id the offline cache lacks is
    FAILED_PRECONDITION; a generation token may not import."""
    with admin(service, 0) as client:
        job = client.import_model("skiing-official", "skiing")
        assert job.import_source == str(OFFICIAL.resolve()) and job.state == "queued"
        job = client.wait_tune_job(job.id, timeout=TIMEOUT)
    assert job.state == "ready", job
    model = TunedModel.open(service.repo / "skiing-official")
    assert model.source().kind == "inverted" and model.config["prompt"] == "a man is skiing"
    assert model.config["base"]["path"].startswith("../.bases/")  # the checkpoint's own networks, in the store
    with user(service, 1) as client:
        info = client.get_model("skiing-official")
        assert info.source_prompt == "a man is skiing" and info.default_steps == 3
        video = client.generate("skiing-official", "a panda is skiing", format="png", timeout=TIMEOUT)
    assert video.frames == 8 and video.width == 32
    with admin(service, 1) as client:
        for args, code, field in [
            (("x-1", "../etc"), CODE.INVALID_ARGUMENT, "source"),
            (("x-2", "skiing", "nope"), CODE.INVALID_ARGUMENT, "base"),
            (("X 3", "skiing"), CODE.INVALID_ARGUMENT, "model_id"),
            (("skiing-official", "skiing"), CODE.ALREADY_EXISTS, "model_id"),
            (("x-4", "tav-test/not-in-the-cache"), CODE.FAILED_PRECONDITION, "source"),
        ]:
            model_id, source, *base = args
            with pytest.raises(ServerError) as e:
                client.import_model(model_id, source, base=base[0] if base else "")
            assert e.value.code == code and e.value.details.startswith(f"{field}:"), e.value
        assert not [j for j in client.list_tune_jobs() if j.model_id.startswith("x-")]
        # what only the import finds fails the job with the importer's one line, publishing nothing
        failed = client.wait_tune_job(client.import_model("code-official", "code").id, timeout=TIMEOUT)
        assert failed.state == "failed" and "pickle that needs code to load, refused" in failed.failure_reason
        assert not (service.repo / "code-official").exists()
    with user(service, 0) as client, pytest.raises(ServerError) as e:
        client.import_model("x-5", "skiing")
    assert e.value.code == CODE.PERMISSION_DENIED


def _tune_metrics(replica: ServeProcess) -> dict:
    """A replica's tuning metrics: (sample name, state or stage) -> value."""
    port = int(re.search(r"metrics on http://127\.0\.0\.1:(\d+)", "".join(replica.log)).group(1))
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    return {(name, labels.get("state") or labels.get("stage")): value
            for family in text_string_to_metric_families(text) for name, labels, value, *_ in family.samples
            if name.startswith("tav_tune")}


def _get_model(client: Client, model_id: str):
    with contextlib.suppress(ServerError):
        return client.get_model(model_id)
    return None


@needs_redis
def test_two_workers_run_two_jobs_at_once_and_a_third_waits(service, clip_path):
    video = clip_path.read_bytes()
    with admin(service) as client:
        jobs = [client.create_tune_job(f"parallel-{i}", video, CAPTION, base="tiny", **{**SMALL, "steps": 2000})
                for i in range(3)]
        seen = wait_until(lambda: _both_tuning_one_queued(client, jobs), 60)
        assert seen[2].queue_position == 0 and {seen[0].worker, seen[1].worker} == {"w1", "w2"}
        for job in jobs:
            client.cancel_tune_job(job.id)
        ended = [client.wait_tune_job(job.id, timeout=TIMEOUT) for job in jobs]
    assert [job.state for job in ended] == ["cancelled"] * 3
    assert not any((service.repo / f"parallel-{i}").exists() for i in range(3))


@needs_redis
def test_the_queue_of_jobs_is_bounded(service, clip_path):
    video = clip_path.read_bytes()
    with admin(service) as client:
        running = [client.create_tune_job(f"busy-{i}", video, CAPTION, base="tiny", **{**SMALL, "steps": 2000})
                   for i in range(2)]
        wait_until(lambda: all(client.get_tune_job(job.id).state == "tuning" for job in running), 60)
        queued = [client.create_tune_job(f"waiting-{i}", video, CAPTION, base="tiny") for i in range(4)]
        assert [job.queue_position for job in queued] == [0, 1, 2, 3]
        with pytest.raises(ServerError) as e:
            client.create_tune_job("one-too-many", video, CAPTION, base="tiny")
        assert e.value.code == CODE.RESOURCE_EXHAUSTED and "4 tune jobs are queued" in e.value.details
        for job in running + queued:
            client.cancel_tune_job(job.id)
        assert all(client.wait_tune_job(job.id, timeout=TIMEOUT).state == "cancelled" for job in running + queued)


def _both_tuning_one_queued(client: Client, jobs):
    now = [client.get_tune_job(job.id) for job in jobs]
    return now if [job.state for job in now] == ["tuning", "tuning", "queued"] else None


@needs_redis
def test_cancel_during_tuning_ends_the_job_within_one_step(service, clip_path):
    with admin(service) as client:
        job = client.create_tune_job("cancelled", clip_path.read_bytes(), CAPTION, base="tiny",
                                     **{**SMALL, "steps": 2000})
        at = wait_until(lambda: (j := client.get_tune_job(job.id)).step >= 3 and j, 60)
        client.cancel_tune_job(job.id)
        after = client.get_tune_job(job.id)  # the step recorded once the cancel is: the worker records each step
        ended = client.wait_tune_job(job.id, timeout=TIMEOUT)  # before it looks for a cancel
    assert ended.state == "cancelled" and ended.cancel_requested
    # counted in steps, not seconds: however busy the machine, at most the step under way when the cancel came
    assert at.step <= after.step <= ended.step <= after.step + 1, (at.step, after.step, ended.step)
    assert not (service.repo / "cancelled").exists()
    wait_until(lambda: leftovers(service.repo) == [], 60)


@needs_redis
def test_a_worker_killed_mid_job_has_its_job_run_again(service, clip_path):
    victim, other = service.workers
    with admin(service) as client:
        job = client.create_tune_job("survivor", clip_path.read_bytes(), CAPTION, base="tiny",
                                     **{**SMALL, "steps": 60})
        running = wait_until(lambda: (j := client.get_tune_job(job.id)).step >= 2 and j, 60)
        killed = victim if running.worker == victim.name else other
        killed.proc.kill()
        killed.proc.wait(30)
        ended = client.wait_tune_job(job.id, timeout=TIMEOUT)
        assert ended.state == "ready" and ended.attempt >= 2 and ended.worker != killed.name, ended
        assert TunedModel.open(service.repo / "survivor").config["steps"] == 60
        # the killed worker, restarted, cleans up after itself and takes new jobs
        index = service.workers.index(killed)
        service.workers[index] = TuneWorker(service.brokers[index], service.repo, killed.name, killed.log)
        wait_until(lambda: leftovers(service.repo) == [], 60)
        busy = client.create_tune_job("keeps-the-other-busy", clip_path.read_bytes(), CAPTION, base="tiny",
                                      **{**SMALL, "steps": 2000})
        wait_until(lambda: client.get_tune_job(busy.id).state == "tuning", 60)
        new = client.tune("after-the-restart", clip_path.read_bytes(), CAPTION, base="tiny", timeout=TIMEOUT,
                          **SMALL)
        client.cancel_tune_job(busy.id)
    assert new.state == "ready" and new.worker == killed.name


@needs_redis
def test_a_redis_restart_loses_no_acknowledged_job(service, clip_path):
    video = clip_path.read_bytes()
    with admin(service) as client:
        jobs = [client.create_tune_job(f"through-restart-{i}", video, CAPTION, base="tiny",
                                       **{**SMALL, "steps": 25}) for i in range(3)]
        service.redis.kill()
        with pytest.raises(ServerError) as e:
            client.get_tune_job(jobs[0].id)
        assert e.value.code == CODE.UNAVAILABLE and "Redis" in e.value.details
        assert wait_until(lambda: client.health("tuneavideo.v1.Tuning") == "NOT_SERVING", 60)
        assert client.health("tuneavideo.v1.VideoGeneration") == "SERVING" and client.health() == "SERVING"
        service.redis.start()
        assert wait_until(lambda: client.health("tuneavideo.v1.Tuning") == "SERVING", 60)
        ended = [client.wait_tune_job(job.id, timeout=TIMEOUT) for job in jobs]
    assert [job.state for job in ended] == ["ready"] * 3, ended
    assert all((service.repo / f"through-restart-{i}").is_dir() for i in range(3))


@needs_redis
def test_bad_input_is_refused_before_anything_is_queued(service, clip_path, tmp_path):
    video = clip_path.read_bytes()
    good = dict(model_id="fresh", video=video, caption=CAPTION, base="tiny")
    cases = [
        (dict(video=b"\0" * ((64 << 20) + 1)), CODE.INVALID_ARGUMENT, "video: must be at most 64 MiB"),
        (dict(video=b"not a video"), CODE.INVALID_ARGUMENT, "video:"),
        (dict(caption=""), CODE.INVALID_ARGUMENT, "caption:"),
        (dict(base="sd-1.5"), CODE.INVALID_ARGUMENT, "base: 'sd-1.5' is not an allowed base"),
        (dict(model_id="../escape"), CODE.INVALID_ARGUMENT, "model_id:"),
        (dict(model_id=".bases"), CODE.INVALID_ARGUMENT, "model_id:"),
        (dict(model_id="square-tuned"), CODE.ALREADY_EXISTS, "model_id:"),
        (dict(steps=0), CODE.INVALID_ARGUMENT, "settings.steps"),
        (dict(steps=2001), CODE.INVALID_ARGUMENT, "settings.steps"),
        (dict(frames=33), CODE.INVALID_ARGUMENT, "settings.frames"),
        (dict(width=30), CODE.INVALID_ARGUMENT, "settings.width: must be a multiple of 4"),
        (dict(height=2048), CODE.INVALID_ARGUMENT, "settings.height"),
        (dict(learning_rate=1.0), CODE.INVALID_ARGUMENT, "settings.lr"),
        (dict(attention_mode="sideways"), CODE.INVALID_ARGUMENT, "settings.attention_mode"),
        (dict(trainable="everything"), CODE.INVALID_ARGUMENT, "settings.trainable"),
        (dict(frame_positions="learned"), CODE.INVALID_ARGUMENT, "settings.frame_positions"),
        (dict(timestep_power=-1.0), CODE.INVALID_ARGUMENT, "settings.timestep_power"),
        (dict(timestep_power=float("nan")), CODE.INVALID_ARGUMENT, "settings.timestep_power"),
    ]
    with admin(service) as client:
        before = len(client.list_tune_jobs())
        for change, code, text in cases:
            with pytest.raises(ServerError) as e:
                client.create_tune_job(**{**good, **change})
            assert (e.value.code, text in e.value.details) == (code, True), (change, e.value.details)
        assert len(client.list_tune_jobs()) == before
        for page in (tuning_pb2.ListTuneJobsRequest(page_token="not-a-token"),
                     tuning_pb2.ListTuneJobsRequest(page_size=101)):
            with pytest.raises(grpc.RpcError) as e:
                client.tuning.ListTuneJobs(page, metadata=client.metadata, timeout=30)
            assert e.value.code() == CODE.INVALID_ARGUMENT and e.value.details().startswith("page_"), e.value
    with user(service) as client:  # a generation token can neither tune nor delete
        for call in (lambda: client.create_tune_job(**good), lambda: client.delete_model("square-tuned"),
                     lambda: client.list_tune_jobs()):
            with pytest.raises(ServerError) as e:
                call()
            assert e.value.code == CODE.PERMISSION_DENIED and "admin token" in e.value.details
    with Client(f"127.0.0.1:{service.replicas[0].port}") as anonymous, pytest.raises(ServerError) as e:
        anonymous.create_tune_job(**good)
    assert e.value.code == CODE.UNAUTHENTICATED


@needs_redis
def test_delete_model_and_ids_reserved_at_create(service, clip_path):
    with admin(service) as client:
        job = client.create_tune_job("reserved", clip_path.read_bytes(), CAPTION, base="tiny",
                                     **{**SMALL, "steps": 2000})
        with pytest.raises(ServerError) as e:  # a second create cannot claim the id, a delete cannot race it
            client.create_tune_job("reserved", clip_path.read_bytes(), CAPTION, base="tiny")
        assert e.value.code == CODE.ALREADY_EXISTS and job.id in e.value.details
        with pytest.raises(ServerError) as e:
            client.delete_model("reserved")
        assert e.value.code == CODE.FAILED_PRECONDITION
        client.cancel_tune_job(job.id)
        client.wait_tune_job(job.id, timeout=TIMEOUT)
        client.delete_tune_job(job.id)
        with pytest.raises(ServerError) as e:
            client.get_tune_job(job.id)
        assert e.value.code == CODE.NOT_FOUND
        client.delete_model("square-tuned")
        assert not (service.repo / "square-tuned").exists()
        with pytest.raises(ServerError) as e:
            client.delete_model("square-tuned")
        assert e.value.code == CODE.NOT_FOUND
    with user(service, 1) as client:
        wait_until(lambda: "square-tuned" not in [m.id for m in client.list_models().models], 60)


def test_the_embedded_default_tunes_with_its_own_worker_through_the_cli(tiny_base, clip_path, seed_engines, tmp_path,
                                                                        capsys):
    """No broker: the server's local worker process tunes, exports and publishes; `tav-client tune --wait`,
    `jobs`, `cancel` and `delete-model` drive it. SIGTERM stops the server and its worker cleanly."""
    repo = tmp_path / "repo"
    repo.mkdir()
    seed_engines(repo)
    server = ServeProcess("--repo", str(repo), "--base", f"tiny={tiny_base}", "--rescan-seconds", "0.5")
    target = f"127.0.0.1:{server.port}"
    try:
        server.wait_for("tuning service serving")
        with Client(target) as client:
            first = client.create_tune_job("local-a", clip_path.read_bytes(), CAPTION, base="tiny",
                                           **{**SMALL, "steps": 2000})
            wait_until(lambda: client.get_tune_job(first.id).step >= 2, 60)
            waiting = threading.Thread(target=cli, args=("tune", "--server", target, "--video", str(clip_path),
                                                         "--prompt", CAPTION, "--model", "local-b", "--base",
                                                         "tiny", "--steps", "3", "--width", "32", "--height", "32",
                                                         "--lr", "1e-3", "--wait"))
            waiting.start()
            second = wait_until(lambda: next((j for j in client.list_tune_jobs() if j.model_id == "local-b"), None))
            assert (second.state, second.queue_position) == ("queued", 0)
            cli("cancel", "--server", target, first.id)
            waiting.join(TIMEOUT)
            out = capsys.readouterr().out
            assert "cancel requested" in out and "model local-b is ready" in out, out
            assert client.get_tune_job(first.id).state == "cancelled"
            wait_until(lambda: _get_model(client, "local-b"), 60)
            assert client.generate("local-b", CAPTION, steps=1, format="png", timeout=TIMEOUT).frames == 8
            cli("jobs", "--server", target)
            listed = capsys.readouterr().out.splitlines()
            assert [line.split("\t")[1:3] for line in listed] == [["local-b", "ready"], ["local-a", "cancelled"]]
            cli("delete-model", "--server", target, "local-b")
        assert sorted(p.name for p in repo.iterdir() if not p.name.startswith(".")) == []
        assert server.terminate() == 0
        assert "leaked" not in "".join(server.log), "the worker ended through Python's exit, releasing its locks"
    finally:
        server.proc.kill()
        server.proc.wait(30)


# Seconds: --max-job-seconds and --job-retention-hours of the test below. The retention only has to outlast a watch
# seeing the job end (a poll every 0.5 s).
LIMIT, RETENTION = 4, 10


@pytest.mark.parametrize("queue", ["local", pytest.param("redis", marks=needs_redis)])
def test_a_job_past_the_maximum_job_time_fails_and_ended_jobs_are_forgotten_after_the_retention(
        queue, tiny_base, clip_path, tmp_path, request):
    """A 4 s job limit and a 10 s retention, on the embedded default and on Redis (a worker and a replica of their
    own on another database of the module's Redis). Two jobs of 2000 steps, which no CPU tunes within the limit:
    each fails with the reason, leaving no directory behind; the second, queued behind the first, shows that the
    worker takes the next job and gives it a limit of its own (it ran for the limit by the job store's clock, half
    of it allowed for the store's lag; a limit counted from its creation would have ended it at its first step).
    Nothing here needs the machine to be fast: the limit is only ever passed, never raced by work that must fit in
    it (as a 20 s limit was, by a small job at load 4). Each ended job is gone from the registry once the retention
    has passed (a bound on waiting only)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    limits = ["--max-job-seconds", str(LIMIT), "--job-retention-hours", str(RETENTION / 3600)]
    worker = None
    if queue == "redis":
        url = re.sub(r"/0(\?|$)", r"/1\1", request.getfixturevalue("service").redis.url)
        (tmp_path / "broker").write_text(url + "\n")
        worker = TuneWorker(url, repo, "w-limits", tmp_path / "worker.log", "--max-job-seconds", str(LIMIT))
        limits += ["--broker-file", str(tmp_path / "broker")]
    server = ServeProcess("--repo", str(repo), "--base", f"tiny={tiny_base}", "--rescan-seconds", "0.5", *limits)
    try:
        server.wait_for("tuning service serving")
        with Client(f"127.0.0.1:{server.port}") as client:
            jobs = [client.create_tune_job(f"too-long-{i}", clip_path.read_bytes(), CAPTION, base="tiny",
                                           **{**SMALL, "steps": 2000}) for i in range(2)]
            ended = [_watch_to_the_end(client, job.id) for job in jobs]
            for job in ended:
                assert tuning_pb2.TuneJob.State.Name(job.state) == "STATE_FAILED", job
                assert "maximum job time" in job.failure_reason and 0 < job.step < 2000, job
            second = ended[1]
            assert second.end_time.ToNanoseconds() - second.start_time.ToNanoseconds() >= LIMIT * 0.5e9, second
            assert not any((repo / f"too-long-{i}").exists() for i in range(2)) and leftovers(repo) == []
            for job in jobs:
                wait_until(lambda job=job: job.id not in [j.id for j in client.list_tune_jobs()], RETENTION + 120)
                with pytest.raises(ServerError) as e:
                    client.get_tune_job(job.id)
                assert e.value.code == CODE.NOT_FOUND
    finally:
        server.proc.kill()
        server.proc.wait(30)
        if worker is not None:
            worker.stop()


def _watch_to_the_end(client: Client, job_id: str) -> tuning_pb2.TuneJob:
    """The job's last update, as the server sends it (with its timestamps)."""
    updates = client.tuning.WatchTuneJob(tuning_pb2.WatchTuneJobRequest(id=job_id), metadata=client.metadata,
                                         timeout=TIMEOUT)
    return list(updates)[-1]


def cli(*args: str) -> None:
    """`tav-client ARGS`, in this process; a non-zero exit fails the test."""
    try:
        client_main(list(args))
    except SystemExit as e:
        assert e.code in (0, None), f"tav-client {' '.join(args)} exited {e.code}"


def test_the_server_process_never_imports_the_exporter():
    code = ("import sys, server.serve, server.tuning, jobs.local\n"
            "print(sorted(m for m in sys.modules if m.startswith('exporter')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_a_hub_base_resolves_from_the_cache_on_disk_without_pickles(tiny_base, tmp_path):
    """A hub id resolves through huggingface_hub's cache, offline (HF_HUB_OFFLINE, read when the library loads, as
    in a deployed server): the diffusers folders' configs, tokenizer and safetensors only; a pickled .bin is never
    asked for."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--tav-test--tiny-sd" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_base, snapshot)
    (cache / "models--tav-test--tiny-sd" / "refs").mkdir()
    (cache / "models--tav-test--tiny-sd" / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}

    code = """
from jobs.bases import load_base
from tuner.components import BaseModelError
print(load_base("hub", "tav-test/tiny-sd").path)
try:
    load_base("missing", "tav-test/not-cached")
except BaseModelError as e:
    print(e)
"""
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    found, missing = result.stdout.splitlines()[:2]
    assert Path(found) == snapshot, result.stderr
    assert "neither a directory nor a hub id in reach" in missing
    assert not any(Path(name).match(pattern) for pattern in model_file_patterns()
                   for name in ("unet/diffusion_pytorch_model.bin", "model.ckpt", "unet/model.pt"))


def test_the_queue_settings_that_make_a_job_safe():
    """The Celery settings jobs/celery_app.py names: acknowledged when the job ends, requeued when its worker is
    lost, one job held per worker, a visibility timeout past the longest job, JSON only, reconnect for ever."""
    app = make_app("redis://127.0.0.1:1/0", max_job_seconds=7200)
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] > 7200 + 300
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.broker_connection_retry_on_startup and conf.broker_connection_max_retries is None
    assert not conf.worker_cancel_long_running_tasks_on_connection_loss  # a Redis blip does not stop a job
