"""The server against hostile input, broken repositories and its own failures (docs/SERVER.md, "Limits" and
"Failures"), over real gRPC on loopback. Each test stands for a class of failure found by trying the server from
outside; each failed on the code before the fix. Where memory is the point, the server is a subprocess under a
resident-memory ceiling read from /proc: past it the server is killed and the test fails, instead of the
machine running out."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import MODEL, OTHER_MODEL, PROMPT, ServeProcess, ServerThread, request, stub
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from tuneavideo.v1 import tuneavideo_pb2 as pb2

from clients import Client, ServerError
from server.engines import load_model
from server.generate import GenerationOptions, Generator
from server.registry import ModelRegistry
from server.serve import MAX_RECEIVE_BYTES, ServerConfig, main
from tuner.tune import TuneError, TuneSettings, tune
from tuner.video_io import MAX_FRAME_PIXELS, VideoError, read_video, write_video

CODE = grpc.StatusCode
TIMEOUT = 300
TOKEN = "hardening-token"
SERVING = health_pb2.HealthCheckResponse.SERVING


def gif_canvas(width: int, height: int) -> bytes:
    """A 35-byte GIF whose header declares a width x height canvas holding one 1x1 image."""
    screen = b"GIF89a" + struct.pack("<HH", width, height) + bytes([0x80, 0, 0]) + b"\0\0\0\xff\xff\xff"
    image = b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\0" + b"\x02\x02\x44\x01\x00"
    return screen + image + b"\x3b"


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


class MemoryCeiling:
    """Watch a process's resident memory every 50 ms; kill it past `limit_mib`. `peak` is the highest seen."""

    def __init__(self, pid: int, limit_mib: float) -> None:
        self.pid, self.limit, self.peak, self.killed = pid, limit_mib, 0.0, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            with contextlib.suppress(OSError, StopIteration):
                self.peak = max(self.peak, rss_mib(self.pid))
                if self.peak > self.limit and not self.killed:
                    self.killed = True
                    os.kill(self.pid, signal.SIGKILL)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(5)
        return self.peak


