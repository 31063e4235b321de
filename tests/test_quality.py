"""The quality benchmark's plumbing on a tiny pretrained shapes model, its checks, and the CLIP metrics on a tiny
randomly initialised CLIP (the real figures come from `tav-bench quality` on the shipped model)."""

import json

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from benchmarks.cli import main as bench_main
from benchmarks.clip_metrics import ClipScorer
from benchmarks.quality import METHODS, RECONSTRUCTION, STARTS, edits, summarize
from tuner.artefacts import TunedModel
from tuner.shapes import world
from tuner.shapes.pretrain import build_tokenizer
from tuner.tune import TuneSettings, default_settings


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip")
    tokenizer = build_tokenizer(directory / "tokenizer-files", world.vocabulary(), max_length=16)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def test_clip_metrics_on_a_tiny_random_clip(tiny_clip):
    scorer = ClipScorer(tiny_clip)
    video, caption, _ = world.make_clip("red", "circle", "white", "right", frames=6, seed=0)
    still = np.repeat(video[:1], 6, axis=0)
    moving = scorer.score(video, caption)
    assert scorer.score(still, caption)["clip_frame_consistency"] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= moving["clip_frame_consistency"] < 1.0 - 1e-6
    assert -1.0 <= moving["clip_text_alignment"] <= 1.0
    other = scorer.score(video, "a blue square on a black background")["clip_text_alignment"]
    assert other != pytest.approx(moving["clip_text_alignment"], abs=1e-6)


def test_edits_change_exactly_what_they_name():
    changed = {name: [a != b for a, b in zip(wanted, ("red", "circle", "white"), strict=True)]
               for name, wanted in edits("red", "circle", "white").items()}
    assert changed == {"colour": [True, False, False], "shape": [False, True, False],
                       "background": [False, False, True], "colour+background": [True, False, True]}


def test_checks_compare_the_method_with_each_ablation():
    def row(method, start, edit="colour", tune_seed=None, **scores):
        base = dict(colour=1.0, shape=1.0, background=1.0, all=1.0, trajectory_px=1.0, any_order_trajectory_px=0.5,
                    flip_rate=0.0, size_change_px=0.1)
        return {"key": "", "clip": "c", "method": method, "start": start, "edit": edit, "tune_seed": tune_seed,
                **{**base, **scores}}

    rows = [row("tune_a_video", s, e) for s in STARTS for e in ("colour", "background", RECONSTRUCTION)]
    rows += [row("t2i_per_frame", s, flip_rate=0.5, size_change_px=2.0, trajectory_px=1.5) for s in STARTS]
    rows += [row("inflated_untuned", "noise", trajectory_px=12.0)]
    summary = summarize(rows)
    assert summary["checks"] and all(summary["checks"].values()), summary["checks"]
    assert "reconstruction_px" not in summary["by_method"]["t2i_per_frame/noise"]
    assert summary["by_method"]["tune_a_video/noise"]["reconstruction_px"] == 1.0
    assert summary["by_method"]["tune_a_video/noise"]["reconstruction_any_order_px"] == 0.5

    rows += [row("tune_a_video", "noise", trajectory_px=40.0, all=0.0)]
    rows += [row("tune_a_video", "noise", RECONSTRUCTION, tune_seed=7, trajectory_px=9.0)]
    rows += [row("tune_a_video", "inversion", "colour", trajectory_px=4.0)]
    summary = summarize(rows)
    assert summary["tune_a_video_reconstruction_px_by_tune_seed"] == {"7": 9.0}  # the seeds --tune-seeds named
    checks = summary["checks"]
    assert not checks["tav_better_motion_than_untuned/noise"] and checks["tav_inversion_trajectory<=3px"]
    assert not checks["tav_noise_reconstruction<=4px"]  # (1 + 9) / 2 px
    assert not checks["tav_colour/inversion_alignment>=0.95_and_trajectory<=2px"]  # (1 + 4) / 2 px
    assert checks["tav_background/inversion_alignment>=0.95_and_trajectory<=2px"]
    assert not checks["tav_inversion_trajectory<t2i_per_frame"]  # 2 px against 1.5 px


