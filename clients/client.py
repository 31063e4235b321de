"""A small typed Python client for the Tune-A-Video gRPC server, sync (`Client`) and asyncio (`AsyncClient`):
generation, models, and the tuning service (tune jobs, model deletion; these need the admin token).

Calls take a deadline (`timeout`, seconds, over all attempts) and `generate` a progress callback. Retries
happen only where they are safe: `generate` on UNAVAILABLE before the server started the request (no "started"
message yet: it never ran, so it cannot run twice; a request accepted but never started was answered by a
replica shutting down, so the retry goes out on a new connection, which a load balancer sends elsewhere), and
the read-only model calls on UNAVAILABLE; at most `retries` times, with exponential backoff, never past the
deadline. Creating a tune job is never retried (a lost answer could otherwise queue the job twice; the model id
reservation would refuse the second with ALREADY_EXISTS anyway).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tuneavideo.v1 import tuneavideo_pb2 as pb2
from tuneavideo.v1 import tuneavideo_pb2_grpc as pb2_grpc
from tuneavideo.v1 import tuning_pb2, tuning_pb2_grpc

FORMATS = {"mp4": pb2.OUTPUT_FORMAT_MP4, "gif": pb2.OUTPUT_FORMAT_GIF, "png": pb2.OUTPUT_FORMAT_PNG_FRAMES}
PHASES = {pb2.PHASE_INVERT: "invert", pb2.PHASE_SAMPLE: "sample", pb2.PHASE_DECODE: "decode"}
# Keepalive pings during calls, no more often than the server accepts (every 30 s).
CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", 60_000), ("grpc.keepalive_timeout_ms", 20_000)]
ProgressFn = Callable[[str, int, int], None]  # (phase: invert | sample | decode, step, total)
AcceptedFn = Callable[[int], None]  # (queue position: requests that start before this one)
TIMINGS = ("queue", "text", "encode", "invert", "sample", "decode", "output", "total")  # in the order they happen


class ServerError(Exception):
    """A call that ended with a status other than OK; `code` is the grpc.StatusCode."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        if code == grpc.StatusCode.INTERNAL and "RST_STREAM" in (details or ""):
            # A proxy (nginx, Envoy) lost its replica mid-stream and reset the stream; the server never sent a
            # status. Report it as a broken direct connection is reported: the replica went away.
            code = grpc.StatusCode.UNAVAILABLE
        hint = ""
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (details or ""):
            hint = " (the request is over the server's message size limit: source_video may be at most 64 MiB)"
        super().__init__(f"{code.name}: {details}{hint}")
        self.code = code
        self.details = details


@dataclass
class Video:
    """A generation's output: one video file, or one PNG file per frame (`mime_type` "image/png")."""

    request_id: str
    mime_type: str
    files: list[bytes]
    frames: int
    width: int
    height: int
    fps: float
    seed: int
    steps: int
    guidance: float
    prompt_truncated: bool
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    cache_interval: int = 1  # the feature-reuse interval the sampling used (1: none)

    def save(self, path: str | Path) -> Path:
        """Write the video to `path`, or for PNG frames the directory `path` of frame_00000.png, ..."""
        path = Path(path)
        if self.mime_type == "image/png":
            path.mkdir(parents=True, exist_ok=True)
            for index, data in enumerate(self.files):
                (path / f"frame_{index:05d}.png").write_bytes(data)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.files[0])
        return path


@dataclass(frozen=True)
class Model:
    """What the server reports about a model (see ModelInfo in the .proto)."""

    id: str
    base_model: str
    width: int
    height: int
    frames: int
    source_frames: int
    fps: float
    source_prompt: str
    attention_mode: str
    backends: tuple[str, ...]
    backend: str
    profiles: tuple[tuple[int, int, int, int], ...]  # (batch, frames, latent height, latent width)
    default_steps: int
    default_guidance: float
    loaded: bool
    cache_interval_supported: bool = False  # the server's backend serves cache_interval > 1 for it
    adapter_kind: str = "full"  # "lora": low-rank factors merged onto the base's W0 when it becomes active
    lora_rank: int = 0

    @classmethod
    def from_proto(cls, info: pb2.ModelInfo) -> Model:
        return cls(
            info.id, info.base_model, info.width, info.height, info.frames, info.source_frames, info.fps,
            info.source_prompt, info.attention_mode, tuple(info.backends), info.backend,
            tuple((p.batch, p.frames, p.latent_height, p.latent_width) for p in info.profiles),
            info.default_steps, info.default_guidance, info.loaded, info.cache_interval_supported,
            info.adapter_kind or "full", info.lora_rank,
        )


