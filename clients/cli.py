"""`tav-client`: generate a video on a server (with progress bars), list its models, probe its health; tune a
clip into a new model (`tune`, with `--wait` a progress bar until it is ready), `import` a model tuned with the
official Tune-A-Video code, list (`jobs`) and `cancel` tune and import jobs, `delete-model`, and list the bases a
tune job may start from (`bases`).

PNG frames are written as a directory of frame_00000.png, frame_00001.png, ... (`--out` names the directory).
Exit codes: 0 on success (for `health`, only when the server is SERVING; for `tune --wait`, only when the model
is ready), 1 when the server answers with an error, is not serving, or the job failed or was cancelled, 2 on bad
usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm.auto import tqdm

from clients.client import FORMATS, Client, ServerError, TuneJob

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
                source_video=source, format=args.format, cache_interval=args.cache_interval, progress=bars,
                timeout=args.timeout,
            )
    finally:
        bars.close()
    path = video.save(args.out)
    timings = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in video.timings.items())
    truncated = " (prompt truncated)" if video.prompt_truncated else ""
    print(f"{path}: {video.frames} frames, {video.width}x{video.height} at {video.fps:g} fps, seed {video.seed}, "
          f"{video.steps} steps, guidance {video.guidance:g}, cache interval {video.cache_interval}{truncated}; "
          f"{timings}")


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


def _tune(args: argparse.Namespace) -> None:
    video = args.video.read_bytes()
    settings = {name: getattr(args, name) for name in ("steps", "frames", "width", "height", "seed", "attention_mode",
                                                        "group_norm", "start", "stride", "trainable",
                                                        "frame_positions", "timestep_power", "adapter_kind",
                                                        "lora_rank", "lora_alpha")}
    with _client(args) as client:
        job = client.create_tune_job(args.model, video, args.prompt, base=args.base or "", learning_rate=args.lr,
                                     **settings)
        _follow(client, job, args)


def _import(args: argparse.Namespace) -> None:
    with _client(args) as client:
        job = client.import_model(args.model, args.source, base=args.base or "", caption=args.prompt or "")
        _follow(client, job, args)


def _follow(client: Client, job: TuneJob, args: argparse.Namespace) -> None:
    """Say the job is queued; with --wait, show its progress until it ends (exit 1 unless the model is ready)."""
    kind = "import" if job.import_source else "tune"
    print(f"{kind} job {job.id}: model {job.model_id}, {job.state}"
          + (f" (position {job.queue_position} in the queue)" if job.state == "queued" else ""))
    if not args.wait:
        return
    bar = tqdm(total=job.total_steps, desc="tuning", dynamic_ncols=True)

    def show(update: TuneJob) -> None:
        bar.set_description(update.state if update.state != "queued" else f"queued, position {update.queue_position}")
        bar.update(update.step - bar.n)
        if update.loss:
            bar.set_postfix(loss=f"{update.loss:.4f}")

    try:
        job = client.wait_tune_job(job.id, show, timeout=args.timeout)
    finally:
        bar.close()
    if job.state != "ready":
        print(f"tav-client: {kind} job {job.id} {job.state}" + (f": {job.failure_reason}" if job.failure_reason
                                                                   else ""), file=sys.stderr)
        raise SystemExit(1)
    made = "imported" if job.import_source else f"tuned in {job.tuning_seconds:.0f} s"
    print(f"model {job.model_id} is ready ({made}, exported in {job.export_seconds:.0f} s)")


def _jobs(args: argparse.Namespace) -> None:
    with _client(args) as client:
        jobs = client.list_tune_jobs(timeout=args.timeout)
    for job in jobs:
        detail = {"queued": f"position {job.queue_position}", "tuning": f"step {job.step}/{job.total_steps}",
                  "failed": job.failure_reason}.get(job.state, "")
        print(f"{job.id}\t{job.model_id}\t{job.state}\t{detail}")


def _cancel(args: argparse.Namespace) -> None:
    with _client(args) as client:
        job = client.cancel_tune_job(args.job, timeout=args.timeout)
    print(f"tune job {job.id}: {job.state}" + (" (cancel requested: it stops at its next check point)"
                                               if not job.ended else ""))


def _bases(args: argparse.Namespace) -> None:
    with _client(args) as client:
        listing = client.list_bases(timeout=args.timeout)
    for base in listing.bases:
        settings = " ".join(f"{name}={value}" for name, value in base.default_settings.items())
        default = "\t(default)" if base.id == listing.default_base else ""
        print(f"{base.id}\tsize {base.default_size} (multiple of {base.size_multiple})\t{settings}{default}")


def _delete_model(args: argparse.Namespace) -> None:
    with _client(args) as client:
        done = client.delete_model(args.id, timeout=args.timeout)
    print(f"model {args.id} " + ("deleted" if done else "will be deleted when a tuning worker runs (accepted; it is "
                                                        "no longer served)"))


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
    g.add_argument("--cache-interval", type=int, metavar="N",
                   help="1..10: full UNet every N-th sampling step, its shallow part between (default 1: off)")
    g.add_argument("--source", type=Path, help="a video to invert instead of the model's source clip (<= 64 MiB)")
    g.add_argument("--format", choices=FORMATS, help="default: from --out (.mp4, .gif; no suffix: png)")
    g.add_argument("--out", required=True, type=Path, help="output file, or directory for png frames")
    commands.add_parser("models", parents=[common], help="list the server's models")
    commands.add_parser("health", parents=[common], help="exit 0 only if the server is SERVING")
    t = commands.add_parser("tune", parents=[common], help="tune a clip into a new model (needs the admin token)")
    t.add_argument("--video", required=True, type=Path, help="the clip (MP4, WebM, GIF, ...; <= 64 MiB)")
    t.add_argument("--prompt", required=True, help='its caption, e.g. "a man is skiing"')
    t.add_argument("--model", required=True, help="the new model's id")
    t.add_argument("--base", help="base model id on the server's allow-list (default: shapes-sd)")
    for name, kind in [("steps", int), ("frames", int), ("width", int), ("height", int), ("lr", float),
                       ("seed", int), ("start", int), ("stride", int), ("attention-mode", str), ("group-norm", str),
                       ("trainable", str), ("frame-positions", str), ("timestep-power", float),
                       ("adapter-kind", str), ("lora-rank", int), ("lora-alpha", float)]:
        t.add_argument(f"--{name}", type=kind, help="default: the tuner's for the base")
    t.add_argument("--wait", action="store_true", help="show progress until the model is ready (exit 1 if not)")
    i = commands.add_parser("import", parents=[common], help="import a model tuned with the official Tune-A-Video "
                            "code (needs the admin token)")
    i.add_argument("--source", required=True, help="a hub id, or an id on the server's import allow-list")
    i.add_argument("--model", required=True, help="the new model's id")
    i.add_argument("--base", help="the base it was tuned from, on the server's allow-list (default: the source's "
                   "own networks)")
    i.add_argument("--prompt", help="its caption (default: the source's config.yaml's)")
    i.add_argument("--wait", action="store_true", help="show progress until the model is ready (exit 1 if not)")
    commands.add_parser("jobs", parents=[common], help="list the tune and import jobs")
    commands.add_parser("bases", parents=[common], help="list the bases a tune job may start from, with defaults")
    c = commands.add_parser("cancel", parents=[common], help="cancel a tune job")
    c.add_argument("job", help="the job id")
    d = commands.add_parser("delete-model", parents=[common], help="delete a model from the repository")
    d.add_argument("id", help="the model id")
    args = p.parse_args(argv)

    if args.command == "generate" and args.format is None:
        args.format = SUFFIX_FORMATS.get(args.out.suffix.lower())
        if args.format is None:
            p.error("--out must end in .mp4 or .gif, or have no suffix (png frames), unless --format is given")
    if args.command not in ("generate", "tune", "import") and args.timeout is None:
        args.timeout = 30.0
    run = {"generate": _generate, "models": _models, "health": _health, "tune": _tune, "import": _import, "jobs": _jobs,
           "cancel": _cancel, "delete-model": _delete_model, "bases": _bases}[args.command]
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
