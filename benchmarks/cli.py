"""`tav-bench`: one command, a subcommand per study; each writes JSON and a PNG plot under --out."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import (
    backends,
    export_sd,
    floor,
    gpu,
    latency,
    models,
    params,
    quality,
    reference,
    scaling,
    threads,
    tune_speed,
)

STUDIES = {
    "backends": (backends, "PyTorch vs ONNX Runtime here: ms per UNet call and per frame, and which is faster"),
    "latency": (latency, "ms per UNet call, per phase and per generated frame vs length, per backend"),
    "tune": (tune_speed, "seconds per tuning step and peak memory"),
    "threads": (threads, "tuning s/step per OpenMP/thread setting, alone and beside a busy process"),
    "scaling": (scaling, "ms per frame vs length: sparse-causal windows vs full cross-frame attention"),
    "floor": (floor, "FLOPs per UNet call and per frame, machine matmul rate, GPU floors for SD 1.4"),
    "models": (models, "resident memory vs number of tuned models of one base; model switch time"),
    "export-sd": (export_sd, "export a full SD 1.4-config video UNet at 512x512 x 8 frames; check at 256"),
    "quality": (quality, "edit quality on the shapes model: text alignment, motion, consistency, ablations, drift"),
    "params": (params, "parameter counts (total, trainable) of the tiny and the SD 1.4-config UNet"),
    "reference": (reference, "the torch and ONNX Runtime engines against the official Tune-A-Video UNet, profiled"),
    "gpu": (gpu, "the GPU figures in one command: UNet per backend and CUDA option, end to end, tuning, compile"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tav-bench", description=__doc__)
    sub = parser.add_subparsers(dest="study", required=True)
    for name, (module, help_text) in STUDIES.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--out", type=Path, default=Path("runs/bench"), help="directory for JSON and PNG")
        module.add_arguments(p)
    args = parser.parse_args(argv)
    result = STUDIES[args.study][0].run(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