@dataclass(frozen=True)
class ModelList:
    models: list[Model]
    skipped: dict[str, str]  # repository entries the server does not serve, with the reason


FORMAT_NAMES = {value: name for name, value in FORMATS.items()}


@dataclass(frozen=True)
class ServerInfo:
    """What a server accepts (see ServerInfo in the .proto): `limits` holds GenerationLimits' fields by name
    (max_frames, default_frames, max_steps, min_guidance, max_guidance, max_prompt_chars, max_seed,
    max_source_bytes, max_source_frames, max_source_pixels, max_cache_interval); `formats` are `generate`'s format
    names."""

    backend: str
    limits: dict
    formats: tuple[str, ...]
    options: tuple[str, ...]
    max_queue: int

    @classmethod
    def from_proto(cls, info: pb2.ServerInfo) -> ServerInfo:
        limits = {f.name: getattr(info.limits, f.name) for f in info.limits.DESCRIPTOR.fields}
        return cls(info.backend, limits, tuple(FORMAT_NAMES[f] for f in info.formats if f in FORMAT_NAMES),
                   tuple(info.options), info.max_queue)


JOB_STATES = {value: name.removeprefix("STATE_").lower() for name, value in tuning_pb2.TuneJob.State.items()}
ENDED = ("ready", "failed", "cancelled")
TUNE_SETTINGS = ("steps", "frames", "width", "height", "learning_rate", "seed", "attention_mode", "group_norm",
                 "start", "stride", "trainable", "frame_positions", "timestep_power", "adapter_kind", "lora_rank",
                 "lora_alpha")
JobProgressFn = Callable[["TuneJob"], None]


@dataclass(frozen=True)
class TuneJob:
    """A tune or import job as the server reports it (see TuneJob in tuning.proto); `state` is queued, tuning,
    exporting, ready, failed or cancelled."""

    id: str
    model_id: str
    base: str
    caption: str
    state: str
    queue_position: int
    step: int
    total_steps: int
    loss: float
    settings: dict
    failure_reason: str
    cancel_requested: bool
    attempt: int
    worker: str
    tuning_seconds: float
    export_seconds: float
    import_source: str = ""  # an import job's source (ImportModel); "" for a tune job

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @classmethod
    def from_proto(cls, job: tuning_pb2.TuneJob) -> TuneJob:
        settings = {name: getattr(job.settings, name) for name in TUNE_SETTINGS if job.settings.HasField(name)}
        return cls(job.id, job.model_id, job.base, job.caption, JOB_STATES.get(job.state, "unknown"),
                   job.queue_position, job.step, job.total_steps, job.loss, settings, job.failure_reason,
                   job.cancel_requested, job.attempt, job.worker, job.tuning_seconds, job.export_seconds,
                   job.import_source)


@dataclass(frozen=True)
class BaseModel:
    """A base the tuning service tunes from (see BaseInfo in tuning.proto); `default_settings` are TuneSettings
    fields by name, as `create_tune_job` takes them."""

    id: str
    size_multiple: int
    default_size: int
    default_settings: dict


@dataclass(frozen=True)
class BaseList:
    """ListBases' answer: the bases, the one a job without a base uses, and the bounds of a tune job (TuneLimits'
    fields by name)."""

    bases: list[BaseModel]
    default_base: str
    limits: dict

    @classmethod
    def from_proto(cls, response: tuning_pb2.ListBasesResponse) -> BaseList:
        bases = [BaseModel(b.id, b.size_multiple, b.default_size,
                           {name: getattr(b.default_settings, name) for name in TUNE_SETTINGS
                            if b.default_settings.HasField(name)}) for b in response.bases]
        limits = {f.name: getattr(response.limits, f.name) for f in response.limits.DESCRIPTOR.fields}
        return cls(bases, response.default_base, limits)


