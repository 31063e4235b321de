"""The tuning worker's promises beyond a single job, on real server processes: with no broker, queued clips wait
on disk (the server's memory does not grow with them) and a server killed with `kill -9` finds its jobs again on
restart; a hung export fails its job at the job time limit and the worker takes the next; the worker exports what
the replicas serve (`--export onnx,aoti`: a `--backend aoti` server serves the model it tuned), and refuses at
start an export it cannot build (TensorRT without a GPU).

Exports of the tiny base are seeded into each repository from the session's engine store and AOTInductor packages
(conftest's `paper_engine_store` and `aoti_repo`), so no test here builds the base graphs or compiles a package again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from grpc_helpers import ServeProcess
from test_tuning import CAPTION, SMALL, TIMEOUT, leftovers, wait_until

from clients import Client
from jobs.local import CLIP, JOBS_DIR, RECORD
from server.interceptors import TRIM_AFTER_BYTES
from server.registry import read_entry
from tuner.artefacts import ArtefactError
from tuner.io_utils import file_lock

# The architecture of the suite's tuned models (`tuned_run`, test_aoti's), so the seeded store entries fit.
TINY = {**SMALL, "frame_positions": "none"}
MIB = 1 << 20


def seeded_repo(tmp_path: Path, *stores: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    for store in stores:
        shutil.copytree(store, repo / ".engines", dirs_exist_ok=True)
    return repo


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def gone(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie that no one reaped counts as exited)."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def padded_clip(clip: bytes, size: int) -> bytes:
    """`clip` (an MP4) grown to `size` bytes by a trailing `free` box: the same video, a large message."""
    pad = size - len(clip)
    return clip + struct.pack(">I", pad) + b"free" + bytes(pad - 8)


def record(repo: Path, job_id: str) -> dict:
    return json.loads((repo / JOBS_DIR / job_id / RECORD).read_text())


def test_queued_clips_wait_on_disk_not_in_the_servers_memory(tiny_base, clip_path, tmp_path):
    """Eleven 20 MiB clips queued behind a running job: from the first to the eleventh the server's RSS settles
    below the receive buffers it may not have given back yet (up to TRIM_AFTER_BYTES) and two clips, half of the
    ten (it grew by all of them when the local store held them in memory); each is a file of its job's directory,
    gone once the job ends."""
    repo = tmp_path / "repo"
    repo.mkdir()
    server = ServeProcess("--repo", str(repo), "--base", f"tiny={tiny_base}", "--max-queued-jobs", "12")
    big = padded_clip(clip_path.read_bytes(), 20 * MIB)
    try:
        server.wait_for("tuning service serving")
        with Client(f"127.0.0.1:{server.port}", retries=0) as client:
            running = client.create_tune_job("busy", clip_path.read_bytes(), CAPTION, base="tiny",
                                             **{**TINY, "steps": 2000})
            wait_until(lambda: client.get_tune_job(running.id).state == "tuning", TIMEOUT)
            queued = [client.create_tune_job("queued-0", big, CAPTION, base="tiny", **TINY)]
            first = rss_bytes(server.proc.pid)
            queued += [client.create_tune_job(f"queued-{i}", big, CAPTION, base="tiny", **TINY) for i in range(1, 11)]
            # What the last calls received is given back once the server is idle (its memory round, every few
            # seconds); a store that kept the clips in memory stays 200 MiB up however long it waits.
            bound, deadline = TRIM_AFTER_BYTES + 2 * len(big), time.monotonic() + TIMEOUT
            while (growth := rss_bytes(server.proc.pid) - first) >= bound and time.monotonic() < deadline:
                time.sleep(0.5)
            assert growth < bound, f"the server's RSS stayed {growth / MIB:.0f} MiB up over 10 queued clips"
            assert [client.get_tune_job(job.id).state for job in queued] == ["queued"] * 11
            assert all((repo / JOBS_DIR / job.id / CLIP).read_bytes() == big for job in queued)
            for job in [running, *queued]:
                client.cancel_tune_job(job.id)
            wait_until(lambda: client.get_tune_job(running.id).state == "cancelled", 60)
            assert not list((repo / JOBS_DIR).glob(f"*/{CLIP}")), "an ended job keeps no clip"
            assert record(repo, queued[0].id)["state"] == "cancelled"
    finally:
        server.proc.kill()
        server.proc.wait(30)


def test_a_server_killed_with_its_jobs_finds_them_on_restart(tiny_base, clip_path, tmp_path, paper_engine_store):
    """`kill -9` the server while one job tunes and another waits: its worker ends with it (no second writer),
    and the server started again on the repository runs the running job again under its next attempt and the
    queued one to READY, in their order."""
    repo = seeded_repo(tmp_path, paper_engine_store[0])
    args = ("--repo", str(repo), "--base", f"tiny={tiny_base}", "--rescan-seconds", "0.5")
    server = ServeProcess(*args)
    try:
        server.wait_for("tuning service serving")
        with Client(f"127.0.0.1:{server.port}", retries=0) as client:
            long = client.create_tune_job("long", clip_path.read_bytes(), CAPTION, base="tiny",
                                          **{**TINY, "steps": 2000})
            waiting = client.create_tune_job("waiting", clip_path.read_bytes(), CAPTION, base="tiny", **TINY)
            tuning = wait_until(lambda: (job := client.get_tune_job(long.id)).step >= 1 and job, TIMEOUT)
        worker = int(tuning.worker.removeprefix("local-"))
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(30)
        wait_until(lambda: gone(worker), 60)  # the worker saw its pipe close and ended
        assert record(repo, waiting.id)["state"] == "queued"

        server = ServeProcess(*args)
        server.wait_for("tuning service serving")
        assert any("tune jobs read back" in line for line in server.log), "".join(server.log)
        with Client(f"127.0.0.1:{server.port}", retries=0) as client:
            again = client.get_tune_job(long.id)
            assert again.attempt == 2 and again.state in ("queued", "tuning"), again
            assert client.get_tune_job(waiting.id).state == "queued"
            client.cancel_tune_job(long.id)
            ended = client.wait_tune_job(waiting.id, timeout=TIMEOUT)
            assert ended.state == "ready", ended
            assert client.get_tune_job(long.id).state == "cancelled"
        assert (repo / "waiting").is_dir() and not (repo / "long").exists() and leftovers(repo) == []
        assert record(repo, waiting.id)["exports"] == "onnx:fp32"
        with pytest.raises(ArtefactError, match=r"exported for onnxruntime only .*add aoti"):
            read_entry(repo / "waiting", "aoti")  # what an aoti replica says of a model exported for ONNX only
    finally:
        server.proc.kill()
        server.proc.wait(30)


def test_a_hung_export_fails_its_job_at_the_time_limit_and_the_worker_takes_the_next(
        tiny_base, clip_path, tmp_path, paper_engine_store):
    """The test holds the lock of the engine store entry the jobs' exports need, as a frozen worker would: the
    first job's export waits for it forever and the job fails at `--max-job-seconds` saying so, nothing of it
    published or left behind; the worker takes the next job (it tunes it and starts its export, which waits on the
    same lock), and a cancel stops that export too. The limit is passed, never raced: the only work that must fit
    in it is a tiny job's tuning (3 s at load average 6 on 2 cores; the limit is 10x that)."""
    store, key = paper_engine_store
    repo = seeded_repo(tmp_path, store)
    server = ServeProcess("--repo", str(repo), "--base", f"tiny={tiny_base}", "--rescan-seconds", "0.5",
                          "--max-job-seconds", "30")
    try:
        server.wait_for("tuning service serving")
        with Client(f"127.0.0.1:{server.port}", retries=0) as client, \
                file_lock(repo / ".engines" / f".{key}.lock"):
            hung = client.create_tune_job("hung", clip_path.read_bytes(), CAPTION, base="tiny", **TINY)
            after = client.create_tune_job("after", clip_path.read_bytes(), CAPTION, base="tiny", **TINY)
            ended = client.wait_tune_job(hung.id, timeout=TIMEOUT)
            assert ended.state == "failed" and "maximum job time" in ended.failure_reason, ended
            assert not (repo / "hung").exists()
            wait_until(lambda: client.get_tune_job(after.id).state == "exporting", 150)
            client.cancel_tune_job(after.id)
            assert client.wait_tune_job(after.id, timeout=TIMEOUT).state == "cancelled"
            assert not (repo / "after").exists() and leftovers(repo) == []
    finally:
        server.proc.kill()
        server.proc.wait(30)


