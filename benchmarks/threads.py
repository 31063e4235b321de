"""`tav-bench threads`: seconds per tuning step of the shipped shapes model under each OpenMP/thread setting, alone
and beside a CPU hog (a busy Python process), each setting in a fresh process. It picks the setting every tuning
process runs with (`tuner.threads`): the one that keeps most of the alone speed and degrades gracefully when a
neighbour takes a core, as on a shared Kubernetes node or a developer's laptop."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import save_plot, summarize, write_result
from tuner.threads import cpu_budget

ROOT = Path(__file__).resolve().parents[1]
OMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")

# The measured process: nothing but the tuner imported (the benchmarks package would set its own OpenMP policy
# before torch loads); it prints the seconds of each tuning step.
CHILD = r"""
import json, sys, tempfile, time
threads, steps = int(sys.argv[1]), int(sys.argv[2])
import torch
if threads:
    torch.set_num_threads(threads)
from dataclasses import replace
from pathlib import Path
from tuner.shapes import SHAPES_MODEL
from tuner.shapes.world import make_clip
from tuner.tune import default_settings, tune
from tuner.video_io import encode_video

video, caption, _ = make_clip("red", "circle", "white", "right", frames=8, seed=0)
settings = replace(default_settings(SHAPES_MODEL), frames=8, width=64, height=64, steps=steps)
marks = []
with tempfile.TemporaryDirectory() as tmp:
    marks.append(time.perf_counter())
    tune(SHAPES_MODEL, encode_video(video, 8, "gif"), caption, Path(tmp) / "run", settings, device="cpu",
         progress=False, on_step=lambda *_: marks.append(time.perf_counter()))
print(json.dumps({"seconds": [b - a for a, b in zip(marks[1:], marks[2:])], "threads": torch.get_num_threads()}))
"""


def settings(cores: int) -> dict[str, dict]:
    """name -> the environment a tuning process starts with and its thread count (0: torch's default)."""
    fewer = max(1, cores - 1)
    return {  # in the order they are measured: the likeliest choices first
        "default (spin ~300k)": {"env": {}, "threads": 0},
        "passive": {"env": {"OMP_WAIT_POLICY": "PASSIVE"}, "threads": 0},
        f"threads={fewer} (cores-1)": {"env": {}, "threads": fewer},
        "GOMP_SPINCOUNT=30000": {"env": {"GOMP_SPINCOUNT": "30000"}, "threads": 0},
        f"threads={fewer} (cores-1), passive": {"env": {"OMP_WAIT_POLICY": "PASSIVE"}, "threads": fewer},
        "GOMP_SPINCOUNT=10000": {"env": {"GOMP_SPINCOUNT": "10000"}, "threads": 0},
        "GOMP_SPINCOUNT=3000": {"env": {"GOMP_SPINCOUNT": "3000"}, "threads": 0},
        "GOMP_SPINCOUNT=1000": {"env": {"GOMP_SPINCOUNT": "1000"}, "threads": 0},
        "GOMP_SPINCOUNT=300": {"env": {"GOMP_SPINCOUNT": "300"}, "threads": 0},
        "active (spin forever)": {"env": {"OMP_WAIT_POLICY": "ACTIVE"}, "threads": 0},
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=15, help="tuning steps per run (the first two are warm-up)")
    p.add_argument("--only", action="append", help="measure only these settings (repeatable; default all)")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds over all settings, interleaved so that the machine's load hits all alike")


def measure(setting: dict, steps: int, hog: bool) -> dict:
    """One fresh tuning process under `setting`, beside a busy Python process when `hog`: its step seconds (the
    first two steps are warm-up), thread count and the load average before it started."""
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARIABLES}
    env.update(setting["env"])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if hog else None
    try:
        load = os.getloadavg()[0]
        done = subprocess.run([sys.executable, "-c", CHILD, str(setting["threads"]), str(steps)], env=env,
                              capture_output=True, text=True, check=False)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    if done.returncode != 0:
        raise RuntimeError(f"the tuning process failed: {done.stderr[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {"seconds": out["seconds"][1:], "threads": out["threads"], "load_average_before": round(load, 2)}


def _cell(runs: list[dict]) -> dict:
    seconds = [s for run in runs for s in run["seconds"]]
    return {**summarize(seconds), "seconds_per_step_median": float(np.median(seconds)), "threads": runs[0]["threads"],
            "runs_seconds": [run["seconds"] for run in runs],
            "load_average_before": [run["load_average_before"] for run in runs]}


def run(args: argparse.Namespace) -> dict:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped study stops its hog and tuner too
    cores = cpu_budget()
    chosen = {k: v for k, v in settings(cores).items() if not args.only or k in args.only}
    results: dict[str, dict] = {}
    result = {
        "study": "threads",
        "model": "models/shapes-sd, 8 frames of 64x64",
        "steps": args.steps,
        "repeats": args.repeats,
        "cpu_budget": cores,
        "affinity": len(os.sched_getaffinity(0)),
        "settings": results,
    }

    def draw(ax) -> None:
        names = list(results)
        x = np.arange(len(names))
        for offset, key, label in ((-0.2, "alone", "alone"), (0.2, "beside_hog", "beside a busy process")):
            ax.bar(x + offset, [results[n][key]["seconds_per_step_median"] for n in names], 0.4, label=label)
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("s per tuning step (median)")
        ax.set_title(f"tuning the shapes model on {cores} cores")
        ax.legend()

    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeats):
        for name, setting in chosen.items():
            for where, hog in (("alone", False), ("beside_hog", True)):
                runs.setdefault((name, where), []).append(measure(setting, args.steps, hog))
            results[name] = {**setting, "alone": _cell(runs[name, "alone"]),
                             "beside_hog": _cell(runs[name, "beside_hog"])}
            alone, hog = (results[name][k]["seconds_per_step_median"] for k in ("alone", "beside_hog"))
            results[name]["slowdown_beside_hog"] = round(hog / alone, 2)
            print(f"{name}: {alone:.3f} s/step alone, {hog:.3f} beside a hog", file=sys.stderr, flush=True)
            result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            write_result(args.out, "threads", result)  # as it goes: a study stopped early keeps what it has
            save_plot(args.out / "threads.png", draw)
    return result
