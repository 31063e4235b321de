"""Server and worker processes for the tests, forked from a parent that has already imported torch, diffusers and
transformers.

Every `tav-serve` and `tav-tune-worker` the tests start is a real process of its own (its pid takes the signals,
its memory is its own), but importing torch, `torch._dynamo`, diffusers and transformers costs 6-13 CPU-s a
process (12-13 measured on the AVX2-only CI-like machine) before it does any work. So `start_module` forks the
process from a preloaded parent (one per worker and import-time environment), which then runs the module as
`python -m` would: the same argv, environment, working directory, standard streams, exit code or death by signal.

The parent never computes, holds no thread and no gRPC channel, so a child starts its own OpenMP threads and gRPC
cleanly, as the project's export fork server does (jobs/work.py). What a library reads from the environment
when it is imported (OpenMP's and the hub's settings) is the parent's, so a child only comes from a parent whose
environment equals the child's, but for `RUNTIME_ONLY`. `TAV_TEST_COLD_PROCESSES=1` starts every process
cold (`subprocess.Popen`), as the product is started.

Run as a script, this file is the preloaded parent: `python preloaded.py SOCKET`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

# What each process the tests start imports before its own code: its package first (it sets the environment its
# libraries read when they load), then the heavy libraries, none of them the module run as __main__ (it must not
# be imported before it runs). onnxruntime is left out: its import starts a thread (and costs little).
TORCH = ("torch", "torch._dynamo", "diffusers.models.unets.unet_2d_condition",
         "diffusers.models.autoencoders.autoencoder_kl", "transformers.models.clip.modeling_clip",
         "transformers.models.clip.tokenization_clip", "peft", "safetensors.torch", "grpc", "av")
PRELOADS = {
    "server.serve": ("server", *TORCH),
    "jobs.celery_worker": ("jobs.work", "jobs.celery_app", "jobs.redis_store", *TORCH),
    "ui.app": ("ui", "gradio", "grpc", "clients"),
}
RUNTIME_ONLY = frozenset({"PYTEST_CURRENT_TEST"})  # set by pytest per test; read by no library at import
START_TIMEOUT = 600  # seconds for the parent's imports, on a busy CI machine
MAX_REQUEST = 1 << 20


class ForkedProcess:
    """The part of `subprocess.Popen` the tests use, for a process forked by a preloaded parent: its exit status
    comes from the parent over a socket."""

    def __init__(self, args: list[str], connection: socket.socket) -> None:
        self.args, self.stdout, self.stderr = args, None, None
        self.returncode: int | None = None
        self._connection, self._received = connection, b""
        pid = self._line(START_TIMEOUT)
        if not pid:
            raise ConnectionError("the preloaded parent forked no child")
        self.pid = int(pid)

    def _line(self, timeout: float | None) -> bytes | None:
        """The parent's next line (the child's pid, then its exit status); None while none has come in
        `timeout` seconds (0: none has come), b"" if the parent closed the connection without one."""
        self._connection.settimeout(timeout)
        while b"\n" not in self._received:
            try:
                chunk = self._connection.recv(64)
            except (TimeoutError, BlockingIOError):
                return None
            if not chunk:
                return b""
            self._received += chunk
        line, self._received = self._received.split(b"\n", 1)
        return line

    def poll(self) -> int | None:
        return self.wait(0) if self.returncode is None else self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        if self.returncode is None:
            line = self._line(timeout)
            if line is None:
                if timeout == 0:
                    return None
                raise subprocess.TimeoutExpired(self.args, timeout)
            # no status: the parent was stopped (the session's end) before the child ended; counted as killed
            self.returncode = int(line) if line else -signal.SIGKILL
            self._connection.close()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _Parent:
    """One preloaded parent process, and the socket it forks children on."""

    def __init__(self, env: dict[str, str], modules: tuple[str, ...]) -> None:
        self.directory = tempfile.mkdtemp(prefix="tav-preloaded-")
        self.path = str(Path(self.directory) / "socket")
        self.process = subprocess.Popen([sys.executable, __file__, self.path, *modules], env=env,
                                        stdout=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.process.stdout], [], [], START_TIMEOUT)
        if not ready or self.process.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError("the preloaded parent did not start")

    def fork(self, module: str, args: list[str], env: dict[str, str], stdout, stderr) -> ForkedProcess:
        out_read = err_read = None
        out_fd, err_fd = stdout, stderr
        if stdout == subprocess.PIPE:
            out_read, out_fd = os.pipe()
        if stderr == subprocess.PIPE:
            err_read, err_fd = os.pipe()
        streams = [0, _fd(out_fd, 1), None]
        streams[2] = streams[1] if stderr == subprocess.STDOUT else _fd(err_fd, 2)
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.connect(self.path)
            request = json.dumps(dict(module=module, args=args, env=env, cwd=os.getcwd())).encode() + b"\n"
            socket.send_fds(connection, [request], streams)
            process = ForkedProcess([sys.executable, "-m", module, *args], connection)
        except BaseException:
            connection.close()
            for fd in (out_read, err_read):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            for fd, given in ((out_fd, stdout), (err_fd, stderr)):
                if given == subprocess.PIPE:
                    os.close(fd)
        process.stdout = None if out_read is None else open(out_read, errors="replace")  # noqa: SIM115
        process.stderr = None if err_read is None else open(err_read, errors="replace")  # noqa: SIM115
        return process

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        Path(self.path).unlink(missing_ok=True)
        os.rmdir(self.directory)


def _fd(stream, default: int) -> int:
    """The file descriptor a child's stream is given: this process's own for None, else the file's."""
    if stream is None:
        return default
    return stream if isinstance(stream, int) else stream.fileno()


