"""The gRPC server over real loopback connections, on the tiny model with the torch backend: end to end against
the Python API, every bad input, queue overflow, fairness, cancellation and deadlines, metrics, TLS and auth,
and draining on SIGTERM."""

from __future__ import annotations

import io
import itertools
import math
import re
import signal
import threading
import time
import urllib.request
from queue import Queue

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import (
    MODEL,
    OTHER_MODEL,
    PROMPT,
    ServeProcess,
    ServerThread,
    files,
    kinds,
    make_certificates,
    make_repo,
    request,
    stub,
)
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tuneavideo.v1 import tuneavideo_pb2 as pb2

from clients import Client, ServerError
from server.engines import load_model
from server.generate import MAX_SOURCE_BYTES, GenerationOptions, Generator
from server.registry import ModelRegistry, ModelUnavailable
from server.serve import MAX_RECEIVE_BYTES, ServerConfig
from server.service import SERVICE_NAME
from server.worker import FairQueue, Job, QueueClosed, QueueFull
from tuner.video_io import read_video

CODE = grpc.StatusCode
TIMEOUT = 300  # seconds, for any one call: generous for a busy machine, but nothing waits forever


@pytest.fixture(scope="module")
def repo(tuned_run, tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("serve"), tuned_run)


@pytest.fixture(scope="module")
def server(repo):
    server = ServerThread(ServerConfig(repo=repo, port=0, max_queue=3, metrics_port=0))
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as channel:
        yield channel


def generate(channel, **fields) -> list[pb2.GenerateResponse]:
    return list(stub(channel).Generate(request(**fields), timeout=TIMEOUT))


def failure(channel, **fields) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        generate(channel, **fields)
    return info.value.code(), info.value.details()


def request_counts(metrics_text: str) -> dict[tuple[str, str, str], float]:
    """`tav_requests_total` by (method, code, model), from the metrics endpoint's text."""
    family = next(f for f in text_string_to_metric_families(metrics_text) if f.name == "tav_requests")
    return {(s.labels["method"], s.labels["code"], s.labels["model"]): s.value
            for s in family.samples if s.name == "tav_requests_total"}


def first_progress(call) -> float:
    """Read a Generate stream until its first progress message; the time it came."""
    for response in call:
        if response.HasField("progress"):
            return time.monotonic()
    raise AssertionError("the stream ended without progress")


