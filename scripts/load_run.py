"""The load run: N concurrent clients send a fixed number of Generate requests to one `tav-serve` replica with a
small queue. It passes when every request either completes (a whole result) or is refused RESOURCE_EXHAUSTED,
no call hangs past its deadline, and the replica's resident memory after the run is within a stated bound of
its memory before (measured after a warm-up, so one-time allocations do not count). Writes the measurements as
JSON: requests, concurrency, outcomes by status code, latency percentiles, memory before, peak and after.

    python scripts/load_run.py --tiny /tmp/tav-load --clients 8 --requests 300 --out load_run.json
    python scripts/load_run.py --repo runs/demo/repo --model NAME --frames 8 --steps 10 ...

`--tiny DIR` builds (once) a repository holding the tiny model tuned at 32x32 px. The replica is started by this
script on a free loopback port and stopped with SIGTERM at the end. tests/test_reliability.py runs a short
version in CI and this long one under the `slow` marker. Exit status: 0 when the run passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
from tuneavideo.v1 import tuneavideo_pb2 as pb2
from tuneavideo.v1 import tuneavideo_pb2_grpc as pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 300.0  # seconds for a replica to load and warm its models on a busy machine
PROMPT = "a blue square is moving right"
ACCEPTABLE = {"OK", "RESOURCE_EXHAUSTED"}


class Replica:
    """One `tav-serve` process on a free loopback port, its log collected for the caller to search."""

    def __init__(self, repo: Path, *args: str) -> None:
        command = [sys.executable, "-m", "server.serve", "--repo", str(repo), "--port", "0", *args]
        self.proc = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._lines: list[str] = []
        self._ended = False
        self._changed = threading.Condition()
        threading.Thread(target=self._read, name=f"tav-serve-log-{self.proc.pid}", daemon=True).start()
        self.port: int | None = None

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    @property
    def log(self) -> str:
        with self._changed:
            return "".join(self._lines)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first line of the log so far, or to come within `timeout` seconds, that matches `pattern`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self._lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self._lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._ended:
                    tail = "".join(self._lines[-30:])
                    raise TimeoutError(f"no {pattern!r} in the log of tav-serve (pid {self.proc.pid}):\n{tail}")
                self._changed.wait(min(remaining, 1.0))

    def wait_serving(self, timeout: float = START_TIMEOUT) -> Replica:
        """Wait until the replica listens and its models are warm; sets `port`."""
        self.port = int(self.wait_for(r"listening on 127\.0\.0\.1:(\d+)", timeout).group(1))
        self.wait_for(r"INFO tav-serve: serving ", timeout)
        return self

    def rss_bytes(self) -> int:
        """Resident memory of the process (Linux)."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (drain), then SIGKILL if it has not exited within `timeout`; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode


def make_tiny_repo(root: Path) -> Path:
    """A repository under `root` with the tiny model tuned on a shapes-world clip as `square` (built once)."""
    from tuner.shapes.world import make_clip
    from tuner.tiny import make_tiny
    from tuner.tune import TuneSettings, tune
    from tuner.video_io import write_video

    repo = root / "repo"
    if (repo / "square").is_dir():
        return repo
    root.mkdir(parents=True, exist_ok=True)
    base = root / "tiny-sd" if (root / "tiny-sd").is_dir() else make_tiny(root / "tiny-sd")
    frames, caption, _ = make_clip("red", "square", "white", "right", frames=12)
    write_video(root / "source.mp4", frames, fps=8)
    settings = TuneSettings(frames=8, width=32, height=32, steps=4, lr=1e-3, seed=1)
    tune(base, root / "source.mp4", caption, repo / "square", settings, progress=False)
    return repo


def generate(stub: pb2_grpc.VideoGenerationStub, request: pb2.GenerateRequest, timeout: float) -> str:
    """One Generate call: its final status code's name, "OK" only for a whole result."""
    try:
        last = False
        for response in stub.Generate(request, timeout=timeout):
            last = response.HasField("chunk") and response.chunk.last
        return "OK" if last else "INCOMPLETE"
    except grpc.RpcError as e:
        return e.code().name


def percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": round(p50, 4), "p90": round(p90, 4), "p99": round(p99, 4), "max": round(max(values), 4)}


