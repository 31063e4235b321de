"""Measures how well a shapes-world text-to-image model follows its prompt, read back by the pixel checker.

Every colour x shape combination (the held-out ones included) is prompted on every background; each sample is
scored for colour, shape and background. This is the number the shipped model card reports, and the check that
a pretraining run learned the words rather than the training combinations.

    tav-eval-shapes --model models/shapes-sd --samples 4 --json eval.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from tuner.shapes import world
from tuner.shapes.checker import check_frame

ATTRIBUTES = ("colour", "shape", "background")


def load_pipeline(model: Path) -> StableDiffusionPipeline:
    pipeline = StableDiffusionPipeline.from_pretrained(
        model, safety_checker=None, requires_safety_checker=False
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(
    pipeline: StableDiffusionPipeline,
    prompts: list[str],
    samples: int,
    steps: int = 25,
    guidance: float = 6.0,
    seed: int = 0,
) -> np.ndarray:
    """uint8 images [len(prompts) * samples, H, W, 3], `samples` consecutive images per prompt."""
    images = pipeline(
        prompts,
        height=world.SIZE,
        width=world.SIZE,
        num_inference_steps=steps,
        guidance_scale=guidance,
        num_images_per_prompt=samples,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def evaluate(
    pipeline: StableDiffusionPipeline,
    samples: int = 4,
    steps: int = 25,
    guidance: float = 6.0,
    seed: int = 0,
    backgrounds: tuple[str, ...] = tuple(world.BACKGROUNDS),
) -> tuple[dict, np.ndarray]:
    """Score all colour x shape combinations on each background.

    Returns the report and the images, [backgrounds, combinations, samples, H, W, 3].
    """
    combos = [(c, s) for c in world.COLOURS for s in world.SHAPES]
    records, grids = [], []
    for b, background in enumerate(backgrounds):
        prompts = [world.image_caption(c, s, background) for c, s in combos]
        images = generate(pipeline, prompts, samples, steps, guidance, seed + b)
        grids.append(images.reshape(len(combos), samples, *images.shape[1:]))
        for i, image in enumerate(images):
            colour, shape = combos[i // samples]
            reading = check_frame(image)
            records.append(
                {
                    "prompt": prompts[i // samples],
                    "held_out": (colour, shape) in world.HELD_OUT,
                    "expected": {"colour": colour, "shape": shape, "background": background},
                    "reading": asdict(reading),
                }
            )
    return summarise(records), np.stack(grids)


def _accuracy(records: list[dict]) -> dict[str, float]:
    hits = {a: [r["reading"][a] == r["expected"][a] for r in records] for a in ATTRIBUTES}
    hits["all"] = [all(h) for h in zip(*hits.values(), strict=True)]
    return {name: float(np.mean(values)) for name, values in hits.items()}


def summarise(records: list[dict]) -> dict:
    by_combo = {}
    for colour in world.COLOURS:
        for shape in world.SHAPES:
            chosen = [
                r for r in records if (r["expected"]["colour"], r["expected"]["shape"]) == (colour, shape)
            ]
            by_combo[f"{colour} {shape}"] = _accuracy(chosen)
    return {
        "overall": _accuracy(records),
        "held_out": _accuracy([r for r in records if r["held_out"]]),
        "seen": _accuracy([r for r in records if not r["held_out"]]),
        "by_combination": by_combo,
        "samples": records,
    }


def format_table(report: dict) -> str:
    header = f"{'':24s}" + "".join(f"{a:>12s}" for a in (*ATTRIBUTES, "all"))
    lines = [header]
    held = {f"{c} {s}" for c, s in world.HELD_OUT}
    for name, acc in report["by_combination"].items():
        label = name + (" (held out)" if name in held else "")
        lines.append(f"{label:24s}" + "".join(f"{acc[a]:12.0%}" for a in (*ATTRIBUTES, "all")))
    lines.append("-" * len(header))
    for group in ("overall", "seen", "held_out"):
        lines.append(f"{group:24s}" + "".join(f"{report[group][a]:12.0%}" for a in (*ATTRIBUTES, "all")))
    return "\n".join(lines)


def save_grid(grids: np.ndarray, path: Path) -> None:
    """One row per colour x shape combination, samples of each background side by side."""
    from PIL import Image

    backgrounds, combos, samples, h, w, _ = grids.shape
    tiles = grids.transpose(1, 3, 0, 2, 4, 5).reshape(combos * h, backgrounds * samples * w, 3)
    Image.fromarray(tiles).save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="SD-1.x diffusers directory")
    parser.add_argument("--samples", type=int, default=4, help="images per prompt")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--backgrounds", nargs="+", choices=list(world.BACKGROUNDS), default=list(world.BACKGROUNDS)
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("eval_t2i.json"), help="where to write the report")
    parser.add_argument("--grid", type=Path, help="also save every sample as one PNG")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    pipeline = load_pipeline(args.model)
    report, grids = evaluate(
        pipeline, args.samples, args.steps, args.guidance, args.seed, tuple(args.backgrounds)
    )
    report["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    print(format_table(report))
    args.json.write_text(json.dumps(report, indent=1))
    if args.grid:
        save_grid(grids, args.grid)


if __name__ == "__main__":
    main()
