"""`tav-serve`: the gRPC server. Assembles the generation service, the tuning service (over Redis and Celery
with `--broker`, else with a local worker process of its own), the worker, health, reflection, admission
(optional bearer-token auth with generation and admin tokens, calls and request bytes in flight), TLS,
message-size, connection and stream limits, keepalive, metrics and the background rescan of the repository, then
runs until SIGTERM or SIGINT and drains (DESIGN.md section 6): health NOT_SERVING, no new requests, the running
request and the queued ones that finish within the grace period complete, the rest are answered UNAVAILABLE
before their work starts, exit 0. If the worker itself fails, health says NOT_SERVING and the process exits 1,
for its supervisor to restart it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE_NAME
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from tuneavideo.v1 import tuneavideo_pb2_grpc as pb2_grpc
from tuneavideo.v1 import tuning_pb2_grpc

from jobs.bases import load_bases, parse_base
from jobs.store import JobStore
from jobs.work import DEFAULT_EXPORTS, check_exports, parse_exports
from server.engines import BACKENDS, add_torch_engine_arguments, check_backend
from server.generate import MAX_SOURCE_BYTES
from server.interceptors import AdmissionInterceptor, Limits, read_tokens
from server.metrics import Metrics
from server.registry import ModelRegistry
from server.service import SERVICE_NAME, VideoGenerationService
from server.tuning import SERVICE_NAME as TUNING_SERVICE_NAME
from server.tuning import TuningService
from server.worker import NOT_STARTED, Failed, FairQueue, Worker
from tuner.compiled import OWN_CUDA_GRAPHS

log = logging.getLogger("tav-serve")
T = TypeVar("T")

MAX_RECEIVE_BYTES = MAX_SOURCE_BYTES + (1 << 20)  # the largest source clip, plus room for the other fields
MAX_SEND_BYTES = 4 << 20  # result chunks are at most 1 MiB
MAX_METADATA_BYTES = 16 << 10
STOP_SECONDS = 1.0  # after the grace period, for the last answers to go out before what still runs is cancelled
LARGE_REQUESTS = {method: MAX_RECEIVE_BYTES  # the methods that carry a clip
                  for method in (f"/{SERVICE_NAME}/Generate", f"/{TUNING_SERVICE_NAME}/CreateTuneJob")}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class ServerConfig:
    repo: Path
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (logged, and returned by TavServer.start)
    backend: str = "torch"
    device: str | None = None
    compile_mode: str | None = None  # torch backend: the UNet compiled by torch.compile in this mode; None: eager
    cuda_graphs: bool = True  # torch backend on CUDA: the UNet replayed from CUDA graphs
    max_queue: int = 16  # requests waiting, besides the running one
    tokens: list[str] = field(default_factory=list)  # accepted bearer tokens; empty: no auth
    tls_cert: Path | None = None
    tls_key: Path | None = None
    metrics_port: int | None = None  # None: no metrics endpoint; 0: any free port
    metrics_host: str = "127.0.0.1"
    reflection: bool = True
    grace: float = 30.0  # seconds to drain after SIGTERM
    max_request_seconds: float = 3600.0  # the longest a request may take from acceptance to result
    max_connection_age: float = 1800.0
    engine_cache_bytes: int = 16 * 2**30
    max_calls: int = 64  # admitted calls in flight (health is never counted)
    max_request_bytes: int = 512 << 20  # request bodies being received or held by calls in flight
    receive_wait: float = 10.0  # seconds a call may wait for room in max_request_bytes
    max_connections: int = 256
    max_streams: int = 100  # concurrent calls on one connection
    rescan_seconds: float = 2.0  # how stale the served view of the repository may get
    admin_tokens: list[str] = field(default_factory=list)  # tokens that may tune and delete
    broker: str | None = None  # redis://... for Celery workers; None: a local worker process
    bases: dict[str, str] = field(default_factory=dict)  # allowed bases for tuning, besides shapes-sd
    import_sources: dict[str, str] = field(default_factory=dict)  # id -> official output directory ImportModel takes
    max_queued_jobs: int = 16
    max_job_seconds: float = 7200.0
    max_job_attempts: int = 3  # runs of a job whose worker keeps dying
    job_retention_hours: float = 168.0
    dead_after: float = 60.0  # seconds without a heartbeat before a tuning worker counts as dead
    exports: str = DEFAULT_EXPORTS  # what the local worker exports (tav-tune-worker's own --export with a broker)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        for name, value, low in [("port", self.port, 0), ("metrics-port", self.metrics_port, 0)]:
            if value is not None and not low <= value <= 65535:
                raise ValueError(f"--{name} must be between {low} and 65535, got {value}")
        if not self.grace >= 0:
            raise ValueError(f"--grace must be 0 or more seconds, got {self.grace}")
        for name, value in [("max-request-seconds", self.max_request_seconds),
                            ("max-connection-age", self.max_connection_age),
                            ("engine-cache-gb", self.engine_cache_bytes), ("rescan-seconds", self.rescan_seconds),
                            ("max-job-seconds", self.max_job_seconds),
                            ("job-retention-hours", self.job_retention_hours),
                            ("worker-dead-after", self.dead_after)]:
            if not 0 < value < math.inf:  # nan and inf too: they reach int() and timers
                raise ValueError(f"--{name} must be positive and finite, got {value}")
        for name, value in [("max-queue", self.max_queue), ("max-calls", self.max_calls),
                            ("max-connections", self.max_connections), ("max-streams", self.max_streams),
                            ("max-queued-jobs", self.max_queued_jobs), ("max-job-attempts", self.max_job_attempts)]:
            if value < 1:
                raise ValueError(f"--{name} must be at least 1, got {value}")
        if self.max_request_bytes < 2 * MAX_RECEIVE_BYTES:
            raise ValueError(f"--max-request-mib must be at least {2 * MAX_RECEIVE_BYTES >> 20} (twice the largest "
                             f"request), got {self.max_request_bytes >> 20}")
        try:
            parse_exports(self.exports)
        except ValueError as e:
            raise ValueError(f"--export: {e}") from None
        if self.broker is not None and self.exports != DEFAULT_EXPORTS:
            raise ValueError("--export sets what the local worker exports; with --broker, give it to tav-tune-worker")

    @property
    def limits(self) -> Limits:
        return Limits(self.max_calls, self.max_request_bytes, LARGE_REQUESTS, self.receive_wait)


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
        ("grpc.max_send_message_length", MAX_SEND_BYTES),
        ("grpc.max_metadata_size", MAX_METADATA_BYTES),
        ("grpc.max_concurrent_streams", config.max_streams),
        ("grpc.max_allowed_incoming_connections", config.max_connections),
        # A second server on a taken port fails to start instead of quietly sharing its traffic.
        ("grpc.so_reuseport", 0),
        # Connections are recycled so clients re-resolve and spread over replicas; a request in flight keeps
        # its connection for as long as the longest allowed request.
        ("grpc.max_connection_age_ms", int(config.max_connection_age * 1000)),
        ("grpc.max_connection_age_grace_ms", int(config.max_request_seconds * 1000)),
        # Ping every minute so proxies and NATs keep idle connections open; accept client pings every 30 s or
        # slower (the client library pings every 60 s during calls).
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 30_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class TavServer:
    """The server's parts and life cycle: `start`, serving once warm, `drain`, `wait_closed` (and `exit_code`)."""

    def __init__(self, config: ServerConfig) -> None:
        check_backend(config.backend, config.device, config.compile_mode)
        self.config = config
        self.metrics = Metrics()
        self.registry = ModelRegistry(config.repo, config.backend, config.device, config.engine_cache_bytes,
                                      compile_mode=config.compile_mode, cuda_graphs=config.cuda_graphs)
        self.queue = FairQueue(config.max_queue)
        self.metrics.queue_depth.set_function(lambda: len(self.queue))
        self.service = VideoGenerationService(self.registry, self.queue, self.metrics, config.max_request_seconds)
        self.bases = load_bases(config.bases)
        self.health = health_aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.draining = False
        self.exit_code = 0
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> int:
        """Listen, start the worker (which warms the models, then flips health to SERVING); returns the port."""
        config = self.config
        loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._closed = asyncio.Event()
        self.admission = AdmissionInterceptor(config.tokens, config.admin_tokens, config.limits, self.metrics)
        self.server = grpc.aio.server(interceptors=[self.admission], options=grpc_options(config))
        self.store = self._job_store()
        self.tuning = TuningService(self.store, self.registry, self.bases, self.metrics, config.max_queued_jobs,
                                    config.import_sources)
        pb2_grpc.add_VideoGenerationServicer_to_server(self.service, self.server)
        tuning_pb2_grpc.add_TuningServicer_to_server(self.tuning, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for name in ("", SERVICE_NAME, TUNING_SERVICE_NAME):
            await self.health.set(name, NOT_SERVING)
        if config.reflection:
            reflection.enable_server_reflection((SERVICE_NAME, TUNING_SERVICE_NAME, HEALTH_SERVICE_NAME,
                                                 reflection.SERVICE_NAME), self.server)
        address = f"{config.host}:{config.port}"
        try:
            if config.tls_cert is not None:
                pair = (config.tls_key.read_bytes(), config.tls_cert.read_bytes())
                self.port = self.server.add_secure_port(address, grpc.ssl_server_credentials([pair]))
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {address} (is another server using the port?): {e}") from None
        await self.server.start()
        if config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(config.metrics_port, config.metrics_host)
            log.info("metrics on http://%s:%d/metrics", config.metrics_host, self.metrics_port)
        self.worker = Worker(self.registry, self.queue, lambda: loop.call_soon_threadsafe(self._became_ready),
                             lambda reason: loop.call_soon_threadsafe(self._failed, reason))
        self.worker.start()
        self._watcher = asyncio.ensure_future(self._watch())
        log.info("listening on %s:%d (%s, backend %s, %s); warming %d models", config.host, self.port,
                 "TLS" if config.tls_cert else "plaintext", config.backend, self._unet_description(),
                 len(self.registry.models))
        return self.port

    def _unet_description(self) -> str:
        """How the torch engine runs the video UNet, for the startup log line."""
        config = self.config
        if config.backend != "torch":
            return "engines as exported"
        mode = f"UNet compiled, mode {config.compile_mode}" if config.compile_mode else "UNet eager"
        on_cuda = (config.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        graphs = config.cuda_graphs and on_cuda and config.compile_mode not in OWN_CUDA_GRAPHS
        return mode + (", the engine's CUDA graphs" if graphs else "")

    def _job_store(self) -> JobStore:
        """The tuning service's registry: Redis (shared with the Celery workers) or the local worker's."""
        config = self.config
        if config.broker is not None:
            from jobs.redis_store import RedisJobStore

            return RedisJobStore(config.broker, config.max_job_seconds)
        from jobs.local import LocalJobStore

        try:
            check_exports(parse_exports(config.exports), config.device)  # at start, not at the first job
        except ValueError as e:
            raise ValueError(f"--export: {e}") from None
        return LocalJobStore(config.repo, config.device, config.max_job_seconds, config.max_job_attempts,
                             config.exports)

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _became_ready(self) -> None:
        if self.draining:
            return
        self.service.accepting = True
        self._spawn(self._serving())

    async def _serving(self) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, SERVING)
        self._ready.set()
        log.info("serving %s", ", ".join(sorted(self.registry.models)) or "no models")

    async def _watch(self) -> None:
        """Every `rescan_seconds`: look at the repository again (off the event loop), check that the worker is
        alive, keep the tune jobs' registry (housekeeping, metrics, the Tuning health entry) and give memory that
        large requests left free back to the system."""
        config, tuning_status = self.config, None
        while not self.draining:
            reachable = await self._round("job_sweep", self.tuning.sweep(
                config.dead_after, config.max_job_attempts, config.job_retention_hours * 3600))
            if (SERVING if reachable else NOT_SERVING) != tuning_status:
                tuning_status = SERVING if reachable else NOT_SERVING
                await self.health.set(TUNING_SERVICE_NAME, tuning_status)
                log.log(logging.INFO if reachable else logging.ERROR, "tuning service %s",
                        "serving" if reachable else "not serving: its job store is unreachable or its sweep failed")
            await asyncio.sleep(config.rescan_seconds)
            await self._round("rescan", asyncio.to_thread(self.registry.scan))
            await self._round("memory", self.admission.give_back_memory())
            if not self.worker.is_alive() and not self.draining:
                self._failed("the worker thread is gone")

    async def _round(self, loop: str, work: Awaitable[T]) -> T | None:
        """One round of a background loop: an error is logged and counted (`tav_background_errors_total`), and the
        loop goes on (None for its result)."""
        try:
            return await work
        except Exception:
            log.exception("the background %s failed; it runs again in %g s", loop, self.config.rescan_seconds)
            self.metrics.background_errors.labels(loop).inc()
            return None

    def _failed(self, reason: str) -> None:
        """The worker cannot serve any more: say so in health, stop, exit 1."""
        if self.draining:
            return
        log.critical("%s: shutting down, exit code 1", reason)
        self.exit_code = 1
        self._spawn(self.drain(grace=0.0))

    async def wait_ready(self) -> None:
        await self._ready.wait()

    def request_drain(self) -> None:
        """Start draining (the signal handler)."""
        if not self.draining:
            self._spawn(self.drain())

    async def drain(self, grace: float | None = None) -> None:
        """Stop serving: see the module docstring."""
        if self.draining:
            await self._closed.wait()
            return
        self.draining = True
        self._watcher.cancel()
        grace = self.config.grace if grace is None else grace
        deadline = time.monotonic() + grace
        log.info("draining: finishing what fits in %.0f s", grace)
        await self.health.enter_graceful_shutdown()
        self.service.accepting = False
        self.worker.drain(deadline)
        try:
            await asyncio.wait_for(self.service.wait_idle(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            log.warning("grace period over: cancelling the requests still running")
        for job in self.queue.take_all():  # never started: their clients may retry them elsewhere
            log.info("request %s not started: the grace period is over", job.id)
            job.emit(Failed(grpc.StatusCode.UNAVAILABLE, NOT_STARTED))
        # a second for those answers to go out, then what still runs is cancelled (it stops within one step)
        await self.server.stop(STOP_SECONDS)
        if not await asyncio.to_thread(self.worker.join, 60):
            log.warning("the worker did not stop within 60 s")
        await self.store.close()
        self.metrics.close()
        log.info("stopped")
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()


async def run(config: ServerConfig) -> int:
    """Serve until SIGTERM or SIGINT, then drain; the process's exit code."""
    server = TavServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_drain)
    await server.wait_closed()
    return server.exit_code


class BackgroundServer:
    """A `TavServer` on its own event loop in a background thread, driven from synchronous code (tests,
    benchmarks, embedding): `BackgroundServer(config)`, `.wait_ready()`, `.target`, `.stop()`."""

    def __init__(self, config: ServerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="tav-serve-loop", daemon=True)
        self._thread.start()
        self.server = self.call(self._make(config))
        self.port = self.call(self.server.start())
        self.target = f"127.0.0.1:{self.port}"

    @staticmethod
    async def _make(config: ServerConfig) -> TavServer:
        return TavServer(config)

    def call(self, coroutine, timeout: float = 600):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def wait_ready(self) -> None:
        self.call(self.server.wait_ready())

    def stop(self) -> None:
        self.call(self.server.drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def parse_import_source(arg: str) -> tuple[str, str]:
    """`ID=DIR` -> (id, the directory as an absolute path); ValueError unless DIR is a directory."""
    source_id, sep, directory = arg.partition("=")
    if not sep or not source_id or not directory:
        raise ValueError(f"--import-source {arg!r}: expected ID=DIR")
    if not Path(directory).is_dir():
        raise ValueError(f"--import-source {arg!r}: {directory} is not a directory")
    return source_id, str(Path(directory).resolve())


def main(argv: list[str] | None = None) -> None:
    d = ServerConfig(repo=Path("."))
    p = argparse.ArgumentParser(prog="tav-serve", description="Serve tuned Tune-A-Video models over gRPC.")
    p.add_argument("--repo", required=True, type=Path, help="model repository: one tuned model directory per id")
    p.add_argument("--host", default=d.host, help="address to listen on (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=d.port, help="0: any free port (logged)")
    p.add_argument("--backend", choices=BACKENDS, default=d.backend)
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    add_torch_engine_arguments(p)
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="requests that may wait; past it "
                   "RESOURCE_EXHAUSTED")
    p.add_argument("--auth-token-file", type=Path, help="require 'authorization: Bearer <token>', a token a line")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain (with --tls-key)")
    p.add_argument("--tls-key", type=Path, help="PEM private key")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this HTTP port")
    p.add_argument("--metrics-host", default=d.metrics_host, help="address of the metrics endpoint (0.0.0.0: all "
                   "interfaces; it has no auth)")
    p.add_argument("--no-reflection", action="store_true", help="do not serve gRPC reflection")
    p.add_argument("--grace", type=float, default=d.grace, help="seconds to drain after SIGTERM")
    p.add_argument("--max-request-seconds", type=float, default=d.max_request_seconds,
                   help="longest a request may take from acceptance to result (also the connection-age grace)")
    p.add_argument("--max-connection-age", type=float, default=d.max_connection_age,
                   help="seconds before a connection recycles")
    p.add_argument("--engine-cache-gb", type=float, default=d.engine_cache_bytes / 2**30,
                   help="memory for the loaded models' own tensors (adapters, source latents)")
    p.add_argument("--max-calls", type=int, default=d.max_calls, help="calls in flight (health not counted)")
    p.add_argument("--max-request-mib", type=int, default=d.max_request_bytes >> 20,
                   help="request bytes being received or held by calls in flight")
    p.add_argument("--max-connections", type=int, default=d.max_connections)
    p.add_argument("--max-streams", type=int, default=d.max_streams, help="concurrent calls on one connection")
    p.add_argument("--rescan-seconds", type=float, default=d.rescan_seconds,
                   help="how often the repository is looked at again (the served view is at most this stale)")
    tuning = p.add_argument_group("tuning service")
    tuning.add_argument("--broker", help="redis://[:PASSWORD@]HOST:PORT/DB (rediss:// for TLS): the job registry "
                        "and Celery broker shared with tav-tune-worker; default: a local worker process")
    tuning.add_argument("--broker-file", type=Path, help="read the broker URL from this file (keeps a password "
                        "out of the process list)")
    tuning.add_argument("--admin-token-file", type=Path, help="tokens (one a line) that may tune and delete models")
    tuning.add_argument("--base", action="append", default=[], metavar="ID=DIR_OR_HUB_ID[@VARIANT]",
                        help="a base model jobs may tune from (repeatable; shapes-sd is always allowed); @fp16 takes "
                             "its fp16 weights variant, by default the main weights")
    tuning.add_argument("--import-source", action="append", default=[], metavar="ID=DIR",
                        help="an official Tune-A-Video output directory ImportModel may import, by ID (repeatable); "
                             "hub ids need no entry")
    tuning.add_argument("--max-queued-jobs", type=int, default=d.max_queued_jobs)
    tuning.add_argument("--max-job-seconds", type=float, default=d.max_job_seconds)
    tuning.add_argument("--max-job-attempts", type=int, default=d.max_job_attempts,
                        help="runs of a job whose worker keeps dying before it fails")
    tuning.add_argument("--job-retention-hours", type=float, default=d.job_retention_hours,
                        help="how long ended jobs are kept")
    tuning.add_argument("--worker-dead-after", type=float, default=d.dead_after,
                        help="seconds without a heartbeat (workers beat every 2 s) before a job's worker counts as "
                             "dead and the job runs again")
    tuning.add_argument("--export", default=d.exports, metavar="KIND[:PRECISION],...",
                        help="no broker: what the local worker exports of every tuned model, as this server serves "
                             "it (onnx, tensorrt, aoti; e.g. onnx,aoti; see tav-tune-worker --help)")
    args = p.parse_args(argv)
    if not 0 < args.engine_cache_gb < math.inf:
        p.error(f"--engine-cache-gb must be positive and finite, got {args.engine_cache_gb}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ServerConfig(
            repo=args.repo, host=args.host, port=args.port, backend=args.backend, device=args.device,
            compile_mode=args.compile, cuda_graphs=args.cuda_graphs == "on",
            max_queue=args.max_queue, tokens=read_tokens(args.auth_token_file) if args.auth_token_file else [],
            tls_cert=args.tls_cert, tls_key=args.tls_key, metrics_port=args.metrics_port,
            metrics_host=args.metrics_host, reflection=not args.no_reflection, grace=args.grace,
            max_request_seconds=args.max_request_seconds, max_connection_age=args.max_connection_age,
            engine_cache_bytes=int(args.engine_cache_gb * 2**30), max_calls=args.max_calls,
            max_request_bytes=args.max_request_mib << 20, max_connections=args.max_connections,
            max_streams=args.max_streams, rescan_seconds=args.rescan_seconds,
            admin_tokens=read_tokens(args.admin_token_file) if args.admin_token_file else [],
            broker=args.broker_file.read_text().strip() if args.broker_file else args.broker,
            bases=dict(parse_base(arg) for arg in args.base), max_queued_jobs=args.max_queued_jobs,
            import_sources=dict(parse_import_source(arg) for arg in args.import_source),
            max_job_seconds=args.max_job_seconds, max_job_attempts=args.max_job_attempts,
            job_retention_hours=args.job_retention_hours, dead_after=args.worker_dead_after, exports=args.export,
        )
        code = asyncio.run(run(config))
    except (OSError, ValueError) as e:
        print(f"tav-serve: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code)


if __name__ == "__main__":
    main()
