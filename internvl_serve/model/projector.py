"""The pixel shuffle and the projector `mlp1` that turn ViT patch features into LLM input embeddings.

Owns: `pixel_shuffle` exactly as the official code (v1 keeps its spatially transposed token order,
which V1-1 was trained with; v2 swaps back to row-major) and `Projector` (the keys mlp1.0/.1/.3).

Does not own: the ViT (vision.py) nor where the features go in the prompt (internvl.py).
"""

from __future__ import annotations

import torch
from torch import nn


def pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5, ps_version: str = "v1") -> torch.Tensor:
    """(B, R, C', D) patch grid -> (B, C'*s, R*s, D/s^2) for v1 or (B, R*s, C'*s, D/s^2) for v2.

    With s = 0.5 the output token for row-pair m and column-pair k holds the channels
    [x(2m,2k), x(2m,2k+1), x(2m+1,2k), x(2m+1,2k+1)]. v1 orders tokens column-pair-major (the grid
    comes out transposed); v2 permutes back to row-major. The official names are n, w, h, c, though
    dim 1 holds rows.
    """
    if ps_version not in ("v1", "v2"):
        raise ValueError(f"ps_version must be 'v1' or 'v2', got {ps_version!r}")
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale_factor), int(c / scale_factor))          # merge column pairs
    x = x.permute(0, 2, 1, 3).contiguous()                                     # (n, h*s, w, c/s)
    x = x.reshape(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    if ps_version == "v2":
        x = x.permute(0, 2, 1, 3).contiguous()                                 # swap back to row-major
    return x


class Projector(nn.Sequential):
    """mlp1: LayerNorm(4C), Linear(4C, H), GELU, Linear(H, H) for scale 2 (C = ViT width, H = LLM width).

    An nn.Sequential so that the state-dict keys are mlp1.0 / mlp1.1 / mlp1.3 as in the checkpoint.
    """

    def __init__(self, vit_hidden_size: int, llm_hidden_size: int, scale: int = 2):
        d_in = vit_hidden_size * scale ** 2
        super().__init__(
            nn.LayerNorm(d_in),                  # eps 1e-5 (nn default, as the official code)
            nn.Linear(d_in, llm_hidden_size),
            nn.GELU(),                           # exact erf GELU
            nn.Linear(llm_hidden_size, llm_hidden_size),
        )
