"""The `tuneavideo.v1.VideoGeneration` gRPC service: checks each request, queues it for the worker, streams
its progress, then sends the encoded result in chunks of at most 1 MiB.

Validation lives in one place: the bounds and defaults are `server.generate`'s (`check_options` before any
work, on the event loop; the source clip's header, the model and `resolve` in a thread, before the request is
accepted whenever the model's engines are loaded; otherwise by the worker, with the same status codes); this
module adds what only the protocol has: the model id, the output format and the request's presence rules. The
request's field names are the core's option names, so `InvalidRequest.field` is the proto field the message
names. Nothing that reads files or tokenizes runs on the event loop, so health checks answer while it works.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc
import numpy as np
from tuneavideo.v1 import tuneavideo_pb2 as pb2
from tuneavideo.v1 import tuneavideo_pb2_grpc as pb2_grpc

from server.engines.base import Unsupported
from server.generate import (
    GenerationOptions,
    GenerationResult,
    InvalidRequest,
    check_options,
    check_source_video,
    resolve,
)
from server.info import server_info
from server.interceptors import end_call
from server.metrics import Metrics
from server.registry import ModelEntry, ModelRegistry, ModelUnavailable, check_model_id
from server.worker import Done, Failed, FairQueue, Job, Progress, QueueClosed, QueueFull, Started
from tuner.components import tokenize
from tuner.video_io import encode_png_frames, encode_video

log = logging.getLogger(__name__)

SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["VideoGeneration"].full_name
CHUNK_BYTES = 1 << 20
DEFAULT_FRAMES = 8
FORMATS = {
    pb2.OUTPUT_FORMAT_UNSPECIFIED: "mp4",
    pb2.OUTPUT_FORMAT_MP4: "mp4",
    pb2.OUTPUT_FORMAT_GIF: "gif",
    pb2.OUTPUT_FORMAT_PNG_FRAMES: "png",
}
MIME_TYPES = {"mp4": "video/mp4", "gif": "image/gif", "png": "image/png"}
PHASES = {"invert": pb2.PHASE_INVERT, "sample": pb2.PHASE_SAMPLE, "decode": pb2.PHASE_DECODE}
DEADLINE_SLACK = 0.5  # seconds: a client's deadline fires a moment before the server's copy of it
NOT_ACCEPTING = "the server is warming up or shutting down; retry shortly or on another replica"


class RequestFailed(Exception):
    """Ends a call with a status code and a message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def options_from_request(request: pb2.GenerateRequest) -> GenerationOptions:
    """The core's options for a request; unset optional fields take their defaults."""
    return GenerationOptions(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        frames=request.frames if request.HasField("frames") else DEFAULT_FRAMES,
        steps=request.steps if request.HasField("steps") else None,
        guidance=request.guidance if request.HasField("guidance") else None,
        seed=request.seed if request.HasField("seed") else None,
        invert=request.invert if request.HasField("invert") else True,
        source_video=request.source_video or None,
        cache_interval=request.cache_interval if request.HasField("cache_interval") else 1,
    )


def encode_output(frames: np.ndarray, fps: float, fmt: str) -> list[bytes]:
    """The files of a result: one MP4 or GIF, or one PNG per frame."""
    return encode_png_frames(frames) if fmt == "png" else [encode_video(frames, fps, fmt)]


def chunks(files: list[bytes]) -> Iterator[pb2.Chunk]:
    """The files cut into chunks of at most CHUNK_BYTES, in order; the last one is marked."""
    pieces = [(index, offset) for index, data in enumerate(files) for offset in range(0, max(len(data), 1),
                                                                                      CHUNK_BYTES)]
    for n, (index, offset) in enumerate(pieces):
        data = files[index][offset : offset + CHUNK_BYTES]
        yield pb2.Chunk(file=index, offset=offset, data=data, last=n == len(pieces) - 1)


