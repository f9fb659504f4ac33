"""The LLaMA language model as transformers' LlamaForCausalLM, built from our LlamaConfig.

Owns: the mapping of our LlamaConfig onto transformers' config (rope_theta / rope_scaling into
rope_parameters, attention implementation) and the re-creation of the RoPE buffers that a model
built on the meta device lacks. This is the reference path (the card's generate); the serving
engine has its own LLaMA forward over a paged KV cache with the same weights.

Checkpoint keys under `language_model.`: model.embed_tokens, model.layers.{j}.*, model.norm, lm_head.
Old checkpoints may also hold `...rotary_emb.inv_freq`; those are derived, never loaded (see
`is_ignored_key`).
"""

from __future__ import annotations

import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from ..config import LlamaConfig

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


def is_ignored_key(key: str) -> bool:
    """Checkpoint keys that are derived buffers, not weights (RoPE inverse frequencies)."""
    return key.endswith("rotary_emb.inv_freq")


def to_hf_config(config: LlamaConfig, *, attn_implementation: str = "sdpa") -> transformers.LlamaConfig:
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}")
    rope = dict(config.rope_scaling or {"rope_type": "default"})
    rope.setdefault("rope_type", rope.get("type", "default"))
    rope["rope_theta"] = config.rope_theta
    hf = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=rope,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        hidden_act=config.hidden_act,
        tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=config.attention_bias,
        initializer_range=config.initializer_range,
    )
    hf._attn_implementation = attn_implementation
    return hf


def build_language_model(config: LlamaConfig, *, attn_implementation: str = "sdpa") -> transformers.LlamaForCausalLM:
    """A LlamaForCausalLM with freshly initialised weights (on the current default device)."""
    return transformers.LlamaForCausalLM(to_hf_config(config, attn_implementation=attn_implementation))


def reset_rotary_buffers(model: torch.nn.Module, device: torch.device | str = "cpu") -> None:
    """Re-create every LlamaRotaryEmbedding on `device` in fp32.

    Its inv_freq buffers are not in the state dict, so a model built on the meta device still has
    them on meta after loading the weights; they are computed from the config, never loaded.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, LlamaRotaryEmbedding):
            with torch.device(device):
                fresh = LlamaRotaryEmbedding(module.config)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)
