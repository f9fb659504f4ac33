"""Our LLaMA forward over the paged KV cache (plain PyTorch, gpt-fast style).

Same weights and the same math as transformers' LlamaForCausalLM: RMSNorm in fp32 then cast then
* weight; rotate_half RoPE with cos/sin computed in fp32 as HF computes them then cast; GQA through
num_key_value_heads; SiLU MLP; logits cast to fp32 as HF generate does.

The batch is ragged and flattened: T tokens of all sequences of one step, (T, hidden) embeddings and (T,)
positions, and the step's AttentionMetadata (attention.py). Each layer writes its new K/V into the paged
cache, then calls the attention function (Llama(attention=...): the reference SDPA one by default, a fused
paged-attention kernel later). Logits are computed only at `logits_indices`.

Does not own: attention metadata (attention.py), the KV tensors, block tables, sampling (runner.py,
sampler.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel

from internvl_serve.engine.attention import (SDPA_BACKENDS, AttentionFn, AttentionMetadata, sdpa_paged_attention,
                                             write_kv)
from internvl_serve.engine.parallel import TensorParallel, local_args, shard_state_dict


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LlamaArgs:
    """The LLaMA sizes this file needs, read from any config-like object (our LlamaConfig, an object
    with .llm_config such as InternVLChatConfig, transformers' LlamaConfig, or a dict)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Mapping | None = None
    head_dim: int = 0  # 0 -> hidden_size // num_attention_heads
    tie_word_embeddings: bool = False
    eos_token_id: int | None = 2

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")

    @classmethod
    def from_config(cls, config) -> "LlamaArgs":
        if isinstance(config, LlamaArgs):
            return config
        if hasattr(config, "llm_config"):
            config = config.llm_config
        get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
        rope = get("rope_parameters") or {}
        theta = get("rope_theta") or rope.get("rope_theta") or 10000.0
        scaling = get("rope_scaling") or None
        eos = get("eos_token_id", 2)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        return cls(vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
                   intermediate_size=get("intermediate_size"), num_hidden_layers=get("num_hidden_layers"),
                   num_attention_heads=get("num_attention_heads"),
                   num_key_value_heads=get("num_key_value_heads") or get("num_attention_heads"),
                   max_position_embeddings=get("max_position_embeddings"),
                   rms_norm_eps=float(get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
                   rope_scaling=dict(scaling) if scaling else None, head_dim=get("head_dim") or 0,
                   tie_word_embeddings=bool(get("tie_word_embeddings", False)), eos_token_id=eos)


def rope_inv_freq(args: LlamaArgs) -> torch.Tensor:
    """HF's default (and linear-scaled) inverse frequencies, computed on the CPU in fp32 as HF does."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    scaling = dict(args.rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind != "default":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (only default and linear)")
    return inv_freq


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype  # as HF: normalize in fp32, cast back, then * weight
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, heads, D); cos, sin (T, 1, D)."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """args: this rank's sizes (local_args under tensor parallelism: its heads only); tp: the group whose
    partial o_proj outputs are summed."""

    def __init__(self, args: LlamaArgs, attention: AttentionFn, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        hidden = args.hidden_size
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=False)
        self.scale = self.head_dim ** -0.5
        self.attention = attention

    def forward(self, x, cos, sin, k_cache, v_cache, meta: AttentionMetadata):
        T = x.shape[0]
        q = apply_rope(self.q_proj(x).view(T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(T, self.n_kv, self.head_dim), cos, sin)
        v = self.v_proj(x).view(T, self.n_kv, self.head_dim)
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        o = self.attention(q, k_cache, v_cache, meta, self.scale)  # (T, H, D)
        return self.project_out(o.reshape(T, self.n_heads * self.head_dim))

    def project_out(self, o: torch.Tensor) -> torch.Tensor:
        """o_proj, summed over the tensor-parallel ranks (each holds its heads' columns)."""
        return self.tp.all_reduce(self.o_proj(o))


class MLP(nn.Module):
    def __init__(self, args: LlamaArgs, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x):
        return self.tp.all_reduce(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, attention: AttentionFn, tp: TensorParallel):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, attention, tp)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args, tp)

    def forward(self, x, cos, sin, k_cache, v_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, args: LlamaArgs, attention: AttentionFn, tp: TensorParallel):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, attention, tp) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Llama(nn.Module):
    """Module names equal HF's LlamaForCausalLM: model.embed_tokens, model.layers.i..., model.norm, lm_head.

    args: the model's sizes; under tensor parallelism (tp.world_size > 1) the layers hold this rank's
    slice (local_args: its heads and its part of the MLP), embeddings, norms and lm_head are whole."""

    def __init__(self, args: LlamaArgs, attention: AttentionFn = sdpa_paged_attention,
                 tp: TensorParallel | None = None):
        super().__init__()
        self.args = args
        self.tp = tp or TensorParallel()
        self.local_args = local_args(args, self.tp.world_size)
        self.model = LlamaModel(self.local_args, attention, self.tp)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rope_cos: torch.Tensor | None = None  # (max_position_embeddings, head_dim), model dtype
        self.rope_sin: torch.Tensor | None = None

    def init_rope(self, device, dtype) -> None:
        """cos/sin of every position, computed as HF's LlamaRotaryEmbedding.forward: fp32 on the device,
        then cast to the model dtype."""
        inv_freq = rope_inv_freq(self.args).to(device)
        pos = torch.arange(self.args.max_position_embeddings, device=device).float()
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.rope_cos, self.rope_sin = emb.cos().to(dtype), emb.sin().to(dtype)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(token_ids)

    def forward(self, input_embeds: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                logits_indices: torch.Tensor) -> torch.Tensor:
        """input_embeds (T, hidden); positions (T,); kv_caches[i] = (k, v), each (num_blocks, block_size,
        Hkv, D); logits_indices (S,) -> logits (S, vocab) in fp32."""
        cos = self.rope_cos[positions].unsqueeze(1)  # (T, 1, D)
        sin = self.rope_sin[positions].unsqueeze(1)
        h = input_embeds
        with sdpa_kernel(SDPA_BACKENDS):
            for layer, (k_cache, v_cache) in zip(self.model.layers, kv_caches):
                h = layer(h, cos, sin, k_cache, v_cache, meta)
        h = self.model.norm(h.index_select(0, logits_indices))  # per-row norm: select first
        return self.lm_head(h).float()