class VideoGenerationService(pb2_grpc.VideoGenerationServicer):
    def __init__(self, registry: ModelRegistry, queue: FairQueue, metrics: Metrics, max_request_seconds: float) -> None:
        self.registry = registry
        self.queue = queue
        self.metrics = metrics
        self.max_request_seconds = max_request_seconds
        self.accepting = False  # True once the models are warm, False again while draining
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tokenizing = threading.Lock()

    async def wait_idle(self) -> None:
        """Return once no Generate call is in progress."""
        await self._idle.wait()

    async def Generate(self, request: pb2.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb2.GenerateResponse]:
        label = request.model if request.model in self.registry.models else "-"
        code = grpc.StatusCode.CANCELLED  # unless the call ends otherwise: the client went away
        refusal = None  # the message of a RequestFailed, answered once nothing refers to its exception
        self._active += 1
        self._idle.clear()
        try:
            async with contextlib.aclosing(self._generate(request, context)) as responses:
                async for response in responses:
                    yield response
            code = grpc.StatusCode.OK
        except RequestFailed as e:
            code, refusal = e.code, e.message
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            if remaining is not None and remaining < DEADLINE_SLACK:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
            raise
        finally:
            self.metrics.count("Generate", code, label)
            self._active -= 1
            if not self._active:
                self._idle.set()
        if refusal is not None:
            end_call(context, code, refusal)

    async def _generate(self, request: pb2.GenerateRequest, context: grpc.aio.ServicerContext
                        ) -> AsyncIterator[pb2.GenerateResponse]:
        if not self.accepting:
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE, NOT_ACCEPTING)
        options, fmt, truncated = await asyncio.to_thread(self._check, request, time.monotonic())
        remaining = context.time_remaining()
        limit = self.max_request_seconds if remaining is None else min(remaining, self.max_request_seconds)
        job = Job(uuid.uuid4().hex, request.model, options, asyncio.get_running_loop(), time.monotonic() + limit)
        try:
            position = self.queue.put(job)
        except QueueFull:
            raise RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"the queue is full ({self.queue.max_size} requests waiting); retry later") from None
        except QueueClosed:
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE, NOT_ACCEPTING) from None
        log.info("request %s accepted for model %s at queue position %d", job.id, job.model, position)
        started = False
        try:
            accepted = pb2.Accepted(request_id=job.id, queue_position=position, prompt_truncated=truncated)
            yield pb2.GenerateResponse(accepted=accepted)
            queued = 0.0
            while not isinstance(event := await job.events.get(), Done):
                if isinstance(event, Failed):
                    raise RequestFailed(event.code, event.message)
                if isinstance(event, Started):
                    started, queued = True, event.queued
                    self.metrics.running.inc()
                    yield pb2.GenerateResponse(started=pb2.Started(queue_seconds=queued))
                elif isinstance(event, Progress):
                    progress = pb2.Progress(phase=PHASES[event.phase], step=event.step, total=event.total)
                    yield pb2.GenerateResponse(progress=progress)
            async for response in self._result(job.model, event.result, fmt=fmt, queued=queued):
                yield response
        finally:
            if started:
                self.metrics.running.dec()
            job.stop.set()  # a no-op once done; else the worker stops within one step
            self.queue.remove(job)

    def _check(self, request: pb2.GenerateRequest, asked: float | None = None) -> tuple[GenerationOptions, str, bool]:
        """(In a thread: it may read files and tokenize.) The request's options (resolved when the model is
        loaded), output format and whether a prompt will be truncated. Sizes are checked before any work."""
        try:
            if request.format not in FORMATS:
                raise InvalidRequest("format", f"unknown output format {request.format}")
            check_model_id(request.model)
            options = options_from_request(request)
            check_options(options)
            if request.model not in self.registry.models:  # a model published since the last background scan?
                self.registry.refresh(time.monotonic() if asked is None else asked)
            entry = self.registry.entry(request.model)
            if options.source_video is not None:
                check_source_video(options.source_video)
            model = self.registry.ready(entry.id)
            if model is not None:
                options = resolve(options, model)
            elif options.cache_interval > 1 and not entry.cache_supported:
                raise Unsupported(f"cache_interval: the {self.registry.backend} backend cannot reuse UNet features "
                                  f"for model {entry.id!r} (cache_interval must be 1)")
        except InvalidRequest as e:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except Unsupported as e:
            raise RequestFailed(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
        except ModelUnavailable as e:
            raise RequestFailed(grpc.StatusCode.NOT_FOUND, str(e)) from None
        with self._tokenizing:  # a fast (Rust) tokenizer must not be used by two threads at once
            truncated = entry.tokenizer is not None and any(
                tokenize(entry.tokenizer, prompt)[1] for prompt in (options.prompt, options.negative_prompt)
            )
        return options, FORMATS[request.format], truncated

    async def _result(self, model: str, result: GenerationResult, *, fmt: str, queued: float
                      ) -> AsyncIterator[pb2.GenerateResponse]:
        clock = time.perf_counter()
        files = await asyncio.to_thread(encode_output, result.frames, result.fps, fmt)
        timings = {"queue": queued, **result.timings, "output": time.perf_counter() - clock}
        frames, height, width, _ = result.frames.shape
        self.metrics.observe_result(model, timings, frames)
        info = pb2.ResultInfo(
            mime_type=MIME_TYPES[fmt], files=len(files), size_bytes=sum(map(len, files)), frames=frames,
            width=width, height=height, fps=result.fps, seed=result.seed, steps=result.steps,
            guidance=result.guidance, timings=timings, cache_interval=result.cache_interval,
        )
        yield pb2.GenerateResponse(result=info)
        for chunk in chunks(files):
            yield pb2.GenerateResponse(chunk=chunk)

    async def ListModels(self, request: pb2.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> pb2.ListModelsResponse:
        """The registry's view, which the background scan keeps at most a few seconds old."""
        skipped = [pb2.SkippedModel(id=name, reason=reason)
                   for name, reason in sorted(self.registry.skipped_models().items())]
        self.metrics.count("ListModels", grpc.StatusCode.OK)
        return pb2.ListModelsResponse(models=[self._info(e) for e in self.registry.entries()], skipped=skipped)

    async def GetModel(self, request: pb2.GetModelRequest, context: grpc.aio.ServicerContext) -> pb2.ModelInfo:
        try:
            check_model_id(request.id, "id")
            if request.id not in self.registry.models:
                await asyncio.to_thread(self.registry.refresh, time.monotonic())
            info = self._info(self.registry.entry(request.id))
        except InvalidRequest as e:
            self.metrics.count("GetModel", grpc.StatusCode.INVALID_ARGUMENT)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except ModelUnavailable as e:
            self.metrics.count("GetModel", grpc.StatusCode.NOT_FOUND)
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        self.metrics.count("GetModel", grpc.StatusCode.OK, request.id)
        return info

    def _info(self, entry: ModelEntry) -> pb2.ModelInfo:
        config = entry.config
        adapter = config.get("adapter", {})
        profiles = [pb2.Profile(batch=b, frames=f, latent_height=h, latent_width=w) for b, f, h, w in entry.profiles]
        return pb2.ModelInfo(
            id=entry.id, base_model=entry.base, width=config["width"],
            height=config["height"], frames=config["frames"], source_frames=config.get("source_frames", 0),
            fps=config["fps"], source_prompt=config["prompt"], attention_mode=config["attention_mode"],
            backends=entry.backends, backend=self.registry.backend, profiles=profiles,
            default_steps=entry.defaults.get("steps", 50), default_guidance=entry.defaults.get("guidance", 12.5),
            loaded=self.registry.ready(entry.id) is not None, cache_interval_supported=entry.cache_supported,
            adapter_kind=adapter.get("kind", "full"), lora_rank=adapter.get("rank", 0),
        )

    async def GetServerInfo(self, request: pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext
                            ) -> pb2.ServerInfo:
        """The bounds and options this server checks requests against (`server.info`)."""
        self.metrics.count("GetServerInfo", grpc.StatusCode.OK)
        return server_info(self.registry.backend, self.queue.max_size, DEFAULT_FRAMES)