def test_models_are_listed_and_bad_entries_skipped(channel):
    s = stub(channel)
    listing = s.ListModels(pb2.ListModelsRequest(), timeout=TIMEOUT)
    assert [m.id for m in listing.models] == [MODEL, OTHER_MODEL]
    skipped = {entry.id: entry.reason for entry in listing.skipped}
    assert set(skipped) == {"Not_An_Id", "empty", "broken"}  # and never .engines
    assert "not a model id" in skipped["Not_An_Id"] and "failed to load" in skipped["broken"]
    info = s.GetModel(pb2.GetModelRequest(id=MODEL), timeout=TIMEOUT)
    assert (info.width, info.height, info.fps, info.frames, info.source_frames) == (32, 32, 8, 8, 12)
    assert info.source_prompt == "a red square is moving right" and info.base_model == "tiny-sd"
    assert "torch" in info.backends and info.backend == "torch" and info.loaded
    assert [(p.batch, p.frames, p.latent_height, p.latent_width) for p in info.profiles] == [(1, 8, 16, 16),
                                                                                             (2, 8, 16, 16)]
    for model_id, code, text in [("../x", CODE.INVALID_ARGUMENT, "id:"), ("nope", CODE.NOT_FOUND, "unknown"),
                                 ("broken", CODE.NOT_FOUND, "failed to load")]:
        with pytest.raises(grpc.RpcError) as e:
            s.GetModel(pb2.GetModelRequest(id=model_id), timeout=TIMEOUT)
        assert e.value.code() == code and text in e.value.details()


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        response = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=TIMEOUT)
    services = {s.name for answer in answers for s in answer.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services


def test_png_frames_equal_the_python_api(channel, tuned_run):
    options = dict(steps=2, seed=5, guidance=7.5, invert=True)
    responses = generate(channel, **options)
    events = kinds(responses)
    assert events[0] == "accepted" and events.count("result") == 1 and events[-1] == "chunk"
    assert events.index("result") > max(i for i, kind in enumerate(events) if kind == "progress")
    progress = [(r.progress.phase, r.progress.step, r.progress.total) for r in responses if r.HasField("progress")]
    phases = [phase for phase, _, _ in progress]
    assert phases == sorted(phases) and pb2.PHASE_SAMPLE in phases and pb2.PHASE_DECODE in phases
    assert all(1 <= step <= total for _, step, total in progress)
    assert progress[-1] == (pb2.PHASE_DECODE, 8, 8)
    info = next(r.result for r in responses if r.HasField("result"))
    assert (info.mime_type, info.files, info.frames, info.width, info.height) == ("image/png", 8, 8, 32, 32)
    assert (info.seed, info.steps, info.guidance) == (5, 2, 7.5)
    assert {"queue", "text", "sample", "decode", "output", "total"} <= set(info.timings)

    served = np.stack([np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in files(responses)])
    local = Generator(load_model(tuned_run)).generate(GenerationOptions(PROMPT, **options))
    np.testing.assert_array_equal(served, local.frames)


@pytest.mark.parametrize("fmt, frames", [(pb2.OUTPUT_FORMAT_MP4, 10), (pb2.OUTPUT_FORMAT_GIF, 8)])
def test_video_formats_decode_to_the_right_frames(channel, fmt, frames):
    responses = generate(channel, format=fmt, frames=frames)
    info = next(r.result for r in responses if r.HasField("result"))
    assert info.mime_type == {pb2.OUTPUT_FORMAT_MP4: "video/mp4", pb2.OUTPUT_FORMAT_GIF: "image/gif"}[fmt]
    assert info.fps == 8 and info.files == 1
    (video,) = files(responses)
    assert len(video) == info.size_bytes
    clip = read_video(video)
    assert clip.frames.shape == (frames, 32, 32, 3)
    assert clip.fps == pytest.approx(8, abs=0.5)  # GIF delays are rounded to 10 ms


BAD_INPUTS = [
    (dict(model="nope"), CODE.NOT_FOUND, "model 'nope' is unknown"),
    (dict(model="broken"), CODE.NOT_FOUND, "model 'broken' is not available"),
    (dict(model="../x"), CODE.INVALID_ARGUMENT, "model:"),
    (dict(model="Upper"), CODE.INVALID_ARGUMENT, "model:"),
    (dict(prompt=""), CODE.INVALID_ARGUMENT, "prompt:"),
    (dict(prompt="x" * 1001), CODE.INVALID_ARGUMENT, "prompt:"),
    (dict(negative_prompt="x" * 1001), CODE.INVALID_ARGUMENT, "negative_prompt:"),
    (dict(frames=0), CODE.INVALID_ARGUMENT, "frames:"),
    (dict(frames=129), CODE.INVALID_ARGUMENT, "frames:"),
    (dict(steps=0), CODE.INVALID_ARGUMENT, "steps:"),
    (dict(steps=201), CODE.INVALID_ARGUMENT, "steps:"),
    (dict(guidance=0.5), CODE.INVALID_ARGUMENT, "guidance:"),
    (dict(guidance=30.5), CODE.INVALID_ARGUMENT, "guidance:"),
    (dict(seed=2**63), CODE.INVALID_ARGUMENT, "seed:"),
    (dict(format=9), CODE.INVALID_ARGUMENT, "format:"),
    (dict(source_video=b"not a video", invert=True), CODE.INVALID_ARGUMENT, "source_video:"),
    (dict(source_video=b"\0" * (MAX_SOURCE_BYTES + 1), invert=True), CODE.INVALID_ARGUMENT, "source_video:"),
    (dict(source_video=b"\0" * (MAX_RECEIVE_BYTES + 1), invert=True), CODE.RESOURCE_EXHAUSTED, "larger than max"),
]


@pytest.mark.parametrize("fields, code, text", BAD_INPUTS,
                         ids=[next(iter(f)) + f"-{code.name}-{i}" for i, (f, code, _) in enumerate(BAD_INPUTS)])
def test_bad_input_gets_its_status_code_and_names_the_field(channel, fields, code, text):
    got_code, details = failure(channel, **fields)
    assert (got_code, text in details) == (code, True), details


def test_source_clip_needs_inversion(channel, clip_path):
    code, details = failure(channel, source_video=clip_path.read_bytes(), invert=False)
    assert code == CODE.INVALID_ARGUMENT and details.startswith("source_video:")


def test_a_good_request_after_bad_ones_succeeds(channel, clip_path):
    responses = generate(channel, source_video=clip_path.read_bytes(), invert=True)
    assert kinds(responses)[-1] == "chunk" and len(files(responses)) == 8


def test_fair_queue_takes_models_in_turn():
    queue = FairQueue(7)

    def job(name: str) -> Job:
        return Job(name, name[0], GenerationOptions(PROMPT), loop=None)

    jobs = {name: job(name) for name in ("a1", "a2", "a3", "a4", "b1", "b2", "c1")}
    positions = {name: queue.put(j) for name, j in jobs.items()}
    assert positions == {"a1": 0, "a2": 1, "a3": 2, "a4": 3, "b1": 1, "b2": 3, "c1": 2}
    with pytest.raises(QueueFull):
        queue.put(job("d1"))
    assert queue.remove(jobs["a3"]) and not queue.remove(jobs["a3"])
    queue.close()
    with pytest.raises(QueueClosed):
        queue.put(job("d1"))
    assert [queue.get().id for _ in range(6)] == ["a1", "b1", "c1", "a2", "b2", "a4"]
    assert queue.get() is None and len(queue) == 0


def test_engine_cache_keeps_what_fits_least_recently_used_out(repo):
    registry = ModelRegistry(repo, max_bytes=1)  # smaller than any model: one at a time
    assert registry.ready(MODEL) is None and registry.ready(OTHER_MODEL) is None
    registry.load(MODEL)
    assert registry.ready(MODEL) is not None
    registry.load(OTHER_MODEL)
    assert registry.ready(OTHER_MODEL) is not None and registry.ready(MODEL) is None
    with pytest.raises(ModelUnavailable, match="failed to load"):
        registry.load("broken")


def test_queue_overflow_is_refused_and_accepted_requests_complete(channel):
    s = stub(channel)
    running = s.Generate(request(steps=200), timeout=TIMEOUT)
    first_progress(running)  # the worker is busy with it; the queue (3) is empty
    outcomes: Queue = Queue()

    def submit() -> None:
        try:
            outcomes.put(("OK", kinds(s.Generate(request(), timeout=TIMEOUT))))
        except grpc.RpcError as e:
            outcomes.put((e.code(), e.details()))

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for thread in threads:
        thread.start()
    refused = [outcomes.get(timeout=TIMEOUT) for _ in range(3)]  # the surplus is answered at once
    assert all(code == CODE.RESOURCE_EXHAUSTED and "queue is full" in details for code, details in refused)
    running.cancel()  # frees the worker for the three queued requests
    for thread in threads:
        thread.join(TIMEOUT)
    done = [outcomes.get(timeout=1) for _ in range(3)]
    assert all(code == "OK" and events[-1] == "chunk" for code, events in done), done


def test_a_burst_on_one_model_does_not_starve_another(channel):
    s = stub(channel)
    running = s.Generate(request(steps=200), timeout=TIMEOUT)
    first_progress(running)
    finished: list[str] = []

    def consume(name: str, call) -> None:
        assert kinds(call)[-1] == "chunk"
        finished.append(name)

    threads = []
    for name, model, position in [("a1", MODEL, 0), ("a2", MODEL, 1), ("b1", OTHER_MODEL, 1)]:
        call = s.Generate(request(model=model), timeout=TIMEOUT)
        assert next(call).accepted.queue_position == position  # b1 goes before a2
        threads.append(threading.Thread(target=consume, args=(name, call)))
        threads[-1].start()
    running.cancel()
    for thread in threads:
        thread.join(TIMEOUT)
    assert finished == ["a1", "b1", "a2"]


def test_cancellation_frees_the_worker_within_a_step(channel):
    s = stub(channel)
    call = s.Generate(request(steps=200), timeout=TIMEOUT)
    stamps = [first_progress(call), first_progress(call), first_progress(call)]
    step = max(stamps[2] - stamps[1], stamps[1] - stamps[0])
    call.cancel()
    cancelled = time.monotonic()
    following = s.Generate(request(), timeout=TIMEOUT)
    waited = first_progress(following) - cancelled
    assert waited < 3 * step + 2.0, (waited, step)  # the cancelled one had 197 steps left
    assert kinds(following)[-1] == "chunk"


def test_deadline_frees_the_worker_within_a_step(channel):
    s = stub(channel)
    call = s.Generate(request(steps=200), timeout=3.0)
    stamps = []
    with pytest.raises(grpc.RpcError) as e:
        for response in call:
            if response.HasField("progress"):
                stamps.append(time.monotonic())
    expired = time.monotonic()
    assert e.value.code() == CODE.DEADLINE_EXCEEDED and len(stamps) < 200
    step = max((b - a for a, b in itertools.pairwise(stamps)), default=3.0)
    waited = first_progress(s.Generate(request(), timeout=TIMEOUT)) - expired
    assert waited < 3 * step + 2.0, (waited, step)


def test_metrics_after_traffic(server):
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    deadline = time.monotonic() + 30
    while "tav_running_requests 0.0" not in (text := urllib.request.urlopen(url, timeout=30).read().decode()):
        assert time.monotonic() < deadline, "a request stays counted as running"
        time.sleep(0.2)  # the last test's cancelled request may still be unwinding
    calls = request_counts(text)
    for code in ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "CANCELLED", "DEADLINE_EXCEEDED"):
        assert any(method == "Generate" and c == code for method, c, _ in calls), code
    assert calls[("Generate", "OK", "square")] >= 1
    assert calls[("Generate", "NOT_FOUND", "-")] >= 1  # unknown ids do not become labels
    assert calls[("ListModels", "OK", "-")] >= 1
    # refused before the service ran: a body over the message size limit
    assert calls[("Generate", "RESOURCE_EXHAUSTED", "-")] >= 1
    assert "tav_queue_depth 0.0" in text
    for phase in ("queue", "text", "sample", "decode", "output", "total"):
        assert f'tav_phase_seconds_count{{model="square",phase="{phase}"}}' in text, phase
    assert re.search(r'tav_seconds_per_frame_count\{model="square"\} [1-9]', text)


