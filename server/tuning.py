"""The `tuneavideo.v1.Tuning` gRPC service: tune and import jobs and model deletion, over the job registry
(`jobs.store`).

Every check a client can fail happens here, at create time, before a job is queued: the model id (a valid id, not
a served model, not reserved by another job), the base (on the server's allow-list), the caption, the clip (at
most 64 MiB, its header and first frame read within the same decoding bounds as a generation's source clip, in a
thread) and the settings (bounds, the base's size factor; defaults from the tuner); for an import, the source (on
the import allow-list, or a hub id; its UNet's layout, from its config alone, where the server can read it). The
job then belongs to the workers; this service reads and changes its record.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import huggingface_hub.constants
from google.protobuf.timestamp_pb2 import Timestamp
from tuneavideo.v1 import tuning_pb2 as pb2
from tuneavideo.v1 import tuning_pb2_grpc as pb2_grpc

from jobs.bases import Base
from jobs.spec import (
    CLIENT_SETTINGS,
    ENDED,
    IMPORT_SETTING,
    MAX_CAPTION_CHARS,
    InvalidField,
    Job,
    resolve_settings,
)
from jobs.store import (
    DeleteRefused,
    IdTaken,
    JobNotFound,
    JobStore,
    ModelNotFound,
    QueueFull,
    StoreUnavailable,
)
from server.generate import MAX_FRAMES, MAX_SOURCE_BYTES, MAX_SOURCE_PIXELS, InvalidRequest
from server.info import list_bases
from server.interceptors import end_call
from server.metrics import Metrics
from server.registry import ModelRegistry, check_model_id
from tuner.official import OfficialFormatError, check_layout
from tuner.video_io import VideoError, probe_video

log = logging.getLogger(__name__)

SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["Tuning"].full_name
DEFAULT_BASE = "shapes-sd"
STATES = {"queued": pb2.TuneJob.STATE_QUEUED, "tuning": pb2.TuneJob.STATE_TUNING,
          "exporting": pb2.TuneJob.STATE_EXPORTING, "ready": pb2.TuneJob.STATE_READY,
          "failed": pb2.TuneJob.STATE_FAILED, "cancelled": pb2.TuneJob.STATE_CANCELLED}
PROTO_SETTINGS = {"lr": "learning_rate"}  # the tuner's name -> the protocol's, where they differ
MAX_PAGE_SIZE, DEFAULT_PAGE_SIZE = 100, 50
WATCH_INTERVAL = 0.5  # seconds between looks at a watched job
# Seconds DeleteModel waits for a worker to do an accepted deletion before answering "pending" (an idle worker takes
# it within milliseconds); below the Redis client's 5 s socket timeout, which would otherwise end the wait as an error.
DELETE_WAIT = 3.0
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")  # owner/name


class SourceUnavailable(Exception):
    """An import source the server cannot reach now (a hub id its cache lacks while offline)."""


ERRORS = {  # the registry's and the checks' errors -> status codes
    InvalidField: grpc.StatusCode.INVALID_ARGUMENT, InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    JobNotFound: grpc.StatusCode.NOT_FOUND, ModelNotFound: grpc.StatusCode.NOT_FOUND,
    IdTaken: grpc.StatusCode.ALREADY_EXISTS, QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeleteRefused: grpc.StatusCode.FAILED_PRECONDITION, StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    SourceUnavailable: grpc.StatusCode.FAILED_PRECONDITION,
}


def _timestamp(seconds: float) -> Timestamp | None:
    if not seconds:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def job_to_proto(job: Job, position: int = 0) -> pb2.TuneJob:
    settings = pb2.TuneSettings(**{PROTO_SETTINGS.get(name, name): job.settings[name] for name in CLIENT_SETTINGS
                                   if job.settings.get(name) is not None})
    return pb2.TuneJob(
        id=job.id, model_id=job.model_id, base=job.base, caption=job.caption, state=STATES[job.state],
        queue_position=position, step=job.step, total_steps=job.total_steps or job.settings.get("steps", 0),
        loss=job.loss, settings=settings, create_time=_timestamp(job.created), start_time=_timestamp(job.started),
        update_time=_timestamp(job.updated), end_time=_timestamp(job.ended), failure_reason=job.failure_reason,
        cancel_requested=job.cancel_requested, attempt=job.attempt, worker=job.worker,
        tuning_seconds=job.tuning_seconds, export_seconds=job.export_seconds, import_source=job.import_source,
    )


def requested_settings(settings: pb2.TuneSettings) -> dict:
    """The settings a client set (the others take the tuner's defaults), under the tuner's names."""
    return {name: getattr(settings, PROTO_SETTINGS.get(name, name)) for name in CLIENT_SETTINGS
            if settings.HasField(PROTO_SETTINGS.get(name, name))}


class TuningService(pb2_grpc.TuningServicer):
    def __init__(self, store: JobStore, registry: ModelRegistry, bases: dict[str, Base], metrics: Metrics,
                 max_queued: int, import_sources: dict[str, str] | None = None) -> None:
        self.store = store
        self.registry = registry
        self.bases = bases
        self.import_sources = import_sources or {}  # id -> an official output directory the server may import
        self.metrics = metrics
        self.max_queued = max_queued

    async def _answer(self, context: grpc.aio.ServicerContext, rpc: str, call):
        """Run `call` (a coroutine), mapping the registry's errors to status codes; count the outcome."""
        try:
            result = await call
        except tuple(ERRORS) as e:
            code, message = self._refusal(e)
        else:
            self.metrics.count(rpc, grpc.StatusCode.OK)
            return result
        self._refuse(context, rpc, code, message)  # outside the handler: nothing keeps the request alive
        return None

    @staticmethod
    def _refusal(error: Exception) -> tuple[grpc.StatusCode, str]:
        code = next(code for kind, code in ERRORS.items() if isinstance(error, kind))
        return code, f"model_id: {error}" if isinstance(error, IdTaken) else str(error)

    def _refuse(self, context: grpc.aio.ServicerContext, rpc: str, code: grpc.StatusCode, message: str) -> None:
        self.metrics.count(rpc, code)
        end_call(context, code, message)

    async def CreateTuneJob(self, request: pb2.CreateTuneJobRequest, context) -> pb2.TuneJob:
        return await self._answer(context, "CreateTuneJob", self._create(request))

    def _allowed_base(self, base_id: str) -> Base:
        base = self.bases.get(base_id)
        if base is None:
            raise InvalidField("base", f"{base_id[:80]!r} is not an allowed base (allowed: "
                                       f"{', '.join(sorted(self.bases))})")
        return base

    def _check_not_served(self, model_id: str) -> None:
        if model_id in self.registry.models or model_id in self.registry.skipped_models():
            raise IdTaken(model_id, "repository")

    async def _create(self, request: pb2.CreateTuneJobRequest) -> pb2.TuneJob:
        check_model_id(request.model_id, "model_id")
        base = self._allowed_base(request.base or DEFAULT_BASE)
        if not request.caption.strip() or len(request.caption) > MAX_CAPTION_CHARS:
            raise InvalidField("caption", f"must be 1 to {MAX_CAPTION_CHARS} characters")
        if not request.video:
            raise InvalidField("video", "is empty: send the clip's encoded bytes")
        if len(request.video) > MAX_SOURCE_BYTES:
            raise InvalidField("video", f"must be at most {MAX_SOURCE_BYTES >> 20} MiB")
        settings = resolve_settings(requested_settings(request.settings), base.defaults, base.size_multiple,
                                    base.max_lora_rank)
        self._check_not_served(request.model_id)
        try:
            await asyncio.to_thread(probe_video, request.video, MAX_FRAMES, MAX_SOURCE_PIXELS)
        except VideoError as e:
            raise InvalidField("video", str(e)) from None
        job = Job(id=uuid.uuid4().hex, model_id=request.model_id, base=base.id, base_source=base.source,
                  caption=request.caption, settings=vars(settings), total_steps=settings.steps)
        job = await self.store.create(job, request.video, self.max_queued)
        log.info("tune job %s created: model %s from base %s", job.id, job.model_id, job.base)
        return job_to_proto(job, await self.store.position(job))

    async def ImportModel(self, request: pb2.ImportModelRequest, context) -> pb2.TuneJob:
        return await self._answer(context, "ImportModel", self._import(request))

    async def _import(self, request: pb2.ImportModelRequest) -> pb2.TuneJob:
        check_model_id(request.model_id, "model_id")
        base = self._allowed_base(request.base) if request.base else None
        if len(request.caption) > MAX_CAPTION_CHARS:
            raise InvalidField("caption", f"must be at most {MAX_CAPTION_CHARS} characters")
        source = self.import_sources.get(request.source)  # an absolute directory
        if source is None:
            if not HUB_ID.fullmatch(request.source):
                raise InvalidField("source", f"{request.source[:80]!r} is neither an allowed import source (allowed: "
                                             f"{', '.join(sorted(self.import_sources)) or 'none'}) nor a hub id")
            source = request.source
        try:
            checked = await asyncio.to_thread(check_layout, source, not Path(source).is_absolute())
        except OfficialFormatError as e:
            raise InvalidField("source", str(e)) from None
        if not checked and huggingface_hub.constants.HF_HUB_OFFLINE:
            raise SourceUnavailable(f"source: {source!r} is not in the server's hub cache, and the server is offline "
                                    "(HF_HUB_OFFLINE): fetch it into the cache first")
        self._check_not_served(request.model_id)
        job = Job(id=uuid.uuid4().hex, model_id=request.model_id, base=base.id if base else "",
                  base_source=base.source if base else "", caption=request.caption,
                  settings={IMPORT_SETTING: True}, import_source=source)
        job = await self.store.create(job, b"", self.max_queued)
        log.info("import job %s created: model %s from %s", job.id, job.model_id, source)
        return job_to_proto(job, await self.store.position(job))

    async def _proto(self, job: Job) -> pb2.TuneJob:
        return job_to_proto(job, await self.store.position(job) if job.state == "queued" else 0)

    async def GetTuneJob(self, request: pb2.GetTuneJobRequest, context) -> pb2.TuneJob:
        async def get():
            return await self._proto(await self.store.get(request.id))

        return await self._answer(context, "GetTuneJob", get())

    async def ListTuneJobs(self, request: pb2.ListTuneJobsRequest, context) -> pb2.ListTuneJobsResponse:
        async def listing():
            if request.page_size > MAX_PAGE_SIZE:
                raise InvalidField("page_size", f"must be at most {MAX_PAGE_SIZE}, got {request.page_size}")
            jobs, token = await self.store.list(request.page_size or DEFAULT_PAGE_SIZE, request.page_token)
            return pb2.ListTuneJobsResponse(tune_jobs=[await self._proto(job) for job in jobs],
                                            next_page_token=token)

        return await self._answer(context, "ListTuneJobs", listing())

    async def CancelTuneJob(self, request: pb2.CancelTuneJobRequest, context) -> pb2.TuneJob:
        async def cancel():
            job = await self.store.cancel(request.id)
            log.info("tune job %s: cancel asked (%s)", job.id, job.state)
            return await self._proto(job)

        return await self._answer(context, "CancelTuneJob", cancel())

    async def DeleteTuneJob(self, request: pb2.DeleteTuneJobRequest, context) -> pb2.DeleteTuneJobResponse:
        async def delete():
            await self.store.delete(request.id)
            return pb2.DeleteTuneJobResponse()

        return await self._answer(context, "DeleteTuneJob", delete())

    async def WatchTuneJob(self, request: pb2.WatchTuneJobRequest, context) -> AsyncIterator[pb2.TuneJob]:
        last = None
        while True:
            try:
                job = await self.store.get(request.id)
                update = await self._proto(job)
            except tuple(ERRORS) as e:
                code, message = self._refusal(e)
                break
            if update != last:
                last = update
                yield update
            if job.state in ENDED:
                self.metrics.count("WatchTuneJob", grpc.StatusCode.OK)
                return
            await asyncio.sleep(WATCH_INTERVAL)
        self._refuse(context, "WatchTuneJob", code, message)

    async def DeleteModel(self, request: pb2.DeleteModelRequest, context) -> pb2.DeleteModelResponse:
        async def delete():
            check_model_id(request.id, "id")
            present = await self._in_repository(request.id)
            done = await self.store.delete_model(request.id, DELETE_WAIT, present)
            if not done:  # this replica stops serving it now, the others at their next sweep
                await self._withdraw(await self.store.pending_deletions() | {request.id})
            log.info("model %s %s", request.id, "deleted" if done else "to be deleted when a tuning worker runs")
            return pb2.DeleteModelResponse(pending=not done)

        return await self._answer(context, "DeleteModel", delete())

    async def _in_repository(self, model_id: str) -> bool:
        """Whether the repository holds the model (servable or not): its directory, looked at now (the served view
        may be a rescan old)."""
        return await asyncio.to_thread((self.registry.repo / model_id).is_dir)

    async def _withdraw(self, model_ids: set[str]) -> None:
        """Stop serving the models whose deletion is pending (rescanning at once when that changes)."""
        if self.registry.withdraw(model_ids):
            await asyncio.to_thread(self.registry.scan)

    async def sweep(self, dead_after: float, max_attempts: int, retention: float) -> bool:
        """Housekeeping and metrics (every few seconds, from the server's watch loop, which logs and counts any other
        error); whether the registry is reachable."""
        try:
            for job in await self.store.sweep(dead_after, max_attempts, retention):
                log.info("tune job %s ended %s%s", job.id, job.state,
                         f": {job.failure_reason}" if job.failure_reason else "")
                if job.state == "ready":
                    self.metrics.tune_seconds.labels("tuning").observe(job.tuning_seconds)
                    self.metrics.tune_seconds.labels("export").observe(job.export_seconds)
            counts = await self.store.counts()
            await self._withdraw(await self.store.pending_deletions())
        except StoreUnavailable as e:
            log.warning("%s", e)
            return False
        for state in STATES:
            self.metrics.tune_jobs.labels(state).set(counts.get(state, 0))
        return await self.store.ping()

    async def ListBases(self, request: pb2.ListBasesRequest, context) -> pb2.ListBasesResponse:
        """The allow-list with each base's size rule and default settings, and the bounds of a create."""
        self.metrics.count("ListBases", grpc.StatusCode.OK)
        return list_bases(self.bases, DEFAULT_BASE, PROTO_SETTINGS)
