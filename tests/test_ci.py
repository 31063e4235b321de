"""What CI promises about itself: a missing program fails a CI run instead of shrinking it, `make demo` (the main
job, end to end) runs, short, with every file the README promises, and the servers the suite forks from a preloaded
parent behave as the ones an operator starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from grpc_helpers import ServeProcess
from PIL import Image
from preloaded import ForkedProcess, start_module
from tools import require_tool

from tuner.video_io import read_video

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 900  # seconds: the short demo took 107-144 s beside other suites at load 5-10 on 2 cores


def test_a_missing_tool_skips_with_the_reason_outside_ci_and_fails_under_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-tool is not installed"):
        require_tool("no-such-tool")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: no-such-tool is not installed"):
        require_tool("no-such-tool")
    assert Path(require_tool("sh")).name == "sh"


def test_under_ci_a_test_needing_a_missing_program_fails_the_run(tmp_path):
    """The marker the suite's tests carry (`needs_tool`, tests/tools.py's plugin), in a pytest run of its own whose
    PATH holds no gdb: CI=true fails the test, naming the program; without CI it is skipped with the reason."""
    (tmp_path / "test_needs_gdb.py").write_text(
        "import pytest\n\n@pytest.mark.needs_tool('gdb')\ndef test_attaches():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(PATH=str(tmp_path), PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")]))
    runs = {ci: subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tools", "-rs",
                                "test_needs_gdb.py"], cwd=tmp_path, env={**env, **({"CI": ci} if ci else {})},
                               capture_output=True, text=True, timeout=TIMEOUT)
            for ci in ("true", None)}
    assert runs["true"].returncode == 1 and "CI=true: gdb is not installed" in runs["true"].stdout, runs["true"].stdout
    assert runs[None].returncode == 0 and "1 skipped" in runs[None].stdout, runs[None].stdout
    assert "gdb is not installed (Debian's gdb package" in runs[None].stdout


def test_the_demo_runs_short_and_writes_every_promised_file(tmp_path):
    """scripts/demo.py (`make demo`) through its real commands, with 2 tuning and 2 sampling steps: the source clip,
    one GIF per edit, grid.png (source on top, one row per generation) and metrics.json (the pixel checker's
    reading of each edit) land in its output folder."""
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "scripts/demo.py", "--out", str(out), "--tune-steps", "2",
                             "--sample-steps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    demo = _load_demo()
    assert read_video(out / "source.gif").frames.shape[0] == 24 and (out / "source.mp4").stat().st_size > 0
    for name, (_, _, frames, _) in demo.EDITS.items():
        video = read_video(out / f"{name}.gif").frames
        assert video.shape[:3] == (frames, 64, 64), (name, video.shape)
    width, height = Image.open(out / "grid.png").size
    assert (width, height) == (8 * 64, (1 + len(demo.EDITS)) * 64)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == set(demo.EDITS)
    assert all({"colour", "shape", "background", "trajectory_px"} <= set(m) for m in metrics.values())
    model = out / "repo" / "red-circle"
    assert json.loads((model / "tav_config.json").read_text())["steps"] == 2
    assert "done: videos, grid and metrics in" in result.stdout


def _load_demo():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_server_forked_from_the_preloaded_parent_behaves_as_one_started_cold(tmp_path, monkeypatch):
    """tests/preloaded.py forks the suite's servers and workers from a parent that imported torch once: the process
    gets its arguments, working directory and streams, and ends as `python -m` would, by its exit code or by a
    signal."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = ["--port", "0", "--repo", str(tmp_path / "no-such-repo")]
    cold = subprocess.run([sys.executable, "-m", "server.serve", *args], capture_output=True, text=True, env=env,
                          timeout=TIMEOUT)
    forked = start_module("server.serve", args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert isinstance(forked, ForkedProcess)  # not a cold start after a parent that failed
    assert forked.wait(TIMEOUT) == cold.returncode == 2
    assert (forked.stdout.read(), forked.stderr.read()) == (cold.stdout, cold.stderr) != ("", "")

    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path)
    server = ServeProcess("--repo", "repo")  # serving the repository named relative to the working directory
    assert isinstance(server.proc, ForkedProcess)
    assert os.readlink(f"/proc/{server.proc.pid}/cwd") == str(tmp_path)
    server.proc.send_signal(signal.SIGKILL)
    assert server.proc.wait(TIMEOUT) == -signal.SIGKILL