@pytest.mark.needs_tool("openssl")
def test_tls_and_bearer_token(repo, tmp_path):
    ca, cert, key = make_certificates(tmp_path)
    token = "s3cret-token"
    server = ServerThread(ServerConfig(repo=repo, port=0, tls_cert=cert, tls_key=key, tokens=[token]))
    try:
        server.wait_ready()
        roots = ca.read_bytes()
        with Client(server.target, token=token, root_certificates=roots) as client:
            video = client.generate(MODEL, PROMPT, steps=1, invert=False, format="png", timeout=TIMEOUT)
            assert video.frames == 8 and len(video.files) == 8
        for wrong in ("not-the-token", None):
            with Client(server.target, token=wrong, root_certificates=roots) as client:
                assert client.health() == "SERVING"  # probes need no token
                with pytest.raises(ServerError) as e:
                    client.generate(MODEL, PROMPT, steps=1, invert=False, timeout=TIMEOUT)
                assert e.value.code == CODE.UNAUTHENTICATED and "bearer token" in e.value.details
                with pytest.raises(ServerError) as e:
                    client.list_models()
                assert e.value.code == CODE.UNAUTHENTICATED
        with Client(server.target, token=token, retries=0) as plaintext, pytest.raises(ServerError) as e:
            plaintext.list_models(timeout=10)
        assert e.value.code == CODE.UNAVAILABLE
    finally:
        server.stop()


