"""`tav-bench gpu` on the CPU, in its smoke mode: every step in its own process, a step past its timeout recorded
as such while the others finish, and the JSON and plots written. (The figures themselves are a GPU's.)"""

from __future__ import annotations

import json
import math
import sys

import pytest

from benchmarks.cli import main as bench
from benchmarks.gpu import watch_check


def test_gpu_study_runs_each_step_in_a_child_and_survives_a_timeout(tmp_path, capsys):
    out = tmp_path / "out"
    bench(["gpu", "--smoke", "--backends", "torch", "--cache", str(tmp_path / "cache"), "--out", str(out),
           "--timeout", "probe=0.5"])
    result = json.loads((out / "gpu.json").read_text())
    assert json.loads(capsys.readouterr().out)["study"] == "gpu"
    statuses = {name: step["status"] for name, step in result["steps"].items()}
    assert statuses == {"env": "ok", "base": "ok", "tune": "ok", "export": "ok", "probe": "timeout", "unet": "ok",
                        "e2e": "ok"}
    assert result["steps"]["probe"]["timeout_seconds"] == 0.5 and "probe" not in result
    assert result["env"]["matmul_tflops"]["fp32"] > 0 and result["env"]["backends"]["aoti"] == "supported"
    assert result["tune"]["precisions"]["fp32"]["seconds_per_step"] > 0
    assert result["tune"]["served_model"]["mixed_precision"] == "no"
    timings = result["unet"]["variants"]["torch eager fp32"]
    assert all(math.isfinite(timings[b]["median_ms"]) and timings[b]["fraction_of_matmul_rate"] > 0
               for b in ("batch1", "batch2"))
    assert set(result["unet"]["vae_decode_8_frames"]) == {"8 calls of 1 frame", "1 call of 8 frames"}
    rows = result["e2e"]["rows"]
    assert set(rows) == {f"torch/{n}/{label}" for n in (8, 16) for label in ("inversion", "cached inversion")}
    for frames in (8, 16):  # a cached inversion costs nothing the second time
        assert rows[f"torch/{frames}/cached inversion"]["phase_ms"].get("invert", 0) < \
            rows[f"torch/{frames}/inversion"]["phase_ms"]["invert"]
    assert "8 frames with inversion <= 400 ms/frame" in result["goals"]["torch"]
    for name in ("gpu_unet", "gpu_e2e", "gpu_tune"):
        assert (out / f"{name}.png").stat().st_size > 0


@pytest.mark.needs_tool("gdb")
def test_the_probe_takes_the_native_stacks_of_a_check_that_hangs(hanging_aoti_check):
    """The open CUDA question of issue 16 is a load that does not return: the probe answers it with where each
    thread of the hung check is, from a debugger attached to it, then ends the check."""
    result = watch_check([sys.executable, "-m", "exporter.aoti_check", str(hanging_aoti_check), "--before",
                          "codecache"], 30)  # a lead (an import first, ~1 s) that a FIFO does not answer; 30 s: >= 5x
    assert result["exit"] == "hung (killed after 30 s)" and result["phase"] == "loading vae_decoder.pt2"
    assert "aoti-check phase: before loading: codecache" in result["output_tail"]
    assert "#0 " in result["native_stacks"] and "Thread" in result["native_stacks"]


def test_a_budget_bounds_every_step_and_skips_the_steps_past_it(tmp_path, capsys):
    """`--budget` (a device lease): a step's timeout is at most what is left of it, and once it is spent the later
    steps are skipped, not started; gpu.json says so. No step can finish in 0.3 s (its child imports torch)."""
    out = tmp_path / "out"
    bench(["gpu", "--smoke", "--backends", "torch", "--cache", str(tmp_path / "cache"), "--out", str(out),
           "--only", "env,base", "--budget", "0.3"])
    steps = json.loads((out / "gpu.json").read_text())["steps"]
    assert steps["env"]["status"] == "timeout" and steps["env"]["timeout_seconds"] <= 0.3
    assert steps["base"] == {"status": "skipped (the --budget was spent)"}
    capsys.readouterr()
