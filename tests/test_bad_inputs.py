"""The bad-input corpus against a server with auth on: malformed protobuf, huge and truncated clips, wrong codecs,
unicode and overlong prompts, absurd numbers, unknown enums, path-like ids, missing or wrong auth. Each case has
the status code it must get (the request is sent as raw bytes, so malformed messages go through the same path),
and the server must be healthy after all of them. Then a property-based fuzz of the request validator against
an independent statement of the bounds (docs/SERVER.md)."""

from __future__ import annotations

import functools
import io
import math
import struct
import wave
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import MODEL, PROMPT, ServerThread, request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tuneavideo.v1 import tuneavideo_pb2 as pb2

from server.generate import MAX_FRAMES, MAX_PROMPT_CHARS, MAX_SEED, MAX_SOURCE_BYTES, MAX_STEPS
from server.metrics import Metrics
from server.registry import MODEL_ID, ModelRegistry
from server.serve import MAX_RECEIVE_BYTES, ServerConfig
from server.service import FORMATS, RequestFailed, VideoGenerationService
from server.worker import FairQueue
from tuner.video_io import encode_video

CODE = grpc.StatusCode
TOKEN = "corpus-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
TIMEOUT = 300  # seconds for any one call: generous for a busy machine, but nothing waits forever
GENERATE = "/tuneavideo.v1.VideoGeneration/Generate"
GET_MODEL = "/tuneavideo.v1.VideoGeneration/GetModel"
LIST_MODELS = "/tuneavideo.v1.VideoGeneration/ListModels"


def clip(frames: int = 8) -> np.ndarray:
    return np.random.default_rng(frames).integers(0, 256, (frames, 32, 32, 3), dtype=np.uint8)


def mp4(frames: int = 8) -> bytes:
    return encode_video(clip(frames), 8, "mp4")


def png() -> bytes:
    out = io.BytesIO()
    Image.fromarray(clip(1)[0]).save(out, "PNG")
    return out.getvalue()


def wav() -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as audio:
        audio.setnchannels(1)
        audio.setsampwidth(2)
        audio.setframerate(8000)
        audio.writeframes(b"\0\0" * 8000)
    return out.getvalue()


def gif_canvas(width: int, height: int) -> bytes:
    """A 35-byte GIF whose header declares a width x height canvas holding one 1x1 image."""
    screen = b"GIF89a" + struct.pack("<HH", width, height) + bytes([0x80, 0, 0]) + b"\0\0\0\xff\xff\xff"
    image = b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\0" + b"\x02\x02\x44\x01\x00"
    return screen + image + b"\x3b"


def req(**fields) -> bytes:
    """A small valid request (one frame, one step, no inversion) with `fields` changed, serialized."""
    return request(**{"frames": 1, **fields}).SerializeToString()


def source(data: bytes) -> bytes:
    return req(source_video=data, invert=True)


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], bytes]  # the serialized request, built when the case runs (some are 64 MiB)
    code: grpc.StatusCode
    detail: str = ""  # a part of the status message (for OK: nothing)
    metadata: tuple = AUTH
    method: str = GENERATE