def health_status(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_sigterm_drains_then_exits_0(repo):
    server = ServeProcess("--repo", str(repo), "--grace", "30", "--max-queue", "4")
    try:
        server.wait_for("serving square")
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            s = stub(channel)
            assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            # size the running request to last a few seconds on this machine, so the drain can be watched
            calibration = next(r.result for r in generate(channel, steps=2) if r.HasField("result"))
            steps = min(200, max(5, math.ceil(4.0 / (calibration.timings["sample"] / 2))))
            outcomes: dict[str, tuple] = {}

            def follow(name: str, call) -> None:
                events = []
                try:
                    for response in call:
                        events.append(response.WhichOneof("event"))
                    outcomes[name] = ("OK", events)
                except grpc.RpcError as e:
                    outcomes[name] = (e.code(), events, e.details())

            running = s.Generate(request(steps=steps), timeout=TIMEOUT)
            first_progress(running)
            threads = [threading.Thread(target=follow, args=("running", running))]
            # too-long: 21 windows x 200 steps x 2 (inversion, sampling) UNet calls cannot fit in 30 s
            for name, fields in [("too-long", dict(frames=128, steps=200, invert=True)), ("short", dict())]:
                call = s.Generate(request(**fields), timeout=TIMEOUT)
                assert next(call).HasField("accepted")  # queued in this order
                threads.append(threading.Thread(target=follow, args=(name, call)))
            for thread in threads:
                thread.start()

            server.proc.send_signal(signal.SIGTERM)
            end = time.monotonic() + 30
            while health_status(channel) == health_pb2.HealthCheckResponse.SERVING and time.monotonic() < end:
                time.sleep(0.05)
            assert health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            code, _ = failure(channel)
            assert code == CODE.UNAVAILABLE
            for thread in threads:
                thread.join(TIMEOUT)
        assert outcomes["running"][0] == "OK" and outcomes["running"][1][-1] == "chunk"
        assert outcomes["short"][0] == "OK"  # fits in the grace period
        # refused before its work started, and says so: no Started message, so a client may retry it elsewhere
        assert outcomes["too-long"][:2] == (CODE.UNAVAILABLE, []) and "did not start" in outcomes["too-long"][2]
        assert server.proc.wait(timeout=120) == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(30)
