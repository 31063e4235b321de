"""Test helpers for the gRPC server: a model repository of tiny models, a server running in-process on its own
event loop thread (so tests stay plain synchronous code), and raw stubs."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from queue import Empty, Queue

import grpc
from preloaded import start_module
from tuneavideo.v1 import tuneavideo_pb2 as pb2
from tuneavideo.v1 import tuneavideo_pb2_grpc as pb2_grpc

from server.serve import BackgroundServer as ServerThread  # noqa: F401  (the tests' name for it)

MODEL = "square"
OTHER_MODEL = "square.v2"  # the same tuned model under a second id
PROMPT = "a blue square is moving right"
START_TIMEOUT = 300  # seconds: loading and warming the tiny model, on a busy CI machine


def make_repo(root: Path, tuned_run: Path) -> Path:
    """A repository with the tuned tiny model as `square` and `square.v2`, the engine store, and entries that must
    be skipped: a name that is not a model id, a directory that is not a model, a model whose adapter is corrupt."""
    repo = root / "repo"
    repo.mkdir()
    for name in (MODEL, OTHER_MODEL):
        (repo / name).symlink_to(tuned_run, target_is_directory=True)
    (repo / ".engines").mkdir()
    (repo / "Not_An_Id").mkdir()
    (repo / "empty").mkdir()
    broken = repo / "broken"
    shutil.copytree(tuned_run, broken)
    (broken / "adapter.safetensors").write_bytes(b"not safetensors")
    return repo


def request(**fields) -> pb2.GenerateRequest:
    """A small, fast request: the tiny model, no inversion, 1 step, unless `fields` say otherwise."""
    defaults = dict(model=MODEL, prompt=PROMPT, steps=1, seed=1, invert=False, format=pb2.OUTPUT_FORMAT_PNG_FRAMES)
    return pb2.GenerateRequest(**{**defaults, **fields})


def stub(channel: grpc.Channel) -> pb2_grpc.VideoGenerationStub:
    return pb2_grpc.VideoGenerationStub(channel)


def kinds(responses) -> list[str]:
    """The event kind of each response of a Generate stream."""
    return [r.WhichOneof("event") for r in responses]


def files(responses) -> list[bytes]:
    """The result files of a Generate stream, reassembled from its chunks."""
    out: dict[int, bytes] = {}
    for r in responses:
        if r.HasField("chunk"):
            assert r.chunk.offset == len(out.get(r.chunk.file, b"")) and len(r.chunk.data) <= 1 << 20
            out[r.chunk.file] = out.get(r.chunk.file, b"") + r.chunk.data
    return [out[i] for i in sorted(out)]


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost signed by it, made with the openssl CLI:
    (ca.pem, server.pem, server.key)."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=tav-test-ca")
    openssl("req", *key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (directory / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "1", "-extfile", "san.cnf")
    return directory / "ca.pem", directory / "server.pem", directory / "server.key"


class ServeProcess:
    """`tav-serve` in a subprocess on a free port, its log collected by a reader thread."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = start_module("server.serve", ["--port", "0", *args], stderr=subprocess.PIPE, env=env)
        self.lines: Queue = Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.port = int(self.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put(None)  # the log's end: the server and every process it started have exited

    def terminate(self, timeout: float = 60) -> int:
        """Stop the server as an operator does (SIGTERM); its exit code, once its whole log has been read."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        while (line := self.lines.get(timeout=timeout)) is not None:
            self.log.append(line)
        return code

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=max(0.0, min(1.0, end - time.monotonic())))
            except Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line is None:
                self.lines.put(None)  # for `terminate`
                break
            self.log.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"no {pattern!r} in the server's log:\n{''.join(self.log)}")
