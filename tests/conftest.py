"""Shared fixtures, each made once a run, whatever the number of pytest-xdist workers (`built_once`): the tiny base
model, a small synthetic clip, a tuned tiny model, the tiny base's ONNX engine store (seeded into test repositories),
a tiny pretrained shapes model, the AOTInductor packages, and one inductor cache; and `hub_cache_repository`, a
huggingface_hub cache laid out on disk. The `needs_tool` marker comes from tests/tools.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable

# PyTorch's OpenMP workers spin while idle; on 2 shared cores that made UNet calls 5-20x slower (measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock

from tuner.tiny import make_tiny
from tuner.tune import TuneSettings, tune
from tuner.video_io import write_video

SHARED_VIDEOS = Path(os.environ.get("TAV_SHARED_VIDEOS", Path(__file__).resolve().parents[2] / "shared" / "videos"))

torch.set_num_threads(min(2, torch.get_num_threads()))
pytest_plugins = ["tools"]  # the needs_tool marker: a missing program skips its tests, or fails them under CI=true


def moving_square_clip(frames: int = 12, width: int = 48, height: int = 40) -> np.ndarray:
    """A red square sliding right over a blue-to-green gradient: real motion, exactly known."""
    y, x = np.mgrid[0:height, 0:width]
    background = np.stack([np.zeros_like(x), 255 * x / width, 255 * (1 - y / height)], -1)
    clip = np.repeat(background[None], frames, 0).astype(np.uint8)
    for i in range(frames):
        left = 2 + 2 * i
        clip[i, 12:24, left : left + 12] = (230, 20, 20)
    return clip


@pytest.fixture(scope="session")
def built_once(tmp_path_factory, worker_id) -> Callable[[str, Callable[[Path], None]], Path]:
    """`built_once(name, build)`: the directory `build(directory)` filled, built by the first of the run's pytest
    processes to ask (the xdist workers share the run's temporary root) while the others wait for it."""
    root = tmp_path_factory.getbasetemp()
    shared = (root if worker_id == "master" else root.parent) / "built-once"
    shared.mkdir(exist_ok=True)

    def get(name: str, build: Callable[[Path], None]) -> Path:
        directory = shared / name
        with FileLock(shared / f"{name}.lock"):
            if not (shared / f"{name}.done").exists():
                shutil.rmtree(directory, ignore_errors=True)
                directory.mkdir()
                build(directory)
                (shared / f"{name}.done").touch()
        return directory

    return get


@pytest.fixture(scope="session", autouse=True)
def inductor_cache(built_once):
    """One inductor cache for the run, the processes it starts included: AOTInductor packages of the same graphs
    compile once a run (tests/test_aoti.py builds the tiny base's), and never come from an earlier run's cache, so
    the suite's time is a cold cache's."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TORCHINDUCTOR_CACHE_DIR", str(built_once("inductor", lambda directory: None)))
        yield


@pytest.fixture(scope="session")
def tiny_base(built_once) -> Path:
    return built_once("models", lambda directory: make_tiny(directory / "tiny-sd")) / "tiny-sd"


@pytest.fixture(scope="session")
def clip_path(built_once) -> Path:
    return built_once("clips", lambda directory: write_video(directory / "square.mp4", moving_square_clip(),
                                                             fps=8)) / "square.mp4"


@pytest.fixture(scope="session")
def tuned_run(tiny_base, clip_path, built_once) -> Path:
    """The tiny model tuned for a few steps on the synthetic clip, at 32x32 pixels (16x16 latents)."""
    settings = TuneSettings(frames=8, width=32, height=32, steps=4, lr=1e-3, seed=1)
    return built_once("runs", lambda directory: tune(tiny_base, clip_path, "a red square is moving right",
                                                     directory / "square", settings, progress=False)) / "square"


@pytest.fixture(scope="session")
def tiny_shapes_base(built_once) -> Path:
    """A shapes-world model pretrained by `tav-pretrain-shapes` at its tiny size for three steps a stage, once a
    run (tests/test_shapes.py checks what it writes; tests/test_quality.py benchmarks on it)."""
    from tuner.shapes.pretrain import main as pretrain_main

    def build(directory: Path) -> None:
        pretrain_main(["--out", str(directory / "tiny-sd"), "--arch", "tiny", "--images", "48", "--vae-steps", "3",
                       "--vae-batch", "4", "--unet-steps", "3", "--unet-batch", "4", "--seed", "1"])

    return built_once("shapes", build) / "tiny-sd"


@pytest.fixture(scope="session")
def engine_store(tiny_base, clip_path, built_once) -> Path:
    """A shared graph store (`REPO/.engines`) holding the tiny base's ONNX graphs for the tuning service's jobs at
    32x32 (the tuner's defaults for the base otherwise: the architecture the store key names), exported once a
    run. The store is content-addressed, so a test repository seeded with it (`seed_engines`) exports
    each tuned model's adapter only, as a repository whose first job built the entry would."""
    from exporter.cli import export
    from tuner.tune import default_settings

    def build(directory: Path) -> None:
        settings = replace(default_settings(tiny_base), frames=8, width=32, height=32, steps=1, seed=1)
        run = tune(tiny_base, clip_path, "a red square is moving right", directory / "repo" / "seed", settings,
                   progress=False)
        export(run, progress=lambda message: None, check_tuned=False)

    return built_once("engine-store", build) / "repo" / ".engines"


@pytest.fixture(scope="session")
def seed_engines(engine_store):
    """`seed_engines(repo)` puts the session's `engine_store` entries into `repo/.engines`, as hard links (entries
    are never written in place: an export replaces a whole directory); returns `repo`. A test that changes a store
    file in place must copy the entry instead, or it changes every seeded repository's."""

    def seed(repo: Path) -> Path:
        for entry in engine_store.iterdir():
            if entry.is_dir():
                shutil.copytree(entry, repo / ".engines" / entry.name, copy_function=os.link)
        return repo

    return seed


@pytest.fixture
def hanging_aoti_check(tmp_path) -> Path:
    """A directory for `exporter.aoti_check` whose package is a FIFO no one writes to: loading it blocks, as loading
    a package did on an H200."""
    import json

    from safetensors.torch import save_file

    from exporter import aoti_check

    directory = tmp_path / ".key.tmp"
    directory.mkdir()
    os.mkfifo(directory / "vae_decoder.pt2")
    save_file({"latents": torch.zeros(1, 4, 16, 16)}, directory / aoti_check.INPUTS_FILE)
    (directory / aoti_check.PLAN_FILE).write_text(json.dumps({"device": "cpu", "packages": {"vae_decoder": {
        "file": "vae_decoder.pt2", "weights": "vae_decoder.safetensors", "batches": {"1": ["latents"]}}}}))
    return directory


MODELS = {"square-a": ("a red square is moving right", TuneSettings(frames=8, width=32, height=32, steps=4, lr=1e-3,
                                                                      seed=1)),
          "square-b": ("a red square is sliding right", TuneSettings(frames=8, width=32, height=32, steps=4, lr=1e-2,
                                                                       seed=2))}


@pytest.fixture(scope="session")
def aoti_repo(tiny_base, clip_path, built_once):
    """Two tuned models of the tiny base; the first exported by `tav-export --aoti`, which builds the packages, the
    second by the API, which reuses them. Returns the repository and the second export's messages."""
    from exporter.cli import export, main

    def build(root: Path) -> None:
        repo = root / "repo"
        for name, (prompt, settings) in MODELS.items():
            tune(tiny_base, clip_path, prompt, repo / name, settings, progress=False)
        messages: list[str] = []
        with pytest.MonkeyPatch.context() as env:
            env.setenv("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
            main(["--model", str(repo / "square-a"), "--aoti", "--device", "cpu"])
            export(repo / "square-b", aoti=True, device="cpu", progress=messages.append)
        (root / "messages.json").write_text(json.dumps(messages))

    root = built_once("aoti", build)
    return root / "repo", json.loads((root / "messages.json").read_text())


@pytest.fixture(scope="session")
def paper_engine_store(tuned_run, built_once) -> tuple[Path, str]:
    """An engine store (`.engines/`) with the ONNX entry of the tiny base at 32x32 in `tuned_run`'s architecture
    (frame positions "none"), built once for the run to be copied into test repositories; and the entry's key."""
    from exporter.cli import export

    def build(root: Path) -> None:
        shutil.copytree(tuned_run, root / "square")
        export(root / "square", progress=lambda message: None)

    root = built_once("paper-engine-store", build)
    manifest = json.loads((root / "square" / "engines" / "manifest.json").read_text())
    return root / ".engines", manifest["store"]["key"]


def hub_cache_repository(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay `folder`'s files out as hub repository `repo_id` in the huggingface_hub cache `cache` (blobs by content
    hash, a snapshot of links to them, refs/main), as a download would leave it: what `HF_HUB_OFFLINE=1` reads."""
    model = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = model / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = model / "snapshots" / commit / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (model / "refs").mkdir(exist_ok=True)
    (model / "refs" / "main").write_text(commit)
