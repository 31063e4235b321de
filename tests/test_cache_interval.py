"""Feature reuse between sampling steps (`cache_interval`, DeepCache-style): off at 1 to the byte, on in the
DDIM loop of torch and ONNX Runtime, never in the inversion, refused where a backend cannot, checked before
Accepted; the ONNX graphs added to an older store entry in place; a colour edit of the tuned shapes model."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_helpers import ServerThread, files, request, stub
from tuneavideo.v1 import tuneavideo_pb2 as pb2

from clients.cli import main as client_main
from exporter.cli import STORE_INDEX, export
from server.engines import load_model, supports_cache_interval
from server.generate import GenerationOptions, GenerationResult, Generator, InversionCache
from server.local import main as local_main
from server.registry import Cost
from server.serve import ServerConfig
from tuner.artefacts import BRANCH_GRAPHS

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "shapes-sd"
PROMPT = "a blue square is moving right"
TIMEOUT = 300  # seconds, for any one call on a busy machine


def options(**fields) -> GenerationOptions:
    return GenerationOptions(**{"prompt": PROMPT, "steps": 4, "seed": 3, **fields})


@pytest.fixture(scope="module")
def onnx_repo(tuned_run, paper_engine_store, tmp_path_factory):
    """A repository whose store entry was exported before the feature-reuse graphs (the session's entry with them
    taken out), then `square` exported into it, which adds them; and `old`, a copy of `square` whose manifest is an
    export's from before them. Returns the repository, the entry, the export's messages, the entry's graphs
    before (content hash and inode by name) and its index after."""
    store, key = paper_engine_store
    repo = tmp_path_factory.mktemp("cache") / "repo"
    entry = repo / ".engines" / key
    shutil.copytree(store / key, entry, copy_function=os.link)  # hard links: files are replaced, never written
    index = json.loads((entry / STORE_INDEX).read_text())
    for name in BRANCH_GRAPHS:
        for file in index["graphs"].pop(name)["files"]:
            (entry / file).unlink()
        index["checks"].pop(name)
    (entry / STORE_INDEX).unlink()
    (entry / STORE_INDEX).write_text(json.dumps(index))
    kept = {name: (graph["sha256"], (entry / graph["file"]).stat().st_ino) for name, graph in index["graphs"].items()}
    shutil.copytree(tuned_run, repo / "square")
    messages: list[str] = []
    export(repo / "square", progress=messages.append)
    shutil.copytree(repo / "square", repo / "old")
    manifest = json.loads((repo / "old" / "engines" / "manifest.json").read_text())
    for name in BRANCH_GRAPHS:
        manifest["graphs"].pop(name)
    (repo / "old" / "engines" / "manifest.json").write_text(json.dumps(manifest))
    return repo, entry, messages, kept, json.loads((entry / STORE_INDEX).read_text())


def test_export_adds_the_feature_reuse_graphs_to_an_older_entry_in_place(onnx_repo):
    _, entry, messages, kept, index = onnx_repo
    assert any(m.startswith("adding the feature-reuse graphs") for m in messages), messages
    assert not any(m.startswith("building shared base graphs") for m in messages), messages
    after = {name: (index["graphs"][name]["sha256"], (entry / index["graphs"][name]["file"]).stat().st_ino)
             for name in kept}
    assert after == kept  # the very same files: nothing rebuilt
    for name in BRANCH_GRAPHS:  # checked against torch at fp32 when built
        assert index["graphs"][name]["ort_optimization"]["multihead_attention"] > 0
        assert index["checks"][name] and max(index["checks"][name].values()) < 1e-4
    assert [o["name"] for o in index["graphs"]["unet_full_branch"]["outputs"]] == ["noise_pred", "branch"]
    assert "branch" in [i["name"] for i in index["graphs"]["unet_shallow"]["inputs"]]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_interval_1_is_byte_identical_and_interval_2_differs(onnx_repo, backend):
    generator = Generator(load_model(onnx_repo[0] / "square", backend))
    plain = generator.generate(options())
    one = generator.generate(options(cache_interval=1))
    two = generator.generate(options(cache_interval=2))
    assert np.array_equal(plain.frames, one.frames)
    assert (plain.cache_interval, one.cache_interval, two.cache_interval) == (1, 1, 2)
    assert not np.array_equal(one.frames, two.frames)
    assert np.abs(one.frames.astype(int) - two.frames).mean() < 40  # an approximation, not another video


def test_onnx_feature_reuse_matches_torch(onnx_repo):
    latents = {backend: Generator(load_model(onnx_repo[0] / "square", backend)).generate_latents(
        options(cache_interval=3, steps=6))[0] for backend in ("torch", "onnxruntime")}
    error = (latents["onnxruntime"] - latents["torch"]).norm() / latents["torch"].norm()
    assert error < 1e-3, error


def test_inversion_is_the_same_whatever_the_interval(tuned_run):
    model = load_model(tuned_run, "torch")
    inverted = []
    for interval in (1, 2):
        cache = InversionCache()
        Generator(model, cache).generate_latents(options(cache_interval=interval))
        assert len(cache) == 1
        inverted.append(next(iter(cache._entries.values())))
    assert torch.equal(*inverted)


def test_cost_counts_shallow_steps_at_their_learned_share():
    cost = Cost(per_call=1.0, per_frame=0.0)
    assert cost.estimate(options(steps=10, invert=False, cache_interval=2), 50) == 10.0  # share 1 until measured
    frames = np.zeros((8, 4, 4, 3), np.uint8)
    cost.observe(GenerationResult(frames, 8.0, 0, 10, 12.5, False, {"sample": 6.0, "decode": 0.0}, 2))
    assert cost.per_call == 1.0 and cost.shallow_share == pytest.approx(0.5 * 1.0 + 0.5 * 0.2)
    assert cost.estimate(options(steps=10, invert=False, cache_interval=2), 50) == pytest.approx(5 + 5 * 0.6)
    assert cost.estimate(options(steps=10, invert=True, cache_interval=1), 50) == 20.0


def test_which_backends_serve_it():
    manifest = {"graphs": {name: {} for name in ("unet", "unet_adapter_inputs", *BRANCH_GRAPHS)}}
    assert supports_cache_interval("torch", None)
    assert supports_cache_interval("onnxruntime", manifest)
    assert not supports_cache_interval("onnxruntime", {"graphs": {"unet": {}, "unet_adapter_inputs": {}}})
    assert not supports_cache_interval("tensorrt", manifest) and not supports_cache_interval("aoti", manifest)


def test_grpc_checks_the_interval_before_accepted_and_echoes_it(onnx_repo):
    repo = onnx_repo[0]
    server = ServerThread(ServerConfig(repo=repo, port=0, backend="onnxruntime", max_queue=2))
    try:
        server.wait_ready()
        with grpc.insecure_channel(server.target) as channel:
            api = stub(channel)
            info = api.GetServerInfo(pb2.GetServerInfoRequest(), timeout=TIMEOUT)
            assert info.limits.max_cache_interval == 10 and "cache_interval" in info.options
            supported = {m.id: m.cache_interval_supported
                         for m in api.ListModels(pb2.ListModelsRequest(), timeout=TIMEOUT).models}
            assert supported == {"square": True, "old": False}
            for model, interval, code in (("square", 0, grpc.StatusCode.INVALID_ARGUMENT),
                                          ("square", 11, grpc.StatusCode.INVALID_ARGUMENT),
                                          ("old", 2, grpc.StatusCode.FAILED_PRECONDITION)):
                call = api.Generate(request(model=model, cache_interval=interval), timeout=TIMEOUT)
                with pytest.raises(grpc.RpcError) as error:
                    next(call)  # refused before Accepted
                assert error.value.code() == code and error.value.details().startswith("cache_interval:")
            assert "onnxruntime" in error.value.details()
            old = list(api.Generate(request(model="old", steps=2), timeout=TIMEOUT))  # interval 1: served as ever
            responses = list(api.Generate(request(model="square", steps=2, cache_interval=2), timeout=TIMEOUT))
    finally:
        server.stop()
    assert len(files(old)) == 8
    result = next(r.result for r in responses if r.HasField("result"))
    assert result.cache_interval == 2 and len(files(responses)) == 8


def test_clis_refuse_a_bad_interval(tuned_run, tmp_path, capsys):
    for main, argv in ((local_main, ["--model", str(tuned_run), "--prompt", PROMPT, "--out", str(tmp_path / "a.gif")]),
                       (client_main, ["generate", "--model", "square", "--prompt", PROMPT, "--out", "x.mp4"])):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--cache-interval", "1.5"])
        assert exit_.value.code == 2 and "--cache-interval" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        local_main(["--model", str(tuned_run), "--prompt", PROMPT, "--out", str(tmp_path / "a.gif"),
                    "--cache-interval", "0"])
    assert exit_.value.code == 2 and "cache_interval" in capsys.readouterr().err


def test_colour_edit_of_the_tuned_shapes_model_reads_right_at_interval_2(tmp_path):
    from tuner.shapes import world
    from tuner.shapes.checker import check_clip, score_clip
    from tuner.tune import default_settings, tune
    from tuner.video_io import write_video

    video, caption, truth = world.make_clip("red", "circle", "white", "right", frames=8, seed=0)
    write_video(tmp_path / "clip.gif", video, fps=8)
    settings = replace(default_settings(SHIPPED), width=64, height=64, steps=10)
    run = tune(SHIPPED, tmp_path / "clip.gif", caption, tmp_path / "run", settings, progress=False)
    wanted = ("blue", "circle", "white")
    generator = Generator(load_model(run, "torch"))  # one inversion cache: the inversion is the same either way
    readings = {}
    for interval in (1, 2):
        frames = generator.generate(GenerationOptions(world.clip_caption(*wanted, "right"), steps=12, guidance=3,
                                                      seed=0, cache_interval=interval)).frames
        readings[interval] = check_clip(frames)
        score = score_clip(readings[interval], wanted, truth)
        assert score["colour"] == 1.0 and score["all"] >= 7 / 8, (interval, score)
    drift = [np.hypot(a.cx - b.cx, a.cy - b.cy) for a, b in zip(readings[1], readings[2], strict=True)]
    assert np.mean(drift) > 0 and max(drift) <= 2.0, drift
