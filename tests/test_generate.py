"""The generation core on the tiny model: inversion, guidance, long-video windows, cache, cancellation, bounds."""

from __future__ import annotations

import pytest
import torch

from server.engines import load_model
from server.generate import (
    Cancelled,
    GenerationOptions,
    Generator,
    InvalidRequest,
    InversionCache,
    plan_windows,
)
from tuner.shapes.world import make_clip
from tuner.tune import TuneSettings, tune
from tuner.video_io import write_video

STEPS = 10


class Recorder:
    """Wraps a model's UNet engine to record every call's input."""

    def __init__(self, model):
        self.calls: list[tuple[tuple[int, ...], torch.Tensor, float]] = []
        engines = model.engines
        run = engines.run_unet

        def recording(sample, timestep, text):
            self.calls.append((tuple(sample.shape), sample.clone(), float(timestep)))
            return run(sample, timestep, text)

        engines.run_unet = recording


@pytest.fixture(scope="module")
def model(tuned_run):
    return load_model(tuned_run)


@pytest.fixture(scope="module")
def long_run(tiny_base, tmp_path_factory):
    """A tuned model whose source clip has 24 frames (a circle moving right), at 32x32 pixels."""
    frames, caption, _ = make_clip("red", "circle", "white", "right", frames=24, seed=0)
    path = tmp_path_factory.mktemp("clips") / "long.mp4"
    write_video(path, frames, fps=8)
    settings = TuneSettings(frames=8, width=32, height=32, steps=2, seed=0)
    return tune(tiny_base, path, caption, tmp_path_factory.mktemp("runs") / "long", settings, progress=False)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_plan_windows_cover_every_frame_once_with_anchor_and_context():
    assert plan_windows(8) == plan_windows(8)[:1]
    for total in (9, 14, 15, 24, 64, 128):
        plan = plan_windows(total)
        generated = [w.frames[s] for w in plan for s in w.new]
        assert sorted(generated) == list(range(total))
        for w in plan[1:]:
            assert len(w.frames) == 8 and w.frames[0] == 0 and len(w.new) <= 6
            context = [w.frames[s] for s in range(1, 8) if s not in w.new]
            first_new = w.frames[w.new[0]]
            assert context and context[-1] == first_new - 1, "the former frame of the first new frame is context"
            assert all(f < first_new for f in context)


def test_inversion_reconstructs_the_source(model):
    """Invert the source latents and sample back with the source prompt at guidance 1.

    Measured on the tiny random model (10 steps): relative error 17.8 from the inverted start, 120.0 from random
    noise (the random UNet predicts large noise, so both are large; the ratio is what inversion buys).
    """
    source = model.source.latents[:, :8][None]
    prompt = "a red square is moving right"
    generator = Generator(model)
    inverted = generator.generate_latents(GenerationOptions(prompt, steps=STEPS, guidance=1.0, seed=0))[0]
    from_noise = generator.generate_latents(
        GenerationOptions(prompt, steps=STEPS, guidance=1.0, seed=0, invert=False))[0]
    inverted_error = relative_error(inverted[:, :, :8], source)
    noise_error = relative_error(from_noise[:, :, :8], source)
    print(f"reconstruction error: from inversion {inverted_error:.4f}, from random noise {noise_error:.4f}")
    assert inverted_error <= 0.5 * noise_error


def test_guidance_one_is_the_conditional_branch_and_uses_batch_one_only(model):
    generator = Generator(model)
    recorder = Recorder(model)
    options = dict(prompt="a blue square", steps=STEPS, seed=3, invert=False)
    plain = generator.generate_latents(GenerationOptions(**options, guidance=1.0))[0]
    assert {shape[0] for shape, _, _ in recorder.calls} == {1}
    recorder.calls.clear()
    guided = generator.generate_latents(GenerationOptions(**options, guidance=1.0 + 1e-6))[0]
    assert {shape[0] for shape, _, _ in recorder.calls} == {2}
    torch.testing.assert_close(guided, plain, atol=1e-4, rtol=1e-4)
    stronger = generator.generate_latents(GenerationOptions(**options, guidance=7.5))[0]
    assert relative_error(stronger, plain) > 1e-3


def test_same_seed_is_bit_identical_and_seed_matters(model):
    generator = Generator(model, InversionCache(max_bytes=0))
    options = dict(prompt="a green square", frames=8, steps=4, guidance=5.0)
    a = generator.generate(GenerationOptions(**options, seed=11))
    b = generator.generate(GenerationOptions(**options, seed=11))
    c = generator.generate(GenerationOptions(**options, seed=12, invert=False))
    assert (a.frames == b.frames).all() and a.seed == 11
    assert a.frames.shape == (8, 32, 32, 3) and a.frames.dtype.name == "uint8"
    assert not (a.frames == c.frames).all()


