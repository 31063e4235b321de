"""The inflated video UNet: equivalence to the image model, attention modes, naming, reference parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from safetensors.torch import load_file

from tuner.inflate import (
    FRAME_POSITIONS,
    FrameContext,
    VideoAttnProcessor,
    inflate,
    is_trainable,
    sinusoidal_positions,
)

FIXTURE = Path(__file__).parent / "fixtures" / "reference_unet3d"


def fresh_unets(tiny_base: Path) -> tuple[UNet2DConditionModel, torch.nn.Module]:
    image = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet").eval()
    video = inflate(UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")).eval()
    return image, video


def zero_temporal_bias(video: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in video.named_parameters():
            if name.endswith("attn_temp.to_out.0.bias"):
                p.zero_()


def per_frame(image: UNet2DConditionModel, sample: torch.Tensor, t: torch.Tensor, text: torch.Tensor):
    b, c, f, h, w = sample.shape
    frames = sample.transpose(1, 2).reshape(b * f, c, h, w)
    out = image(frames, t, text.repeat_interleave(f, 0)).sample
    return out.reshape(b, f, c, h, w).transpose(1, 2)


@pytest.mark.parametrize("mode", ["sparse_causal", "per_frame", "full"])
def test_equals_image_model_on_one_frame_and_on_identical_frames(tiny_base, mode):
    image, video = fresh_unets(tiny_base)
    video.set_attention_mode(mode)
    zero_temporal_bias(video)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([321.0])
    with torch.no_grad():
        one = torch.randn(2, 4, 1, 16, 16, generator=g)
        torch.testing.assert_close(video(one, t, text), per_frame(image, one, t, text), atol=1e-5, rtol=0)
        still = one.expand(-1, -1, 6, -1, -1).contiguous()
        torch.testing.assert_close(video(still, t, text), per_frame(image, still, t, text), atol=1e-5, rtol=0)


def test_per_frame_group_norm_keeps_the_image_model_on_distinct_frames(tiny_base):
    """In `per_frame` attention mode the untuned video UNet is the image model run frame by frame, whatever the
    frames hold; with the reference's clip-wide GroupNorm statistics it is not."""
    image, video = fresh_unets(tiny_base)
    video.set_attention_mode("per_frame")
    zero_temporal_bias(video)
    clip_norm = inflate(UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet"), "per_frame",
                        group_norm="per_clip").eval()
    zero_temporal_bias(clip_norm)
    g = torch.Generator().manual_seed(0)
    sample, text = torch.randn(1, 4, 5, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
    t = torch.tensor([9.0])
    sample[:, :, 2:] *= 3.0  # frames of different contrast, as a moving shape gives
    with torch.no_grad():
        expected = per_frame(image, sample, t, text)
        torch.testing.assert_close(video(sample, t, text), expected, atol=1e-5, rtol=0)
        assert (clip_norm(sample, t, text) - expected).abs().max() > 1e-2


def test_fresh_inflation_differs_from_image_model_only_by_temporal_bias(tiny_base):
    image, video = fresh_unets(tiny_base)
    sample = torch.randn(1, 4, 1, 16, 16)
    text = torch.randn(1, 77, 32)
    with torch.no_grad():
        gap = (video(sample, 10, text) - per_frame(image, sample, torch.tensor([10]), text)).abs().max()
    assert gap > 1e-4, "the temporal output bias keeps its default init, as in the reference"


def tuned_temporal_attention(video: torch.nn.Module) -> None:
    """Give every temporal attention a non-zero output, as tuning does."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in video.named_parameters():
            if ".attn_temp." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("mode", ["sparse_causal", "full"])
def test_only_frame_positions_let_the_model_tell_identical_frames_apart(tiny_base, mode):
    """Without positions the video UNet maps identical frames to identical outputs whatever its weights: no tensor
    of it knows a frame's index, so a tuned model cannot tie the clip's motion to frame order. With sinusoidal
    positions a tuned one can; untuned (zero temporal output weights), they change nothing."""
    g = torch.Generator().manual_seed(0)
    still = torch.randn(1, 4, 1, 16, 16, generator=g).expand(-1, -1, 6, -1, -1).contiguous()
    text, t = torch.randn(1, 77, 32, generator=g), torch.tensor([700.0])
    outputs = {}
    for positions in FRAME_POSITIONS:
        torch.manual_seed(0)
        video = inflate(UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet"), mode,
                        frame_positions=positions).eval()
        with torch.no_grad():
            fresh = video(still, t, text)
            tuned_temporal_attention(video)
            outputs[positions] = fresh, video(still, t, text)
    fresh_none, tuned_none = outputs["none"]
    assert (tuned_none - tuned_none[:, :, :1]).abs().max() < 1e-5, "frames told apart without positions"
    for positions in ("sinusoidal", "sinusoidal_short_middle"):
        fresh, tuned = outputs[positions]
        torch.testing.assert_close(fresh, fresh_none, atol=1e-6, rtol=0)
        spread = (tuned - tuned[:, :, :1]).abs().amax(dim=(0, 1, 3, 4))
        assert (spread[1:] > 1e-3).all(), (positions, spread)
    assert (outputs["sinusoidal_short_middle"][1] - outputs["sinusoidal"][1]).abs().max() > 1e-3


def test_short_wavelengths_go_to_the_middle_block_only(tiny_base):
    """`sinusoidal_short_middle`: the middle block's temporal attentions get wavelengths up to 20 x 2 pi (its
    channels turn from frame to frame), every other block keeps the Transformer's."""
    video = inflate(UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet"),
                    frame_positions="sinusoidal_short_middle")
    middle = {id(m) for m in video.mid_block.modules()}
    wavelengths = {(id(m) in middle, m.position_wavelength) for m in video.modules()
                   if hasattr(m, "position_wavelength")}
    assert wavelengths == {(True, 20.0), (False, 10000.0)}

    def turning(longest: float) -> int:  # channels that change by more than 0.5 between frames 0 and 7
        positions = sinusoidal_positions(8, 32, torch.zeros(()), longest)
        return int(((positions[7] - positions[0]).abs() > 0.5).sum())

    assert turning(20.0) > turning(10000.0)


