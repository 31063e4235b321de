"""Inflate a stock diffusers `UNet2DConditionModel` into Tune-A-Video's video UNet, in place and fork-free.

The 2-D UNet runs on frames folded into the batch, `(b f) c h w`. Three things make it a video model, each a
subclass of the stock module it replaces, so every pretrained tensor keeps its diffusers name:

* the self-attention (attn1) of every transformer block takes its keys and values across frames, by mode:
  `sparse_causal` (the method: frame i attends to frames 0 and i-1), `per_frame` (plain image attention, the
  paper's ablation) or `full` (every frame attends to all frames);
* every transformer block gains a temporal attention after its feed-forward (`norm_temp` + `attn_temp`, attention
  across the frames at each spatial position, output projection's weight zero-initialised). The paper gives it no
  position information (`frame_positions="none"`), so it treats the frames as an unordered set; with
  `"sinusoidal"` a fixed sinusoidal encoding of each frame's index is added to its input, which lets a tuned model
  tie the clip's motion to frame order; `"sinusoidal_short_middle"` is the same with shorter wavelengths in the
  UNet's middle block, which holds the order best on a small model (docs/ARCHITECTURE.md, "Frame positions");
* with `group_norm="per_clip"` (the reference implementation's behaviour), the ResNet blocks' GroupNorms and
  `conv_norm_out` normalise over all frames of a clip. The default, `"per_frame"`, keeps them per frame, so an
  untuned video UNet in `per_frame` mode is exactly the image model: on a small model the clip-wide statistics
  changed its noise prediction by as much as the prediction itself (docs/ARCHITECTURE.md, "Per-frame GroupNorm").

Convolutions, up/down-sampling and cross-attention stay per frame. The frame count reaches the inflated modules
through one `FrameContext` per UNet, set at the start of each forward pass; a UNet must therefore not run two
forward passes concurrently (the server's single worker owns its engines).

`VideoUNet.forward` runs diffusers' blocks layer by layer itself (the one place that knows their order), so it
can stop at and resume from the branch of feature reuse between denoising steps (DeepCache, Ma et al. 2024;
docs/ARCHITECTURE.md, "Feature reuse"): `return_branch` also returns the input of the last `branch_layers` layers
of the final up block, and `branch=` runs only the shallow path from such features: `conv_in`, the first
`branch_layers - 1` layers of the first down block (the skips those up layers read), those up layers, `conv_out`.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

ATTENTION_MODES = ("sparse_causal", "per_frame", "full")
GROUP_NORMS = ("per_frame", "per_clip")
FRAME_POSITIONS = ("none", "sinusoidal", "sinusoidal_short_middle")
# The sinusoidal encoding's longest wavelength, in multiples of 2 pi frames: the Transformer's, and the middle
# block's under "sinusoidal_short_middle" (over an 8-frame window most of the Transformer's channels barely turn).
LONGEST_WAVELENGTH = 10000.0
SHORT_MIDDLE_WAVELENGTH = 20.0

# The tensors one-shot tuning updates (DESIGN.md section 2): the query projections of self- and cross-attention,
# and the whole temporal attention but its norm.
TRAINABLE_PATTERN = re.compile(r"(attn1\.to_q|attn2\.to_q|attn_temp\.(to_q|to_k|to_v|to_out\.0))\.(weight|bias)$")


def is_trainable(name: str) -> bool:
    """Whether the video UNet's tensor `name` belongs to Tune-A-Video's trainable set."""
    return TRAINABLE_PATTERN.search(name) is not None


class FrameContext:
    """The number of frames in the forward pass under way, shared by the inflated modules of one UNet."""

    def __init__(self) -> None:
        self.frames = 1


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention of `[N, Lq, C]` queries over `[N, Lk, C]` keys/values, the project's only one.

    PyTorch's fused `scaled_dot_product_attention` (flash / memory-efficient kernels on GPU); it exports to ONNX
    as the pattern TensorRT fuses (scale on Q and K before the first MatMul).
    """
    n, q_len, channels = query.shape
    head_dim = channels // heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(n, -1, heads, head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(query), split(key), split(value))
    return out.transpose(1, 2).reshape(n, q_len, channels)