def test_long_video_uses_8_frame_calls_and_carries_anchor_and_context(long_run):
    model = load_model(long_run)
    recorder = Recorder(model)
    result = Generator(model).generate(GenerationOptions("a red circle is moving right on a white background",
                                                         frames=24, steps=STEPS, guidance=4.0, seed=0))
    assert result.frames.shape == (24, 32, 32, 3)
    assert {shape for shape, _, _ in recorder.calls} == {(1, 4, 8, 16, 16), (2, 4, 8, 16, 16)}
    windows = plan_windows(24)
    invert_calls = [x for shape, x, _ in recorder.calls if shape[0] == 1]
    sample_calls = [x[:1] for shape, x, _ in recorder.calls if shape[0] == 2]
    assert len(invert_calls) == len(sample_calls) == len(windows) * STEPS
    for calls in (invert_calls, sample_calls):
        per_window = [calls[i * STEPS : (i + 1) * STEPS] for i in range(len(windows))]
        first = per_window[0]
        for w, window in enumerate(windows[1:], start=1):
            for slot in range(8):
                if slot in window.new:
                    continue
                frame = window.frames[slot]
                origin = next(i for i, ww in enumerate(windows) if frame in [ww.frames[s] for s in ww.new])
                origin_slot = next(s for s in windows[origin].new if windows[origin].frames[s] == frame)
                for step in range(STEPS):
                    assert torch.equal(per_window[w][step][:, :, slot], per_window[origin][step][:, :, origin_slot])
        assert len(first) == STEPS
    # smoothness across window seams vs inside windows
    pixels = result.frames.astype(float)
    change = abs(pixels[1:] - pixels[:-1]).mean(axis=(1, 2, 3))  # change[i]: frame i -> i+1
    seams = [w.frames[w.new[0]] - 1 for w in windows[1:]]  # frame before each window's first new frame
    seam_change = change[seams].mean()
    inside_change = change[[i for i in range(23) if i not in seams]].mean()
    print(f"mean frame-to-frame change: across seams {seam_change:.2f}, inside windows {inside_change:.2f}")
    assert seam_change <= 1.5 * inside_change


def test_second_request_on_the_same_clip_skips_inversion(model):
    cache = InversionCache()
    generator = Generator(model, cache)
    recorder = Recorder(model)
    options = dict(steps=STEPS, guidance=3.0, seed=5)
    first = generator.generate(GenerationOptions("a yellow square", **options))
    assert sum(shape[0] == 1 for shape, _, _ in recorder.calls) == STEPS
    recorder.calls.clear()
    second = generator.generate(GenerationOptions("a green square", **options))
    assert all(shape[0] == 2 for shape, _, _ in recorder.calls), "no inversion call on a cache hit"
    uncached = Generator(model, InversionCache()).generate(GenerationOptions("a green square", **options))
    assert (second.frames == uncached.frames).all()
    assert not (first.frames == second.frames).all()


def test_cancellation_stops_within_one_step(model):
    recorder = Recorder(model)
    checks = iter(range(10_000))
    with pytest.raises(Cancelled):
        Generator(model).generate(GenerationOptions("a square", steps=50, seed=1, invert=False),
                                  cancelled=lambda: next(checks) >= 3)
    assert len(recorder.calls) == 3


@pytest.mark.parametrize(
    "options, field",
    [
        (dict(prompt=""), "prompt"),
        (dict(prompt="x" * 1001), "prompt"),
        (dict(prompt="a", negative_prompt="y" * 1001), "negative_prompt"),
        (dict(prompt="a", frames=0), "frames"),
        (dict(prompt="a", frames=129), "frames"),
        (dict(prompt="a", steps=0), "steps"),
        (dict(prompt="a", steps=201), "steps"),
        (dict(prompt="a", guidance=0.5), "guidance"),
        (dict(prompt="a", guidance=31.0), "guidance"),
        (dict(prompt="a", seed=-1), "seed"),
        (dict(prompt="a", source_video=b"garbage bytes"), "source_video"),
    ],
)
def test_out_of_bounds_options_fail_before_any_work(model, options, field):
    recorder = Recorder(model)
    with pytest.raises(InvalidRequest) as error:
        Generator(model).generate(GenerationOptions(**options))
    assert error.value.field == field
    assert not recorder.calls


def test_size_mismatch_between_model_and_engine_is_refused(tuned_run):
    model = load_model(tuned_run)
    model.engines.latent_shape = (4, 8, 8)
    with pytest.raises(InvalidRequest, match="latent shape"):
        Generator(model).generate(GenerationOptions("a square", steps=2))


def test_client_supplied_source_clip_is_inverted(model, clip_path):
    recorder = Recorder(model)
    result = Generator(model).generate(
        GenerationOptions("a red square", steps=3, guidance=2.0, seed=0, source_video=clip_path.read_bytes()))
    assert result.frames.shape == (8, 32, 32, 3)
    assert sum(shape[0] == 1 for shape, _, _ in recorder.calls) == 3


def test_v_prediction_models_generate(tmp_path, clip_path):
    from tuner.tiny import make_tiny

    base = make_tiny(tmp_path / "tiny-v", seed=1, prediction_type="v_prediction")
    run = tune(base, clip_path, "a red square", tmp_path / "run", TuneSettings(width=32, height=32, steps=2),
               progress=False)
    model = load_model(run)
    assert model.scheduler_config["prediction_type"] == "v_prediction"
    source = model.source.latents[:, :8][None]
    generator = Generator(model)
    inverted = generator.generate_latents(GenerationOptions("a red square", steps=STEPS, guidance=1.0, seed=0))[0]
    noise = generator.generate_latents(GenerationOptions("a red square", steps=STEPS, guidance=1.0, seed=0,
                                                         invert=False))[0]
    assert relative_error(inverted[:, :, :8], source) <= 0.5 * relative_error(noise[:, :, :8], source)
