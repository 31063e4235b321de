"""A small typed Python client for the Tune-A-Video gRPC server, sync (`Client`) and asyncio (`AsyncClient`).

Calls take a deadline (`timeout`, seconds, over all attempts) and `generate` a progress callback. Retries
happen only where they are safe: `generate` on UNAVAILABLE before the server started the request (no "started"
message yet: it never ran, so it cannot run twice; a request accepted but never started was answered by a
replica shutting down, so the retry goes out on a new connection, which a load balancer sends elsewhere), and
the read-only model calls on UNAVAILABLE; at most `retries` times, with exponential backoff, never past the
deadline.
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

FORMATS = {"mp4": pb2.OUTPUT_FORMAT_MP4, "gif": pb2.OUTPUT_FORMAT_GIF, "png": pb2.OUTPUT_FORMAT_PNG_FRAMES}
PHASES = {pb2.PHASE_INVERT: "invert", pb2.PHASE_SAMPLE: "sample", pb2.PHASE_DECODE: "decode"}
# Keepalive pings during calls, no more often than the server accepts (every 30 s).
CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", 60_000), ("grpc.keepalive_timeout_ms", 20_000)]
ProgressFn = Callable[[str, int, int], None]  # (phase: invert | sample | decode, step, total)
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

    @classmethod
    def from_proto(cls, info: pb2.ModelInfo) -> Model:
        return cls(
            info.id, info.base_model, info.width, info.height, info.frames, info.source_frames, info.fps,
            info.source_prompt, info.attention_mode, tuple(info.backends), info.backend,
            tuple((p.batch, p.frames, p.latent_height, p.latent_width) for p in info.profiles),
            info.default_steps, info.default_guidance, info.loaded,
        )


@dataclass(frozen=True)
class ModelList:
    models: list[Model]
    skipped: dict[str, str]  # repository entries the server does not serve, with the reason


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
) -> pb2.GenerateRequest:
    """A GenerateRequest; None leaves a field unset, so the server's default applies."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    optional = {"frames": frames, "steps": steps, "guidance": guidance, "seed": seed}
    return pb2.GenerateRequest(
        model=model, prompt=prompt, negative_prompt=negative_prompt, invert=invert,
        source_video=source_video or b"", format=FORMATS[format],
        **{name: value for name, value in optional.items() if value is not None},
    )


class _Collector:
    """Assembles a Video from the messages of a Generate stream."""

    def __init__(self, progress: ProgressFn | None) -> None:
        self.progress = progress
        self.accepted: pb2.Accepted | None = None
        self.started = False
        self.info: pb2.ResultInfo | None = None
        self.files: list[bytearray] = []
        self.complete = False

    def add(self, response: pb2.GenerateResponse) -> None:
        kind = response.WhichOneof("event")
        if kind == "accepted":
            self.accepted = response.accepted
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
                 **options) -> Video:
        """Generate a video; `options` are `make_request`'s (negative_prompt, frames, steps, guidance, seed,
        invert, source_video, format)."""
        request = make_request(model, prompt, **options)
        deadline = _deadline(timeout)
        attempt = 0
        while True:
            collector = _Collector(progress)
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

    def _unary(self, method, request, timeout: float | None):
        deadline = _deadline(timeout)
        attempt = 0
        while True:
            try:
                return method(request, timeout=_remaining(deadline), metadata=self.metadata)
            except grpc.RpcError as e:
                delay = self._retry_delay(e, attempt, deadline)
                if delay is None:
                    raise ServerError(e.code(), e.details()) from None
            time.sleep(delay)
            attempt += 1

    def list_models(self, timeout: float | None = 30) -> ModelList:
        response = self._unary(self.stub.ListModels, pb2.ListModelsRequest(), timeout)
        return ModelList([Model.from_proto(m) for m in response.models], {s.id: s.reason for s in response.skipped})

    def get_model(self, model: str, timeout: float | None = 30) -> Model:
        return Model.from_proto(self._unary(self.stub.GetModel, pb2.GetModelRequest(id=model), timeout))

    def health(self, service: str = "", timeout: float | None = 10) -> str:
        """The server's health status ("SERVING", "NOT_SERVING", ...): one check, no retries."""
        try:
            return _health_status(self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=timeout))
        except grpc.RpcError as e:
            raise ServerError(e.code(), e.details()) from None


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
                       timeout: float | None = None, **options) -> Video:
        request = make_request(model, prompt, **options)
        deadline = _deadline(timeout)
        attempt = 0
        while True:
            collector = _Collector(progress)
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

    async def _unary(self, method, request, timeout: float | None):
        deadline = _deadline(timeout)
        attempt = 0
        while True:
            try:
                return await method(request, timeout=_remaining(deadline), metadata=self.metadata)
            except grpc.RpcError as e:
                delay = self._retry_delay(e, attempt, deadline)
                if delay is None:
                    raise ServerError(e.code(), e.details()) from None
            await asyncio.sleep(delay)
            attempt += 1

    async def list_models(self, timeout: float | None = 30) -> ModelList:
        response = await self._unary(self.stub.ListModels, pb2.ListModelsRequest(), timeout)
        return ModelList([Model.from_proto(m) for m in response.models], {s.id: s.reason for s in response.skipped})

    async def get_model(self, model: str, timeout: float | None = 30) -> Model:
        return Model.from_proto(await self._unary(self.stub.GetModel, pb2.GetModelRequest(id=model), timeout))

    async def health(self, service: str = "", timeout: float | None = 10) -> str:
        try:
            return _health_status(await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                                               timeout=timeout))
        except grpc.RpcError as e:
            raise ServerError(e.code(), e.details()) from None