def run_load(target: str, request: pb2.GenerateRequest, clients: int, requests: int, timeout: float,
             think: float) -> tuple[list[tuple[str, float]], float, int]:
    """`clients` threads, each on its own channel, send `requests` calls in all (a client pauses `think` seconds
    between calls). Returns (code, seconds) per call, the wall time, and how many threads were still running
    when every call should have ended (hangs)."""
    numbers = itertools.count()
    outcomes: list[tuple[str, float]] = []
    lock = threading.Lock()

    def client() -> None:
        with grpc.insecure_channel(target) as channel:
            stub = pb2_grpc.VideoGenerationStub(channel)
            while next(numbers) < requests:
                start = time.perf_counter()
                code = generate(stub, request, timeout)
                with lock:
                    outcomes.append((code, time.perf_counter() - start))
                time.sleep(think)

    threads = [threading.Thread(target=client, name=f"load-client-{i}", daemon=True) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    rounds = -(-requests // clients)  # each call ends by its deadline, so the whole run ends by this bound
    deadline = time.monotonic() + rounds * (timeout + think) + 30
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    wall = time.perf_counter() - started
    with lock:
        return list(outcomes), wall, sum(thread.is_alive() for thread in threads)


class PeakSampler:
    """Samples a replica's resident memory every `interval` seconds in the background; keeps the peak."""

    def __init__(self, replica: Replica, interval: float = 0.2) -> None:
        self.peak = replica.rss_bytes()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(interval) and replica.proc.poll() is None:
                self.peak = max(self.peak, replica.rss_bytes())

        self._thread = threading.Thread(target=sample, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(10)
        return self.peak


def load_run(args: argparse.Namespace) -> dict:
    repo = make_tiny_repo(args.tiny) if args.tiny else args.repo
    replica = Replica(repo, "--max-queue", str(args.max_queue), "--grace", "30")
    mib = 1 / 2**20
    try:
        replica.wait_serving()
        with grpc.insecure_channel(replica.target) as channel:
            stub = pb2_grpc.VideoGenerationStub(channel)
            model = args.model or stub.ListModels(pb2.ListModelsRequest(), timeout=60).models[0].id
            request = pb2.GenerateRequest(model=model, prompt=PROMPT, frames=args.frames, steps=args.steps, seed=1,
                                          invert=args.invert, format=pb2.OUTPUT_FORMAT_PNG_FRAMES)
            warmup = [generate(stub, request, args.timeout) for _ in range(args.warmup)]
        if set(warmup) != {"OK"}:
            raise RuntimeError(f"the warm-up requests failed: {warmup}")
        before = replica.rss_bytes()
        sampler = PeakSampler(replica)
        outcomes, wall, hung = run_load(replica.target, request, args.clients, args.requests, args.timeout,
                                        args.think)
        peak = sampler.stop()
        time.sleep(args.settle)
        after = replica.rss_bytes()
    finally:
        exit_code = replica.stop()
    by_code = Counter(code for code, _ in outcomes)
    growth = (after - before) * mib
    failures = []
    if set(by_code) - ACCEPTABLE:
        failures.append(f"statuses other than OK and RESOURCE_EXHAUSTED: {dict(by_code)}")
    if hung or len(outcomes) != args.requests:
        failures.append(f"{hung} clients hung; {len(outcomes)} of {args.requests} calls ended")
    if growth > args.max_growth_mib:
        failures.append(f"memory grew by {growth:.1f} MiB, more than {args.max_growth_mib} MiB")
    if exit_code != 0:
        failures.append(f"the replica exited with {exit_code} after SIGTERM")
    ok = [seconds for code, seconds in outcomes if code == "OK"]
    return {
        "config": {
            "clients": args.clients, "requests": args.requests, "max_queue": args.max_queue, "model": model,
            "frames": args.frames, "steps": args.steps, "invert": args.invert, "timeout_s": args.timeout,
            "think_s": args.think, "warmup_requests": args.warmup,
        },
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version()},
        "wall_s": round(wall, 2),
        "completed_per_s": round(len(ok) / wall, 3),
        "by_code": dict(sorted(by_code.items())),
        "latency_s": {code: percentiles([s for c, s in outcomes if c == code]) for code in sorted(by_code)},
        "hung_clients": hung,
        "memory_mib": {"before": round(before * mib, 1), "peak": round(peak * mib, 1), "after": round(after * mib, 1),
                       "growth": round(growth, 1), "bound": args.max_growth_mib},
        "replica_exit_code": exit_code,
        "passed": not failures,
        "failures": failures,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--repo", type=Path, help="model repository to serve")
    source.add_argument("--tiny", type=Path, help="build (once) and serve the tiny model's repository under DIR")
    p.add_argument("--model", help="model id (default: the first one the server lists)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients, each on its own connection")
    p.add_argument("--requests", type=int, default=300, help="Generate calls in all")
    p.add_argument("--max-queue", type=int, default=4, help="the replica's --max-queue")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--invert", action="store_true", help="invert the source clip (default: start from noise)")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline of each call, seconds")
    p.add_argument("--think", type=float, default=2.0, help="a client's pause between calls, seconds")
    p.add_argument("--warmup", type=int, default=3, help="sequential calls before memory is first measured")
    p.add_argument("--settle", type=float, default=2.0, help="seconds between the run's end and the last measure")
    p.add_argument("--max-growth-mib", type=float, default=64.0, help="allowed memory growth over the run")
    p.add_argument("--out", type=Path, default=Path("load_run.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = load_run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
