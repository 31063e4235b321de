"""The client library (sync and async) and the `tav-client` CLI against a live server on the tiny model, and the
client's retry rule (only UNAVAILABLE before the request was accepted) against scripted stubs."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from grpc_helpers import MODEL, OTHER_MODEL, PROMPT, ServerThread, make_repo
from tuneavideo.v1 import tuneavideo_pb2 as pb2

from clients import AsyncClient, Client, ServerError
from clients.cli import main
from server.serve import ServerConfig
from tuner.video_io import read_video

TIMEOUT = 300
CODE = grpc.StatusCode


@pytest.fixture(scope="module")
def server(tuned_run, tmp_path_factory):
    server = ServerThread(ServerConfig(repo=make_repo(tmp_path_factory.mktemp("client"), tuned_run), port=0))
    server.wait_ready()
    yield server
    server.stop()


def test_client_generates_with_progress_and_reads_models(server, tmp_path):
    calls = []
    with Client(server.target) as client:
        video = client.generate(MODEL, PROMPT, steps=2, seed=3, invert=False, format="png", timeout=TIMEOUT,
                                progress=lambda *args: calls.append(args))
        assert (video.mime_type, video.frames, len(video.files), video.seed, video.steps) == ("image/png", 8, 8, 3, 2)
        assert video.request_id and not video.prompt_truncated and video.timings["total"] > 0
        assert calls[:2] == [("sample", 1, 2), ("sample", 2, 2)] and calls[-1] == ("decode", 8, 8)
        frames = video.save(tmp_path / "frames")
        assert sorted(p.name for p in frames.iterdir()) == [f"frame_{i:05d}.png" for i in range(8)]

        listing = client.list_models()
        assert [m.id for m in listing.models] == [MODEL, OTHER_MODEL] and "broken" in listing.skipped
        model = client.get_model(MODEL)
        assert (model.width, model.height, model.default_steps, model.loaded) == (32, 32, 50, True)
        assert client.health() == "SERVING"
        with pytest.raises(ServerError) as e:
            client.get_model("nope")
        assert e.value.code == CODE.NOT_FOUND
        long_prompt = client.generate(MODEL, "a red square " * 10, steps=1, invert=False, timeout=TIMEOUT)
        assert long_prompt.prompt_truncated  # the tiny tokenizer holds 32 tokens of one character each


def test_client_deadline(server):
    with Client(server.target) as client, pytest.raises(ServerError) as e:
        client.generate(MODEL, PROMPT, steps=200, invert=False, timeout=1.0)
    assert e.value.code == CODE.DEADLINE_EXCEEDED


def test_async_client(server):
    async def session() -> None:
        async with AsyncClient(server.target) as client:
            video = await client.generate(MODEL, PROMPT, steps=1, invert=False, format="gif", timeout=TIMEOUT)
            assert video.mime_type == "image/gif" and len(read_video(video.files[0])) == 8
            assert [m.id for m in (await client.list_models()).models] == [MODEL, OTHER_MODEL]
            assert (await client.get_model(MODEL)).id == MODEL
            assert await client.health() == "SERVING"
            with pytest.raises(ServerError) as e:
                await client.generate(MODEL, PROMPT, frames=0)
            assert e.value.code == CODE.INVALID_ARGUMENT and e.value.details.startswith("frames:")

    asyncio.run(session())


class ScriptedError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"scripted {self._code.name}"


ACCEPTED = pb2.GenerateResponse(accepted=pb2.Accepted(request_id="r1"))
RESULT = [
    ACCEPTED,
    pb2.GenerateResponse(result=pb2.ResultInfo(mime_type="video/mp4", files=1, size_bytes=3, frames=8)),
    pb2.GenerateResponse(chunk=pb2.Chunk(file=0, offset=0, data=b"abc", last=True)),
]


class ScriptedStub:
    """Answers each Generate call with the next (responses, error) of its script."""

    def __init__(self, *script: tuple[list, grpc.StatusCode | None]) -> None:
        self.script = list(script)
        self.calls = 0

    def Generate(self, request, timeout=None, metadata=None):
        self.calls += 1
        responses, code = self.script.pop(0)
        yield from responses
        if code is not None:
            raise ScriptedError(code)


@pytest.mark.parametrize("script, calls, code", [
    ([([], CODE.UNAVAILABLE), ([], CODE.UNAVAILABLE), (RESULT, None)], 3, None),  # not yet accepted: retried
    ([([ACCEPTED], CODE.UNAVAILABLE)], 1, CODE.UNAVAILABLE),  # accepted: it may have run, never retried
    ([([], CODE.INVALID_ARGUMENT)], 1, CODE.INVALID_ARGUMENT),
    ([([], CODE.RESOURCE_EXHAUSTED)], 1, CODE.RESOURCE_EXHAUSTED),
    ([([], CODE.UNAVAILABLE)] * 3, 3, CODE.UNAVAILABLE),  # at most `retries` retries
])
def test_retries_only_unavailable_before_acceptance(script, calls, code):
    with Client("127.0.0.1:9", retries=2, backoff=0.01) as client:  # never connects: the stub is scripted
        client.stub = stub = ScriptedStub(*script)
        if code is None:
            assert client.generate(MODEL, PROMPT).files == [b"abc"]
        else:
            with pytest.raises(ServerError) as e:
                client.generate(MODEL, PROMPT)
            assert e.value.code == code
        assert stub.calls == calls


def test_retries_stop_at_the_deadline():
    with Client("127.0.0.1:9", retries=5, backoff=10.0) as client:
        client.stub = stub = ScriptedStub(([], CODE.UNAVAILABLE), (RESULT, None))
        with pytest.raises(ServerError):
            client.generate(MODEL, PROMPT, timeout=1.0)  # the first backoff would pass the deadline
        assert stub.calls == 1


def test_cli(server, tmp_path, capsys):
    common = ["--server", server.target]
    generate = ["generate", *common, "--model", MODEL, "--prompt", PROMPT, "--steps", "1", "--no-invert"]
    main([*generate, "--seed", "4", "--out", str(tmp_path / "frames")])
    assert len(list((tmp_path / "frames").glob("frame_*.png"))) == 8
    assert "seed 4" in capsys.readouterr().out
    main([*generate, "--out", str(tmp_path / "video.gif")])
    assert len(read_video(tmp_path / "video.gif")) == 8
    capsys.readouterr()

    main(["models", *common])
    out = capsys.readouterr().out
    assert out.startswith(f"{MODEL}\t32x32") and "broken\tskipped" in out
    main(["health", *common])
    assert capsys.readouterr().out.strip() == "SERVING"

    with pytest.raises(SystemExit) as e:
        main([*generate, "--frames", "0", "--out", str(tmp_path / "bad.mp4")])
    assert e.value.code == 1 and "INVALID_ARGUMENT: frames:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([*generate, "--out", str(tmp_path / "video.webm")])
    assert e.value.code == 2


def test_cli_health_fails_without_a_server(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SystemExit) as e:
        main(["health", "--server", f"127.0.0.1:{port}", "--timeout", "5"])
    assert e.value.code == 1 and "UNAVAILABLE" in capsys.readouterr().err
