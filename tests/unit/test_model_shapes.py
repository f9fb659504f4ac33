"""The full-size V1-1 model, built on the meta device, has exactly the checkpoint's keys and shapes
(model sheet section 2) and the official 19,113,663,360 parameters."""

from __future__ import annotations

import transformers

from internvl_serve.config import InternVLChatConfig
from internvl_serve.model.internvl import InternVLChatModel, VisionEncoder, build_model, count_parameters

D, F, L = 3200, 12800, 48           # ViT width, MLP width, blocks
H, I, J, V = 5120, 13824, 40, 41840  # LLM width, MLP width, layers, vocab


def sheet_keys() -> dict[str, tuple[int, ...]]:
    """Section 2's table, written out key by key."""
    keys = {
        "vision_model.embeddings.class_embedding": (1, 1, D),
        "vision_model.embeddings.patch_embedding.weight": (D, 3, 14, 14),
        "vision_model.embeddings.patch_embedding.bias": (D,),
        "vision_model.embeddings.position_embedding": (1, 1025, D),
        "mlp1.0.weight": (4 * D,), "mlp1.0.bias": (4 * D,),
        "mlp1.1.weight": (H, 4 * D), "mlp1.1.bias": (H,),
        "mlp1.3.weight": (H, H), "mlp1.3.bias": (H,),
        "language_model.model.embed_tokens.weight": (V, H),
        "language_model.model.norm.weight": (H,),
        "language_model.lm_head.weight": (V, H),
    }
    for i in range(L):
        p = f"vision_model.encoder.layers.{i}."
        keys.update({
            p + "attn.qkv.weight": (3 * D, D),
            p + "attn.q_norm.weight": (D,), p + "attn.k_norm.weight": (D,),
            p + "attn.proj.weight": (D, D), p + "attn.proj.bias": (D,),
            p + "mlp.fc1.weight": (F, D), p + "mlp.fc1.bias": (F,),
            p + "mlp.fc2.weight": (D, F), p + "mlp.fc2.bias": (D,),
            p + "norm1.weight": (D,), p + "norm2.weight": (D,),
            p + "ls1": (D,), p + "ls2": (D,),
        })
    for j in range(J):
        p = f"language_model.model.layers.{j}."
        keys.update({p + f"self_attn.{x}_proj.weight": (H, H) for x in "qkvo"})
        keys.update({
            p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I),
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
        })
    return keys


def test_full_size_keys_shapes_and_parameter_count(v1_1_config_dict):
    config = InternVLChatConfig.from_dict(v1_1_config_dict)
    model = build_model(config)                     # meta device: no memory
    assert isinstance(model, InternVLChatModel)
    assert isinstance(model.language_model, transformers.LlamaForCausalLM)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = sheet_keys()
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    assert {k: s for k, s in got.items() if want[k] != s} == {}
    n = count_parameters(model)
    print(f"\nInternVL-Chat-V1-1 parameters: {n:,}")
    assert n == 19_113_663_360
    assert count_parameters(model.vision_model) == 5_905_251_200
    assert count_parameters(model.mlp1) == 91_786_240
    assert all(p.is_meta for p in model.parameters())


def test_vision_encoder_and_language_parts(v1_1_config_dict):
    config = InternVLChatConfig.from_dict(v1_1_config_dict)
    want = sheet_keys()
    vision = build_model(config, parts=("vision",))
    assert isinstance(vision, VisionEncoder)
    assert {k: tuple(v.shape) for k, v in vision.state_dict().items()} == {
        k: s for k, s in want.items() if k.startswith(("vision_model.", "mlp1."))}
    language = build_model(config, parts=["language"])
    assert isinstance(language, transformers.LlamaForCausalLM)
    assert {"language_model." + k: tuple(v.shape) for k, v in language.state_dict().items()} == {
        k: s for k, s in want.items() if k.startswith("language_model.")}


def test_trim_keeps_the_blocks_select_layer_needs(v1_1_config_dict):
    config = InternVLChatConfig.from_dict(v1_1_config_dict)
    vision = build_model(config, parts=("vision",))
    vision.vision_model.trim_unused_blocks(config.select_layer)
    assert len(vision.vision_model.encoder.layers) == 45