def test_a_worker_exporting_aoti_publishes_what_an_aoti_replica_serves(tiny_base, clip_path, tmp_path, aoti_repo,
                                                                        paper_engine_store):
    """`--export onnx,aoti` on the local worker of a `--backend aoti` server on CPU: the job records its exports,
    the model's manifest lists both backends, the packages are the store's (reused, not compiled again) and the
    server generates from the model it tuned."""
    aoti_store = aoti_repo[0] / ".engines"
    repo = seeded_repo(tmp_path, paper_engine_store[0], aoti_store)
    entries = sorted(p.name for p in (repo / ".engines").iterdir())
    server = ServeProcess("--repo", str(repo), "--base", f"tiny={tiny_base}", "--rescan-seconds", "0.5",
                          "--backend", "aoti", "--device", "cpu", "--export", "onnx,aoti")
    try:
        server.wait_for("tuning service serving")
        with Client(f"127.0.0.1:{server.port}", retries=0) as client:
            job = client.tune("both", clip_path.read_bytes(), CAPTION, base="tiny", timeout=TIMEOUT, **TINY)
            assert job.state == "ready", job
            assert record(repo, job.id)["exports"] == "onnx:fp32,aoti:fp32"
            manifest = json.loads((repo / "both" / "engines" / "manifest.json").read_text())
            assert manifest["backends"] == ["onnxruntime", "aoti"] and list(manifest["aoti"]) == ["cpu"]
            assert sorted(p.name for p in (repo / ".engines").iterdir()
                          if not p.name.startswith(".")) == [e for e in entries if not e.startswith(".")]
            wait_until(lambda: "both" in [m.id for m in client.list_models().models], 30)
            assert client.generate("both", CAPTION, steps=1, format="png", timeout=TIMEOUT).frames == 8
    finally:
        server.proc.kill()
        server.proc.wait(30)


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "jobs.celery_worker", "--broker", "redis://127.0.0.1:9/0", "--device", "cpu"],
    [sys.executable, "-m", "server.serve", "--device", "cpu"],
], ids=["tav-tune-worker", "tav-serve"])
def test_an_export_the_machine_cannot_build_is_refused_at_start(command, tmp_path):
    """TensorRT plans need a GPU and tensorrt: a worker asked for them exits 2 at start saying so (never at its
    first job); a malformed `--export` exits 2 naming the flag."""
    for export_flag, expected in [("onnx,tensorrt", r"--export: .*tensorrt"), ("onnx:bf16", r"--export: .*bf16")]:
        result = subprocess.run([*command, "--repo", str(tmp_path), "--export", export_flag], capture_output=True,
                                text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
        assert re.search(expected, result.stderr.strip().splitlines()[-1]), result.stderr[-2000:]


def test_a_job_record_written_before_exports_were_recorded_still_loads():
    """Records in Redis (or on disk) from workers before `exports` existed lack the field: they load, with it
    empty, and everything else as written."""
    from jobs.spec import Job

    job = Job("j1", "model", "shapes-sd", "src", "a caption", {"steps": 3}, state="tuning", exports="onnx:fp32")
    fields = job.to_fields()
    del fields["exports"]
    old = Job.from_fields({k.encode(): str(v).encode() for k, v in fields.items()})
    assert old.exports == "" and old.to_fields() == {**job.to_fields(), "exports": ""}


def test_records_before_imports_are_tune_jobs_and_an_import_is_refused_by_a_worker_that_only_tunes():
    """A record from before import jobs lacks `import_source`: it loads as the tune job it is. An import job's
    record carries a setting no tuning settings have, so a worker older than imports, which reads every record as
    a tune job (`tune_settings`), refuses it saying to upgrade instead of tuning an empty clip."""
    from jobs.spec import IMPORT_SETTING, Job, UnreadableRecord

    tune = Job("j1", "model", "shapes-sd", "src", "a caption", {"steps": 3})
    fields = tune.to_fields()
    del fields["import_source"]
    old = Job.from_fields(fields)
    assert old.import_source == "" and old.tune_settings().steps == 3
    imported = Job.from_fields(Job("j2", "skiing", "", "", "", {IMPORT_SETTING: True},
                                   import_source="owner/name").to_fields())
    assert imported.import_source == "owner/name"
    with pytest.raises(UnreadableRecord, match="upgrade the worker"):
        imported.tune_settings()
