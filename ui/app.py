"""`tav-ui`: the browser page of a served deployment. A Gradio Blocks app with a Generate tab (any token), a Train
tab (only with `--admin-token-file`: the Tuning service needs the admin token) and a Models tab, talking to one or
more `tav-serve` replicas over gRPC through the clients library, so it works behind the same load balancer, TLS
and tokens. It holds no model, and the tokens stay in this process: the browser never sees them.

The bounds the page shows (frames 1..128, steps, guidance, upload sizes, the bases and their defaults) come from
the server (`GetServerInfo`, `ListBases`), read once at start. Handlers that wait on the server are async and use
the async client, so Gradio's cancel cancels the RPC. Every server error reaches the page as the server's one-line
message (`server_message`), never a traceback, and the page keeps working after it.

Nothing is loaded from outside the machine that serves the page: Gradio's analytics and version check are off
(set by the package, before Gradio is imported), the theme uses the system's fonts, and server-side rendering (a
Node process) is off.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import grpc

from clients import AsyncClient, BaseList, Client, Model, ServerError, ServerInfo, TuneJob
from ui.media import mp4_to_gif

START_OPTIONS = {"the inverted source clip": True, "noise": False}
MODEL_COLUMNS = ["id", "caption", "base", "size", "frames", "fps", "backends", "loaded"]
JOB_COLUMNS = ["id", "model", "base", "state", "progress", "detail"]
# The other TuneSettings, in the Train tab's "More settings" with the base's defaults (the server checks them).
MORE_SETTINGS = {"attention_mode": str, "group_norm": str, "trainable": str, "frame_positions": str, "start": int,
                 "stride": int, "timestep_power": float}
READY_POLL_SECONDS = 1.0  # between ListModels calls while waiting for a READY model to be served
READY_POLL_BOUND = 60.0  # seconds: a READY model is served after the next rescan (2 s by default); then give up
THEME = gr.themes.Default(font=("system-ui", "sans-serif"), font_mono=("ui-monospace", "monospace"))


@dataclass(frozen=True)
class Connection:
    """Where the server is and how to reach it (`tav-client`'s flags)."""

    target: str
    token: str | None = None
    admin_token: str | None = None
    root_certificates: bytes | None = None
    tls: bool = False

    def client(self, admin: bool = False) -> Client:
        return Client(self.target, token=self.admin_token if admin else self.token,
                      root_certificates=self.root_certificates, tls=self.tls)

    def async_client(self, admin: bool = False) -> AsyncClient:
        return AsyncClient(self.target, token=self.admin_token if admin else self.token,
                           root_certificates=self.root_certificates, tls=self.tls)


def server_message(error: ServerError) -> str:
    """The one line the page shows for a server error: the server's message, with what to do for the codes a
    user meets (busy: retry; unreachable)."""
    details = " ".join((error.details or "").split())
    if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return f"busy, retry: {details}"
    if error.code == grpc.StatusCode.UNAVAILABLE:
        return f"server not reachable: {details}"
    if error.code == grpc.StatusCode.INVALID_ARGUMENT:
        return details
    return f"{error.code.name}: {details}"


def model_label(model: Model) -> str:
    return (f"{model.id} — “{model.source_prompt}” ({model.base_model}, {model.width}x{model.height}, "
            f"{model.frames} frames; {', '.join(model.backends)})")


def model_rows(models: list[Model]) -> list[list]:
    return [[m.id, m.source_prompt, m.base_model, f"{m.width}x{m.height}", m.frames, m.fps, ", ".join(m.backends),
             m.loaded] for m in models]


def job_summary(job: TuneJob) -> str:
    """One line for a job's state: position, step and loss, or why it ended."""
    if job.state == "queued":
        return f"queued, position {job.queue_position}"
    if job.state == "tuning":
        return f"tuning: step {job.step}/{job.total_steps}" + (f", loss {job.loss:.4f}" if job.loss else "")
    if job.state == "ready":
        return f"ready: tuned in {job.tuning_seconds:.0f} s, exported in {job.export_seconds:.0f} s"
    if job.state in ("failed", "cancelled"):
        return job.state + (f": {job.failure_reason}" if job.failure_reason else "")
    return job.state + (" (cancel requested)" if job.cancel_requested else "")


def job_rows(jobs: list[TuneJob]) -> list[list]:
    return [[j.id, j.model_id, j.base, j.state, f"{j.step}/{j.total_steps}", job_summary(j)] for j in jobs]


def _seed(text: str | int | None, field: str) -> int | None:
    """A seed field: blank leaves it to the server (a number input cannot be blank: it would send 0)."""
    text = str(text if text is not None else "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise gr.Error(f"{field}: must be a whole number, got {text[:40]!r}", print_exception=False) from None


def _check_upload(path: str | None, limit: int, field: str) -> bytes | None:
    """An uploaded file's bytes, refused here when over the server's limit (before anything is sent)."""
    if not path:
        return None
    size = Path(path).stat().st_size
    if size > limit:
        raise gr.Error(f"{field}: must be at most {limit >> 20} MiB, got {size / 2**20:.1f} MiB", print_exception=False)
    return Path(path).read_bytes()


class Page:
    """The page's handlers, over one connection. The async clients are made on first use, on the event loop that
    runs the handlers (a gRPC aio channel belongs to one loop)."""

    def __init__(self, connection: Connection, info: ServerInfo, bases: BaseList | None) -> None:
        self.connection = connection
        self.info = info
        self.bases = bases
        self._clients: dict[bool, AsyncClient] = {}
        self.outputs = Path(tempfile.mkdtemp(prefix="tav-ui-"))

    def client(self, admin: bool = False) -> AsyncClient:
        if admin not in self._clients:
            self._clients[admin] = self.connection.async_client(admin)
        return self._clients[admin]

    async def _models(self) -> list[Model]:
        try:
            return (await self.client().list_models()).models
        except ServerError as e:
            raise gr.Error(server_message(e), print_exception=False) from None

    async def list_models(self, selected: str | None = None) -> tuple:
        """The model picker's choices (keeping the selection while it is served) and the Models tab's table."""
        models = await self._models()
        ids = [m.id for m in models]
        value = selected if selected in ids else (ids[0] if ids else None)
        return (gr.Dropdown(choices=[(model_label(m), m.id) for m in models], value=value),
                model_rows(models), gr.Dropdown(choices=ids, value=None))

    async def describe_model(self, model_id: str | None) -> tuple:
        """A picked model's caption and defaults: the steps and guidance sliders take its defaults; the feature
        reuse slider is at 1 and fixed there where the model's backend cannot reuse features."""
        if not model_id:
            return "", gr.skip(), gr.skip(), gr.skip()
        try:
            model = await self.client().get_model(model_id)
        except ServerError as e:
            return server_message(e), gr.skip(), gr.skip(), gr.skip()
        text = (f"Tuned on “{model.source_prompt}”: {model.source_frames} source frames at {model.fps:g} fps, "
                f"{model.width}x{model.height}, base {model.base_model}, backends {', '.join(model.backends)}.")
        reuse = gr.Slider(value=1, interactive=model.cache_interval_supported,
                          info=None if model.cache_interval_supported else "not on this model's backend")
        return text, gr.Slider(value=model.default_steps), gr.Slider(value=model.default_guidance), reuse

    async def generate(self, model: str | None, prompt: str, negative_prompt: str, frames: float, steps: float,
                       guidance: float, seed: str | None, start: str, source: str | None, cache_interval: float = 1
                       ) -> AsyncIterator[tuple]:
        """Generate, streaming the queue position and each step to the progress line; then the video to play, its
        MP4 and GIF (transcoded here) to download, and the seed and timings. `cache_interval` > 1 reuses features
        between sampling steps (the full UNet on every N-th step: faster, at some fidelity)."""
        if not model:
            raise gr.Error("model: pick a model (Refresh lists the server's models)", print_exception=False)
        source_video = _check_upload(source, self.info.limits["max_source_bytes"], "source_video")
        events: asyncio.Queue[str] = asyncio.Queue()
        call = asyncio.ensure_future(self.client().generate(
            model, prompt, negative_prompt=negative_prompt, frames=int(frames), steps=int(steps),
            guidance=float(guidance), seed=_seed(seed, "seed"), invert=START_OPTIONS.get(start, True),
            source_video=source_video, format="mp4", cache_interval=int(cache_interval or 1),
            on_accepted=lambda position: events.put_nowait(f"queued: position {position}"),
            progress=lambda phase, step, total: events.put_nowait(f"{phase}: step {step}/{total}"),
        ))
        try:
            yield "running", "sending the request", gr.skip(), gr.skip(), gr.skip()
            while not call.done():
                waiter = asyncio.ensure_future(events.get())
                await asyncio.wait({call, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if waiter.done():  # into its own line: a late one cannot overwrite the status Cancel sets
                    yield gr.skip(), waiter.result(), gr.skip(), gr.skip(), gr.skip()
                else:
                    waiter.cancel()
            video = call.result()
        except ServerError as e:
            raise gr.Error(server_message(e), print_exception=False) from None
        finally:
            call.cancel()  # the page's Cancel (or a closed tab) cancels the RPC, and the server stops the work
        stem = self.outputs / f"{model}-{video.request_id[:8]}"
        mp4, gif = stem.with_suffix(".mp4"), stem.with_suffix(".gif")
        mp4.write_bytes(video.files[0])
        gif.write_bytes(await asyncio.to_thread(mp4_to_gif, video.files[0], video.fps))
        timings = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in video.timings.items())
        info = (f"{video.frames} frames, {video.width}x{video.height} at {video.fps:g} fps; seed {video.seed}, "
                f"{video.steps} steps, guidance {video.guidance:g}"
                + (f", the full UNet every {video.cache_interval} steps" if video.cache_interval > 1 else "")
                + (" (prompt truncated to the tokenizer's length)" if video.prompt_truncated else "")
                + f"\n\nTimings: {timings}")
        yield "done", "", str(mp4), [str(mp4), str(gif)], info

    def base_defaults(self, base_id: str | None) -> tuple:
        """The settings fields take the chosen base's defaults (and its size rule)."""
        base = next((b for b in self.bases.bases if b.id == base_id), None) if self.bases else None
        if base is None:
            return (gr.skip(),) * (5 + len(MORE_SETTINGS)) + ("",)
        d = base.default_settings
        size = dict(step=base.size_multiple, minimum=base.size_multiple)
        return (gr.Number(value=d.get("steps")), gr.Number(value=d.get("frames")),
                gr.Number(value=d.get("width", base.default_size), **size),
                gr.Number(value=d.get("height", base.default_size), **size), gr.Number(value=d.get("learning_rate")),
                *(d.get(name) for name in MORE_SETTINGS),
                f"Native size {base.default_size} px; width and height are multiples of {base.size_multiple}.")

    async def tune(self, clip: str | None, caption: str, model_id: str, base: str, steps: float | None,
                   frames: float | None, width: float | None, height: float | None, learning_rate: float | None,
                   seed: str | None, *more: str | float | None) -> AsyncIterator[tuple]:
        """Create a tune job and show its state as it changes (WatchTuneJob); once READY, wait (bounded) until the
        server serves the model, then offer it on Generate."""
        video = _check_upload(clip, self.bases.limits["max_video_bytes"], "video")
        if video is None:
            raise gr.Error("video: upload the clip to tune on", print_exception=False)
        settings = {name: (None if value is None else kind(value)) for name, value, kind in [
            ("steps", steps, int), ("frames", frames, int), ("width", width, int), ("height", height, int),
            ("learning_rate", learning_rate, float)]}
        settings["seed"] = _seed(seed, "settings.seed")
        for (name, kind), value in zip(MORE_SETTINGS.items(), more, strict=True):
            if value is not None and str(value).strip():
                settings[name] = kind(value.strip() if isinstance(value, str) else value)
        admin = self.client(admin=True)
        updates: asyncio.Queue[TuneJob] = asyncio.Queue()
        try:
            job = await admin.create_tune_job(model_id.strip(), video, caption, base=base, **settings)
            yield job_summary(job), job.id, gr.skip()
            watch = asyncio.ensure_future(admin.wait_tune_job(job.id, updates.put_nowait))
            try:
                while not watch.done():
                    waiter = asyncio.ensure_future(updates.get())
                    await asyncio.wait({watch, waiter}, return_when=asyncio.FIRST_COMPLETED)
                    if waiter.done():
                        yield job_summary(waiter.result()), job.id, gr.skip()
                    else:
                        waiter.cancel()
                job = watch.result()
            finally:
                watch.cancel()
            yield job_summary(job), job.id, gr.skip()
            if job.state != "ready":
                return
            end = time.monotonic() + READY_POLL_BOUND
            while (models := (await self.client().list_models()).models) and job.model_id not in {m.id for m in models}:
                if time.monotonic() > end:
                    yield (f"ready, but not served after {READY_POLL_BOUND:.0f} s: press Refresh on Generate later",
                           job.id, gr.skip())
                    return
                await asyncio.sleep(READY_POLL_SECONDS)
        except ServerError as e:
            raise gr.Error(server_message(e), print_exception=False) from None
        choices = [(model_label(m), m.id) for m in models]
        yield (f"{job_summary(job)}; model {job.model_id} is served: pick it on Generate", job.id,
               gr.Dropdown(choices=choices, value=job.model_id))

    async def cancel_job(self, job_id: str) -> str:
        if not job_id:
            raise gr.Error("job: no job to cancel", print_exception=False)
        try:
            job = await self.client(admin=True).cancel_tune_job(job_id.strip())
        except ServerError as e:
            raise gr.Error(server_message(e), print_exception=False) from None
        return job_summary(job) + ("" if job.ended else " (cancel requested: it stops at its next check point)")

    async def list_jobs(self) -> list[list]:
        try:
            return job_rows(await self.client(admin=True).list_tune_jobs())
        except ServerError as e:
            raise gr.Error(server_message(e), print_exception=False) from None

    async def delete_model(self, model_id: str | None) -> str:
        if not model_id:
            raise gr.Error("id: pick the model to delete", print_exception=False)
        try:
            await self.client(admin=True).delete_model(model_id)
        except ServerError as e:
            raise gr.Error(server_message(e), print_exception=False) from None
        return f"model {model_id} deleted: every replica stops serving it at its next rescan"


def build(connection: Connection) -> tuple[gr.Blocks, Page]:
    """The page for a server: its bounds and bases are read now (a server that cannot be reached is a ServerError)."""
    with connection.client() as client:
        info = client.get_server_info()
        models = client.list_models().models
    bases = None
    if connection.admin_token is not None:
        with connection.client(admin=True) as client:
            bases = client.list_bases()
    page = Page(connection, info, bases)
    limits = info.limits
    waiting = info.max_queue + 1  # the server runs one request and queues max_queue: its queue says "busy"
    with gr.Blocks(title="Tune-A-Video", analytics_enabled=False) as demo:
        gr.Markdown(f"# Tune-A-Video\nServer `{connection.target}`, backend {info.backend}.")
        with gr.Tab("Generate", id="generate_tab"):
            with gr.Row():
                # Any id is accepted (the server answers NOT_FOUND for an unknown one): a model published after
                # the page loaded can be asked for before its list is refreshed.
                model = gr.Dropdown(label="Model", choices=[(model_label(m), m.id) for m in models], elem_id="model",
                                    value=models[0].id if models else None, allow_custom_value=True, scale=4)
                refresh = gr.Button("Refresh", scale=1, elem_id="refresh")
            model_details = gr.Markdown(elem_id="model_details")
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", elem_id="prompt", max_length=limits["max_prompt_chars"],
                                        placeholder="what the edited video shows")
                    negative = gr.Textbox(label="Negative prompt", elem_id="negative_prompt",
                                          max_length=limits["max_prompt_chars"],
                                          visible="negative_prompt" in info.options)
                    frames = gr.Slider(1, limits["max_frames"], value=limits["default_frames"], step=1,
                                       label="Frames", elem_id="frames")
                    steps = gr.Slider(1, limits["max_steps"], value=50, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(limits["min_guidance"], limits["max_guidance"], value=12.5, step=0.5,
                                         label="Guidance", elem_id="guidance")
                    cache_interval = gr.Slider(
                        1, limits["max_cache_interval"], value=1, step=1, elem_id="cache_interval",
                        label="Feature reuse (1: off; N: the full UNet every N-th sampling step, faster, less exact)",
                        visible="cache_interval" in info.options)
                    seed = gr.Textbox(label="Seed (blank: random, shown after)", elem_id="seed", max_lines=1)
                    start = gr.Radio(list(START_OPTIONS), value=next(iter(START_OPTIONS)), label="Start from",
                                     elem_id="start", visible="invert" in info.options)
                    source = gr.File(label=f"Source clip (optional, at most {limits['max_source_bytes'] >> 20} MiB)",
                                     file_types=["video", ".gif"], elem_id="source",
                                     visible="source_video" in info.options)
                    with gr.Row():
                        generate = gr.Button("Generate", variant="primary", elem_id="generate")
                        cancel = gr.Button("Cancel", elem_id="cancel")
                with gr.Column():
                    status = gr.Markdown("Pick a model, write a prompt, press Generate.", elem_id="status")
                    progress = gr.Markdown(elem_id="progress")
                    video = gr.Video(label="Result", elem_id="video", format=None, interactive=False,
                                     autoplay=True, loop=True)
                    downloads = gr.File(label="Download (MP4, GIF)", file_count="multiple", elem_id="downloads",
                                        interactive=False)
                    result_info = gr.Markdown(elem_id="result_info")
        with gr.Tab("Train", id="train_tab", visible=bases is not None):
            limit = bases.limits if bases else {}
            clip = gr.File(label=f"Clip (at most {limit.get('max_video_bytes', 0) >> 20} MiB)",
                           file_types=["video", ".gif"], elem_id="clip")
            caption = gr.Textbox(label="Caption", placeholder="a man is skiing", elem_id="caption",
                                 max_length=limit.get("max_caption_chars"))
            model_id = gr.Textbox(label="Model id ([a-z0-9][a-z0-9._-]{0,63})", elem_id="model_id")
            base_ids = [b.id for b in bases.bases] if bases else []
            base = gr.Dropdown(base_ids, label="Base", elem_id="base",
                               value=bases.default_base if bases and bases.default_base in base_ids else
                               (base_ids[0] if base_ids else None))
            base_note = gr.Markdown(elem_id="base_note")
            with gr.Row():
                tune_steps = gr.Number(label=f"Steps (1..{limit.get('max_steps')})", precision=0, minimum=1,
                                       maximum=limit.get("max_steps"), elem_id="tune_steps")
                tune_frames = gr.Number(label=f"Frames (1..{limit.get('max_frames')})", precision=0, minimum=1,
                                        maximum=limit.get("max_frames"), elem_id="tune_frames")
                width = gr.Number(label="Width", precision=0, maximum=limit.get("max_size"), elem_id="width")
                height = gr.Number(label="Height", precision=0, maximum=limit.get("max_size"), elem_id="height")
                learning_rate = gr.Number(label="Learning rate", minimum=limit.get("min_learning_rate"),
                                          maximum=limit.get("max_learning_rate"), elem_id="learning_rate")
                tune_seed = gr.Textbox(label="Seed (blank: the tuner's)", elem_id="tune_seed", max_lines=1)
            with gr.Accordion("More settings (the base's defaults; blank: the tuner's)", open=False), gr.Row():
                more = [gr.Textbox(label=name.replace("_", " ").capitalize(), elem_id=f"tune_{name}", max_lines=1)
                        if kind is str else gr.Number(label=name.replace("_", " ").capitalize(), elem_id=f"tune_{name}",
                                                      precision=0 if kind is int else None)
                        for name, kind in MORE_SETTINGS.items()]
            with gr.Row():
                tune = gr.Button("Tune", variant="primary", elem_id="tune")
                tune_cancel = gr.Button("Cancel job", elem_id="tune_cancel")
            job = gr.Markdown(elem_id="job")
            job_id = gr.Textbox(label="Job id", interactive=False, elem_id="job_id")
        with gr.Tab("Models", id="models_tab"):
            models_refresh = gr.Button("Refresh", elem_id="models_refresh")
            models_table = gr.Dataframe(headers=MODEL_COLUMNS, interactive=False, elem_id="models")
            with gr.Group(visible=bases is not None):
                with gr.Row():
                    delete_id = gr.Dropdown(label="Model to delete", choices=[], elem_id="delete_id")
                    delete = gr.Button("Delete…", variant="stop", elem_id="delete")
                with gr.Row(visible=False) as confirm_row:
                    confirm_note = gr.Markdown()
                    confirm = gr.Button("Yes, delete it", variant="stop", elem_id="delete_confirm")
                    keep = gr.Button("Keep it", elem_id="delete_keep")
                deleted = gr.Markdown(elem_id="deleted")
                jobs_refresh = gr.Button("Refresh jobs", elem_id="jobs_refresh")
                jobs_table = gr.Dataframe(headers=JOB_COLUMNS, interactive=False, elem_id="jobs")

        listing = [model, models_table, delete_id]
        demo.load(page.list_models, model, listing, api_name=False)
        refresh.click(page.list_models, model, listing, api_name="list_models")
        models_refresh.click(page.list_models, model, listing, api_name=False)
        model.change(page.describe_model, model, [model_details, steps, guidance, cache_interval], api_name=False)
        running = generate.click(
            page.generate, [model, prompt, negative, frames, steps, guidance, seed, start, source, cache_interval],
            [status, progress, video, downloads, result_info], api_name="generate", concurrency_limit=waiting,
            show_progress_on=[video],  # the status line is the progress; a cancelled call leaves it "cancelled"
        )
        cancel.click(lambda: "cancelled", None, status, cancels=[running], api_name=False)
        if bases is not None:
            settings = [tune_steps, tune_frames, width, height, learning_rate, *more, base_note]
            base.change(page.base_defaults, base, settings, api_name=False)
            demo.load(page.base_defaults, base, settings, api_name=False)
            tune.click(page.tune, [clip, caption, model_id, base, tune_steps, tune_frames, width, height,
                                   learning_rate, tune_seed, *more], [job, job_id, model], api_name="tune",
                       concurrency_limit=None)
            tune_cancel.click(page.cancel_job, job_id, job, api_name="cancel_job")
            delete.click(lambda i: (gr.Row(visible=bool(i)), f"Delete model **{i}** from the repository?"),
                         delete_id, [confirm_row, confirm_note], api_name=False)
            confirm.click(page.delete_model, delete_id, deleted, api_name="delete_model").then(
                lambda: gr.Row(visible=False), None, confirm_row, api_name=False).then(
                page.list_models, model, listing, api_name=False)
            keep.click(lambda: gr.Row(visible=False), None, confirm_row, api_name=False)
            jobs_refresh.click(page.list_jobs, None, jobs_table, api_name="list_jobs")
    demo.queue(default_concurrency_limit=None)
    return demo, page


def read_logins(path: Path) -> list[tuple[str, str]]:
    """`user:password` lines (blank lines and # comments skipped) -> Gradio's auth list."""
    logins = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"{path}:{number}: expected user:password")
        logins.append((user, password))
    if not logins:
        raise ValueError(f"{path}: no user:password line")
    return logins


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tav-ui", description="The browser page of a Tune-A-Video server.")
    p.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of tav-serve (or its load balancer)")
    p.add_argument("--token-file", type=Path, help="file holding the generation bearer token")
    p.add_argument("--admin-token-file", type=Path, help="file holding the admin token: shows the Train tab and "
                                                         "model deletion (the token stays in this process)")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--ca", type=Path, help="PEM root certificate(s) of the server: use TLS")
    tls.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    p.add_argument("--login-file", type=Path, help="lines of user:password the page asks for (required unless "
                                                   "--host is a loopback address)")
    p.add_argument("--host", default="127.0.0.1", help="address the page listens on (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--root-path", default=None, help="the URL prefix a reverse proxy serves the page under, "
                                                     "e.g. /ui (deploy/nginx)")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be 0..65535, got {args.port}")
    try:
        logins = read_logins(args.login_file) if args.login_file else None
        connection = Connection(
            args.server,
            token=args.token_file.read_text().strip() if args.token_file else None,
            admin_token=args.admin_token_file.read_text().strip() if args.admin_token_file else None,
            root_certificates=args.ca.read_bytes() if args.ca else None, tls=args.tls,
        )
    except (OSError, ValueError) as e:
        p.error(str(e))
    if logins is None and not is_loopback(args.host):
        p.error(f"--host {args.host} is not a loopback address: anyone who reaches it could use the server's tokens; "
                f"give --login-file (lines of user:password) to require a login")
    try:
        demo, page = build(connection)
    except ServerError as e:
        print(f"tav-ui: error: {args.server}: {server_message(e)}", file=sys.stderr)
        raise SystemExit(1) from None
    upload_limit = max(page.info.limits["max_source_bytes"], page.bases.limits["max_video_bytes"] if page.bases else 0)
    print(f"tav-ui: serving the page for {args.server} on http://{args.host}:{args.port}"
          + (" (login required)" if logins else " (loopback only, no login)"), file=sys.stderr, flush=True)
    demo.launch(server_name=args.host, server_port=args.port, auth=logins, root_path=args.root_path,
                max_file_size=upload_limit, theme=THEME, ssr_mode=False, share=False, show_error=True,
                footer_links=["api"], allowed_paths=[str(page.outputs)], quiet=False, pwa=False, mcp_server=False)


if __name__ == "__main__":
    main()
