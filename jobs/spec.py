"""A tune job as every part of the tuning service sees it: its states, its record (a flat mapping of strings, as
a Redis hash holds it), and the bounds of what a client may ask for. An import job (an official Tune-A-Video
checkpoint brought in, `ImportModel`) is the same record and state machine, with `import_source` set and no
tuning settings: it goes from queued to exporting (the import and the export) to ready.

The defaults of every setting come from the tuner (`tuner.tune`), never from here: a client's request names only
what it wants to change, and `resolve_settings` fills in the rest and checks the bounds.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace

from tuner.io_utils import parse_json
from tuner.tune import ADAPTER_KINDS, TuneSettings, adapter_defaults, invalid_choice

QUEUED, TUNING, EXPORTING, READY, FAILED, CANCELLED = "queued", "tuning", "exporting", "ready", "failed", "cancelled"
STATES = (QUEUED, TUNING, EXPORTING, READY, FAILED, CANCELLED)
RUNNING = (TUNING, EXPORTING)
ENDED = (READY, FAILED, CANCELLED)

MAX_STEPS = 2000
MAX_FRAMES = 32
MAX_SIZE = 1024
MIN_LR, MAX_LR = 1e-6, 1e-2
MAX_SEED = 2**63 - 1
MAX_TIMESTEP_POWER = 8
MAX_CAPTION_CHARS = 1000
# An import job's only setting. A worker older than imports refuses a record with a setting it does not know
# (`Job.tune_settings`: "upgrade the worker"), so it fails the job saying so instead of tuning an empty clip.
IMPORT_SETTING = "import"
CLIENT_SETTINGS = ("steps", "frames", "width", "height", "lr", "seed", "attention_mode", "group_norm", "start",
                   "stride", "trainable", "frame_positions", "timestep_power", "adapter_kind", "lora_rank",
                   "lora_alpha")  # precision, device: the worker's


class InvalidField(ValueError):
    """A request field outside its bounds; `field` names it as the protocol does."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def resolve_settings(requested: dict, defaults: TuneSettings, size_multiple: int,
                     max_lora_rank: int | None = None) -> TuneSettings:
    """The settings a job runs with: `defaults` (the tuner's, for the base) with the client's `requested` values
    (setting name -> value, only those the client set), each checked against its bounds (a LoRA rank at most
    `max_lora_rank`)."""
    unknown = set(requested) - set(CLIENT_SETTINGS)
    if unknown:
        raise InvalidField(f"settings.{sorted(unknown)[0]}", "cannot be chosen by a client")
    kind = requested.get("adapter_kind", defaults.adapter_kind)
    if kind not in ADAPTER_KINDS:
        raise InvalidField("settings.adapter_kind", f"must be one of {', '.join(ADAPTER_KINDS)}")
    s = replace(adapter_defaults(defaults, kind), **requested)

    def bounded(name: str, value, low, high) -> None:
        if not (isinstance(value, int | float) and math.isfinite(value) and low <= value <= high):
            raise InvalidField(f"settings.{name}", f"must be between {low:g} and {high:g}, got {value}")

    bounded("steps", s.steps, 1, MAX_STEPS)
    bounded("frames", s.frames, 1, MAX_FRAMES)
    bounded("lr", s.lr, MIN_LR, MAX_LR)
    bounded("seed", s.seed, 0, MAX_SEED)
    bounded("start", s.start, 0, 10_000)
    bounded("stride", s.stride, 1, 100)
    for name in ("width", "height"):
        value = getattr(s, name)
        if value is not None:
            bounded(name, value, size_multiple, MAX_SIZE)
            if value % size_multiple:
                raise InvalidField(f"settings.{name}", f"must be a multiple of {size_multiple} for this base, "
                                                       f"got {value}")
    bad = invalid_choice(s, max_lora_rank)
    if bad:
        raise InvalidField(f"settings.{bad[0]}", bad[1])
    bounded("timestep_power", s.timestep_power, 0, MAX_TIMESTEP_POWER)
    return s


class UnreadableRecord(ValueError):
    """A job record this worker cannot run as it was meant (written by a newer server); the message says why."""


@dataclass
class Job:
    """One tune job's record. Times are seconds since the epoch (0: not yet)."""

    id: str
    model_id: str
    base: str  # the base's id in the allow-list (an import job: "" for the source's own networks)
    base_source: str  # where the worker finds it: a directory or a hub id
    caption: str
    settings: dict  # the resolved TuneSettings, as a dict (an import job: {IMPORT_SETTING: True})
    state: str = QUEUED
    sequence: int = 0  # queue order
    step: int = 0
    total_steps: int = 0
    loss: float = 0.0
    created: float = field(default_factory=time.time)
    started: float = 0.0
    updated: float = field(default_factory=time.time)
    ended: float = 0.0
    failure_reason: str = ""
    cancel_requested: bool = False
    attempt: int = 1
    worker: str = ""
    heartbeat: float = 0.0
    tuning_seconds: float = 0.0
    export_seconds: float = 0.0
    exports: str = ""  # what its worker exports (the worker's --export, e.g. "onnx:fp32,aoti:fp32")
    import_source: str = ""  # an import job's official output directory or hub id (`tuner.official`); "": tune

    @property
    def ended_state(self) -> bool:
        return self.state in ENDED

    def to_fields(self) -> dict[str, str]:
        """The record as a flat mapping of strings (a Redis hash)."""
        out = {}
        for name, value in asdict(self).items():
            out[name] = json.dumps(value) if isinstance(value, dict | bool) else str(value)
        return out

    @classmethod
    def from_fields(cls, data: dict) -> Job:
        """The record from `to_fields`'s mapping (str or bytes keys and values)."""
        text = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in data.items()}
        values = {}
        for f in fields(cls):
            if f.name not in text:
                continue
            raw = text[f.name]
            if f.type in ("dict", "bool"):
                values[f.name] = parse_json(raw, f"job record field {f.name}")
            elif f.type == "int":
                values[f.name] = int(raw)
            elif f.type == "float":
                values[f.name] = float(raw)
            else:
                values[f.name] = raw
        return cls(**values)

    def tune_settings(self) -> TuneSettings:
        """The record's settings; a record written by a newer server, with settings this worker does not know, is
        refused naming them (it must not be tuned without them)."""
        unknown = sorted(set(self.settings) - {f.name for f in fields(TuneSettings)})
        if unknown:
            raise UnreadableRecord(f"job {self.id}: settings {', '.join(unknown)} are unknown to this worker (an older "
                             "version than the server that queued the job): upgrade the worker")
        return TuneSettings(**self.settings)
