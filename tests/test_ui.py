"""The browser page (`tav-ui`) and the RPCs it is built on: `GetServerInfo` and `ListBases` answer the bounds the
server checks; the page's flows through `gradio_client` (fast) and in headless Chromium (Debian's, through
Playwright), against a real `tav-serve` on the tiny model, with the browser's networking limited to loopback."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from queue import Empty, Queue
from urllib.parse import urlparse

import av
import pytest
from grpc_helpers import MODEL, START_TIMEOUT, ServeProcess, make_repo
from preloaded import start_module
from test_reliability import NGINX, render_nginx, wait_listening

from clients import Client, ServerError
from clients.cli import main as client_main
from jobs import spec
from server.generate import MAX_FRAMES, MAX_GUIDANCE, MAX_SOURCE_BYTES, MIN_GUIDANCE

CAPTION = "a red square is moving right"
USER_TOKEN, ADMIN_TOKEN = "user-token", "admin-token"
TIMEOUT = 300  # seconds for one generation or tune job on a loaded 2-core machine (each takes a few to 30)
PAGE_TIMEOUT = 60  # seconds for the page to answer a click on a loaded 2-core machine (it takes well under 5)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Headless Chromium with its networking limited to loopback: every other host resolves to nothing and goes to a
# proxy that is not there; the test also checks that every request the page made went to the page's own server.
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking",
                  "--disable-component-update", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                  "--proxy-server=http://127.0.0.1:9"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UIProcess:
    """`tav-ui` in a subprocess, its output collected by a reader thread."""

    def __init__(self, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = start_module("ui.app", ["--port", str(self.port), *args], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, env=env)
        self.lines: Queue = Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}/"

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=1)
            except Empty:
                continue
            if line is None:
                break
            self.log.append(line)
            if re.search(pattern, line):
                return
        raise AssertionError(f"no {pattern!r} in tav-ui's output:\n{''.join(self.log)}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tokens")
    (directory / "user").write_text(USER_TOKEN + "\n")
    (directory / "admin").write_text(ADMIN_TOKEN + "\n")
    return directory / "user", directory / "admin"


@pytest.fixture(scope="module")
def serve(tiny_base, tuned_run, tmp_path_factory, tokens):
    """`tav-serve` with auth on, on a repository holding the tuned tiny model; tuning from the tiny base (its
    local worker)."""
    repo = make_repo(tmp_path_factory.mktemp("ui"), tuned_run)
    server = ServeProcess("--repo", str(repo), "--base", f"tiny={tiny_base}", "--rescan-seconds", "0.5",
                          "--auth-token-file", str(tokens[0]), "--admin-token-file", str(tokens[1]))
    try:
        server.wait_for("tuning service serving")
        yield server
    finally:
        server.proc.kill()
        server.proc.wait(30)


@pytest.fixture(scope="module")
def ui(serve, tokens):
    """`tav-ui` on loopback for that server, with both tokens (so the Train tab is shown)."""
    pytest.importorskip("gradio", reason="the ui extra (pip install .[ui])")
    page = UIProcess("--server", f"127.0.0.1:{serve.port}", "--token-file", str(tokens[0]),
                     "--admin-token-file", str(tokens[1]))
    try:
        page.wait_for(r"Running on local URL")
        yield page
    finally:
        page.stop()


def test_server_info_and_bases_are_the_bounds_the_server_checks(serve, tokens, capsys):
    with Client(f"127.0.0.1:{serve.port}", token=ADMIN_TOKEN) as client:
        info = client.get_server_info()
        bases = client.list_bases()
        with pytest.raises(ServerError) as refused:
            client.generate(MODEL, "x", frames=info.limits["max_frames"] + 1, steps=1)
    assert info.backend == "torch" and info.formats == ("mp4", "gif", "png")
    assert info.limits["max_frames"] == MAX_FRAMES == 128 and info.limits["default_frames"] == 8
    assert (info.limits["min_guidance"], info.limits["max_guidance"]) == (MIN_GUIDANCE, MAX_GUIDANCE)
    assert info.limits["max_source_bytes"] == MAX_SOURCE_BYTES and "negative_prompt" in info.options
    assert f"between 1 and {info.limits['max_frames']}" in refused.value.details
    tiny = next(b for b in bases.bases if b.id == "tiny")
    assert bases.default_base == "shapes-sd" and bases.limits["max_steps"] == spec.MAX_STEPS
    assert tiny.size_multiple > 0 and tiny.default_size % tiny.size_multiple == 0
    assert tiny.default_settings["width"] == tiny.default_size and tiny.default_settings["steps"] >= 1
    client_main(["bases", "--server", f"127.0.0.1:{serve.port}", "--token-file", str(tokens[1])])
    assert any(line.startswith("tiny\t") for line in capsys.readouterr().out.splitlines())


def decoded_frames(data: bytes | Path) -> int:
    """Frames a served video file decodes to."""
    with av.open(str(data)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_server_errors_become_one_line_messages():
    pytest.importorskip("gradio", reason="the ui extra (pip install .[ui])")
    import grpc

    from ui.app import server_message

    assert server_message(ServerError(grpc.StatusCode.INVALID_ARGUMENT, "frames: must be between 1 and 128, got 0")
                          ) == "frames: must be between 1 and 128, got 0"
    assert server_message(ServerError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the queue is full (16 requests "
                                      "waiting); retry later")).startswith("busy, retry: the queue is full")
    assert server_message(ServerError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses;\n"
                                      "last error: ...")) == ("server not reachable: failed to connect to all "
                                                             "addresses; last error: ...")


def test_uploads_over_the_servers_limit_are_refused_before_sending(tmp_path):
    pytest.importorskip("gradio", reason="the ui extra (pip install .[ui])")
    import gradio as gr

    from ui.app import _check_upload

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"x" * 2**20)
    assert _check_upload(str(clip), 2**20, "video") == clip.read_bytes()
    with pytest.raises(gr.Error) as refused:
        _check_upload(str(clip), 2**20 - 1, "video")
    assert refused.value.message == "video: must be at most 0 MiB, got 1.0 MiB"


def test_a_non_loopback_bind_needs_a_login_file_and_the_server_must_answer(tmp_path):
    pytest.importorskip("gradio", reason="the ui extra (pip install .[ui])")
    run = [sys.executable, "-m", "ui.app", "--server", "127.0.0.1:1", "--port", str(free_port())]
    refused = subprocess.run([*run, "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--login-file" in refused.stderr, refused.stderr
    (tmp_path / "logins").write_text("no password here\n")
    broken = subprocess.run([*run, "--host", "0.0.0.0", "--login-file", str(tmp_path / "logins")],
                            capture_output=True, text=True, timeout=120)
    assert broken.returncode == 2 and "expected user:password" in broken.stderr, broken.stderr
    unreachable = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert unreachable.returncode == 1 and "server not reachable" in unreachable.stderr, unreachable.stderr


def test_generate_list_and_errors_through_gradio_client(ui):
    """The Generate flow as an API user meets it: the model list, a generation whose MP4 and GIF (one request)
    decode to the frames asked for, the server's one-line message for a bad input, and the page still working."""
    from gradio_client import Client as PageClient
    from gradio_client.exceptions import AppError

    page = PageClient(ui.url, verbose=False)
    named = page.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/generate", "/tune", "/list_models", "/delete_model", "/list_jobs", "/cancel_job"} <= set(named)
    picker, table, _ = page.predict(None, api_name="/list_models")
    assert picker["value"] == MODEL and [row[0] for row in table["data"]] == [MODEL, "square.v2"]
    with pytest.raises(AppError, match=r"^prompt: must not be empty$"):
        page.predict(MODEL, "   ", "", 8, 1, 7.5, "3", "noise", None, api_name="/generate")
    status, _, video, downloads, info = page.predict(MODEL, "a red square is moving left", "", 10, 1, 7.5, "",
                                                     "noise", None, api_name="/generate")
    assert status == "done" and video.endswith(".mp4") and "Timings: queue" in info
    assert re.search(r"seed [1-9]\d*,", info), "a blank seed is drawn at random and shown"
    mp4, gif = sorted(downloads, key=lambda p: Path(p).suffix, reverse=True)
    assert decoded_frames(Path(mp4)) == decoded_frames(Path(gif)) == 10
    # feature reuse: the full UNet on every 2nd sampling step, said with the result; bounded by the server's limit
    *_, info = page.predict(MODEL, "a red square", "", 8, 4, 7.5, "5", "noise", None, 2, api_name="/generate")
    assert "4 steps, guidance 7.5, the full UNet every 2 steps" in info
    with pytest.raises(AppError, match=r"^Value 11 is greater than maximum value 10\.$"):
        page.predict(MODEL, "a prompt", "", 8, 2, 7.5, "3", "noise", None, 11, api_name="/generate")
    with pytest.raises(AppError, match=r"^seed: must be a whole number"):
        page.predict(MODEL, "a prompt", "", 8, 1, 7.5, "abc", "noise", None, api_name="/generate")
    with pytest.raises(AppError, match=r"^model no-such-model not found|^NOT_FOUND: "):
        page.predict("no-such-model", "a prompt", "", 8, 1, 7.5, "3", "noise", None, api_name="/generate")