class VideoAttnProcessor:
    """Attention processor for every attention of the video UNet.

    With `mode` None it is plain attention (cross-attention, temporal attention); with a mode it is attn1's
    cross-frame self-attention over hidden states laid out `(b f) tokens c`.
    """

    def __init__(self, frame_context: FrameContext | None = None, mode: str | None = None) -> None:
        if mode is not None and mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
        self.frame_context = frame_context
        self.mode = mode

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **unused: object,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("the video UNet's attention takes no attention mask")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if self.mode is None or self.mode == "per_frame":
            out = attention(query, key, value, attn.heads)
        elif self.mode == "sparse_causal":
            out = attention(query, self._first_and_former(key), self._first_and_former(value), attn.heads)
        else:  # full: one sequence of all the clip's tokens
            bf, tokens, channels = query.shape
            b = bf // self.frame_context.frames

            def clip(x: torch.Tensor) -> torch.Tensor:
                return x.reshape(b, -1, channels)

            out = attention(clip(query), clip(key), clip(value), attn.heads).reshape(bf, tokens, channels)
        return attn.to_out[1](attn.to_out[0](out))

    def _first_and_former(self, x: torch.Tensor) -> torch.Tensor:
        """`[(b f), n, c]` -> `[(b f), 2n, c]`: frame i's tokens become frame 0's followed by frame i-1's."""
        frames = self.frame_context.frames
        bf, tokens, channels = x.shape
        x = x.reshape(bf // frames, frames, tokens, channels)
        first = x[:, :1].expand(-1, frames, -1, -1)
        former = torch.cat([x[:, :1], x[:, :-1]], dim=1)  # slices, not an index list: no host-to-device copy
        return torch.cat([first, former], dim=2).reshape(bf, 2 * tokens, channels)


def sinusoidal_positions(
    frames: int, channels: int, like: torch.Tensor, longest: float = LONGEST_WAVELENGTH
) -> torch.Tensor:
    """`[frames, channels]`: the Transformer's sinusoidal encoding of frame indices 0..frames-1 (sines in the even
    channels, cosines in the odd ones, wavelengths from 2 pi to `longest` * 2 pi)."""
    index = torch.arange(frames, device=like.device, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, channels, 2, device=like.device, dtype=torch.float32)
                     * (-math.log(longest) / channels))
    angle = index * rate
    return torch.stack([angle.sin(), angle.cos()], dim=-1).reshape(frames, -1)[:, :channels].to(like.dtype)


