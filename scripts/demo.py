"""The main job, end to end on the embedded default model: `make demo`.

Every stage is the real command a user runs, driven from here:
  1. base model: the shipped shapes-world model `models/shapes-sd` (the tuning service's default base);
  2. source clip: a shapes-world clip, "a red circle is moving right on a white background";
  3. `tav-serve` on loopback over the model repository runs/demo/repo/, with ONNX Runtime, waited on through the
     standard health service; with no broker it runs its own local tuning worker;
  4. `tav-client tune --wait`: the service tunes the clip, exports it to ONNX and publishes it as `red-circle`
     (reused when the repository already holds it tuned from this base, caption and settings);
  5. `tav-client generate`: the clip redrawn from noise by the tuned weights alone, a colour, a shape and a
     background edit from the inverted clip, and a 24-frame long video with colour and background changed, as GIFs;
  6. a side-by-side grid PNG and edit metrics from the pixel checker (`score_clip`).
Everything lands under runs/demo/ (`--out`). `--tune-steps` and `--sample-steps` make it short (the test suite runs
it so, tests/test_demo.py); by default the tuner's defaults and the quality benchmark's 30 sampling steps.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuner.shapes.checker import check_clip, score_clip  # noqa: E402
from tuner.shapes.world import make_clip  # noqa: E402
from tuner.tune import default_settings, is_tuned  # noqa: E402
from tuner.video_io import read_video, write_video  # noqa: E402

RUNS = ROOT / "runs" / "demo"
SHAPES_MODEL = ROOT / "models" / "shapes-sd"
SOURCE = ("red", "circle", "white", "right")
# name -> (prompt, what the checker should read: colour, shape, background; frames; from the inverted source?).
# One of each edit type `tav-bench quality` measures (benchmarks/README.md), and the tuned weights alone: the clip
# redrawn from noise with its own caption.
EDITS = {
    "from-noise": ("a red circle is moving right on a white background", ("red", "circle", "white"), 8, False),
    "blue-circle": ("a blue circle is moving right on a white background", ("blue", "circle", "white"), 8, True),
    "red-square": ("a red square is moving right on a white background", ("red", "square", "white"), 8, True),
    "red-circle-black": ("a red circle is moving right on a black background", ("red", "circle", "black"), 8, True),
    "long-yellow-circle-gray": ("a yellow circle is moving right on a gray background", ("yellow", "circle", "gray"),
                                24, True),
}
BIN = Path(sys.executable).parent


def sh(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run([str(BIN / args[0]), *args[1:]], check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(server: subprocess.Popen, target: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"tav-serve exited with {server.returncode}")
        health = subprocess.run([str(BIN / "tav-client"), "health", "--server", target], capture_output=True)
        if health.returncode == 0:
            return
        time.sleep(1)
    raise SystemExit("tav-serve did not become SERVING in time")


def tune_once(target: str, base: Path, clip: Path, caption: str, model: Path, steps: int | None) -> None:
    """Tune through the service, unless the repository already holds this model tuned from this very base (by
    content) on this caption with these settings (the tuner's defaults for the base, at 8 frames of 64x64, and
    `steps` tuning steps where given)."""
    settings = replace(default_settings(base), frames=8, width=64, height=64)
    if steps is not None:
        settings = replace(settings, steps=steps)
    if is_tuned(model, base, caption, settings):
        print(f"reusing the tuned model {model}")
        return
    if model.exists():
        sh("tav-client", "delete-model", "--server", target, model.name)
    sh("tav-client", "tune", "--server", target, "--video", str(clip), "--prompt", caption, "--model", model.name,
       "--frames", str(settings.frames), "--width", str(settings.width), "--height", str(settings.height),
       "--steps", str(settings.steps), "--wait")


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def grid(rows: dict[str, np.ndarray], path: Path, frames: int = 8) -> None:
    """One row per clip (first `frames` frames), source on top."""
    from PIL import Image

    strips = [np.concatenate(list(video[:frames]), axis=1) for video in rows.values()]
    Image.fromarray(np.concatenate(strips, axis=0)).save(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="demo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=RUNS, help="where everything lands (default runs/demo)")
    p.add_argument("--tune-steps", type=positive, help="tuning steps (default: the tuner's default for the base)")
    p.add_argument("--sample-steps", type=positive, default=30, help="sampling steps of each generation")
    args = p.parse_args(argv)
    runs = args.out
    runs.mkdir(parents=True, exist_ok=True)
    base = SHAPES_MODEL
    print(f"base model: {base}")

    frames, caption, truth = make_clip(*SOURCE, frames=24, seed=0)
    clip = runs / "source.mp4"
    write_video(clip, frames, fps=8)
    write_video(runs / "source.gif", frames, fps=8)
    print(f"source clip: {clip} ({caption!r})")

    repo = runs / "repo"
    repo.mkdir(exist_ok=True)
    model = repo / "red-circle"
    port = free_port()
    target = f"127.0.0.1:{port}"
    server = subprocess.Popen([str(BIN / "tav-serve"), "--repo", str(repo), "--port", str(port),
                               "--backend", "onnxruntime"], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    videos: dict[str, np.ndarray] = {}
    try:
        wait_serving(server, target)
        tune_once(target, base, clip, caption, model, args.tune_steps)
        for name, (prompt, _, length, invert) in EDITS.items():
            out = runs / f"{name}.gif"
            # the quality benchmark's sampling: 30 steps, guidance 3 (on the shapes model every edit takes and the
            # path stays within 2 px on average; benchmarks/README)
            sh("tav-client", "generate", "--server", target, "--model", "red-circle", "--prompt", prompt,
               "--frames", str(length), "--steps", str(args.sample_steps), "--guidance", "3", "--seed", "0",
               "--format", "gif", "--out", str(out), *([] if invert else ["--no-invert"]))
            videos[name] = read_video(out).frames
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)

    grid({"source": frames, **videos}, runs / "grid.png")
    print(f"grid: {runs / 'grid.png'}")
    metrics = {name: score_clip(check_clip(video), EDITS[name][1], truth) for name, video in videos.items()}
    (runs / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    for name, m in metrics.items():
        print(f"  {name:20s} colour {m['colour']:.0%}  shape {m['shape']:.0%}  background {m['background']:.0%}"
              f"  trajectory {m['trajectory_px']:.1f}px")
    print(f"done: videos, grid and metrics in {runs}")


if __name__ == "__main__":
    main()
