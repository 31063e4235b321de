"""The paper's CLIP metrics for a generated clip, given a local CLIP model directory (no hub is reachable).

- text alignment ("CLIP score"): the mean cosine similarity between each frame's image embedding and the
  prompt's text embedding;
- frame consistency: the mean cosine similarity between the image embeddings of consecutive frames.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer


class ClipScorer:
    """Embeds frames and prompts with a `transformers.CLIPModel` loaded from a local directory."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model = CLIPModel.from_pretrained(model_dir).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(model_dir)
        self.processor = CLIPImageProcessor.from_pretrained(model_dir)

    @torch.inference_mode()
    def score(self, frames: np.ndarray, prompt: str) -> dict[str, float]:
        """CLIP text alignment and frame consistency of uint8 frames [F, H, W, 3] for `prompt`."""
        pixels = self.processor(images=list(frames), return_tensors="pt").pixel_values
        ids = self.tokenizer([prompt], padding="max_length", truncation=True, return_tensors="pt").input_ids
        out = self.model(input_ids=ids, pixel_values=pixels)  # CLIPModel returns unit-norm embeddings
        images, text = out.image_embeds, out.text_embeds[0]
        consistency = (images[:-1] * images[1:]).sum(-1).mean() if len(images) > 1 else torch.tensor(1.0)
        return {"clip_text_alignment": float((images @ text).mean()), "clip_frame_consistency": float(consistency)}
