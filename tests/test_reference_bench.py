"""`tav-bench reference` without the official code: it says it is skipped and why, and writes no figures.

The study itself (the official UNet beside the engines) needs a showlab/Tune-A-Video checkout and its virtualenv,
which CI lacks; it is run by hand (benchmarks/README.md, "The engines against the official UNet")."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks.cli import main as bench


def _skipped(out: Path, capsys: pytest.CaptureFixture, *extra: str) -> dict:
    bench(["reference", "--out", str(out), *extra])
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((out / "reference.json").read_text())
    assert written["skipped"] is True and printed["reason"] == written["reason"]
    for figure in ("ms_per_call", "speedup_vs_official", "profile", "goals", "agreement_max_rel_diff"):
        assert figure not in written, figure  # nothing that reads as a measurement
    assert sorted(p.name for p in out.iterdir()) == ["reference.json"]  # no plot
    return written


def test_reference_without_ref_dir_is_skipped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "reference.png").write_bytes(b"an earlier run's plot")  # would contradict the JSON: removed
    assert "--ref-dir" in _skipped(tmp_path, capsys)["reason"]


def test_reference_with_a_dir_that_is_not_the_checkout_is_skipped(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    reason = _skipped(tmp_path / "out", capsys, "--ref-dir", str(tmp_path), "--ref-python", sys.executable)["reason"]
    assert "tuneavideo/models/unet.py" in reason


def test_reference_when_the_python_cannot_import_it_is_skipped(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    unet = tmp_path / "checkout" / "tuneavideo" / "models" / "unet.py"
    unet.parent.mkdir(parents=True)
    unet.write_text("import a_module_nobody_has\n")
    reason = _skipped(tmp_path / "out", capsys, "--ref-dir", str(tmp_path / "checkout"),
                      "--ref-python", sys.executable)["reason"]
    assert "cannot import the official UNet" in reason and "a_module_nobody_has" in reason