def cross_frame_attention(mode: str, frames: int = 5, tokens: int = 6, channels: int = 16):
    torch.manual_seed(0)
    attn = Attention(query_dim=channels, heads=2, dim_head=channels // 2)
    context = FrameContext()
    context.frames = frames
    attn.set_processor(VideoAttnProcessor(context, mode))
    x = torch.randn(2 * frames, tokens, channels)
    return attn, x


def changed_frames(attn, x: torch.Tensor, frames: int, j: int) -> set[int]:
    """Frames (of batch item 0) whose attn1 output changes when frame j's input changes."""
    with torch.no_grad():
        before = attn(x)
        y = x.clone()
        y[j] += torch.randn_like(y[j])
        after = attn(y)
    diff = (after - before).abs().amax(dim=(1, 2))[:frames]
    return {i for i in range(frames) if diff[i] > 1e-6}


def test_sparse_causal_attends_to_first_and_former_frame_only():
    frames = 5
    attn, x = cross_frame_attention("sparse_causal", frames)
    for j in range(frames):
        # frame j is a key for itself, for frame j+1 (its former frame), and for every frame when j == 0
        expected = set(range(frames)) if j == 0 else {j, j + 1} & set(range(frames))
        assert changed_frames(attn, x, frames, j) == expected
        assert all(i >= j for i in changed_frames(attn, x, frames, j)), "no frame before j may change"


def test_per_frame_and_full_modes():
    frames = 4
    attn, x = cross_frame_attention("per_frame", frames)
    assert changed_frames(attn, x, frames, 2) == {2}
    attn, x = cross_frame_attention("full", frames)
    assert changed_frames(attn, x, frames, 2) == set(range(frames))


def test_state_dict_names_and_trainable_set(tiny_base):
    image, video = fresh_unets(tiny_base)
    image_keys, video_keys = set(image.state_dict()), set(video.state_dict())
    assert image_keys <= video_keys
    new = video_keys - image_keys
    assert new and all(".attn_temp." in k or ".norm_temp." in k for k in new)
    assert all(k.split(".attn_temp.")[0].endswith(tuple(f"transformer_blocks.{i}" for i in range(9)))
               for k in new if ".attn_temp." in k)
    trainable = {k for k in video_keys if is_trainable(k)}
    blocks = {k.rsplit(".attn1.", 1)[0] for k in video_keys if ".attn1.to_q." in k}
    assert len(blocks) == 4  # 1 down, 1 mid and 2 up attention blocks in the tiny model
    for block in blocks:
        expected = {f"{block}.{n}" for n in ("attn1.to_q.weight", "attn2.to_q.weight", "attn_temp.to_q.weight",
                                             "attn_temp.to_k.weight", "attn_temp.to_v.weight",
                                             "attn_temp.to_out.0.weight", "attn_temp.to_out.0.bias")}
        assert expected == {k for k in trainable if k.startswith(block + ".")}
    zero_out = [p for k, p in video.state_dict().items() if k.endswith("attn_temp.to_out.0.weight")]
    assert all(torch.count_nonzero(p) == 0 for p in zero_out)


def test_inflate_rejects_bad_mode_and_double_inflation(tiny_base):
    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")
    with pytest.raises(ValueError, match="attention mode"):
        inflate(unet, mode="causal")
    with pytest.raises(ValueError, match="group norm"):
        inflate(unet, group_norm="per_batch")
    inflate(unet)
    with pytest.raises(ValueError, match="already inflated"):
        inflate(unet)


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="reference fixture missing")
def test_matches_reference_implementation_checkpoint():
    """A checkpoint of the public reference implementation's UNet3DConditionModel (see the fixture's README)
    loads with strict key matching and gives the reference's outputs (with its clip-wide GroupNorm)."""
    config = json.loads((FIXTURE / "unet_config.json").read_text())
    video = inflate(UNet2DConditionModel(**config), group_norm="per_clip").eval()
    state = {k: v.float() for k, v in load_file(FIXTURE / "reference_unet3d.safetensors").items()}
    video.load_state_dict(state, strict=True)
    io = load_file(FIXTURE / "io.safetensors")
    with torch.no_grad():
        out = video(io["sample"], io["timestep"], io["encoder_hidden_states"])
    assert out.shape == io["output"].shape
    assert (out - io["output"]).abs().max() < 1e-4
