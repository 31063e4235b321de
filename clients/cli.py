"""`tav-client`: generate a video on a server (with progress bars), list its models, or probe its health.

PNG frames are written as a directory of frame_00000.png, frame_00001.png, ... (`--out` names the directory).
Exit codes: 0 on success (for `health`, only when the server is SERVING), 1 when the server answers with an
error or is not serving, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm.auto import tqdm

from clients.client import FORMATS, Client, ServerError

SUFFIX_FORMATS = {".mp4": "mp4", ".gif": "gif", "": "png"}


class ProgressBars:
    """One tqdm bar per phase, fed by the client's progress callback."""

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


def _client(args: argparse.Namespace) -> Client:
    token = args.token_file.read_text().strip() if args.token_file else None
    roots = args.ca.read_bytes() if args.ca else None
    return Client(args.server, token=token, root_certificates=roots, tls=args.tls)


def _generate(args: argparse.Namespace) -> None:
    source = args.source.read_bytes() if args.source else None
    bars = ProgressBars()
    try:
        with _client(args) as client:
            video = client.generate(
                args.model, args.prompt, negative_prompt=args.negative_prompt, frames=args.frames,
                steps=args.steps, guidance=args.guidance, seed=args.seed, invert=not args.no_invert,
                source_video=source, format=args.format, progress=bars, timeout=args.timeout,
            )
    finally:
        bars.close()
    path = video.save(args.out)
    timings = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in video.timings.items())
    truncated = " (prompt truncated)" if video.prompt_truncated else ""
    print(f"{path}: {video.frames} frames, {video.width}x{video.height} at {video.fps:g} fps, seed {video.seed}, "
          f"{video.steps} steps, guidance {video.guidance:g}{truncated}; {timings}")


def _models(args: argparse.Namespace) -> None:
    with _client(args) as client:
        listing = client.list_models(timeout=args.timeout)
    for m in listing.models:
        print(f"{m.id}\t{m.width}x{m.height}\t{m.frames} frames\t{m.fps:g} fps\tbase {m.base_model}\t"
              f"backends {','.join(m.backends)}\t{'loaded' if m.loaded else 'not loaded'}\t{m.source_prompt!r}")
    for name, reason in listing.skipped.items():
        print(f"{name}\tskipped: {reason}")


def _health(args: argparse.Namespace) -> None:
    with _client(args) as client:
        status = client.health(timeout=args.timeout)
    print(status)
    if status != "SERVING":
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT")
    common.add_argument("--token-file", type=Path, help="file holding the bearer token")
    common.add_argument("--ca", type=Path, help="PEM root certificate(s) of the server: use TLS")
    common.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    common.add_argument("--timeout", type=float, help="deadline in seconds (default: none for generate, else 30)")

    p = argparse.ArgumentParser(prog="tav-client", description="Client of the Tune-A-Video gRPC server.")
    commands = p.add_subparsers(dest="command", required=True)
    g = commands.add_parser("generate", parents=[common], help="generate a video")
    g.add_argument("--model", required=True, help="model id")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--frames", type=int, help="1..128 (server default 8)")
    g.add_argument("--steps", type=int, help="1..200 (default: the model's, 50)")
    g.add_argument("--guidance", type=float, help="1..30 (default: the model's, 12.5)")
    g.add_argument("--seed", type=int, help="default: random, reported")
    g.add_argument("--no-invert", action="store_true", help="start from seeded noise, not the inverted source")
    g.add_argument("--source", type=Path, help="a video to invert instead of the model's source clip (<= 64 MiB)")
    g.add_argument("--format", choices=FORMATS, help="default: from --out (.mp4, .gif; no suffix: png)")
    g.add_argument("--out", required=True, type=Path, help="output file, or directory for png frames")
    commands.add_parser("models", parents=[common], help="list the server's models")
    commands.add_parser("health", parents=[common], help="exit 0 only if the server is SERVING")
    args = p.parse_args(argv)

    if args.command == "generate" and args.format is None:
        args.format = SUFFIX_FORMATS.get(args.out.suffix.lower())
        if args.format is None:
            p.error("--out must end in .mp4 or .gif, or have no suffix (png frames), unless --format is given")
    if args.command != "generate" and args.timeout is None:
        args.timeout = 30.0
    run = {"generate": _generate, "models": _models, "health": _health}[args.command]
    try:
        run(args)
    except OSError as e:
        print(f"tav-client: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (ServerError, ValueError) as e:
        print(f"tav-client: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
