"""The browser page (`tav-ui`) and the RPCs it is built on: `GetServerInfo` and `ListBases` answer the bounds the
server checks; the page's flows through `gradio_client` (fast) and in headless Chromium (Debian's, through
Playwright), against a real `tav-serve` on the tiny model, with the browser's networking limited to loopback."""

from __future__ import annotations

import pytest
from grpc_helpers import MODEL, ServeProcess, make_repo

from clients import Client, ServerError
from clients.cli import main as client_main
from jobs import spec
from server.generate import MAX_FRAMES, MAX_GUIDANCE, MAX_SOURCE_BYTES, MIN_GUIDANCE

CAPTION = "a red square is moving right"


@pytest.fixture(scope="module")
def serve(tiny_base, tuned_run, tmp_path_factory):
    """`tav-serve` on a repository holding the tuned tiny model, tuning allowed from the tiny base (local worker)."""
    repo = make_repo(tmp_path_factory.mktemp("ui"), tuned_run)
    server = ServeProcess("--repo", str(repo), "--base", f"tiny={tiny_base}", "--rescan-seconds", "0.5")
    try:
        server.wait_for("tuning service serving")
        yield server
    finally:
        server.proc.kill()
        server.proc.wait(30)


def test_server_info_and_bases_are_the_bounds_the_server_checks(serve, capsys):
    with Client(f"127.0.0.1:{serve.port}") as client:
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
    client_main(["bases", "--server", f"127.0.0.1:{serve.port}"])
    assert any(line.startswith("tiny\t") for line in capsys.readouterr().out.splitlines())
