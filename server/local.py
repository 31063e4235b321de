"""Generation without gRPC: the Python API `server.generate(...)` and the CLI `tav-generate-local`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm.auto import tqdm

from server.engines import BACKENDS, add_torch_engine_arguments, check_compile, load_model
from server.engines.base import Unsupported
from server.generate import Cancelled, GenerationOptions, GenerationResult, Generator, InvalidRequest, ProgressFn
from tuner.artefacts import ArtefactError
from tuner.video_io import write_video


def generate(
    model: str | Path,
    prompt: str,
    *,
    backend: str = "torch",
    device: str | None = None,
    compile_mode: str | None = None,
    cuda_graphs: bool = True,
    progress: ProgressFn | None = None,
    cancelled=None,
    **options,
) -> GenerationResult:
    """Generate a video from a tuned model directory: `options` are those of `GenerationOptions`
    (negative_prompt, frames, steps, guidance, seed, invert, source_video, cache_interval)."""
    loaded = load_model(model, backend, device, compile_mode=compile_mode, cuda_graphs=cuda_graphs)
    return Generator(loaded).generate(GenerationOptions(prompt=prompt, **options), progress, cancelled)


class ProgressBars:
    """One tqdm bar per phase, fed by the loop's progress callback."""

    def __init__(self) -> None:
        self.bars: dict[str, tqdm] = {}

    def __call__(self, phase: str, step: int, total: int) -> None:
        bar = self.bars.get(phase)
        if bar is None:
            bar = self.bars[phase] = tqdm(total=total, desc=phase, dynamic_ncols=True)
        bar.update(step - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tav-generate-local", description="Generate a video from a tuned model.")
    p.add_argument("--model", required=True, help="tuned model directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--steps", type=int, help="default: the model's recommended steps")
    p.add_argument("--guidance", type=float, help="default: the model's recommended guidance")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-invert", action="store_true", help="start from seeded noise, not the inverted source")
    p.add_argument("--cache-interval", type=int, default=1, metavar="N",
                   help="1..10: full UNet every N-th sampling step, its shallow part between (default 1: off)")
    p.add_argument("--backend", choices=BACKENDS, default="torch")
    p.add_argument("--device")
    add_torch_engine_arguments(p)
    p.add_argument("--out", required=True, type=Path, help="output .gif or .mp4")
    args = p.parse_args(argv)
    if args.out.suffix.lower() not in (".gif", ".mp4"):
        p.error("--out must end in .gif or .mp4")
    try:
        check_compile(args.backend, args.compile)
    except ValueError as e:
        print(f"tav-generate-local: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    bars = ProgressBars()
    try:
        result = generate(args.model, args.prompt, backend=args.backend, device=args.device,
                          compile_mode=args.compile, cuda_graphs=args.cuda_graphs == "on", progress=bars,
                          negative_prompt=args.negative_prompt, frames=args.frames, steps=args.steps,
                          guidance=args.guidance, seed=args.seed, invert=not args.no_invert,
                          cache_interval=args.cache_interval)
    except ArtefactError as e:
        bars.close()
        print(f"tav-generate-local: error: {args.model}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (InvalidRequest, Unsupported, Cancelled) as e:
        bars.close()
        print(f"tav-generate-local: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    bars.close()
    write_video(args.out, result.frames, result.fps)
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    print(f"{args.out} ({len(result.frames)} frames, seed {result.seed}; {timings})")


if __name__ == "__main__":
    main()
