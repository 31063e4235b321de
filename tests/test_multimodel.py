"""Many tuned videos per replica: twenty models of one base served from one process, each generating what it
generates alone, at the memory cost of its adapter rather than a UNet; models added or removed while serving."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from grpc_helpers import ServeProcess
from safetensors.torch import load_file, save_file

from benchmarks.models import MEASURABLE_UNET
from clients import Client, ServerError
from server.engines import load_model, torch_engine
from server.generate import GenerationOptions, Generator
from tuner.artefacts import ADAPTER_FILE, CONFIG_FILE
from tuner.io_utils import sha256_files
from tuner.shapes.world import make_clip
from tuner.tiny import make_tiny
from tuner.tune import TuneSettings, tune
from tuner.video_io import write_video

MODELS = 20
# From noise, conditional branch only: two UNet calls a request (inversion and guidance have tests of their own;
# what matters here is which adapter each call runs with).
OPTIONS = dict(frames=8, steps=2, guidance=1.0, seed=4, invert=False)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """Twenty models of one base: one tuned for a step, and nineteen copies of it whose adapters carry seeded noise
    (0.02 on every tensor, the temporal attentions' zero outputs included), each with its adapter's hash: as
    distinct to the server as twenty tunings, at the cost of one."""
    root = tmp_path_factory.mktemp("many")
    base = make_tiny(root / "base", unet_config=MEASURABLE_UNET)
    frames, caption, _ = make_clip("red", "circle", "white", "right", frames=8, seed=0)
    write_video(root / "clip.mp4", frames, fps=8)
    first = tune(base, root / "clip.mp4", caption, root / "repo" / "m00",
                 TuneSettings(width=32, height=32, steps=1, seed=0), progress=False)
    adapter = load_file(first / ADAPTER_FILE)
    for i in range(1, MODELS):
        clone = shutil.copytree(first, root / "repo" / f"m{i:02d}")
        generator = torch.Generator().manual_seed(i)
        save_file({name: tensor + 0.02 * torch.randn(tensor.shape, generator=generator)
                   for name, tensor in adapter.items()}, clone / ADAPTER_FILE)
        config = json.loads((clone / CONFIG_FILE).read_text())
        config["adapter_sha256"] = sha256_files([clone / ADAPTER_FILE], clone)
        (clone / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return root / "repo"


def unet_mib(repo) -> float:
    base = next(repo.iterdir()).parent.parent / "base" / "unet"
    return sum(p.stat().st_size for p in base.glob("*.safetensors")) / 2**20


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def alone(run) -> np.ndarray:
    """The model's frames when it is the only model in the process (its own, unshared modules)."""
    torch_engine._BASES.clear()
    frames = Generator(load_model(run, "torch")).generate(GenerationOptions("a blue circle", **OPTIONS)).frames
    torch_engine._BASES.clear()
    return frames


def serve(repo, models: list[str], tmp_path):
    """tav-serve on a repository holding just `models` (symlinks), warmed up."""
    subset = tmp_path / f"repo{len(models)}"
    subset.mkdir()
    for name in models:
        (subset / name).symlink_to(repo / name, target_is_directory=True)
    server = ServeProcess("--repo", str(subset))
    server.wait_for(r"serving ", timeout=600)
    return server, subset


def test_twenty_models_share_one_base(repo, tmp_path):
    names = sorted(p.name for p in repo.iterdir())
    assert len(names) == MODELS
    expected = {name: alone(repo / name) for name in names}
    assert len({frames.tobytes() for frames in expected.values()}) == MODELS, "every model generates its own frames"
    many, subset = serve(repo, names[:1], tmp_path)  # one model, then nineteen more added while it serves
    try:
        with Client(f"127.0.0.1:{many.port}") as client:
            client.generate(names[0], "a blue circle", format="png", **OPTIONS)
            rss_one = rss_mib(many.proc.pid)
            for name in names[1:]:
                (subset / name).symlink_to(repo / name, target_is_directory=True)
            listed_within_a_rescan(client, names)
            for name in names:
                video = client.generate(name, "a blue circle", format="png", **OPTIONS)
                frames = np.stack([read_video_png(data) for data in video.files])
                assert np.array_equal(frames, expected[name]), f"{name} differs from the model served alone"
            assert all(m.loaded for m in client.list_models().models)
        rss_many = rss_mib(many.proc.pid)
    finally:
        many.proc.terminate()
        many.proc.wait(60)
    per_model = (rss_many - rss_one) / (MODELS - 1)
    print(f"resident memory: 1 model {rss_one:.0f} MiB, {MODELS} models {rss_many:.0f} MiB, "
          f"{per_model:.2f} MiB per added model; the UNet is {unet_mib(repo):.1f} MiB")
    assert unet_mib(repo) >= 20
    assert per_model < 0.25 * unet_mib(repo)


def read_video_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def listed_within_a_rescan(client: Client, names: list[str], seconds: float = 60.0) -> None:
    """The server lists exactly `names` after a rescan (every 2 s by default; the bound leaves a busy machine
    room: only a failure waits for it)."""
    deadline = time.monotonic() + seconds
    while (listed := [m.id for m in client.list_models().models]) != names:
        assert time.monotonic() < deadline, listed
        time.sleep(0.2)


def test_models_added_and_removed_while_serving(repo, tmp_path):
    names = sorted(p.name for p in repo.iterdir())[:2]
    server, subset = serve(repo, names[:1], tmp_path)
    try:
        with Client(f"127.0.0.1:{server.port}") as client:
            assert [m.id for m in client.list_models().models] == names[:1]
            (subset / names[1]).symlink_to(repo / names[1], target_is_directory=True)
            listed_within_a_rescan(client, names)
            assert not client.get_model(names[1]).loaded
            client.generate(names[1], "a green circle", format="gif", **OPTIONS)
            assert client.get_model(names[1]).loaded
            # removing a model while a request on it runs: that request finishes, later ones get NOT_FOUND
            started, outcome = threading.Event(), {}

            def long_request():
                with Client(f"127.0.0.1:{server.port}") as other:
                    outcome["video"] = other.generate(names[0], "a red circle", format="gif", frames=8, steps=20,
                                                      seed=1, progress=lambda *_: started.set())

            thread = threading.Thread(target=long_request)
            thread.start()
            assert started.wait(300)
            (subset / names[0]).unlink()
            listed_within_a_rescan(client, names[1:])
            thread.join(600)
            assert outcome["video"].frames == 8
            with pytest.raises(ServerError) as error:
                client.generate(names[0], "a green circle", format="gif", **OPTIONS)
            assert error.value.code.name == "NOT_FOUND"
    finally:
        server.proc.terminate()
        server.proc.wait(60)
