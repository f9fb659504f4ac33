"""InternViT: the select_layer truncation equals hidden_states[select_layer] of the full run, runs only the
blocks it needs; position interpolation is the identity at the native grid; SDPA attention and the
RMSNorm follow the sheet's naive formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from internvl_serve.model.vision import InternRMSNorm, InternVisionModel, interpolate_pos_embed
from slow_reference import randomize, ref_attention, ref_hidden_states, ref_rms, small_config


@pytest.fixture(scope="module")
def vit():
    config = small_config(layers=6, select_layer=-4)
    return randomize(InternVisionModel(config.vision_config)).eval(), config


def all_hidden_states(model, pixels):
    """Run every block with the model's own modules: (embeddings, out_1, ..., out_L)."""
    states = [model.embeddings(pixels)]
    for layer in model.encoder.layers:
        states.append(layer(states[-1]))
    return states


@pytest.mark.parametrize("select_layer", [-1, -2, -4, -7, 0, 1, 3, 6])
def test_select_layer_truncation_equals_full_run(vit, select_layer):
    model, _ = vit
    pixels = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(model(pixels, select_layer=select_layer), all_hidden_states(model, pixels)[select_layer])


def test_only_needed_blocks_run(vit):
    model, config = vit
    calls = []
    hooks = [layer.register_forward_hook(lambda m, i, o, n=n: calls.append(n))
             for n, layer in enumerate(model.encoder.layers)]
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, 112, 112), select_layer=config.select_layer)
    finally:
        for h in hooks:
            h.remove()
    assert calls == [0, 1, 2]          # 6 blocks, select_layer -4: hidden_states[3] = out_3


def test_trim_unused_blocks(vit):
    model, config = vit
    pixels = torch.randn(1, 3, 112, 112)
    trimmed = InternVisionModel(config.vision_config)
    trimmed.load_state_dict(model.state_dict())
    trimmed.trim_unused_blocks(config.select_layer)
    assert len(trimmed.encoder.layers) == 3
    with torch.no_grad():
        assert torch.equal(trimmed(pixels, select_layer=-4), model(pixels, select_layer=-4))
        with pytest.raises(ValueError, match="select_layer"):
            trimmed(pixels, select_layer=-1)


def test_matches_naive_reference(vit):
    model, config = vit
    pixels = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        want = ref_hidden_states(model, pixels, config.vision_config.num_attention_heads)
        for s in (-1, -4):
            torch.testing.assert_close(model(pixels, select_layer=s), want[s], rtol=1e-4, atol=1e-4)


def test_sdpa_attention_equals_naive(vit):
    model, config = vit
    attn = model.encoder.layers[0].attn
    x = torch.randn(2, 17, 32, dtype=torch.float64)
    attn64 = attn.double()
    try:
        with torch.no_grad():
            torch.testing.assert_close(attn64(x), ref_attention(attn64, x, 4), rtol=1e-6, atol=1e-6)
    finally:
        attn.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_position_interpolation_identity_at_same_grid(dtype):
    pos = torch.randn(1, 32 * 32, 64).to(dtype)
    assert torch.equal(interpolate_pos_embed(pos, (32, 32)), pos)


def test_position_interpolation_to_other_grid(vit):
    model, _ = vit
    pixels = torch.randn(1, 3, 56, 56)                 # 4x4 patches against the native 8x8 grid
    with torch.no_grad():
        out = model(pixels, select_layer=0)
        e = model.embeddings
        pos = e.position_embedding[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(4, 4), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
        patches = e.patch_embedding(pixels).flatten(2).transpose(1, 2)
    assert out.shape == (1, 17, 32)
    torch.testing.assert_close(out[:, 1:], patches + pos)
    torch.testing.assert_close(out[:, :1], e.class_embedding + e.position_embedding[:, :1])


def test_rms_norm_fp32_compute_cast_back_then_weight():
    norm = InternRMSNorm(64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x = (torch.randn(3, 64) * 5).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(norm(x), ref_rms(x, norm.weight))
    assert norm(x).dtype == torch.float32   # fp32 weight times the bf16 result, as the official module
