"""The vision service behind the `vision` Triton model: pixel tiles -> image embeddings.

Owns: loading only the checkpoint's vision_model.* and mlp1.* weights (bfloat16 on CUDA, float32 on
CPU), and running several requests' images as one batched forward (chunked to bound memory), split
back per request. Does not own: Triton (the adapter in model_repository/vision) or image decoding.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from internvl_serve.checkpoint import load_model
from internvl_serve.config import InternVLChatConfig
from internvl_serve.serving.device import default_dtype, resolve_device


class VisionService:
    """`embed([pixel_values of request 1, of request 2, ...])` -> their image embeddings, one forward."""

    def __init__(self, checkpoint: str | Path, *, device: str = "auto", dtype: torch.dtype | None = None,
                 max_images_per_forward: int = 32):
        self.device = resolve_device(device)
        self.dtype = dtype or default_dtype(self.device)
        self.config = InternVLChatConfig.from_pretrained(checkpoint)
        self.encoder = load_model(checkpoint, dtype=self.dtype, device=self.device, parts=("vision",),
                                  trim_vision_layers=True, progress=False)
        self.max_images_per_forward = max_images_per_forward
        self.num_image_token = self.config.num_image_token
        self.hidden_size = self.config.llm_config.hidden_size

    @torch.inference_mode()
    def embed(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """Each element (N_i, 3, S, S) float32 -> (N_i * num_image_token, llm_hidden) float32."""
        counts = [int(b.shape[0]) for b in batches]
        total = sum(counts)
        out = torch.empty((total, self.num_image_token, self.hidden_size), dtype=torch.float32)
        if total:
            pixels = torch.from_numpy(np.concatenate([b for b in batches if b.shape[0]], axis=0))
            for start in range(0, total, self.max_images_per_forward):
                chunk = pixels[start:start + self.max_images_per_forward]
                chunk = chunk.to(device=self.device, dtype=self.dtype, non_blocking=True)
                out[start:start + chunk.shape[0]] = self.encoder(chunk).float().cpu()
        embeds, start = [], 0
        for n in counts:  # (n, tokens, H) -> (n * tokens, H), in image order
            embeds.append(out[start:start + n].reshape(n * self.num_image_token, self.hidden_size).numpy())
            start += n
        return embeds
