"""`tav-bench export-sd`: the exporter on a full-size model. A Stable Diffusion 1.4-config video UNet (random
weights built from the config, nothing downloaded) exported at 512x512 x 8 frames, batch axis 1|2 (3.4 GB of
fp32 weights: external data), then exported again at 256x256 and checked against PyTorch at batch 1 (the check
at 512 would not fit this machine's memory beside the model)."""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from benchmarks.common import save_plot, write_result
from benchmarks.params import SD14_UNET_CONFIG
from exporter.cli import ort_session
from exporter.onnx_export import GraphSpec, check_graph, export_graph, graph_files, has_sdpa_pattern
from tuner.inflate import inflate


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="512,256", help="pixel sizes to export; the last one is checked numerically")
    p.add_argument("--workdir", type=Path, help="where the graphs go (default: a temporary directory)")


def unet_spec(unet: torch.nn.Module, latent: int) -> GraphSpec:
    return GraphSpec("unet", unet, {"sample": torch.zeros(2, 4, 8, latent, latent),
                                    "timestep": torch.ones(1),
                                    "encoder_hidden_states": torch.zeros(2, 77, 768)},
                     ["noise_pred"], batch_axis=True)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    unet = inflate(UNet2DConditionModel(**SD14_UNET_CONFIG)).eval()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for size in sizes:
            path = Path(tmp) / f"unet_{size}.onnx"
            started = time.perf_counter()
            spec = unet_spec(unet, size // 8)
            export_graph(spec, path)
            row = {"size": size, "export_seconds": time.perf_counter() - started,
                   "files": {f.name: f.stat().st_size for f in graph_files(path)},
                   "sdpa_pattern": has_sdpa_pattern(path), "peak_rss_gib_so_far": peak_rss_gib()}
            if size == sizes[-1]:
                started = time.perf_counter()
                row["check"] = check_graph(spec, ort_session(path), "fp32", batches=(1,))
                row["check_seconds"] = time.perf_counter() - started
                row["peak_rss_gib_so_far"] = peak_rss_gib()
            rows.append(row)
            path.unlink()
            for f in graph_files(path):
                f.unlink(missing_ok=True)
    result = {"study": "export-sd", "unet_config": SD14_UNET_CONFIG, "frames": 8, "rows": rows,
              "peak_rss_gib": peak_rss_gib()}
    write_result(args.out, "export_sd", result)
    save_plot(args.out / "export_sd.png", lambda ax: (
        ax.bar([str(r["size"]) for r in rows], [r["export_seconds"] for r in rows]),
        ax.set_xlabel("pixel size (8 frames)"), ax.set_ylabel("export seconds, SD 1.4-config video UNet")))
    return result