# ------------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------------

def sanitize_state_dict(state_dict: Mapping[str, torch.Tensor], args: LlamaArgs) -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM keys, with or without the InternVL `language_model.` prefix -> our keys
    (the same names). Drops rotary_emb.inv_freq and, when the prefixed keys are present, every
    non-language key (vision_model.*, mlp1.*). Raises KeyError naming missing/unexpected keys."""
    prefix = "language_model."
    has_prefix = any(k.startswith(prefix) for k in state_dict)
    out = {}
    for key, value in state_dict.items():
        if has_prefix:
            if not key.startswith(prefix):
                continue
            key = key[len(prefix):]
        if key.endswith("rotary_emb.inv_freq"):
            continue
        out[key] = value
    if "lm_head.weight" not in out and args.tie_word_embeddings and "model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        expected |= {p + f"self_attn.{n}_proj.weight" for n in "qkvo"}
        expected |= {p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
        expected |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
    missing, unexpected = sorted(expected - out.keys()), sorted(out.keys() - expected)
    if missing or unexpected:
        raise KeyError(f"LLaMA state dict mismatch: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                       f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    return out


def load_llama(config, state_dict: Mapping[str, torch.Tensor], *, device, dtype,
               attention: AttentionFn = sdpa_paged_attention, tp: TensorParallel | None = None) -> Llama:
    """Build Llama on the meta device and take the state dict's tensors (moved/cast only where needed:
    a state dict already on `device` in `dtype` is used without a copy). Under tensor parallelism the
    full state dict is given and this rank's slices are taken (parallel.shard_state_dict)."""
    args = LlamaArgs.from_config(config)
    tp = tp or TensorParallel()
    weights = shard_state_dict(sanitize_state_dict(state_dict, args), tp.rank, tp.world_size)
    with torch.device("meta"):
        model = Llama(args, attention, tp)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, value in weights.items():
        if tuple(value.shape) != shapes[key]:
            raise ValueError(f"{key}: shape {tuple(value.shape)}, expected {shapes[key]} from the config")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in weights.items()},
                          strict=True, assign=True)
    model.requires_grad_(False)
    model.init_rope(torch.device(device), dtype)
    return model.eval()