def make_tune_request(model_id: str, video: bytes, caption: str, base: str = "", **settings
                      ) -> tuning_pb2.CreateTuneJobRequest:
    """A CreateTuneJobRequest; `settings` are TuneSettings fields (None leaves one to the server's default)."""
    unknown = set(settings) - set(TUNE_SETTINGS)
    if unknown:
        raise ValueError(f"unknown tune settings: {', '.join(sorted(unknown))}")
    chosen = tuning_pb2.TuneSettings(**{k: v for k, v in settings.items() if v is not None})
    return tuning_pb2.CreateTuneJobRequest(model_id=model_id, base=base, caption=caption, video=video,
                                           settings=chosen)


def make_request(
    model: str,
    prompt: str,
    *,
    negative_prompt: str = "",
    frames: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int | None = None,
    invert: bool = True,
    source_video: bytes | None = None,
    format: str = "mp4",
    cache_interval: int | None = None,
) -> pb2.GenerateRequest:
    """A GenerateRequest; None leaves a field unset, so the server's default applies."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    optional = {"frames": frames, "steps": steps, "guidance": guidance, "seed": seed, "cache_interval": cache_interval}
    return pb2.GenerateRequest(
        model=model, prompt=prompt, negative_prompt=negative_prompt, invert=invert,
        source_video=source_video or b"", format=FORMATS[format],
        **{name: value for name, value in optional.items() if value is not None},
    )


class _Collector:
    """Assembles a Video from the messages of a Generate stream."""

    def __init__(self, progress: ProgressFn | None, on_accepted: AcceptedFn | None = None) -> None:
        self.progress = progress
        self.on_accepted = on_accepted
        self.accepted: pb2.Accepted | None = None
        self.started = False
        self.info: pb2.ResultInfo | None = None
        self.files: list[bytearray] = []
        self.complete = False

    def add(self, response: pb2.GenerateResponse) -> None:
        kind = response.WhichOneof("event")
        if kind == "accepted":
            self.accepted = response.accepted
            if self.on_accepted is not None:
                self.on_accepted(response.accepted.queue_position)
        elif kind == "started":
            self.started = True
        elif kind == "progress" and self.progress is not None:
            p = response.progress
            self.progress(PHASES.get(p.phase, "unknown"), p.step, p.total)
        elif kind == "result":
            self.info = response.result
            self.files = [bytearray() for _ in range(self.info.files)]
        elif kind == "chunk":
            chunk = response.chunk
            self.files[chunk.file][chunk.offset : chunk.offset + len(chunk.data)] = chunk.data
            self.complete = chunk.last

    def video(self) -> Video:
        if self.accepted is None or self.info is None or not self.complete:
            raise ServerError(grpc.StatusCode.UNKNOWN, "the stream ended before the whole result arrived")
        info = self.info
        return Video(
            self.accepted.request_id, info.mime_type, [bytes(f) for f in self.files], info.frames, info.width,
            info.height, info.fps, info.seed, info.steps, info.guidance, self.accepted.prompt_truncated,
            dict(sorted(info.timings.items(), key=lambda item: TIMINGS.index(item[0]) if item[0] in TIMINGS else 99)),
            info.cache_interval,
        )


class _Base:
    """Connection settings and the retry rule, shared by the sync and async clients."""

    def __init__(self, target: str, token: str | None, root_certificates: bytes | None, tls: bool, retries: int,
                 backoff: float) -> None:
        self.target = target
        self.credentials = grpc.ssl_channel_credentials(root_certificates) if tls or root_certificates else None
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.retries = retries
        self.backoff = backoff

    def _retry_delay(self, error: grpc.RpcError, attempt: int, deadline: float | None) -> float | None:
        """Seconds to wait before retrying a call that failed with `error` and is safe to retry, else None."""
        delay = self.backoff * 2**attempt
        if error.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries:
            return None
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _health_status(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class Client(_Base):
    """Blocking client. `target` is "host:port"; TLS with `root_certificates` (PEM bytes) or `tls=True` (the
    system's roots); `token` is sent as a bearer token."""

    def __init__(self, target: str, *, token: str | None = None, root_certificates: bytes | None = None,
                 tls: bool = False, retries: int = 3, backoff: float = 0.5) -> None:
        super().__init__(target, token, root_certificates, tls, retries, backoff)
        self._connect()

    def _connect(self) -> None:
        if self.credentials is None:
            self.channel = grpc.insecure_channel(self.target, CHANNEL_OPTIONS)
        else:
            self.channel = grpc.secure_channel(self.target, self.credentials, CHANNEL_OPTIONS)
        self.stub = pb2_grpc.VideoGenerationStub(self.channel)
        self.tuning = tuning_pb2_grpc.TuningStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def _reconnect(self) -> None:
        self.channel.close()
        self._connect()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate(self, model: str, prompt: str, *, progress: ProgressFn | None = None, timeout: float | None = None,
                 on_accepted: AcceptedFn | None = None, **options) -> Video:
        """Generate a video; `options` are `make_request`'s (negative_prompt, frames, steps, guidance, seed,
        invert, source_video, format, cache_interval); `on_accepted` hears the queue position."""
        request = make_request(model, prompt, **options)
        deadline = _deadline(timeout)
        attempt = 0
        while True:
            collector = _Collector(progress, on_accepted)
            try:
                for response in self.stub.Generate(request, timeout=_remaining(deadline), metadata=self.metadata):
                    collector.add(response)
                return collector.video()
            except grpc.RpcError as e:
                delay = None if collector.started else self._retry_delay(e, attempt, deadline)
                if delay is None:
                    raise ServerError(e.code(), e.details()) from None
            time.sleep(delay)
            if collector.accepted:  # that replica is shutting down
                self._reconnect()
            attempt += 1

    def _unary(self, method, request, timeout: float | None, retry: bool = True):
        deadline = _deadline(timeout)
        attempt = 0
        while True:
            try:
                return method(request, timeout=_remaining(deadline), metadata=self.metadata)
            except grpc.RpcError as e:
                delay = self._retry_delay(e, attempt, deadline) if retry else None
                if delay is None:
                    raise ServerError(e.code(), e.details()) from None
            time.sleep(delay)
            attempt += 1

    def list_models(self, timeout: float | None = 30) -> ModelList:
        response = self._unary(self.stub.ListModels, pb2.ListModelsRequest(), timeout)
        return ModelList([Model.from_proto(m) for m in response.models], {s.id: s.reason for s in response.skipped})

    def get_model(self, model: str, timeout: float | None = 30) -> Model:
        return Model.from_proto(self._unary(self.stub.GetModel, pb2.GetModelRequest(id=model), timeout))

    def get_server_info(self, timeout: float | None = 30) -> ServerInfo:
        """The bounds and options the server checks requests against."""
        return ServerInfo.from_proto(self._unary(self.stub.GetServerInfo, pb2.GetServerInfoRequest(), timeout))

    def list_bases(self, timeout: float | None = 30) -> BaseList:
        """The bases a tune job may start from, with their defaults (needs the admin token)."""
        return BaseList.from_proto(self._unary(self.tuning.ListBases, tuning_pb2.ListBasesRequest(), timeout))

    def health(self, service: str = "", timeout: float | None = 10) -> str:
        """The server's health status ("SERVING", "NOT_SERVING", ...): one check, no retries."""
        try:
            return _health_status(self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=timeout))
        except grpc.RpcError as e:
            raise ServerError(e.code(), e.details()) from None

    def create_tune_job(self, model_id: str, video: bytes, caption: str, *, base: str = "",
                        timeout: float | None = 120, **settings) -> TuneJob:
        """Queue a tune job (never retried: see the module docstring)."""
        request = make_tune_request(model_id, video, caption, base, **settings)
        return TuneJob.from_proto(self._unary(self.tuning.CreateTuneJob, request, timeout, retry=False))

    def import_model(self, model_id: str, source: str, *, base: str = "", caption: str = "",
                     timeout: float | None = 120) -> TuneJob:
        """Queue an import of an official Tune-A-Video model (`source`: a hub id or an id on the server's import
        allow-list; never retried, as create_tune_job); watch it as a tune job."""
        request = tuning_pb2.ImportModelRequest(model_id=model_id, source=source, base=base, caption=caption)
        return TuneJob.from_proto(self._unary(self.tuning.ImportModel, request, timeout, retry=False))

    def get_tune_job(self, job_id: str, timeout: float | None = 30) -> TuneJob:
        return TuneJob.from_proto(self._unary(self.tuning.GetTuneJob, tuning_pb2.GetTuneJobRequest(id=job_id), timeout))

    def list_tune_jobs(self, timeout: float | None = 30) -> list[TuneJob]:
        """Every job the server keeps, newest first."""
        jobs, token = [], ""
        while True:
            page = self._unary(self.tuning.ListTuneJobs, tuning_pb2.ListTuneJobsRequest(page_token=token), timeout)
            jobs += [TuneJob.from_proto(job) for job in page.tune_jobs]
            if not (token := page.next_page_token):
                return jobs

    def cancel_tune_job(self, job_id: str, timeout: float | None = 30) -> TuneJob:
        request = tuning_pb2.CancelTuneJobRequest(id=job_id)
        return TuneJob.from_proto(self._unary(self.tuning.CancelTuneJob, request, timeout))

    def delete_tune_job(self, job_id: str, timeout: float | None = 30) -> None:
        self._unary(self.tuning.DeleteTuneJob, tuning_pb2.DeleteTuneJobRequest(id=job_id), timeout)

    def delete_model(self, model_id: str, timeout: float | None = 60) -> bool:
        """Delete a model; whether it is gone now (False: accepted, a tuning worker removes it when one runs)."""
        return not self._unary(self.tuning.DeleteModel, tuning_pb2.DeleteModelRequest(id=model_id), timeout,
                               retry=False).pending

    def wait_tune_job(self, job_id: str, progress: JobProgressFn | None = None, timeout: float | None = None
                      ) -> TuneJob:
        """Watch a job until it ends (each change to `progress`); the ended job. A watch cut by UNAVAILABLE (the
        job store or the replica away) is resumed, as the read-only calls are retried."""
        deadline = _deadline(timeout)
        attempt = 0
        while True:
            try:
                for update in self.tuning.WatchTuneJob(tuning_pb2.WatchTuneJobRequest(id=job_id),
                                                       timeout=_remaining(deadline), metadata=self.metadata):
                    job = TuneJob.from_proto(update)
                    if progress is not None:
                        progress(job)
                return job
            except grpc.RpcError as e:
                delay = self._retry_delay(e, attempt, deadline)
                if delay is None:
                    raise ServerError(e.code(), e.details()) from None
            time.sleep(delay)
            attempt += 1

    def tune(self, model_id: str, video: bytes, caption: str, *, base: str = "", wait: bool = True,
             progress: JobProgressFn | None = None, timeout: float | None = None, **settings) -> TuneJob:
        """Create a tune job and, with `wait`, watch it until it ends; the job (check `.state`)."""
        job = self.create_tune_job(model_id, video, caption, base=base, **settings)
        return self.wait_tune_job(job.id, progress, timeout) if wait else job