class HealthWatch:
    """Ask for health every 0.2 s on a connection of its own; the slowest answer, and any failure."""

    def __init__(self, target: str) -> None:
        self.latencies, self.failures = [], []
        self._stop = threading.Event()
        self._channel = grpc.insecure_channel(target)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        health = health_pb2_grpc.HealthStub(self._channel)
        while not self._stop.wait(0.2):
            started = time.monotonic()
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                if status != SERVING:
                    self.failures.append(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
            except grpc.RpcError as e:
                self.failures.append(e.code().name)
            self.latencies.append(time.monotonic() - started)

    def stop(self) -> tuple[float, list[str]]:
        """The slowest answer (seconds) and the failures."""
        self._stop.set()
        self._thread.join(10)
        self._channel.close()
        return max(self.latencies, default=0.0), self.failures


@pytest.fixture(scope="module")
def repo(tuned_run, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("hardening") / "repo"
    repo.mkdir()
    for name in (MODEL, OTHER_MODEL):
        (repo / name).symlink_to(tuned_run, target_is_directory=True)
    return repo


@pytest.fixture(scope="module")
def other_run(tiny_base, clip_path, tmp_path_factory) -> Path:
    """A second tuned model of the same base, with other weights and another caption."""
    out = tmp_path_factory.mktemp("runs") / "other"
    settings = TuneSettings(frames=8, width=32, height=32, steps=4, lr=1e-2, seed=7)
    return tune(tiny_base, clip_path, "a green square is moving right", out, settings, progress=False)


# 1. Decoded size is bounded before decoding, and decoding stops when the request does.

def test_a_tiny_file_declaring_a_huge_canvas_is_refused_before_decoding(tiny_base, tmp_path):
    bomb = gif_canvas(8192, 8192)
    with pytest.raises(VideoError, match="4096x4096"):
        read_video(bomb)
    assert 8192 * 8192 > MAX_FRAME_PIXELS >= 4096 * 4096
    assert read_video(gif_canvas(64, 64)).frames.shape == (1, 64, 64, 3)
    clip = np.random.default_rng(0).integers(0, 256, (12, 48, 40, 3), dtype=np.uint8)
    path = tmp_path / "clip.gif"
    write_video(path, clip, 8)
    with pytest.raises(VideoError, match="more than 19200 pixels"):
        read_video(path, max_pixels=10 * 48 * 40)  # 12 frames do not fit, counted as they decode
    assert read_video(path, max_pixels=12 * 48 * 40).frames.shape == (12, 48, 40, 3)
    (tmp_path / "bomb.gif").write_bytes(bomb)
    with pytest.raises(TuneError, match="4096x4096"):
        tune(tiny_base, tmp_path / "bomb.gif", "a square", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_decoding_stops_when_the_request_is_cancelled(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, np.zeros((40, 32, 32, 3), np.uint8), 8)
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        read_video(path, check=check)
    assert len(calls) == 6  # stopped before the sixth frame, of 40


# 2. A caller without a token costs almost nothing; admitted calls are bounded in number and in bytes.

def test_unauthenticated_floods_cost_nothing_while_health_and_real_work_go_on(repo, tmp_path):
    """16 clients without a token send 64 MiB requests (4 of them gzip-compressed, inflating to 64 MiB) for 8 s
    (the slow test below: 60 s) at a server holding a token: its resident memory stays under 1.5 GB (it
    is killed past that), health answers within 1 s throughout, an authenticated generation completes, a tiny
    GIF declaring an 8192x8192 canvas is refused before decoding, and the refusals are counted and logged at a
    bounded rate."""
    run_flood(repo, tmp_path, seconds=8.0)


def run_flood(repo: Path, tmp_path: Path, seconds: float) -> None:
    (tmp_path / "tokens").write_text(TOKEN + "\n")
    server = ServeProcess("--repo", str(repo), "--auth-token-file", str(tmp_path / "tokens"), "--metrics-port", "0")
    ceiling = flood = None
    try:
        server.wait_for("serving square")
        metrics_port = int(re.search(r"metrics on http://127\.0\.0\.1:(\d+)", "".join(server.log)).group(1))
        target = f"127.0.0.1:{server.port}"
        ceiling = MemoryCeiling(server.proc.pid, 1536)
        health = HealthWatch(target)
        flood_start = time.monotonic()
        flood = subprocess.Popen([sys.executable, str(Path(__file__).with_name("flood.py")), target, "16",
                                  str(seconds), "4"], stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        with Client(target, token=TOKEN) as client:
            video = client.generate(MODEL, PROMPT, steps=2, invert=False, format="png", timeout=TIMEOUT)
            with pytest.raises(ServerError) as bomb:
                client.generate(MODEL, PROMPT, steps=1, source_video=gif_canvas(8192, 8192), timeout=TIMEOUT)
        outcomes = json.loads(flood.communicate(timeout=seconds + 120)[0])
        slowest, failures = health.stop()
        peak = ceiling.stop()
        assert not ceiling.killed and peak < 1536, f"the server's memory passed 1.5 GB ({peak:.0f} MiB)"
        assert slowest < 1.0 and not failures, (sorted(health.latencies)[-5:], failures)
        assert video.frames == 8 and len(video.files) == 8
        assert bomb.value.code == CODE.INVALID_ARGUMENT and "4096x4096" in bomb.value.details
        assert set(outcomes) == {"UNAUTHENTICATED"} and outcomes["UNAUTHENTICATED"] >= 16, outcomes
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read().decode()
        refused = float(re.search(r"^tav_auth_failures_total (\S+)$", metrics, re.M).group(1))
        assert refused >= outcomes["UNAUTHENTICATED"], (refused, outcomes)
        refusing = time.monotonic() - flood_start  # refusals may go on past `seconds` on a loaded machine
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(120) == 0
        server.wait_for("stopped", 30)  # the whole log read
        logged = "".join(server.log).count("refused without a valid token")
        assert 1 <= logged <= refusing / 10 + 2, (logged, refusing)  # one line per 10 s, however many refusals
        print(f"flood of {seconds:.0f} s: peak {peak:.0f} MiB, slowest health {slowest * 1000:.0f} ms, {outcomes}")
    finally:
        for process in (flood, server.proc):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(30)
        if ceiling is not None:
            ceiling.stop()


@pytest.mark.slow
def test_unauthenticated_floods_for_a_minute(repo, tmp_path):
    """The issue's target, outside CI: the same for 60 s."""
    run_flood(repo, tmp_path, seconds=60.0)


def test_calls_and_request_bytes_in_flight_are_bounded_and_health_is_not(repo):
    budget = 2 * MAX_RECEIVE_BYTES + (16 << 20)  # room to receive one largest request, and 16 MiB more
    server = ServerThread(ServerConfig(repo=repo, port=0, max_calls=3, max_request_bytes=budget, receive_wait=1.0))
    try:
        server.wait_ready()
        with grpc.insecure_channel(server.target) as channel:
            # a running request whose message carries 24 MiB (an unknown field: parsed, kept, held)
            padding = b"\xfa\x06" + _varint(24 << 20) + b"\0" * (24 << 20)
            raw = request(steps=200).SerializeToString() + padding
            running = channel.unary_stream("/tuneavideo.v1.VideoGeneration/Generate",
                                           response_deserializer=pb2.GenerateResponse.FromString)(raw, timeout=TIMEOUT)
            assert next(running).HasField("accepted")
            # 148 MiB budget - 48 MiB held: no room to receive another Generate (it may carry 65 MiB x 2) ...
            with pytest.raises(grpc.RpcError) as e:
                list(stub(channel).Generate(request(), timeout=TIMEOUT))
            assert e.value.code() == CODE.RESOURCE_EXHAUSTED and "request bytes" in e.value.details()
            # ... while small calls still pass, and health is outside every bound
            assert stub(channel).ListModels(pb2.ListModelsRequest(), timeout=TIMEOUT).models
            queued = [stub(channel).ListModels.future(pb2.ListModelsRequest(), timeout=TIMEOUT) for _ in range(2)]
            [q.result() for q in queued]
            running.cancel()
            held = [stub(channel).Generate(request(steps=200), timeout=TIMEOUT) for _ in range(3)]
            for call in held:
                next(call)  # accepted: three calls in flight
            with pytest.raises(grpc.RpcError) as e:
                stub(channel).GetModel(pb2.GetModelRequest(id=MODEL), timeout=TIMEOUT)
            assert e.value.code() == CODE.RESOURCE_EXHAUSTED and "calls in flight" in e.value.details()
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
            for call in held:
                call.cancel()
    finally:
        server.stop()


def _varint(n: int) -> bytes:
    out = b""
    while n >= 0x80:
        out += bytes([n & 0x7F | 0x80])
        n >>= 7
    return out + bytes([n])


# 3. One broken model never breaks another, and a client reads which file is wrong, nothing more.

BROKEN_CONFIGS = {
    "null": b"null",
    "list": b"[1, 2]",
    "latin1": "{\"prompt\": \"caf\xe9\"}".encode("latin-1"),
    "missing-keys": b"{\"format\": \"tav-tuned-model\", \"format_version\": 1}",
    "wrong-type": None,  # the good config with width a string
    "huge": b" " * (2 << 20),
}


def test_broken_model_files_are_skipped_with_a_reason_naming_the_file(tuned_run, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "good").symlink_to(tuned_run, target_is_directory=True)
    good_config = (tuned_run / "tav_config.json").read_text()
    for name, content in BROKEN_CONFIGS.items():
        shutil.copytree(tuned_run, repo / name)
        if content is None:
            content = good_config.replace('"width": 32', '"width": "wide"').encode()
        (repo / name / "tav_config.json").write_bytes(content)
    shutil.copytree(tuned_run, repo / "later")
    server = ServerThread(ServerConfig(repo=repo, port=0, rescan_seconds=0.3))
    try:
        server.wait_ready()
        with Client(server.target) as client:
            listing = client.list_models()
            assert [m.id for m in listing.models] == ["good", "later"]
            assert set(listing.skipped) == set(BROKEN_CONFIGS)
            for name, reason in listing.skipped.items():
                assert reason.startswith("tav_config.json"), (name, reason)
                assert str(tmp_path) not in reason and "Error" not in reason, reason
            assert "not UTF-8" in listing.skipped["latin1"] and "width" in listing.skipped["wrong-type"]
            assert "larger than" in listing.skipped["huge"]
            # broken while serving: the next scan skips it, the others go on
            (repo / "later" / "tav_config.json").write_text("null")
            wait_until(lambda: "later" in client.list_models().skipped)
            assert client.generate("good", PROMPT, steps=1, invert=False, format="png", timeout=TIMEOUT).frames == 8
            with pytest.raises(ServerError) as e:
                client.get_model("later")
            assert e.value.code == CODE.NOT_FOUND and "tav_config.json" in e.value.details
            (repo / "later" / "tav_config.json").write_text(good_config)
            wait_until(lambda: "later" in [m.id for m in client.list_models().models])
            assert client.generate("later", PROMPT, steps=1, invert=False, format="png", timeout=TIMEOUT).frames == 8
    finally:
        server.stop()


def wait_until(condition, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not within the rescan interval"
        time.sleep(0.1)


# 4. A failure of a model is that model's; a failure of the worker ends the process for its supervisor.

def test_a_model_removed_during_warm_up_is_skipped_and_the_rest_serve(tuned_run, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("a", "b", "c"):
        shutil.copytree(tuned_run, repo / name)
    registry = ModelRegistry(repo)
    shutil.rmtree(repo / "b")  # listed, then gone before its engines load
    registry.warm()
    assert registry.ready("a") is not None and registry.ready("c") is not None and registry.ready("b") is None
    registry.scan()
    assert sorted(registry.models) == ["a", "c"] and "b" not in registry.skipped


def test_a_poisoned_device_makes_health_say_so_and_the_server_exit_1(repo, monkeypatch):
    server = ServerThread(ServerConfig(repo=repo, port=0, max_queue=4))
    try:
        server.wait_ready()

        def poisoned(self, *args, **kwargs):  # what a CUDA illegal memory access looks like to the worker
            time.sleep(0.5)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        monkeypatch.setattr(Generator, "generate", poisoned)
        with grpc.insecure_channel(server.target) as channel:
            first = stub(channel).Generate(request(), timeout=TIMEOUT)
            assert next(first).HasField("accepted")  # first in the queue, whatever the load on this machine
            second = stub(channel).Generate(request(), timeout=TIMEOUT)
            assert next(second).HasField("accepted")
            with pytest.raises(grpc.RpcError) as e:
                list(first)
            assert e.value.code() == CODE.INTERNAL and "Error" not in e.value.details()
            events = []
            with pytest.raises(grpc.RpcError) as e:
                events.extend(r.WhichOneof("event") for r in second)
            assert e.value.code() == CODE.UNAVAILABLE and "started" not in events  # safe to retry elsewhere
        server.call(server.server.wait_closed(), timeout=60)
        assert server.server.exit_code == 1
    finally:
        monkeypatch.undo()
        server.stop()


# 5. What is served follows the disk: replaced models reload, removed ones leave and free their engines.

def test_served_models_follow_the_repository(tuned_run, other_run, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(tuned_run, repo / "m")
    shutil.copytree(tuned_run, repo / "n")
    options = dict(steps=2, seed=3, guidance=2.0, invert=False)
    server = ServerThread(ServerConfig(repo=repo, port=0, rescan_seconds=0.3))
    try:
        server.wait_ready()
        registry = server.server.registry
        with Client(server.target) as client:
            before = frames(client.generate("m", PROMPT, format="png", timeout=TIMEOUT, **options))
            np.testing.assert_array_equal(before, local(tuned_run, options))
            # re-created in place with other weights (written beside, then renamed, as a publisher does)
            shutil.copytree(other_run, repo / ".m.new")
            os.rename(repo / "m", repo / ".m.old")
            os.rename(repo / ".m.new", repo / "m")
            wait_until(lambda: client.get_model("m").source_prompt == "a green square is moving right")
            after = frames(client.generate("m", PROMPT, format="png", timeout=TIMEOUT, **options))
            np.testing.assert_array_equal(after, local(other_run, options))
            assert not np.array_equal(before, after)

            # a request running on a model that is removed finishes; then the model is gone, engines and all
            assert registry.ready("n") is not None
            progressed = threading.Event()
            long = threading.Thread(target=lambda: results.append(client.generate(
                "n", PROMPT, steps=40, invert=False, format="png", timeout=TIMEOUT,
                progress=lambda *_: progressed.set())))
            results: list = []
            long.start()
            assert progressed.wait(TIMEOUT)
            shutil.rmtree(repo / "n")
            wait_until(lambda: registry.ready("n") is None)
            long.join(TIMEOUT)
            assert results and results[0].frames == 8
            with pytest.raises(ServerError) as e:
                client.generate("n", PROMPT, steps=1, invert=False, timeout=TIMEOUT)
            assert e.value.code == CODE.NOT_FOUND
    finally:
        server.stop()


def frames(video) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in video.files])


def local(run: Path, options: dict) -> np.ndarray:
    return Generator(load_model(run)).generate(GenerationOptions(PROMPT, **options)).frames


# 6. Nothing blocks the event loop: sizes are checked before work, work runs off the loop, scans are throttled.

def test_huge_prompts_and_big_repositories_never_stall_health(tuned_run, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for i in range(300):
        (repo / f"model-{i:03d}").symlink_to(tuned_run, target_is_directory=True)
    server = ServerThread(ServerConfig(repo=repo, port=0, engine_cache_bytes=1))  # one model in memory at a time
    try:
        server.wait_ready()
        with grpc.insecure_channel(server.target) as channel:
            s = stub(channel)
            list(s.Generate(request(model="model-001"), timeout=TIMEOUT))  # its tokenizer is known ...
            list(s.Generate(request(model="model-000"), timeout=TIMEOUT))  # ... and its engines unloaded
            health = HealthWatch(server.target)
            huge = [s.Generate(request(model="model-001", prompt="a red square " * 400_000), timeout=TIMEOUT)
                    for _ in range(8)]
            listings = [s.ListModels.future(pb2.ListModelsRequest(), timeout=TIMEOUT) for _ in range(20)]
            for call in huge:
                with pytest.raises(grpc.RpcError) as e:
                    list(call)
                assert e.value.code() == CODE.INVALID_ARGUMENT and e.value.details().startswith("prompt:")
            assert all(len(f.result().models) == 300 for f in listings)
            time.sleep(0.5)
            slowest, failures = health.stop()
        assert slowest < 1.0 and not failures, (slowest, failures)
    finally:
        server.stop()


# 8. The smaller things: the running gauge, operator mistakes refused at start, reflection and metrics exposure.

def test_running_gauge_reflection_off_and_metrics_on_loopback(repo):
    server = ServerThread(ServerConfig(repo=repo, port=0, host="0.0.0.0", metrics_port=0, reflection=False))
    try:
        server.wait_ready()
        assert server.server.metrics._http.server_address[0] == "127.0.0.1"
        url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
        with grpc.insecure_channel(server.target) as channel:
            call = stub(channel).Generate(request(steps=200), timeout=TIMEOUT)
            assert [next(call).WhichOneof("event") for _ in range(3)] == ["accepted", "started", "progress"]
            assert "tav_running_requests 1.0" in urllib.request.urlopen(url, timeout=30).read().decode()
            call.cancel()
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            with pytest.raises(grpc.RpcError) as e:
                list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                     timeout=30))
            assert e.value.code() == CODE.UNIMPLEMENTED
        wait_until(lambda: "tav_running_requests 0.0" in urllib.request.urlopen(url, timeout=30).read().decode())
    finally:
        server.stop()


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port must be between 0 and 65535"),
    (["--grace", "-5"], "--grace must be 0 or more"),
    (["--max-request-seconds", "0"], "--max-request-seconds must be positive"),
    (["--max-calls", "0"], "--max-calls must be at least 1"),
    (["--metrics-port", "-1"], "--metrics-port must be between"),
    (["--backend", "tensorrt"], "tensorrt"),
])
def test_operator_mistakes_exit_2_with_the_reason(repo, args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--repo", str(repo), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_second_server_on_a_taken_port_refuses_to_start(repo):
    first = ServeProcess("--repo", str(repo))
    try:
        second = subprocess.run([sys.executable, "-m", "server.serve", "--repo", str(repo), "--port", str(first.port)],
                                capture_output=True, text=True, timeout=TIMEOUT)
        assert second.returncode == 2 and "cannot listen" in second.stderr, second.stderr
    finally:
        first.proc.kill()
        first.proc.wait(30)
