"""A replica no client or file can stop or exhaust (issue 31): deeply nested JSON anywhere the server and workers
parse it, background loops that outlive their errors, refused large requests that leave no memory behind, uploads
decoded at the job's size, and numeric flags whose mistakes are one-line errors naming the flag. Each test failed on
the code before its fix; servers are real `tav-serve` processes where the process's fate or memory is the point."""

from __future__ import annotations

import contextlib
import gc
import json
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import redis
from grpc_helpers import MODEL, OTHER_MODEL, ServeProcess, ServerThread, request, stub
from tools import require_tool
from tuneavideo.v1 import tuneavideo_pb2 as pb2
from tuneavideo.v1 import tuning_pb2, tuning_pb2_grpc

from jobs import celery_worker
from jobs.bases import load_base
from jobs.spec import Job
from server import serve
from server.registry import ModelRegistry
from server.serve import ServerConfig
from tuner.components import BaseModelError, check_base_dir

DEEP = b"[" * 200_000 + b"]" * 200_000  # 400 kB: under the 1 MiB bound on JSON files, 200 000 levels deep
DEEP_REASON = "nests deeper than 64 levels"


def wait_until(condition, seconds: float = 120, every: float = 0.2):
    """`condition()`'s first true value within `seconds` (generous: the clock is not what these tests measure)."""
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(every)
    return value


def deep_model(tuned_run: Path, path: Path, file: str) -> Path:
    """A copy of the tuned model whose `file` (relative to it) is the deeply nested document."""
    shutil.copytree(tuned_run, path)
    (path / file).parent.mkdir(exist_ok=True)
    (path / file).write_bytes(DEEP)
    return path


# 1. Deeply nested JSON is a reason naming the file, wherever it is parsed.

def test_a_deeply_nested_model_file_skips_that_model_with_a_reason_naming_the_file(tuned_run, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / MODEL).symlink_to(tuned_run, target_is_directory=True)
    deep_model(tuned_run, repo / "deep-config", "tav_config.json")
    deep_model(tuned_run, repo / "deep-manifest", "engines/manifest.json")
    torch_view = ModelRegistry(repo)
    assert torch_view.skipped_models() == {"deep-config": f"tav_config.json {DEEP_REASON}"}
    assert {e.id for e in torch_view.entries()} == {MODEL, "deep-manifest"}  # the torch backend reads no engines
    onnx_view = ModelRegistry(repo, backend="onnxruntime")
    assert onnx_view.skipped_models() == {"deep-config": f"tav_config.json {DEEP_REASON}",
                                          "deep-manifest": f"engines/manifest.json {DEEP_REASON}",
                                          MODEL: "no onnxruntime engines (run tav-export)"}


def test_deeply_nested_base_configs_and_job_records_are_errors_naming_them(tiny_base, tmp_path):
    base = shutil.copytree(tiny_base, tmp_path / "base")
    (base / "vae" / "config.json").write_bytes(DEEP)
    with pytest.raises(ValueError, match=f"vae/config.json {DEEP_REASON}"):
        load_base("deep", str(base))
    (base / "unet" / "config.json").write_bytes(DEEP)
    with pytest.raises(BaseModelError, match=f"unet/config.json {DEEP_REASON}"):
        check_base_dir(base)
    record = Job("j", "m", "b", "s", "a caption", {"steps": 1}).to_fields()
    with pytest.raises(ValueError, match=f"job record field settings {DEEP_REASON}"):
        Job.from_fields({**record, "settings": DEEP.decode()})
    assert Job.from_fields(record).settings == {"steps": 1}


def listing(channel: grpc.Channel) -> tuple[set[str], dict[str, str]]:
    """The served ids and the skipped ids with their reasons."""
    answer = stub(channel).ListModels(pb2.ListModelsRequest(), timeout=60)
    return {m.id for m in answer.models}, {s.id: s.reason for s in answer.skipped}