class AsyncClient(_Base):
    """The asyncio twin of `Client` (same arguments, same methods, awaited)."""

    def __init__(self, target: str, *, token: str | None = None, root_certificates: bytes | None = None,
                 tls: bool = False, retries: int = 3, backoff: float = 0.5) -> None:
        super().__init__(target, token, root_certificates, tls, retries, backoff)
        self._connect()

    def _connect(self) -> None:
        if self.credentials is None:
            self.channel = grpc.aio.insecure_channel(self.target, CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.secure_channel(self.target, self.credentials, CHANNEL_OPTIONS)
        self.stub = pb2_grpc.VideoGenerationStub(self.channel)
        self.tuning = tuning_pb2_grpc.TuningStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    async def _reconnect(self) -> None:
        await self.channel.close()
        self._connect()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def generate(self, model: str, prompt: str, *, progress: ProgressFn | None = None,
                       timeout: float | None = None, on_accepted: AcceptedFn | None = None, **options) -> Video:
        request = make_request(model, prompt, **options)
        deadline = _deadline(timeout)
        attempt = 0
        while True:
            collector = _Collector(progress, on_accepted)
            try:
                async for response in self.stub.Generate(request, timeout=_remaining(deadline),
                                                         metadata=self.metadata):
                    collector.add(response)
                return collector.video()
            except grpc.RpcError as e:
                delay = None if collector.started else self._retry_delay(e, attempt, deadline)
                if delay is None:
                    raise ServerError(e.code(), e.details()) from None
            await asyncio.sleep(delay)
            if collector.accepted:  # that replica is shutting down
                await self._reconnect()
            attempt += 1

    async def _unary(self, method, request, timeout: float | None, retry: bool = True):
        deadline = _deadline(timeout)
        attempt = 0
        while True:
            try:
                return await method(request, timeout=_remaining(deadline), metadata=self.metadata)
            except grpc.RpcError as e:
                delay = self._retry_delay(e, attempt, deadline) if retry else None
                if delay is None:
                    raise ServerError(e.code(), e.details()) from None
            await asyncio.sleep(delay)
            attempt += 1

    async def list_models(self, timeout: float | None = 30) -> ModelList:
        response = await self._unary(self.stub.ListModels, pb2.ListModelsRequest(), timeout)
        return ModelList([Model.from_proto(m) for m in response.models], {s.id: s.reason for s in response.skipped})

    async def get_model(self, model: str, timeout: float | None = 30) -> Model:
        return Model.from_proto(await self._unary(self.stub.GetModel, pb2.GetModelRequest(id=model), timeout))

    async def get_server_info(self, timeout: float | None = 30) -> ServerInfo:
        return ServerInfo.from_proto(await self._unary(self.stub.GetServerInfo, pb2.GetServerInfoRequest(),
                                                       timeout))

    async def list_bases(self, timeout: float | None = 30) -> BaseList:
        return BaseList.from_proto(await self._unary(self.tuning.ListBases, tuning_pb2.ListBasesRequest(), timeout))

    async def health(self, service: str = "", timeout: float | None = 10) -> str:
        try:
            return _health_status(await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                                               timeout=timeout))
        except grpc.RpcError as e:
            raise ServerError(e.code(), e.details()) from None

    async def create_tune_job(self, model_id: str, video: bytes, caption: str, *, base: str = "",
                              timeout: float | None = 120, **settings) -> TuneJob:
        request = make_tune_request(model_id, video, caption, base, **settings)
        return TuneJob.from_proto(await self._unary(self.tuning.CreateTuneJob, request, timeout, retry=False))

    async def import_model(self, model_id: str, source: str, *, base: str = "", caption: str = "",
                           timeout: float | None = 120) -> TuneJob:
        request = tuning_pb2.ImportModelRequest(model_id=model_id, source=source, base=base, caption=caption)
        return TuneJob.from_proto(await self._unary(self.tuning.ImportModel, request, timeout, retry=False))

    async def get_tune_job(self, job_id: str, timeout: float | None = 30) -> TuneJob:
        request = tuning_pb2.GetTuneJobRequest(id=job_id)
        return TuneJob.from_proto(await self._unary(self.tuning.GetTuneJob, request, timeout))

    async def list_tune_jobs(self, timeout: float | None = 30) -> list[TuneJob]:
        jobs, token = [], ""
        while True:
            page = await self._unary(self.tuning.ListTuneJobs, tuning_pb2.ListTuneJobsRequest(page_token=token),
                                     timeout)
            jobs += [TuneJob.from_proto(job) for job in page.tune_jobs]
            if not (token := page.next_page_token):
                return jobs

    async def cancel_tune_job(self, job_id: str, timeout: float | None = 30) -> TuneJob:
        request = tuning_pb2.CancelTuneJobRequest(id=job_id)
        return TuneJob.from_proto(await self._unary(self.tuning.CancelTuneJob, request, timeout))

    async def delete_tune_job(self, job_id: str, timeout: float | None = 30) -> None:
        await self._unary(self.tuning.DeleteTuneJob, tuning_pb2.DeleteTuneJobRequest(id=job_id), timeout)

    async def delete_model(self, model_id: str, timeout: float | None = 60) -> bool:
        return not (await self._unary(self.tuning.DeleteModel, tuning_pb2.DeleteModelRequest(id=model_id), timeout,
                                      retry=False)).pending

    async def wait_tune_job(self, job_id: str, progress: JobProgressFn | None = None,
                            timeout: float | None = None) -> TuneJob:
        deadline = _deadline(timeout)
        attempt = 0
        while True:
            try:
                async for update in self.tuning.WatchTuneJob(tuning_pb2.WatchTuneJobRequest(id=job_id),
                                                             timeout=_remaining(deadline), metadata=self.metadata):
                    job = TuneJob.from_proto(update)
                    if progress is not None:
                        progress(job)
                return job
            except grpc.RpcError as e:
                delay = self._retry_delay(e, attempt, deadline)
                if delay is None:
                    raise ServerError(e.code(), e.details()) from None
            await asyncio.sleep(delay)
            attempt += 1

    async def tune(self, model_id: str, video: bytes, caption: str, *, base: str = "", wait: bool = True,
                   progress: JobProgressFn | None = None, timeout: float | None = None, **settings) -> TuneJob:
        job = await self.create_tune_job(model_id, video, caption, base=base, **settings)
        return await self.wait_tune_job(job.id, progress, timeout) if wait else job