def test_quality_benchmark_end_to_end_on_a_tiny_shapes_model(tmp_path, tiny_clip, tiny_shapes_base, capsys):
    base = tiny_shapes_base
    work, out = tmp_path / "work", tmp_path / "out"
    bench_main(["quality", "--base", str(base), "--work", str(work), "--out", str(out), "--clips", "1",
                "--tune-steps", "2", "--steps", "2", "--seeds", "3,4", "--lengths", "8,12", "--clip", str(tiny_clip)])
    result = json.loads((out / "quality.json").read_text())
    assert set(result["by_method"]) == {f"{m}/{s}" for m in METHODS for s in STARTS}
    assert len(result["rows"]) == len(METHODS) * 5 * (1 + 2)  # 4 edits and the source caption; 2 seeds from noise
    assert {r["seed"] for r in result["rows"] if r["start"] == "noise"} == {3, 4}
    for values in result["by_method"].values():
        assert 0.0 <= values["all"] <= 1.0 and values["trajectory_px"] >= 0.0 and values["reconstruction_px"] >= 0
        assert values["any_order_trajectory_px"] <= values["trajectory_px"] + 1e-9
        assert values["reconstruction_any_order_px"] <= values["reconstruction_px"] + 1e-9
        assert -1.0 <= values["clip_text_alignment"] <= 1.0
    assert set(result["length_study"]["colour"]) == {"8", "12"}
    assert len(result["length_study"]["colour"]["12"]["segment_all"]) == 2
    tables = (out / "quality.md").read_text().split("\n\n")
    assert [t.split(" |")[0] for t in tables] == [
        "| method / start", "| Tune-A-Video: edit / start", "| Tune-A-Video, inversion: guidance / prompt"]
    grid = Image.open(out / "quality_grid.png")
    kept = 1 + len(METHODS) * 4 + 2 * 2  # source, clip 0 inverted edits of every method, the length study
    assert grid.size[1] == kept * world.SIZE
    models = work / "models"

    def config(method):
        return json.loads((models / f"clip0-red-circle-white-right-{method}" / "tav_config.json").read_text())

    tuned, paper, untuned = config("tune_a_video"), config("tune_a_video_paper"), config("t2i_per_frame")
    assert (tuned["steps"], tuned["attention_mode"]) == (2, "sparse_causal")
    assert tuned["settings"]["lr"] == default_settings(base).lr != paper["settings"]["lr"] == TuneSettings().lr
    assert (untuned["steps"], untuned["attention_mode"]) == (0, "per_frame")
    assert list(result["colour_swap_latent_cosine"]) == ["clip0-red-circle-white-right"]
    assert -1.0 <= result["colour_swap_latent_cosine"]["clip0-red-circle-white-right"] <= 1.0
    # the default --guidance 3 and sweep 1, 2, 5, 7.5; at 3 only the reconstruction is new (the edits are cached)
    sweep = result["guidance_study"]
    assert list(sweep) == ["1", "2", "3", "5", "7.5"]
    assert set(sweep["1"]) == {"edits", "reconstruction", *edits("red", "circle", "white")}
    assert all(0.0 <= r["all"] <= 1.0 and r["trajectory_px"] >= 0.0 for r in sweep["3"].values())
    assert (out / "quality_guidance.png").exists()
    # the guidance study adds 4 scales x 5 prompts (at the default 3 all are cached), the length study 2 x 2
    assert len((work / "scores.jsonl").read_text().splitlines()) == len(result["rows"]) + 4 * 5 + 2 * 2

    # --tune-seeds: every tuned method is tuned once per seed and averaged over them; untuned ones run once
    bench_main(["quality", "--base", str(base), "--work", str(work), "--out", str(tmp_path / "seeds"), "--clips",
                "1", "--methods", "t2i_per_frame,tune_a_video", "--tune-steps", "2", "--steps", "2", "--seeds", "3",
                "--tune-seeds", "5,6", "--guidance-sweep", "", "--lengths", ""])
    result = json.loads((tmp_path / "seeds" / "quality.json").read_text())
    assert len(result["rows"]) == (1 + 2) * 5 * 2  # t2i once, Tune-A-Video twice; 5 prompts, 2 starts
    assert {(r["method"], r["tune_seed"]) for r in result["rows"]} == {
        ("t2i_per_frame", None), ("tune_a_video", 5), ("tune_a_video", 6)}
    by_seed = result["tune_a_video_reconstruction_px_by_tune_seed"]
    assert set(by_seed) == {"5", "6"}
    assert result["by_method"]["tune_a_video/noise"]["reconstruction_px"] == pytest.approx(np.mean(
        list(by_seed.values())))
    seeded = [models / f"clip0-red-circle-white-right-tune_a_video-seed{seed}" for seed in (5, 6)]
    assert [TunedModel.open(m).config["settings"]["seed"] for m in seeded] == [5, 6]
    assert TunedModel.open(seeded[0]).model_hash != TunedModel.open(seeded[1]).model_hash


def test_flop_count_grows_quadratically_only_with_full_attention(tiny_base):
    from benchmarks.floor import unet_flops

    config = {k: v for k, v in json.loads((tiny_base / "unet" / "config.json").read_text()).items()
              if not k.startswith("_")}
    sparse = [unet_flops(config, 1, n, 8) for n in (8, 16)]
    full = [unet_flops(config, 1, n, 8, mode="full") for n in (8, 16)]
    sparse_excess, full_excess = sparse[1] - 2 * sparse[0], full[1] - 2 * full[0]
    assert 0 <= sparse_excess < 0.01 * sparse[1]  # sparse-causal: linear in frames, but for temporal attention
    assert full[0] > sparse[0] and full_excess > 10 * sparse_excess  # full: a quadratic spatio-temporal term