class TemporalTransformerBlock(BasicTransformerBlock):
    """A diffusers transformer block followed by Tune-A-Video's temporal attention (with residual)."""

    frame_context: FrameContext
    position_wavelength: float | None  # the encoding's longest wavelength; None: no positions
    norm_temp: nn.LayerNorm
    attn_temp: Attention

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        hidden_states = super().forward(hidden_states, *args, **kwargs)
        frames = self.frame_context.frames
        bf, tokens, channels = hidden_states.shape
        # (b f) d c -> (b d) f c: attend across the frames at each spatial position.
        x = hidden_states.reshape(bf // frames, frames, tokens, channels).transpose(1, 2)
        x = x.reshape(-1, frames, channels)
        h = self.norm_temp(x)
        if self.position_wavelength is not None:
            h = h + sinusoidal_positions(frames, channels, h, self.position_wavelength)
        x = self.attn_temp(h) + x
        x = x.reshape(bf // frames, tokens, frames, channels).transpose(1, 2)
        return x.reshape(bf, tokens, channels)


class ClipGroupNorm(nn.GroupNorm):
    """GroupNorm over `(b f) c h w` whose statistics span all frames of each clip, as over `b c f h w`."""

    frame_context: FrameContext

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = self.frame_context.frames
        bf, channels, height, width = x.shape
        clip = x.reshape(bf // frames, frames, channels, height * width).transpose(1, 2)
        clip = F.group_norm(clip, self.num_groups, self.weight, self.bias, self.eps)
        return clip.transpose(1, 2).reshape(bf, channels, height, width)


class VideoUNet(UNet2DConditionModel):
    """The inflated UNet: `forward(sample [B, C, F, H, W], timestep, encoder_hidden_states [B, L, D])`.

    Made by `inflate`, never constructed directly. Its state dict is the 2-D UNet's plus each transformer block's
    `attn_temp.*` and `norm_temp.*`, named as in the reference implementation's UNet3DConditionModel.
    """

    frame_context: FrameContext
    attention_mode: str
    branch_layers: int = 1  # DeepCache's finest branch: only the final up block's last layer is shallow

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        branch: torch.Tensor | None = None,
        return_branch: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The noise prediction `[B, C, F, H, W]`; with `return_branch`, also the branch features
        `[B, C', F, H, W]` for later shallow passes; with `branch` (such features), the shallow pass from them."""
        if branch is not None and return_branch:
            raise ValueError("a shallow pass (branch given) has no branch features to return")
        b, c, f, h, w = sample.shape
        self.frame_context.frames = f
        x = _fold(sample)
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        timestep = timestep.expand(b * f) if timestep.numel() == 1 else timestep.repeat_interleave(f)
        text = encoder_hidden_states.repeat_interleave(f, dim=0)
        emb = self.time_embedding(self.time_proj(timestep).to(x.dtype))
        x = self.conv_in(x)
        skips = [x]
        last = self.up_blocks[-1]
        shallow = range(len(last.resnets) - self.branch_layers, len(last.resnets))
        if branch is not None:
            for layer in range(self.branch_layers - 1):
                skips.append(x := _down_layer(self.down_blocks[0], layer, x, emb, text))
            x = _fold(branch)
            for layer in shallow:
                x = _up_layer(last, layer, x, skips[len(last.resnets) - 1 - layer], emb, text)
            return _unfold(self._out(x), b)
        for block in self.down_blocks:
            for layer in range(len(block.resnets)):
                skips.append(x := _down_layer(block, layer, x, emb, text))
            if block.downsamplers is not None:
                for downsampler in block.downsamplers:
                    x = downsampler(x)
                skips.append(x)
        if self.mid_block is not None:
            x = self.mid_block.resnets[0](x, emb)
            for attention, resnet in zip(self.mid_block.attentions, self.mid_block.resnets[1:], strict=True):
                x = resnet(attention(x, encoder_hidden_states=text, return_dict=False)[0], emb)
        # like diffusers: upsample to the skip's size only where the latent size is not a multiple of the factor
        odd = any(dim % 2**self.num_upsamplers for dim in (h, w))
        features = None
        for block in self.up_blocks:
            count = len(block.resnets)
            block_skips, skips = skips[-count:], skips[:-count]
            for layer in range(count):
                if block is last and layer == shallow.start:
                    features = x
                x = _up_layer(block, layer, x, block_skips[count - 1 - layer], emb, text)
            if block.upsamplers is not None:
                for upsampler in block.upsamplers:
                    x = upsampler(x, skips[-1].shape[2:] if odd else None)
        out = _unfold(self._out(x), b)
        return (out, _unfold(features, b)) if return_branch else out

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv_norm_out is not None:
            x = self.conv_act(self.conv_norm_out(x))
        return self.conv_out(x)

    def set_attention_mode(self, mode: str) -> None:
        """Switch attn1 between `sparse_causal`, `per_frame` and `full` (weights are the same in every mode)."""
        self.set_attn_processor(_processors(self, mode))
        self.attention_mode = mode


def _fold(x: torch.Tensor) -> torch.Tensor:
    """`[B, C, F, H, W]` -> `[(B F), C, H, W]`."""
    b, c, f, h, w = x.shape
    return x.transpose(1, 2).reshape(b * f, c, h, w)


def _unfold(x: torch.Tensor, batch: int) -> torch.Tensor:
    """`[(B F), C, H, W]` -> `[B, C, F, H, W]`."""
    bf, c, h, w = x.shape
    return x.reshape(batch, bf // batch, c, h, w).transpose(1, 2)


def _down_layer(block: nn.Module, layer: int, x: torch.Tensor, emb: torch.Tensor, text: torch.Tensor
                ) -> torch.Tensor:
    """Layer `layer` of a diffusers down block: its ResNet, then its transformer if it has them."""
    x = block.resnets[layer](x, emb)
    if getattr(block, "attentions", None) is not None:
        x = block.attentions[layer](x, encoder_hidden_states=text, return_dict=False)[0]
    return x


def _up_layer(block: nn.Module, layer: int, x: torch.Tensor, skip: torch.Tensor, emb: torch.Tensor,
              text: torch.Tensor) -> torch.Tensor:
    """Layer `layer` of a diffusers up block on `x` and its skip connection."""
    return _down_layer(block, layer, torch.cat([x, skip], dim=1), emb, text)


def inflate(
    unet: UNet2DConditionModel, mode: str = "sparse_causal", group_norm: str = "per_frame",
    frame_positions: str = "none",
) -> VideoUNet:
    """Turn a diffusers 2-D UNet into the video UNet, in place, and return it.

    New temporal attentions are initialised like the reference's (default init, output weight zero) from the
    global torch RNG; seed it for reproducible inflation. `frame_positions` adds no tensor: the encoding is fixed.
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
    if group_norm not in GROUP_NORMS:
        raise ValueError(f"group norm must be one of {GROUP_NORMS}, got {group_norm!r}")
    if frame_positions not in FRAME_POSITIONS:
        raise ValueError(f"frame positions must be one of {FRAME_POSITIONS}, got {frame_positions!r}")
    if isinstance(unet, VideoUNet):
        raise ValueError("this UNet is already inflated")
    _check_stable_diffusion_1(unet)
    context = FrameContext()
    middle = set(unet.mid_block.modules()) if unet.mid_block is not None else set()
    for module in list(unet.modules()):
        if isinstance(module, BasicTransformerBlock):
            _add_temporal_attention(module, context)
            module.position_wavelength = _position_wavelength(frame_positions, module in middle)
        elif isinstance(module, ResnetBlock2D) and group_norm == "per_clip":
            for norm in (module.norm1, module.norm2):
                _become(norm, ClipGroupNorm, context)
    if group_norm == "per_clip":
        _become(unet.conv_norm_out, ClipGroupNorm, context)
    _become(unet, VideoUNet, context)
    unet.set_attention_mode(mode)
    return unet


def _check_stable_diffusion_1(unet: UNet2DConditionModel) -> None:
    """`VideoUNet.forward` runs what a Stable Diffusion 1.x UNet has: no class, added or projected embeddings."""
    extras = ("class_embedding", "add_embedding", "encoder_hid_proj", "time_embed_act")
    if any(getattr(unet, name, None) is not None for name in extras) or unet.config.center_input_sample:
        raise ValueError("only Stable Diffusion 1.x-style UNets can be inflated")


def _position_wavelength(frame_positions: str, in_middle_block: bool) -> float | None:
    if frame_positions == "none":
        return None
    if frame_positions == "sinusoidal_short_middle" and in_middle_block:
        return SHORT_MIDDLE_WAVELENGTH
    return LONGEST_WAVELENGTH


def _become(module: nn.Module, cls: type, context: FrameContext) -> None:
    """Swap `module`'s class for the frame-aware subclass `cls`, keeping its tensors and their names."""
    if not isinstance(module, cls.__mro__[1]):
        raise TypeError(f"cannot inflate {type(module).__name__} into {cls.__name__}")
    module.__class__ = cls
    module.frame_context = context


def _add_temporal_attention(block: BasicTransformerBlock, context: FrameContext) -> None:
    attn1 = block.attn1
    for attn in (attn1, block.attn2):
        if attn is None or attn.group_norm is not None or attn.spatial_norm is not None or attn.norm_q is not None:
            raise ValueError("only Stable Diffusion 1.x-style transformer blocks can be inflated")
    dim = attn1.query_dim
    attn_temp = Attention(
        query_dim=dim,
        heads=attn1.heads,
        dim_head=attn1.inner_dim // attn1.heads,
        bias=attn1.to_q.bias is not None,
        upcast_attention=attn1.upcast_attention,
    )
    nn.init.zeros_(attn_temp.to_out[0].weight)
    param = attn1.to_q.weight
    block.add_module("norm_temp", nn.LayerNorm(dim).to(param.device, param.dtype))
    block.add_module("attn_temp", attn_temp.to(param.device, param.dtype))
    _become(block, TemporalTransformerBlock, context)


def _processors(unet: VideoUNet, mode: str) -> dict[str, VideoAttnProcessor]:
    """One processor per attention of the UNet, keyed as diffusers' `set_attn_processor` expects."""
    cross_frame = VideoAttnProcessor(unet.frame_context, mode)
    plain = VideoAttnProcessor()
    return {
        name: cross_frame if name.endswith("attn1.processor") else plain for name in unet.attn_processors
    }