def test_a_server_starts_and_keeps_rescanning_with_deeply_nested_files_in_its_repository(tuned_run, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in (MODEL, OTHER_MODEL):
        (repo / name).symlink_to(tuned_run, target_is_directory=True)
    deep_model(tuned_run, repo / "deep-config", "tav_config.json")
    server = ServeProcess("--repo", str(repo), "--rescan-seconds", "0.5")  # exited 1 (RecursionError) before
    try:
        server.wait_for("serving ")
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            assert listing(channel) == ({MODEL, OTHER_MODEL}, {"deep-config": f"tav_config.json {DEEP_REASON}"})
            deep_model(tuned_run, repo / "late-deep", "tav_config.json")  # at runtime: ended the rescan before
            wait_until(lambda: "late-deep" in listing(channel)[1])
            (repo / "later").symlink_to(tuned_run, target_is_directory=True)
            (repo / OTHER_MODEL).unlink()
            assert wait_until(lambda: listing(channel)[0] == {MODEL, "later"})
            with pytest.raises(grpc.RpcError) as e:
                list(stub(channel).Generate(request(model="late-deep"), timeout=60))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert f"tav_config.json {DEEP_REASON}" in e.value.details()
            assert "Error" not in e.value.details()
            assert list(stub(channel).Generate(request(model="later"), timeout=300))[-1].chunk.last
        assert server.proc.poll() is None
    finally:
        assert server.terminate() == 0


# 2. No background loop ends on an exception: it logs, counts and goes on.

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_url(tmp_path):
    """A throwaway redis-server on loopback."""
    port = free_port()
    proc = subprocess.Popen([require_tool("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", str(tmp_path), "--save", ""],
                            stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"

    def answers() -> bool:
        with contextlib.suppress(redis.ConnectionError), redis.Redis.from_url(url, socket_timeout=1) as client:
            return client.ping()
        return False

    try:
        wait_until(answers, 60)
        yield url
    finally:
        proc.kill()
        proc.wait(30)


def background_errors(metrics: str, loop: str) -> float:
    match = re.search(rf'^tav_background_errors_total{{loop="{loop}"}} (\S+)$', metrics, re.M)
    return float(match.group(1)) if match else 0.0


def test_a_failing_background_round_is_logged_and_counted_and_the_loops_go_on(tuned_run, tmp_path, redis_url):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / MODEL).symlink_to(tuned_run, target_is_directory=True)
    # the sweep reads running jobs once it has watched Redis reachable for --worker-dead-after (60 s by default)
    server = ServeProcess("--repo", str(repo), "--broker", redis_url, "--rescan-seconds", "0.5", "--metrics-port", "0",
                          "--worker-dead-after", "1")
    try:
        server.wait_for("serving ")
        metrics_port = int(next(m.group(1) for line in server.log
                                if (m := re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", line))))
        # a running job whose record no reader can parse: every sweep round fails on it
        with redis.Redis.from_url(redis_url) as client:
            record = Job("poison", "poisoned", "shapes-sd", "s", "a caption", {"steps": 1}, state="tuning")
            client.hset("tav:job:poison", mapping={**record.to_fields(), "settings": DEEP})
            client.sadd("tav:running", "poison")

        def scrape() -> str:
            return urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read().decode()

        wait_until(lambda: background_errors(scrape(), "job_sweep") >= 3)  # several rounds: the loop went on
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            (repo / "later").symlink_to(tuned_run, target_is_directory=True)
            (repo / MODEL).unlink()
            assert wait_until(lambda: listing(channel)[0] == {"later"})
        assert background_errors(scrape(), "rescan") == 0
    finally:
        assert server.terminate() == 0
    assert any(f"job record field settings {DEEP_REASON}" in line for line in server.log)


def test_a_tuning_worker_s_control_loop_outlives_requests_it_cannot_read(tmp_path, redis_url):
    """A control request of deeply nested JSON, then one without its fields, then the wake-up of a recorded
    deletion: the worker does the deletion and answers it (before, the first ended its control loop with a
    RecursionError: no deletion was done or answered again)."""
    repo = tmp_path / "repo"
    (repo / "doomed").mkdir(parents=True)
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "jobs.celery_worker", "--broker", redis_url, "--repo", str(repo),
                               "--device", "cpu", "--name", "w"], stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        with redis.Redis.from_url(redis_url) as client:
            client.sadd("tav:deletions", "doomed")
            client.rpush("tav:control", DEEP, b"{}", b'{"delete_model": "doomed", "reply": "tav:reply:t"}')
            answer = wait_until(lambda: client.lpop("tav:reply:t"), 300)  # the worker starts (imports torch) meanwhile
        assert json.loads(answer) == {"deleted": True}
        assert not (repo / "doomed").exists()
        assert f"a control request {DEEP_REASON}" in log.read_text()
    finally:
        worker.terminate()
        worker.wait(60)


# 3. A refused request leaves nothing behind, however large it was.

def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def idle_rss_mib(pid: int) -> float:
    """The server's resident memory once it has settled after the last answer (two readings 1 s apart agree)."""
    last, now = 0.0, rss_mib(pid)
    while abs(now - last) > 2:
        time.sleep(1.0)
        last, now = now, rss_mib(pid)
    return now


def test_refused_large_requests_leave_the_server_s_memory_where_the_first_left_it(tuned_run, tmp_path):
    """Each round sends three refused 60 MiB requests: a Generate with an invalid field, the same gzip-compressed
    (60 KB on the wire), a CreateTuneJob with an invalid caption. After 12 rounds the idle server is within 100 MB
    of where one round left it (each refusal kept about 120 MB before: its request lived on in the traceback of
    the abort raised while handling it); the test ends at the first round past that."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / MODEL).symlink_to(tuned_run, target_is_directory=True)
    clip = bytes(60 << 20)
    generate = request(frames=0, source_video=clip)
    create = tuning_pb2.CreateTuneJobRequest(model_id="refused", caption=" ", video=clip)
    server = ServeProcess("--repo", str(repo), "--rescan-seconds", "0.5")  # its watch loop gives memory back
    try:
        server.wait_for("serving ")
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            calls = [(lambda: list(stub(channel).Generate(generate, timeout=120)), "frames"),
                     (lambda: list(stub(channel).Generate(generate, timeout=120, compression=grpc.Compression.Gzip)),
                      "frames"),
                     (lambda: tuning_pb2_grpc.TuningStub(channel).CreateTuneJob(create, timeout=120), "caption")]
            first = None
            for _ in range(12):
                for call, field in calls:
                    with pytest.raises(grpc.RpcError) as e:
                        call()
                    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()
                rss = idle_rss_mib(server.proc.pid)
                first = rss if first is None else first
                assert rss - first < 100, f"{rss - first:.0f} MiB more than after the first round"
        print(f"idle RSS after the first round {first:.0f} MiB, after the last {rss:.0f} MiB")
    finally:
        assert server.terminate() == 0


def test_nothing_keeps_a_refused_request_alive(tuned_run, tmp_path):
    """With the garbage collector off, no request message of a refused call outlives its call: before, the abort
    raised while handling the refusal kept the request in a reference cycle with grpc's call state."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / MODEL).symlink_to(tuned_run, target_is_directory=True)
    server = ServerThread(ServerConfig(repo=repo, port=0))
    try:
        server.wait_ready()
        sent = [request(frames=0, source_video=b"\0" * 1024),
                tuning_pb2.CreateTuneJobRequest(model_id="refused", caption=" ", video=b"\0" * 1024)]
        gc.collect()
        gc.disable()
        with grpc.insecure_channel(server.target) as channel:
            for _ in range(3):
                with pytest.raises(grpc.RpcError):
                    list(stub(channel).Generate(sent[0], timeout=60))
                with pytest.raises(grpc.RpcError):
                    tuning_pb2_grpc.TuningStub(channel).CreateTuneJob(sent[1], timeout=60)
        kinds = (pb2.GenerateRequest, tuning_pb2.CreateTuneJobRequest)
        alive = [o for o in gc.get_objects() if type(o) in kinds and not any(o is m for m in sent)]
        assert not alive, f"{len(alive)} refused requests are still alive"
    finally:
        gc.enable()
        server.stop()


# 4. The tuner decodes an upload at the job's size, keeping only the frames it tunes on.

def gif_bomb(width: int, height: int, frames: int) -> bytes:
    """A GIF of a few hundred bytes whose frames are each a width x height canvas holding one 1x1 image."""
    screen = b"GIF89a" + struct.pack("<HH", width, height) + bytes([0x80, 0, 0]) + b"\0\0\0\xff\xff\xff"
    loop = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    frame = (b"\x21\xf9\x04\x00\x0a\x00\x00\x00" + b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\0"
             + b"\x02\x02\x44\x01\x00")
    return screen + loop + frame * frames + b"\x3b"


TUNE_PEAK = """
import resource, sys
from pathlib import Path
from tuner.tune import TuneSettings, tune
clip = Path(sys.argv[2]).read_bytes()
settings = TuneSettings(frames=8, width=32, height=32, steps=1)
tune(sys.argv[1], clip, "a white dot", sys.argv[3], settings, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_an_upload_declaring_huge_frames_is_tuned_from_frames_decoded_at_the_job_s_size(tiny_base, tmp_path):
    """A 407-byte GIF declaring 16 frames of 4096x4096 (805 MB decoded, within the decoding bounds) tunes at
    32x32 with the peak memory of a 16-frame 64x64 GIF, give or take 400 MB (it took 1.6 GB more before: every
    frame was decoded and kept at full size)."""
    peaks = {}
    for name, size in (("small", 64), ("bomb", 4096)):
        clip = tmp_path / f"{name}.gif"
        clip.write_bytes(gif_bomb(size, size, 16))
        done = subprocess.run([sys.executable, "-c", TUNE_PEAK, str(tiny_base), str(clip), str(tmp_path / name)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        peaks[name] = int(done.stdout.split()[-1])
    assert len(gif_bomb(4096, 4096, 16)) == 407
    assert peaks["bomb"] - peaks["small"] < 400, peaks
    print(f"peak resident MiB of tuning: {peaks}")


# 5. Numeric flags: a mistake is exit 2 and one line naming the flag, never a traceback.

@pytest.mark.parametrize("args, message", [
    (["--max-request-seconds", "inf"], "--max-request-seconds must be positive and finite, got inf"),
    (["--max-connection-age", "inf"], "--max-connection-age must be positive and finite, got inf"),
    (["--engine-cache-gb", "inf"], "--engine-cache-gb must be positive and finite, got inf"),
    (["--engine-cache-gb", "nan"], "--engine-cache-gb must be positive and finite, got nan"),
    (["--worker-dead-after", "0"], "--worker-dead-after must be positive and finite, got 0.0"),
    (["--max-job-seconds", "inf", "--broker", "redis://127.0.0.1:1/0"],
     "--max-job-seconds must be positive and finite, got inf"),
    (["--rescan-seconds", "nan"], "--rescan-seconds must be positive and finite, got nan"),
])
def test_a_bad_number_for_the_server_exits_2_naming_the_flag(tmp_path, args, message, capsys):
    with pytest.raises(SystemExit) as e:
        serve.main(["--repo", str(tmp_path), *args])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"tav-serve: error: {message}"


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1"])
def test_a_bad_job_time_for_the_worker_exits_2_naming_the_flag(tmp_path, value, capsys):
    with pytest.raises(SystemExit) as e:
        celery_worker.main(["--broker", "redis://127.0.0.1:1/0", "--repo", str(tmp_path), "--max-job-seconds", value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("tav-tune-worker: error: --max-job-seconds must be positive and finite, got ")