CASES = [
    # malformed protobuf: the parse error is answered before the service sees the request (a caller without a token
    # is refused before its bytes are read at all)
    Case("protobuf-garbage", lambda: b"\xff\xff\xff", CODE.INVALID_ARGUMENT, "request: not a valid Generate"),
    Case("protobuf-truncated", lambda: req()[:-3], CODE.INVALID_ARGUMENT, "request: not a valid Generate"),
    Case("protobuf-invalid-utf8-prompt", lambda: req() + b"\x12\x02\xc3\x28", CODE.INVALID_ARGUMENT,
         "Error parsing message"),
    Case("protobuf-garbage-without-token", lambda: b"\xff", CODE.UNAUTHENTICATED, "bearer token", metadata=()),
    Case("protobuf-garbage-get-model", lambda: b"\xff", CODE.INVALID_ARGUMENT, "not a valid GetModel request",
         method=GET_MODEL),
    Case("protobuf-empty-message", lambda: b"", CODE.INVALID_ARGUMENT, "model:"),
    Case("protobuf-wrong-wire-type-ignored", lambda: req() + b"\x22\x01x", CODE.OK),  # frames as bytes: unknown
    Case("protobuf-unknown-field-ignored", lambda: req() + b"\xf8\x06\x01", CODE.OK),  # field 111
    # huge or truncated clips
    Case("clip-over-64-mib", lambda: source(b"\0" * (MAX_SOURCE_BYTES + 1)), CODE.INVALID_ARGUMENT, "source_video:"),
    Case("message-over-limit", lambda: source(b"\0" * MAX_RECEIVE_BYTES), CODE.RESOURCE_EXHAUSTED, "larger than max"),
    Case("clip-truncated-mp4", lambda: source(mp4()[: len(mp4()) // 2]), CODE.INVALID_ARGUMENT, "source_video:"),
    Case("clip-mp4-header-only", lambda: source(mp4()[:64]), CODE.INVALID_ARGUMENT, "source_video:"),
    Case("clip-200-frames-capped-at-128", lambda: source(mp4(200)), CODE.OK),
    Case("clip-gif-declaring-8192x8192", lambda: source(gif_canvas(8192, 8192)), CODE.INVALID_ARGUMENT,
         "4096x4096"),
    Case("clip-gif-declaring-4096x4096", lambda: source(gif_canvas(4096, 4096)), CODE.OK),
    Case("clip-without-inversion", lambda: req(source_video=mp4(), invert=False), CODE.INVALID_ARGUMENT,
         "source_video:"),
    # wrong codecs: anything that decodes to frames is a clip; the rest is refused naming the field
    Case("codec-wav-audio-only", lambda: source(wav()), CODE.INVALID_ARGUMENT, "no video stream"),
    Case("codec-json-text", lambda: source(b'{"video": "no"}'), CODE.INVALID_ARGUMENT, "source_video:"),
    Case("codec-gif", lambda: source(encode_video(clip(), 8, "gif")), CODE.OK),
    Case("codec-png-still", lambda: source(png()), CODE.OK),
    # unicode and overlong prompts (bounds count characters, not bytes or tokens)
    Case("prompt-1000-cjk-characters", lambda: req(prompt="猫" * MAX_PROMPT_CHARS), CODE.OK),
    Case("prompt-1001-emoji", lambda: req(prompt="🎬" * (MAX_PROMPT_CHARS + 1)), CODE.INVALID_ARGUMENT, "prompt:"),
    Case("prompt-rtl-and-combining", lambda: req(prompt="קוביה כחולה e\u0301\u200f"), CODE.OK),
    Case("prompt-nul-and-controls", lambda: req(prompt="a\x00b\x07\n\t"), CODE.OK),
    Case("prompt-whitespace-only", lambda: req(prompt=" \t\n\u3000"), CODE.INVALID_ARGUMENT, "prompt:"),
    Case("negative-prompt-overlong", lambda: req(negative_prompt="x" * 1001), CODE.INVALID_ARGUMENT,
         "negative_prompt:"),
    # absurd numbers
    Case("frames-max-uint32", lambda: req(frames=2**32 - 1), CODE.INVALID_ARGUMENT, "frames:"),
    Case("frames-zero", lambda: req(frames=0), CODE.INVALID_ARGUMENT, "frames:"),
    Case("steps-max-uint32", lambda: req(steps=2**32 - 1), CODE.INVALID_ARGUMENT, "steps:"),
    Case("guidance-nan", lambda: req(guidance=math.nan), CODE.INVALID_ARGUMENT, "guidance:"),
    Case("guidance-infinite", lambda: req(guidance=math.inf), CODE.INVALID_ARGUMENT, "guidance:"),
    Case("guidance-negative-huge", lambda: req(guidance=-1e308), CODE.INVALID_ARGUMENT, "guidance:"),
    Case("seed-max-uint64", lambda: req(seed=2**64 - 1), CODE.INVALID_ARGUMENT, "seed:"),
    # unknown enums (proto3 keeps unknown enum numbers)
    Case("format-unknown-99", lambda: req(format=99), CODE.INVALID_ARGUMENT, "format:"),
    Case("format-negative", lambda: req(format=-1), CODE.INVALID_ARGUMENT, "format:"),
    # path-like and otherwise malformed model ids
    *[Case(f"model-id-{i}", lambda bad=bad: req(model=bad), CODE.INVALID_ARGUMENT, "model:")
      for i, bad in enumerate(["../square", "/etc/passwd", "square/../square", ".engines", "square\x00",
                               "%2e%2e%2fsquare", "ｓｑｕａｒｅ", "C:\\square", "a" * 65, ""])],
    Case("model-id-unknown-64-chars", lambda: req(model="a" * 64), CODE.NOT_FOUND, "unknown"),
    Case("get-model-path-id", lambda: pb2.GetModelRequest(id="../../etc").SerializeToString(),
         CODE.INVALID_ARGUMENT, "id:", method=GET_MODEL),
    # missing or wrong auth
    Case("auth-missing", req, CODE.UNAUTHENTICATED, "bearer token", metadata=()),
    Case("auth-wrong-token", req, CODE.UNAUTHENTICATED, "bearer token", metadata=(("authorization", "Bearer no"),)),
    Case("auth-basic-scheme", req, CODE.UNAUTHENTICATED, "bearer token",
         metadata=(("authorization", f"Basic {TOKEN}"),)),
    Case("auth-token-as-other-key", req, CODE.UNAUTHENTICATED, "bearer token", metadata=(("x-token", TOKEN),)),
    Case("auth-missing-on-listing", lambda: b"", CODE.UNAUTHENTICATED, "bearer token", metadata=(),
         method=LIST_MODELS),
    Case("metadata-over-20-kib", req, CODE.RESOURCE_EXHAUSTED, "metadata size",
         metadata=(*AUTH, ("x-padding", "p" * (20 << 10)))),
    Case("auth-scheme-case-insensitive", req, CODE.OK, metadata=(("authorization", f"bearer {TOKEN}"),)),
]


@pytest.fixture(scope="module")
def repo(tuned_run, tmp_path_factory):
    repo = tmp_path_factory.mktemp("corpus") / "repo"
    repo.mkdir()
    (repo / MODEL).symlink_to(tuned_run, target_is_directory=True)
    return repo


@pytest.fixture(scope="module")
def channel(repo):
    server = ServerThread(ServerConfig(repo=repo, port=0, max_queue=4, tokens=[TOKEN]))
    try:
        server.wait_ready()
        with grpc.insecure_channel(server.target) as channel:
            yield channel
    finally:
        server.stop()


def call(channel: grpc.Channel, case: Case) -> tuple[grpc.StatusCode, str, list]:
    """Send the case's bytes as they are; the final status, its message and the responses."""
    if case.method == GENERATE:
        method = channel.unary_stream(case.method, response_deserializer=pb2.GenerateResponse.FromString)
        responses: list = []
        try:
            responses.extend(method(case.make(), timeout=TIMEOUT, metadata=case.metadata))
        except grpc.RpcError as e:
            return e.code(), e.details() or "", responses
        return CODE.OK, "", responses
    try:
        return CODE.OK, "", [channel.unary_unary(case.method)(case.make(), timeout=TIMEOUT, metadata=case.metadata)]
    except grpc.RpcError as e:
        return e.code(), e.details() or "", []


def test_the_corpus_is_large_and_named_uniquely():
    assert len(CASES) >= 20 and len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_gets_its_status_code(channel, case):
    code, details, responses = call(channel, case)
    assert (code, case.detail in details) == (case.code, True), details
    if case.code == CODE.OK and case.method == GENERATE:
        assert responses[-1].chunk.last, "a whole result"
        if case.name == "prompt-1000-cjk-characters":  # past the tokenizer's 77 tokens: cut and reported
            assert responses[0].accepted.prompt_truncated


def test_the_server_is_healthy_after_the_corpus(channel):
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status == \
        health_pb2.HealthCheckResponse.SERVING  # and open without a token, for probes
    code, details, responses = call(channel, Case("good", lambda: req(frames=8, steps=2), CODE.OK))
    assert code == CODE.OK and responses[-1].chunk.last, details


# The fuzz: the validator against an independent statement of the bounds.

@pytest.fixture(scope="module")
def validator(repo) -> VideoGenerationService:
    registry = ModelRegistry(repo)
    registry.load(MODEL)  # loaded, so the numeric bounds are checked before acceptance
    return VideoGenerationService(registry, FairQueue(1), Metrics(), max_request_seconds=60)


def violations(r: pb2.GenerateRequest, source: str) -> set[str]:
    """The fields of `r` that break docs/SERVER.md's bounds."""
    bad = set()
    if not MODEL_ID.fullmatch(r.model) or r.model != MODEL:
        bad.add("model")
    if not r.prompt.strip() or len(r.prompt) > MAX_PROMPT_CHARS:
        bad.add("prompt")
    if len(r.negative_prompt) > MAX_PROMPT_CHARS:
        bad.add("negative_prompt")
    if r.HasField("frames") and not 1 <= r.frames <= MAX_FRAMES:
        bad.add("frames")
    if r.HasField("steps") and not 1 <= r.steps <= MAX_STEPS:
        bad.add("steps")
    if r.HasField("guidance") and not 1 <= r.guidance <= 30:  # NaN fails both comparisons
        bad.add("guidance")
    if r.HasField("seed") and r.seed > MAX_SEED:
        bad.add("seed")
    if r.format not in FORMATS:
        bad.add("format")
    if source != "none" and (source != "mp4" or (r.HasField("invert") and not r.invert)):
        bad.add("source_video")  # too large, not a video, or without inversion
    return bad


SOURCES = {"none": lambda: b"", "mp4": mp4, "garbage": lambda: b"\0" * 16,
           "over-limit": lambda: b"\0" * (MAX_SOURCE_BYTES + 1)}


@functools.cache
def source_video(name: str) -> bytes:
    return SOURCES[name]()


texts = st.one_of(st.text(max_size=40), st.text(min_size=995, max_size=1005), st.sampled_from(["", " ", PROMPT]))
fuzzed_requests = st.fixed_dictionaries(
    {"model": st.one_of(st.sampled_from([MODEL, "nope", "../x", "", ".engines", "Square"]), st.text(max_size=70)),
     "prompt": texts, "negative_prompt": texts},
    optional={
        "frames": st.integers(0, 2**32 - 1), "steps": st.integers(0, 2**32 - 1),
        "guidance": st.floats(allow_nan=True, allow_infinity=True), "seed": st.integers(0, 2**64 - 1),
        "invert": st.booleans(), "format": st.integers(-(2**31), 2**31 - 1),
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fields=fuzzed_requests, source=st.sampled_from(sorted(SOURCES)))
def test_validator_accepts_exactly_the_requests_within_bounds(validator, fields, source):
    r = pb2.GenerateRequest(**fields, source_video=source_video(source))
    bad = violations(r, source)
    try:
        options, fmt, _ = validator._check(r)
    except RequestFailed as e:
        if e.code == CODE.NOT_FOUND:
            assert "model" in bad and MODEL_ID.fullmatch(r.model), e.message
        else:
            assert e.code == CODE.INVALID_ARGUMENT and e.message.split(":")[0] in bad, (e.message, bad)
        return
    assert not bad, bad
    assert 1 <= options.frames <= MAX_FRAMES and 1 <= options.steps <= MAX_STEPS and 1 <= options.guidance <= 30
    assert 0 <= options.seed <= MAX_SEED and fmt in {"mp4", "gif", "png"}


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_validator_survives_arbitrary_bytes(validator, data):
    """Bytes that parse as a request (however odd) get a verdict, never an exception from the validator."""
    try:
        r = pb2.GenerateRequest.FromString(data)
    except DecodeError:  # the parser's refusal: INVALID_ARGUMENT before the service (see the corpus)
        return
    try:
        validator._check(r)
    except RequestFailed as e:
        assert e.code in (CODE.INVALID_ARGUMENT, CODE.NOT_FOUND)
