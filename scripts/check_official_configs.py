"""Check, by hand (not in CI), that the official Tune-A-Video configs parse and tune with `tav-tune --config`.

Given a checkout of showlab/Tune-A-Video, each of its `configs/*.yaml` is read (`tuner.official_config`) and tuned
on the shipped shapes model, with `--base`, `--video` (the clip of the same name in --videos) and
`--mixed-precision no` (the configs' fp16 is CUDA-only) overriding it. The configs ask for 24 frames at 512x512 and
500 steps, slow on a CPU: `--steps N` tunes each for N steps instead (0: read, encode and write the model only).

    python scripts/check_official_configs.py CHECKOUT [--steps N] [--videos DIR] [--out DIR]

Prints a line per config (parsed, tuned, seconds, the command) and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuner.threads import tuning_environment  # noqa: E402  (no torch: OpenMP's settings go in before it loads)

tuning_environment()

from tuner.official_config import ConfigError, read_official_config  # noqa: E402
from tuner.tune import main as tav_tune  # noqa: E402

SHAPES = ROOT / "models" / "shapes-sd"
VIDEOS = ROOT.parent / "shared" / "videos"


def check(config: Path, videos: Path, out: Path, steps: int | None) -> tuple[bool, bool, float, str, str]:
    """(parsed, tuned, seconds, command, what went wrong) for one config."""
    argv = ["--config", str(config), "--base", str(SHAPES), "--video", str(videos / f"{config.stem}.mp4"),
            "--mixed-precision", "no", "--out", str(out / config.stem), "--overwrite",
            *(["--steps", str(steps)] if steps is not None else [])]
    command = "tav-tune " + " ".join(argv)
    try:
        read_official_config(config)
    except ConfigError as e:
        return False, False, 0.0, command, str(e)
    started = time.perf_counter()
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            tav_tune(argv)
    except SystemExit as e:
        lines = [line for line in stderr.getvalue().splitlines() if "error:" in line]
        return True, False, time.perf_counter() - started, command, lines[-1] if lines else f"exit {e.code}"
    warnings = sum(line.startswith("tav-tune: warning:") for line in stderr.getvalue().splitlines())
    return True, True, time.perf_counter() - started, command, f"{warnings} warning lines"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkout", type=Path, help="a checkout of showlab/Tune-A-Video (its configs/*.yaml are read)")
    p.add_argument("--steps", type=int, help="tune each config for this many steps (default: the config's)")
    p.add_argument("--videos", type=Path, default=VIDEOS, help="folder of <config name>.mp4 clips")
    p.add_argument("--out", type=Path, help="where the tuned models go (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    configs = sorted((args.checkout / "configs").glob("*.yaml"))
    if not configs:
        raise SystemExit(f"{args.checkout}/configs holds no *.yaml")
    failed = 0
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        for config in configs:
            parsed, tuned, seconds, command, note = check(config, args.videos, out, args.steps)
            failed += not tuned
            print(f"{config.name}: parsed {'yes' if parsed else 'NO'}, tuned {'yes' if tuned else 'NO'}, "
                  f"{seconds:.1f} s ({note})\n  {command}", flush=True)
    print(f"{len(configs) - failed} of {len(configs)} configs parsed and tuned", flush=True)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
