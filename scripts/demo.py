"""The main job, end to end on the embedded default model: `make demo`.

Stages (each a real command a user would run, driven from here):
  1. the base model: the tiny random SD 1.x-layout model (`tav-make-tiny`);
  2. a source clip: a shapes-world clip, "a red circle is moving right on a white background";
  3. one-shot tuning into the model repository (`tav-tune`).
Everything lands under runs/demo/.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tuner.shapes.world import make_clip
from tuner.video_io import write_video

RUNS = Path("runs/demo")


def sh(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def main() -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    base = RUNS / "tiny-sd"
    if not base.exists():
        sh("tav-make-tiny", str(base))
    frames, caption, _ = make_clip("red", "circle", "white", "right", frames=16, seed=0)
    source = RUNS / "red-circle.mp4"
    write_video(source, frames, fps=8)
    print(f"source clip: {source} ({caption!r})")
    model = RUNS / "repo" / "red-circle"
    sh("tav-tune", "--base", str(base), "--video", str(source), "--prompt", caption, "--out", str(model),
       "--frames", "8", "--width", "64", "--height", "64", "--steps", "50", "--lr", "1e-3", "--overwrite")
    print(f"tuned model: {model}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
