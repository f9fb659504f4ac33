"""Slow, obviously-correct references for the model math, written from the model sheet (section 3),
not from internvl_serve: the naive ViT (hidden_states tuple, naive attention), the pixel shuffle as a
loop over the documented channel/token layout, and the projector as functional calls."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from internvl_serve.config import InternVLChatConfig, LlamaConfig, VisionConfig


def small_config(*, image_size=112, layers=4, select_layer=-2, ps_version="v1", downsample_ratio=0.5):
    vision = VisionConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=layers,
                          patch_size=14, image_size=image_size)
    llm = LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    return InternVLChatConfig(vision_config=vision, llm_config=llm, select_layer=select_layer,
                              ps_version=ps_version, downsample_ratio=downsample_ratio)


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm weights and layer scales too, so none can be silently ignored)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        z = torch.randn(p.shape, generator=g)
        if name.endswith(("norm1.weight", "norm2.weight", "q_norm.weight", "k_norm.weight", "mlp1.0.weight")):
            p.copy_(1 + 0.2 * z)
        elif name.endswith(("ls1", "ls2")):
            p.copy_(0.5 + 0.2 * z)
        elif p.dim() >= 2 and "embedding" not in name:
            p.copy_(z / p[0].numel() ** 0.5)
        else:
            p.copy_(0.5 * z)
    return module


def ref_rms(x, weight, eps=1e-6):
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def ref_attention(attn, x, num_heads):
    """The sheet's naive path: qkv -> (3,B,H,N,hd); q/k RMSNorm over all heads; softmax((q*s) k^T) v."""
    B, N, C = x.shape
    hd = C // num_heads
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(B, N, 3, num_heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q = ref_rms(q.transpose(1, 2).flatten(-2), attn.q_norm.weight).view(B, N, num_heads, hd).transpose(1, 2)
    k = ref_rms(k.transpose(1, 2).flatten(-2), attn.k_norm.weight).view(B, N, num_heads, hd).transpose(1, 2)
    a = ((q * hd ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (a @ v).transpose(1, 2).reshape(B, N, C)
    return F.linear(out, attn.proj.weight, attn.proj.bias)


def ref_hidden_states(vision_model, pixel_values, num_heads):
    """(embedding output, out_1, ..., out_L), as output_hidden_states=True gives them."""
    e = vision_model.embeddings
    p = F.conv2d(pixel_values, e.patch_embedding.weight, e.patch_embedding.bias, stride=e.patch_embedding.stride)
    B, D = p.shape[:2]
    x = torch.cat([e.class_embedding.expand(B, 1, D), p.flatten(2).transpose(1, 2)], dim=1) + e.position_embedding
    states = [x]
    for layer in vision_model.encoder.layers:
        x = x + ref_attention(layer.attn, ref_rms(x, layer.norm1.weight), num_heads) * layer.ls1
        h = ref_rms(x, layer.norm2.weight)
        h = F.linear(F.gelu(F.linear(h, layer.mlp.fc1.weight, layer.mlp.fc1.bias)), layer.mlp.fc2.weight, layer.mlp.fc2.bias)
        x = x + h * layer.ls2
        states.append(x)
    return tuple(states)


def ref_pixel_shuffle(x, ps_version):
    """(B, R, C, D) -> (B, R/2 * C/2, 4D): token (m, k) = [x(2m,2k), x(2m,2k+1), x(2m+1,2k), x(2m+1,2k+1)];
    v1 puts it at t = k * R/2 + m (column-pair-major), v2 at t = m * C/2 + k (row-major)."""
    B, R, C, D = x.shape
    out = torch.zeros(B, (R // 2) * (C // 2), 4 * D, dtype=x.dtype)
    for m in range(R // 2):
        for k in range(C // 2):
            t = k * (R // 2) + m if ps_version == "v1" else m * (C // 2) + k
            out[:, t] = torch.cat([x[:, 2 * m, 2 * k], x[:, 2 * m, 2 * k + 1],
                                   x[:, 2 * m + 1, 2 * k], x[:, 2 * m + 1, 2 * k + 1]], dim=-1)
    return out


def ref_extract_feature(model, config, pixel_values):
    hs = ref_hidden_states(model.vision_model, pixel_values, config.vision_config.num_attention_heads)
    feats = hs[config.select_layer][:, 1:]
    B, T, D = feats.shape
    g = int(T ** 0.5)
    x = ref_pixel_shuffle(feats.reshape(B, g, g, D), config.ps_version)
    ln, fc1, fc2 = model.mlp1[0], model.mlp1[1], model.mlp1[3]
    x = F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, eps=1e-5)
    return F.linear(F.gelu(F.linear(x, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