def test_tune_cancel_and_jobs_through_gradio_client(ui, clip_path):
    """The Train flow's API: a bad model id is the server's message; a running job's progress streams and
    cancel_job stops it; list_jobs shows it cancelled."""
    from gradio_client import Client as PageClient
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    page = PageClient(ui.url, verbose=False)
    clip = handle_file(str(clip_path))
    more = ("", "", "", "", None, None, None)  # the "More settings" left blank: the tuner's for the base
    with pytest.raises(AppError, match=r"^settings\.attention_mode: "):
        page.predict(clip, CAPTION, "api-bad", "tiny", 2, None, 32, 32, None, "", "sideways", *more[1:],
                     api_name="/tune")
    with pytest.raises(AppError, match=r"^model_id: "):
        page.predict(clip, CAPTION, "Not_An_Id", "tiny", 2, None, 32, 32, None, "", *more, api_name="/tune")
    job = page.submit(clip, CAPTION, "api-cancelled", "tiny", 2000, None, 32, 32, None, "", *more,
                      api_name="/tune")
    end = time.monotonic() + TIMEOUT
    while not any(update[0].startswith("tuning: step") for update in job.outputs()):
        assert time.monotonic() < end and not job.done(), job.outputs()
        time.sleep(0.2)
    job_id = job.outputs()[-1][1]
    assert "cancel" in page.predict(job_id, api_name="/cancel_job")
    assert job.result(timeout=TIMEOUT)[0].startswith("cancelled")
    rows = page.predict(api_name="/list_jobs")["data"]
    assert [row[3] for row in rows if row[0] == job_id] == ["cancelled"]


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs Debian's nginx)")
def test_the_page_behind_nginx_with_its_root_path(serve, tokens, tmp_path):
    """deploy/nginx as shipped (replica, page and listen lines replaced): the page under /ui/ over HTTP/1.1, its
    gRPC calls through nginx's gRPC server to the replica; a generation streams through both."""
    pytest.importorskip("gradio", reason="the ui extra (pip install .[ui])")
    from gradio_client import Client as PageClient

    deploy = Path(__file__).resolve().parents[1] / "deploy" / "nginx"
    tmp_path.chmod(0o755)  # nginx's workers (user nobody when started as root) use the temp paths inside
    grpc_port, page_port, ui_port = free_port(), free_port(), free_port()
    (tmp_path / "nginx.conf").write_text(render_nginx((deploy / "nginx.conf").read_text(),
                                                      [f"127.0.0.1:{serve.port}"], grpc_port, tmp_path))
    (tmp_path / "tav-ui.d").mkdir()
    ui_conf = (deploy / "tav-ui.d" / "ui.conf").read_text()
    ui_conf, listens = re.subn(r"(?m)^    listen \d+;", f"    listen 127.0.0.1:{page_port};", ui_conf)
    ui_conf, servers = re.subn(r"(?m)^    server 127\.0\.0\.1:\d+;", f"    server 127.0.0.1:{ui_port};", ui_conf)
    assert (listens, servers) == (1, 1), "deploy/nginx/tav-ui.d/ui.conf changed: update this test"
    (tmp_path / "tav-ui.d" / "ui.conf").write_text(ui_conf)
    nginx = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e",
                              str(tmp_path / "error.log"), "-g", "daemon off;"])
    page = None
    try:
        wait_listening(page_port, nginx)
        page = UIProcess("--server", f"127.0.0.1:{grpc_port}", "--token-file", str(tokens[0]), "--root-path", "/ui",
                         port=ui_port)
        page.wait_for(r"Running on local URL")
        with urllib.request.urlopen(f"http://127.0.0.1:{page_port}/ui/", timeout=60) as response:
            assert response.status == 200 and b"Tune-A-Video" in response.read()
        client = PageClient(f"http://127.0.0.1:{page_port}/ui/", verbose=False)
        status, _, video, _, _ = client.predict(MODEL, "a red square is moving left", "", 8, 1, 7.5, "1", "noise", None,
                                             api_name="/generate")
        assert status == "done" and decoded_frames(Path(video)) == 8
    finally:
        if page is not None:
            page.stop()
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(30)


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, driven by Playwright (its own browser download is not used). Under CI a
    missing Chromium fails the run instead of skipping."""
    pytest.importorskip("gradio", reason="the ui extra (pip install .[ui])")
    missing = [name for name, absent in [("chromium (apt-get install chromium chromium-driver; .ci/run does)",
                                          CHROMIUM is None),
                                         ("playwright (the dev extra)", importlib.util.find_spec("playwright") is None)]
               if absent]
    if missing:
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(f"needs {' and '.join(missing)}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, ui):
    """A fresh page on tav-ui; afterwards, every request it made must have gone to tav-ui itself."""
    context = browser.new_context()
    tab = context.new_page()
    tab.set_default_timeout(PAGE_TIMEOUT * 1000)
    hosts = []
    tab.on("request", lambda request: hosts.append(urlparse(request.url).hostname))
    tab.goto(ui.url)
    tab.locator("#generate").wait_for()
    yield tab
    context.close()
    assert hosts and set(hosts) <= {"127.0.0.1"}, sorted(set(hosts))


def pick_model(tab, model: str) -> None:
    tab.locator("#model input").click()
    tab.get_by_role("option", name=re.compile(f"^{re.escape(model)} ")).click()


def generate_in_page(tab, prompt: str, frames: int) -> str:
    """Type a prompt, set the frames and one step, press Generate, wait until the video can play; its URL."""
    tab.locator("#prompt textarea").fill(prompt)
    for name, value in (("frames", frames), ("steps", 1)):
        number = tab.locator(f"#{name} input[type=number]")
        number.fill(str(value))
        number.press("Enter")
    tab.locator("#generate").click()
    tab.wait_for_function("() => { const v = document.querySelector('#video video');"
                          " return v !== null && v.readyState >= 2 && v.duration > 0; }", timeout=TIMEOUT * 1000)
    return tab.eval_on_selector("#video video", "v => v.currentSrc")


def test_generate_in_a_real_browser(page, serve, tmp_path):
    """Pick the model, type a prompt, press Generate: the video plays and the served file decodes to the frames
    asked for. A bad input shows the server's message on the page; Cancel stops a long generation on the server
    (its worker logs the request stopped); the page keeps working after both."""
    pick_model(page, MODEL)
    page.locator("#prompt textarea").fill("   ")
    page.locator("#generate").click()
    page.get_by_text("prompt: must not be empty").first.wait_for()
    page.locator("#prompt textarea").fill("a long one")
    for name, value in (("frames", 128), ("steps", 200)):  # minutes of work on the tiny model
        number = page.locator(f"#{name} input[type=number]")
        number.fill(str(value))
        number.press("Enter")
    page.locator("#generate").click()
    page.locator("#progress").get_by_text(re.compile(r"(invert|sample): step")).wait_for(timeout=TIMEOUT * 1000)
    page.locator("#cancel").click()
    serve.wait_for(r"request \w+ stopped \(cancelled\)", timeout=TIMEOUT)
    sync_api = pytest.importorskip("playwright.sync_api")
    sync_api.expect(page.locator("#status")).to_have_text("cancelled", timeout=PAGE_TIMEOUT * 1000)
    source = generate_in_page(page, "a red square is moving left", 10)
    video = tmp_path / "served.mp4"
    with urllib.request.urlopen(source, timeout=60) as response:
        video.write_bytes(response.read())
    assert decoded_frames(video) == 10
    assert "done" in page.locator("#status").inner_text()
    assert re.search(r"seed [1-9]\d*,", page.locator("#result_info").inner_text()), "blank: drawn at random"
    with urllib.request.urlopen(f"{page.url}config", timeout=60) as response:
        config = response.read().decode()
    assert "elem_id" in config and USER_TOKEN not in config + page.content() and ADMIN_TOKEN not in config


def test_tune_in_a_real_browser_then_generate_from_it_and_delete_it(page, clip_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    """Train: upload the clip, caption it, name the model, two steps (the base's defaults otherwise), Tune; the
    job's progress shows until the model is served, and it is picked on Generate without reloading the page. Then
    Models deletes it, after a confirmation."""
    page.get_by_role("tab", name="Train").click()
    page.locator("#base_note").get_by_text("Native size").wait_for()  # the tab is drawn and the page loaded
    page.locator("#clip input[type=file]").set_input_files(str(clip_path))
    # An upload is the page's server processing the video, not a click: it waited past 60 s once in a CI run whose
    # other worker compiled a UNet (tests/test_compile.py) and passed alone in 74 s for the whole file
    page.locator("#clip").get_by_text(clip_path.name).first.wait_for(timeout=TIMEOUT * 1000)
    page.locator("#caption textarea").fill(CAPTION)
    page.locator("#model_id textarea").fill("browser-tuned")
    page.locator("#base input").click()
    page.get_by_role("option", name="tiny", exact=True).click()
    page.locator("#base_note").get_by_text("Native size 32 px").wait_for()
    assert page.locator("#width input").input_value() == "32"  # the tiny base's native size, from ListBases
    page.locator("#tune_steps input").fill("2")
    page.locator("#tune").click()
    page.locator("#job").get_by_text("is served").wait_for(timeout=TIMEOUT * 1000)
    page.get_by_role("tab", name="Generate").click()
    assert page.locator("#model input").input_value().startswith("browser-tuned ")
    source = generate_in_page(page, "a red square is moving left", 8)
    with urllib.request.urlopen(source, timeout=60) as response:
        assert response.status == 200
    page.get_by_role("tab", name="Models").click()
    page.locator("#models_refresh").click()
    sync_api.expect(page.locator("#models")).to_contain_text("browser-tuned", timeout=PAGE_TIMEOUT * 1000)
    page.locator("#delete_id input").click()
    page.get_by_role("option", name="browser-tuned").click()
    page.locator("#delete").click()
    page.locator("#delete_confirm").click()
    page.get_by_text("model browser-tuned deleted").wait_for()


def test_the_dockerfile_has_a_ui_target():
    pytest.importorskip("gradio", reason="the ui extra (pip install .[ui])")
    from test_deploy import cli_flags, dockerfile

    from ui.app import main as ui_main

    instructions = dockerfile()
    start = instructions.index(("FROM", "deps-cpu AS ui"))
    end = next(i for i in range(start + 1, len(instructions)) if instructions[i][0] == "FROM")
    values = dict(instructions[start:end])
    assert json.loads(values["ENTRYPOINT"]) == ["tav-ui"] and not values["USER"].startswith("0")
    command = json.loads(values["CMD"])
    assert {arg for arg in command if arg.startswith("--")} <= cli_flags(ui_main) and "--login-file" in command
