"""InternViT (InternVisionModel) in plain PyTorch, under the checkpoint's key names.

Owns: patch + class + position embeddings (bicubic fp32 re-interpolation when the grid differs),
the pre-norm blocks (RMSNorm, qkv without bias, q/k RMSNorm over all heads jointly, layer scale)
and the select_layer rule. There is no final norm and no pooler: the model is embeddings + blocks.

select_layer indexes hidden_states = (embeddings, out_1, ..., out_L), -1 being the last; forward()
runs only the blocks that feed that entry (V1-1: 48 blocks, select_layer -4 -> 45 blocks run).

Does not own: the pixel shuffle and projector (projector.py), image decoding/normalisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig


class InternRMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) computed in fp32, cast back to the input dtype, then times weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def make_norm(config: VisionConfig) -> nn.Module:
    if config.norm_type == "rms_norm":
        return InternRMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


def interpolate_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, G*G, D) patch position embeddings -> (1, H*W, D) by bicubic interpolation in fp32.

    The official code always interpolates; at the same grid this is an exact identity, so callers may
    skip it then (InternVisionEmbeddings does).
    """
    _, n, d = pos.shape
    g = int(round(n ** 0.5))
    assert g * g == n, f"position embedding holds {n} patches, not a square grid"
    h, w = grid
    x = pos.float().reshape(1, g, g, d).permute(0, 3, 1, 2)                     # (1, D, G, G)
    x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)       # (1, D, H, W)
    return x.reshape(1, d, h * w).permute(0, 2, 1).to(pos.dtype)                 # (1, H*W, D)


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        d = config.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_embedding = nn.Conv2d(config.num_channels, d, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_patches + 1, d))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))          # (B, D, H, W)
        b, d, h, w = patches.shape
        patches = patches.flatten(2).transpose(1, 2)                    # (B, H*W, D)
        cls = self.class_embedding.expand(b, 1, d).to(dtype)            # (B, 1, D)
        x = torch.cat([cls, patches], dim=1)                            # (B, 1+H*W, D)
        pos_patches = self.position_embedding[:, 1:]
        if pos_patches.shape[1] != h * w:
            pos_patches = interpolate_pos_embed(pos_patches, (h, w))
        pos = torch.cat([self.position_embedding[:, :1], pos_patches], dim=1)
        return x + pos.to(dtype)


class InternAttention(nn.Module):
    """Bidirectional multi-head attention; q and k are RMS-normalised over the full width (all heads)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(d, 3 * d, bias=config.qkv_bias)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm = InternRMSNorm(d, eps=config.layer_norm_eps)
            self.k_norm = InternRMSNorm(d, eps=config.layer_norm_eps)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, d).unbind(2)             # 3 x (B, N, D)
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)                        # over all heads jointly
        q, k, v = (t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B,H,N,hd)
        out = F.scaled_dot_product_attention(q, k, v)                   # softmax(q k^T / sqrt(hd)) v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class InternMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = nn.GELU() if config.hidden_act == "gelu" else nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        d = config.hidden_size
        self.attn = InternAttention(config)
        self.mlp = InternMLP(config)
        self.norm1 = make_norm(config)
        self.norm2 = make_norm(config)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(d))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x).to(x.dtype)) * self.ls1
        x = x + self.mlp(self.norm2(x).to(x.dtype)) * self.ls2
        return x


class InternVisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, num_blocks: int | None = None) -> torch.Tensor:
        """Run the first `num_blocks` blocks (all by default)."""
        for layer in self.layers[:num_blocks]:
            x = layer(x)
        return x


def blocks_for_select_layer(select_layer: int, num_hidden_layers: int) -> int:
    """How many blocks produce hidden_states[select_layer] of (embeddings, out_1, ..., out_L)."""
    L = num_hidden_layers
    if not -(L + 1) <= select_layer <= L:
        raise ValueError(f"select_layer {select_layer} is out of range for {L} blocks")
    return select_layer if select_layer >= 0 else L + 1 + select_layer


class InternVisionModel(nn.Module):
    """Embeddings + encoder. forward(pixel_values, select_layer) -> (B, 1 + H*W, D), CLS first."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        # (B, 3, S, S) -> hidden_states[select_layer]: (B, 1 + (S/14)^2, D)
        n = blocks_for_select_layer(select_layer, self.config.num_hidden_layers)
        if n > len(self.encoder.layers):
            raise ValueError(f"select_layer {select_layer} needs {n} blocks but only "
                             f"{len(self.encoder.layers)} are loaded")
        return self.encoder(self.embeddings(pixel_values), num_blocks=n)

    def trim_unused_blocks(self, select_layer: int) -> None:
        """Drop the blocks after those select_layer needs (V1-1: the last 3 of 48), to save memory."""
        n = blocks_for_select_layer(select_layer, self.config.num_hidden_layers)
        self.encoder.layers = self.encoder.layers[:n]
