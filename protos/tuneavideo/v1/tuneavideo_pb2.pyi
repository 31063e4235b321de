from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_FORMAT_UNSPECIFIED: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_MP4: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_GIF: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_PNG_FRAMES: _ClassVar[OutputFormat]

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PHASE_INVERT: _ClassVar[Phase]
    PHASE_SAMPLE: _ClassVar[Phase]
    PHASE_DECODE: _ClassVar[Phase]
OUTPUT_FORMAT_UNSPECIFIED: OutputFormat
OUTPUT_FORMAT_MP4: OutputFormat
OUTPUT_FORMAT_GIF: OutputFormat
OUTPUT_FORMAT_PNG_FRAMES: OutputFormat
PHASE_UNSPECIFIED: Phase
PHASE_INVERT: Phase
PHASE_SAMPLE: Phase
PHASE_DECODE: Phase

class GenerateRequest(_message.Message):
    __slots__ = ("model", "prompt", "negative_prompt", "frames", "steps", "guidance", "seed", "invert", "source_video", "format", "cache_interval")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INVERT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_VIDEO_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    CACHE_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    negative_prompt: str
    frames: int
    steps: int
    guidance: float
    seed: int
    invert: bool
    source_video: bytes
    format: OutputFormat
    cache_interval: int
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., frames: _Optional[int] = ..., steps: _Optional[int] = ..., guidance: _Optional[float] = ..., seed: _Optional[int] = ..., invert: _Optional[bool] = ..., source_video: _Optional[bytes] = ..., format: _Optional[_Union[OutputFormat, str]] = ..., cache_interval: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("accepted", "progress", "result", "chunk", "started")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    accepted: Accepted
    progress: Progress
    result: ResultInfo
    chunk: Chunk
    started: Started
    def __init__(self, accepted: _Optional[_Union[Accepted, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[ResultInfo, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., started: _Optional[_Union[Started, _Mapping]] = ...) -> None: ...

class Accepted(_message.Message):
    __slots__ = ("request_id", "queue_position", "prompt_truncated")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    queue_position: int
    prompt_truncated: bool
    def __init__(self, request_id: _Optional[str] = ..., queue_position: _Optional[int] = ..., prompt_truncated: _Optional[bool] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("queue_seconds",)
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    queue_seconds: float
    def __init__(self, queue_seconds: _Optional[float] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("phase", "step", "total")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    phase: Phase
    step: int
    total: int
    def __init__(self, phase: _Optional[_Union[Phase, str]] = ..., step: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class ResultInfo(_message.Message):
    __slots__ = ("mime_type", "files", "size_bytes", "frames", "width", "height", "fps", "seed", "steps", "guidance", "timings", "cache_interval")
    class TimingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    CACHE_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    mime_type: str
    files: int
    size_bytes: int
    frames: int
    width: int
    height: int
    fps: float
    seed: int
    steps: int
    guidance: float
    timings: _containers.ScalarMap[str, float]
    cache_interval: int
    def __init__(self, mime_type: _Optional[str] = ..., files: _Optional[int] = ..., size_bytes: _Optional[int] = ..., frames: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., fps: _Optional[float] = ..., seed: _Optional[int] = ..., steps: _Optional[int] = ..., guidance: _Optional[float] = ..., timings: _Optional[_Mapping[str, float]] = ..., cache_interval: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("file", "offset", "data", "last")
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    file: int
    offset: int
    data: bytes
    last: bool
    def __init__(self, file: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "skipped")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    skipped: _containers.RepeatedCompositeFieldContainer[SkippedModel]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., skipped: _Optional[_Iterable[_Union[SkippedModel, _Mapping]]] = ...) -> None: ...

class SkippedModel(_message.Message):
    __slots__ = ("id", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    reason: str
    def __init__(self, id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class Profile(_message.Message):
    __slots__ = ("batch", "frames", "latent_height", "latent_width")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    LATENT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    LATENT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    batch: int
    frames: int
    latent_height: int
    latent_width: int
    def __init__(self, batch: _Optional[int] = ..., frames: _Optional[int] = ..., latent_height: _Optional[int] = ..., latent_width: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("id", "base_model", "width", "height", "frames", "source_frames", "fps", "source_prompt", "attention_mode", "backends", "backend", "profiles", "default_steps", "default_guidance", "loaded", "cache_interval_supported", "adapter_kind", "lora_rank")
    ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MODE_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    CACHE_INTERVAL_SUPPORTED_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_KIND_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    id: str
    base_model: str
    width: int
    height: int
    frames: int
    source_frames: int
    fps: float
    source_prompt: str
    attention_mode: str
    backends: _containers.RepeatedScalarFieldContainer[str]
    backend: str
    profiles: _containers.RepeatedCompositeFieldContainer[Profile]
    default_steps: int
    default_guidance: float
    loaded: bool
    cache_interval_supported: bool
    adapter_kind: str
    lora_rank: int
    def __init__(self, id: _Optional[str] = ..., base_model: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., frames: _Optional[int] = ..., source_frames: _Optional[int] = ..., fps: _Optional[float] = ..., source_prompt: _Optional[str] = ..., attention_mode: _Optional[str] = ..., backends: _Optional[_Iterable[str]] = ..., backend: _Optional[str] = ..., profiles: _Optional[_Iterable[_Union[Profile, _Mapping]]] = ..., default_steps: _Optional[int] = ..., default_guidance: _Optional[float] = ..., loaded: _Optional[bool] = ..., cache_interval_supported: _Optional[bool] = ..., adapter_kind: _Optional[str] = ..., lora_rank: _Optional[int] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GenerationLimits(_message.Message):
    __slots__ = ("max_frames", "default_frames", "max_steps", "min_guidance", "max_guidance", "max_prompt_chars", "max_seed", "max_source_bytes", "max_source_frames", "max_source_pixels", "max_cache_interval")
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MIN_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    MAX_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_SOURCE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SOURCE_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_SOURCE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_CACHE_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    max_frames: int
    default_frames: int
    max_steps: int
    min_guidance: float
    max_guidance: float
    max_prompt_chars: int
    max_seed: int
    max_source_bytes: int
    max_source_frames: int
    max_source_pixels: int
    max_cache_interval: int
    def __init__(self, max_frames: _Optional[int] = ..., default_frames: _Optional[int] = ..., max_steps: _Optional[int] = ..., min_guidance: _Optional[float] = ..., max_guidance: _Optional[float] = ..., max_prompt_chars: _Optional[int] = ..., max_seed: _Optional[int] = ..., max_source_bytes: _Optional[int] = ..., max_source_frames: _Optional[int] = ..., max_source_pixels: _Optional[int] = ..., max_cache_interval: _Optional[int] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("backend", "limits", "formats", "options", "max_queue")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    FORMATS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    backend: str
    limits: GenerationLimits
    formats: _containers.RepeatedScalarFieldContainer[OutputFormat]
    options: _containers.RepeatedScalarFieldContainer[str]
    max_queue: int
    def __init__(self, backend: _Optional[str] = ..., limits: _Optional[_Union[GenerationLimits, _Mapping]] = ..., formats: _Optional[_Iterable[_Union[OutputFormat, str]]] = ..., options: _Optional[_Iterable[str]] = ..., max_queue: _Optional[int] = ...) -> None: ...