_parents: dict[tuple, _Parent | None] = {}


def start_module(module: str, args: list[str], *, env: dict[str, str] | None = None, stdout=None,
                 stderr=None) -> subprocess.Popen | ForkedProcess:
    """`python -m module args` with the given environment (this process's by default) and standard output and
    error (None, a file, PIPE or, for stderr, STDOUT; piped ones read as text): forked from a preloaded parent with
    the same import-time environment, or started cold when that is switched off or the parent cannot start."""
    env = dict(os.environ if env is None else env)
    if os.environ.get("TAV_TEST_COLD_PROCESSES") != "1" and module in PRELOADS:
        key = (module, *sorted((k, v) for k, v in env.items() if k not in RUNTIME_ONLY))
        if not _parents:
            atexit.register(close_parents)
        if key not in _parents:
            try:
                _parents[key] = _Parent(env, PRELOADS[module])
            except (OSError, RuntimeError) as e:
                print(f"preloaded parent: {e}; starting processes cold", file=sys.stderr)
                _parents[key] = None
        if _parents[key] is not None:
            try:
                return _parents[key].fork(module, args, env, stdout, stderr)
            except OSError as e:  # the parent is gone
                print(f"preloaded parent: {e}; starting processes cold", file=sys.stderr)
                _parents[key] = None
    return subprocess.Popen([sys.executable, "-m", module, *args], env=env, stdout=stdout, stderr=stderr, text=True)


def close_parents() -> None:
    """Stop the preloaded parents (their children run on)."""
    for parent in _parents.values():
        if parent is not None:
            parent.close()
    _parents.clear()


# The preloaded parent.

def _serve(path: str, modules: list[str]) -> None:
    import importlib
    import threading

    before = dict(os.environ)
    for name in modules:
        importlib.import_module(name)
    # what the imports set in the environment, the children's environments get too (as their own imports would)
    added = {k: v for k, v in os.environ.items() if before.get(k) != v}
    if threading.active_count() != 1:
        sys.exit(f"the imports started threads ({threading.enumerate()}); a fork would not carry them")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    print("ready", flush=True)
    parent, children = os.getppid(), {}
    while os.getppid() == parent:  # until the test process is gone
        if select.select([listener], [], [], 0.1)[0]:
            connection, _ = listener.accept()
            try:
                request, fds = _receive(connection)
            except (OSError, ValueError) as e:
                print(f"preloaded parent: a bad request ({e})", file=sys.stderr)
                connection.close()
                continue
            pid = os.fork()
            if pid == 0:
                listener.close()
                for other in children.values():
                    other.close()
                _child(request, fds, connection, added)
            for fd in fds:
                os.close(fd)
            connection.sendall(b"%d\n" % pid)
            children[pid] = connection
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = children.pop(pid)
            with contextlib.suppress(OSError):  # nobody waits for it any more
                connection.sendall(b"%d\n" % os.waitstatus_to_exitcode(status))
            connection.close()


def _receive(connection: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(connection, MAX_REQUEST, 3)
    while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
        chunk = connection.recv(MAX_REQUEST)
        if not chunk:
            break
        data += chunk
    if len(fds) != 3:
        raise ValueError(f"{len(fds)} file descriptors, not 3")
    return json.loads(data), fds


def _child(request: dict, fds: list[int], connection: socket.socket, added: dict[str, str]) -> None:
    """In the forked child: become `python -m module args` and exit as it would."""
    import random
    import runpy
    import threading
    import types

    try:
        connection.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in set(fds):
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for name, value in added.items():
            os.environ.setdefault(name, value)
        sys.argv = [request["module"], *request["args"]]
        sys.path[0] = request["cwd"]
        sys.modules["__main__"] = types.ModuleType("__main__")  # the module runs in a namespace of its own
        random.seed()  # each process its own random state, as a fresh one has
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
    except BaseException:
        os._exit(127)
    code = 0
    try:
        runpy._run_module_as_main(request["module"])
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()  # as the interpreter does at exit: wait for the threads that are not daemons
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code & 0xFF)


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2:])
