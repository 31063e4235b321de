import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TuneSettings(_message.Message):
    __slots__ = ("steps", "frames", "width", "height", "learning_rate", "seed", "attention_mode", "group_norm", "start", "stride", "trainable", "frame_positions", "timestep_power", "adapter_kind", "lora_rank", "lora_alpha")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MODE_FIELD_NUMBER: _ClassVar[int]
    GROUP_NORM_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_FIELD_NUMBER: _ClassVar[int]
    FRAME_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_POWER_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_KIND_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    steps: int
    frames: int
    width: int
    height: int
    learning_rate: float
    seed: int
    attention_mode: str
    group_norm: str
    start: int
    stride: int
    trainable: str
    frame_positions: str
    timestep_power: float
    adapter_kind: str
    lora_rank: int
    lora_alpha: float
    def __init__(self, steps: _Optional[int] = ..., frames: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., learning_rate: _Optional[float] = ..., seed: _Optional[int] = ..., attention_mode: _Optional[str] = ..., group_norm: _Optional[str] = ..., start: _Optional[int] = ..., stride: _Optional[int] = ..., trainable: _Optional[str] = ..., frame_positions: _Optional[str] = ..., timestep_power: _Optional[float] = ..., adapter_kind: _Optional[str] = ..., lora_rank: _Optional[int] = ..., lora_alpha: _Optional[float] = ...) -> None: ...

class CreateTuneJobRequest(_message.Message):
    __slots__ = ("model_id", "base", "caption", "video", "settings")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    base: str
    caption: str
    video: bytes
    settings: TuneSettings
    def __init__(self, model_id: _Optional[str] = ..., base: _Optional[str] = ..., caption: _Optional[str] = ..., video: _Optional[bytes] = ..., settings: _Optional[_Union[TuneSettings, _Mapping]] = ...) -> None: ...

class ImportModelRequest(_message.Message):
    __slots__ = ("model_id", "source", "base", "caption")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    source: str
    base: str
    caption: str
    def __init__(self, model_id: _Optional[str] = ..., source: _Optional[str] = ..., base: _Optional[str] = ..., caption: _Optional[str] = ...) -> None: ...

class GetTuneJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListTuneJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTuneJobsResponse(_message.Message):
    __slots__ = ("tune_jobs", "next_page_token")
    TUNE_JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tune_jobs: _containers.RepeatedCompositeFieldContainer[TuneJob]
    next_page_token: str
    def __init__(self, tune_jobs: _Optional[_Iterable[_Union[TuneJob, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelTuneJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteTuneJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteTuneJobResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchTuneJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ("pending",)
    PENDING_FIELD_NUMBER: _ClassVar[int]
    pending: bool
    def __init__(self, pending: _Optional[bool] = ...) -> None: ...

class TuneJob(_message.Message):
    __slots__ = ("id", "model_id", "base", "caption", "state", "queue_position", "step", "total_steps", "loss", "settings", "create_time", "start_time", "update_time", "end_time", "failure_reason", "cancel_requested", "attempt", "worker", "tuning_seconds", "export_seconds", "import_source")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[TuneJob.State]
        STATE_QUEUED: _ClassVar[TuneJob.State]
        STATE_TUNING: _ClassVar[TuneJob.State]
        STATE_EXPORTING: _ClassVar[TuneJob.State]
        STATE_READY: _ClassVar[TuneJob.State]
        STATE_FAILED: _ClassVar[TuneJob.State]
        STATE_CANCELLED: _ClassVar[TuneJob.State]
    STATE_UNSPECIFIED: TuneJob.State
    STATE_QUEUED: TuneJob.State
    STATE_TUNING: TuneJob.State
    STATE_EXPORTING: TuneJob.State
    STATE_READY: TuneJob.State
    STATE_FAILED: TuneJob.State
    STATE_CANCELLED: TuneJob.State
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    TUNING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXPORT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IMPORT_SOURCE_FIELD_NUMBER: _ClassVar[int]
    id: str
    model_id: str
    base: str
    caption: str
    state: TuneJob.State
    queue_position: int
    step: int
    total_steps: int
    loss: float
    settings: TuneSettings
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    failure_reason: str
    cancel_requested: bool
    attempt: int
    worker: str
    tuning_seconds: float
    export_seconds: float
    import_source: str
    def __init__(self, id: _Optional[str] = ..., model_id: _Optional[str] = ..., base: _Optional[str] = ..., caption: _Optional[str] = ..., state: _Optional[_Union[TuneJob.State, str]] = ..., queue_position: _Optional[int] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., settings: _Optional[_Union[TuneSettings, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., failure_reason: _Optional[str] = ..., cancel_requested: _Optional[bool] = ..., attempt: _Optional[int] = ..., worker: _Optional[str] = ..., tuning_seconds: _Optional[float] = ..., export_seconds: _Optional[float] = ..., import_source: _Optional[str] = ...) -> None: ...

class ListBasesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBasesResponse(_message.Message):
    __slots__ = ("bases", "default_base", "limits")
    BASES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_BASE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    bases: _containers.RepeatedCompositeFieldContainer[BaseInfo]
    default_base: str
    limits: TuneLimits
    def __init__(self, bases: _Optional[_Iterable[_Union[BaseInfo, _Mapping]]] = ..., default_base: _Optional[str] = ..., limits: _Optional[_Union[TuneLimits, _Mapping]] = ...) -> None: ...

class BaseInfo(_message.Message):
    __slots__ = ("id", "size_multiple", "default_size", "default_settings")
    ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SETTINGS_FIELD_NUMBER: _ClassVar[int]
    id: str
    size_multiple: int
    default_size: int
    default_settings: TuneSettings
    def __init__(self, id: _Optional[str] = ..., size_multiple: _Optional[int] = ..., default_size: _Optional[int] = ..., default_settings: _Optional[_Union[TuneSettings, _Mapping]] = ...) -> None: ...

class TuneLimits(_message.Message):
    __slots__ = ("max_steps", "max_frames", "max_size", "min_learning_rate", "max_learning_rate", "max_caption_chars", "max_video_bytes")
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    MIN_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_CAPTION_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_VIDEO_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_steps: int
    max_frames: int
    max_size: int
    min_learning_rate: float
    max_learning_rate: float
    max_caption_chars: int
    max_video_bytes: int
    def __init__(self, max_steps: _Optional[int] = ..., max_frames: _Optional[int] = ..., max_size: _Optional[int] = ..., min_learning_rate: _Optional[float] = ..., max_learning_rate: _Optional[float] = ..., max_caption_chars: _Optional[int] = ..., max_video_bytes: _Optional[int] = ...) -> None: ...
