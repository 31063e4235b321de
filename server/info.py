"""What a server accepts, for clients that show its rules instead of copying them (the browser page, `tav-ui`):
`GetServerInfo`'s generation bounds and `ListBases`'s bases and tuning bounds, read from the modules that check
them (`server.generate`, `jobs.spec`, `jobs.bases`), so the answer cannot drift from the checks."""

from __future__ import annotations

from tuneavideo.v1 import tuneavideo_pb2 as pb2
from tuneavideo.v1 import tuning_pb2

from jobs import spec
from jobs.bases import Base
from server.generate import (
    MAX_CACHE_INTERVAL,
    MAX_FRAMES,
    MAX_GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SOURCE_BYTES,
    MAX_SOURCE_PIXELS,
    MAX_STEPS,
    MIN_GUIDANCE,
)

OPTIONS = ("prompt", "negative_prompt", "frames", "steps", "guidance", "seed", "invert", "source_video", "format",
           "cache_interval")
FORMATS = (pb2.OUTPUT_FORMAT_MP4, pb2.OUTPUT_FORMAT_GIF, pb2.OUTPUT_FORMAT_PNG_FRAMES)


def server_info(backend: str, max_queue: int, default_frames: int) -> pb2.ServerInfo:
    """GetServerInfo's answer for a server running `backend` with a queue of `max_queue` requests."""
    limits = pb2.GenerationLimits(
        max_frames=MAX_FRAMES, default_frames=default_frames, max_steps=MAX_STEPS,
        min_guidance=MIN_GUIDANCE, max_guidance=MAX_GUIDANCE,
        max_prompt_chars=MAX_PROMPT_CHARS, max_seed=MAX_SEED,
        max_source_bytes=MAX_SOURCE_BYTES, max_source_frames=MAX_FRAMES,
        max_source_pixels=MAX_SOURCE_PIXELS, max_cache_interval=MAX_CACHE_INTERVAL,
    )
    return pb2.ServerInfo(backend=backend, limits=limits, formats=FORMATS, options=OPTIONS, max_queue=max_queue)


def base_info(base: Base, proto_names: dict[str, str]) -> tuning_pb2.BaseInfo:
    """One allowed base: its size rule and the tuner's defaults for it (width and height filled in with its
    native size where the tuner leaves them to the base); `proto_names` maps the tuner's setting names to
    TuneSettings' where they differ."""
    defaults = {name: getattr(base.defaults, name) for name in spec.CLIENT_SETTINGS}
    for name in ("width", "height"):
        if defaults[name] is None:
            defaults[name] = base.default_size
    settings = tuning_pb2.TuneSettings(**{proto_names.get(name, name): value for name, value in defaults.items()
                                          if value is not None})
    return tuning_pb2.BaseInfo(id=base.id, size_multiple=base.size_multiple, default_size=base.default_size,
                               default_settings=settings)


def list_bases(bases: dict[str, Base], default_base: str, proto_names: dict[str, str]
               ) -> tuning_pb2.ListBasesResponse:
    """ListBases' answer: the allow-list by id, the default base and the bounds CreateTuneJob checks."""
    limits = tuning_pb2.TuneLimits(
        max_steps=spec.MAX_STEPS, max_frames=spec.MAX_FRAMES, max_size=spec.MAX_SIZE,
        min_learning_rate=spec.MIN_LR, max_learning_rate=spec.MAX_LR, max_caption_chars=spec.MAX_CAPTION_CHARS,
        max_video_bytes=MAX_SOURCE_BYTES,
    )
    return tuning_pb2.ListBasesResponse(bases=[base_info(bases[key], proto_names) for key in sorted(bases)],
                                        default_base=default_base, limits=limits)
