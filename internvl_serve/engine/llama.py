"""Our LLaMA forward over the paged KV cache (plain PyTorch, gpt-fast style, plus fused Triton kernels).

Same weights and the same math as transformers' LlamaForCausalLM: RMSNorm in fp32 then cast then
* weight; rotate_half RoPE with cos/sin computed in fp32 as HF computes them then cast; GQA through
num_key_value_heads; SiLU MLP; logits cast to fp32 as HF generate does. q/k/v and gate/up are merged
at load (qkv_proj, gate_up_proj: the checkpoint's weights stacked by rows, after the tensor-parallel
split; merge_projections).

`Llama.forward` is the one layer loop, for prefill, decode and mixed steps, eager or captured in a CUDA
graph (decode_graphs.py). The batch is ragged and flattened: T tokens of all sequences of one step,
(T, hidden) embeddings and (T,) positions. Every layer first writes its K/V into the cache (slots < 0
skipped): on the fused path in the rotary's kernel (fused_ops.rotary_write_kv_), on the plain path with
kernels.write_kv. The metadata then selects the attention: an AttentionMetadata
(attention.py) runs the attention function given at construction (the reference SDPA one by default); a
DecodeMetadata (one token per sequence, padding rows with slot -1) runs kernels.paged_decode_attention.
Logits are computed only at `logits_indices`.

Two paths, chosen by `Llama.fused` (load_llama's fused_kernels; default on for CUDA, off on the CPU,
INTERNVL_SERVE_FUSED_KERNELS=0 turns the default off): fused, one GEMM per merged projection and the
kernels of kernels/fused_ops.py (add+RMSNorm, rotary in place with the K/V write, SiLU-and-mul);
plain, the torch ops with each merged projection computed part by part (split_linear), bit-identical to
separate linears.

Does not own: attention metadata (attention.py), the kernels (kernels/), the KV tensors, block tables,
sampling (runner.py, sampler.py), the CUDA graphs (decode_graphs.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, MutableMapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel

from internvl_serve.engine.attention import SDPA_BACKENDS, AttentionFn, AttentionMetadata, sdpa_paged_attention
from internvl_serve import kernels
from internvl_serve.env_switch import env_switch
from internvl_serve.engine.parallel import TensorParallel, local_args, shard_state_dict
from internvl_serve.kernels.fused_ops import (add_rmsnorm, add_rmsnorm_fp8, add_rmsnorm_torch, apply_rope,
                                              rms_norm_torch, rotary_write_kv_, silu_and_mul, silu_and_mul_fp8,
                                              triton)
from internvl_serve.kernels.fp8_linear import WEIGHT_ONLY_MAX_M, Fp8Linear, Fp8Rows, fp8_linear
from internvl_serve.kernels.int8_linear import Int8Linear, int8_linear


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

FUSED_ENV = "INTERNVL_SERVE_FUSED_KERNELS"


def fused_kernels_default(device) -> bool:
    """The fused Triton path: on for CUDA devices unless INTERNVL_SERVE_FUSED_KERNELS=0 (the switch to
    turn it off if it misbehaves on a card), never on the CPU (no Triton there; the torch path keeps the
    CPU tokens bit-identical to the reference)."""
    return torch.device(device).type == "cuda" and triton is not None and env_switch(FUSED_ENV) is not False


@dataclass
class DecodeMetadata:
    """A pure-decode step (one new token per sequence, padded rows allowed) for the Triton kernels:
    the K/V write (slots < 0 skipped) and `kernels.paged_decode_attention`. decode_graphs.py keeps
    these tensors as a captured bucket's static buffers; Llama.forward selects the kernels by this type."""
    slot_mapping: torch.Tensor   # (B,) int64; -1 for padding rows
    block_tables: torch.Tensor   # (B, max_blocks) int32
    context_lens: torch.Tensor   # (B,) int32 (including the new token; 0 for padding rows)


@dataclass
class _Step:
    """What every layer of one forward shares: the positions and rope tables, and the path."""
    fused: bool
    positions: torch.Tensor                 # (T,)
    cos_table: torch.Tensor                 # (max_position_embeddings, D)
    sin_table: torch.Tensor
    cos: torch.Tensor | None = None         # (T, 1, D) gathered, torch path only
    sin: torch.Tensor | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_torch(x, self.weight, self.eps)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None,
                 fused: bool, fp8: bool = False) -> tuple[torch.Tensor | Fp8Rows, torch.Tensor]:
        """(norm(residual + x), residual + x); residual None: (norm(x), x). One kernel when fused; with
        fp8 too (the fused path only), the norm comes out quantized for the Fp8Linears it feeds."""
        if fused and fp8:
            q, scale, residual = add_rmsnorm_fp8(x, residual, self.weight, self.eps, use_triton=True)
            return Fp8Rows(q, scale, x.dtype), residual
        if fused:
            return add_rmsnorm(x, residual, self.weight, self.eps, use_triton=True)
        return add_rmsnorm_torch(x, residual, self.weight, self.eps)


def split_linear(linear: nn.Module, x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """A merged projection computed part by part (one matmul per row slice of its weight): the torch
    path's numerics equal those of separate q/k/v (gate/up) linears, bit for bit."""
    if isinstance(linear, Int8Linear):
        return [int8_linear(x, w, s) for w, s in zip(linear.weight.split(sizes), linear.scale.split(sizes))]
    if isinstance(linear, Fp8Linear):
        return [fp8_linear(x, w, s, fast_accum=linear.fast_accum, triton_max_rows=linear.triton_max_rows)
                for w, s in zip(linear.weight_fp8.split(sizes), linear.weight_scale.split(sizes))]
    return [F.linear(x, w) for w in linear.weight.split(sizes)]


class Attention(nn.Module):
    """args: this rank's sizes (local_args under tensor parallelism: its heads only); tp: the group whose
    partial o_proj outputs are summed. qkv_proj: q, k and v stacked by output rows (built at load)."""

    def __init__(self, args: LlamaArgs, attention: AttentionFn, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        hidden = args.hidden_size
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.q_size, self.kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=False)
        self.scale = self.head_dim ** -0.5
        self.attention = attention

    def forward(self, x, step: _Step, k_cache, v_cache, meta):
        """x: the normed rows (T, hidden), or on the fused path Fp8Rows of them."""
        T, D = step.positions.shape[0], self.head_dim
        if step.fused:  # one GEMM; one kernel: RoPE in place on its q and k heads, K/V into the cache
            qkv = self.qkv_proj(x).view(T, self.n_heads + 2 * self.n_kv, D)
            rotary_write_kv_(qkv, step.positions, step.cos_table, step.sin_table, self.n_heads, self.n_kv,
                             k_cache, v_cache, meta.slot_mapping, use_triton=True)
            q = qkv[:, :self.n_heads]
        else:
            q, k, v = split_linear(self.qkv_proj, x, [self.q_size, self.kv_size, self.kv_size])
            q = apply_rope(q.view(T, self.n_heads, D), step.cos, step.sin)
            k = apply_rope(k.view(T, self.n_kv, D), step.cos, step.sin)
            kernels.write_kv(k, v.view(T, self.n_kv, D), k_cache, v_cache, meta.slot_mapping)
        # K/V are in the cache before the attention, which reads them back from there
        if isinstance(meta, DecodeMetadata):
            o = kernels.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, self.scale)
        else:
            o = self.attention(q, k_cache, v_cache, meta, self.scale)  # (T, H, D)
        return self.project_out(o.reshape(T, self.q_size))

    def project_out(self, o: torch.Tensor) -> torch.Tensor:
        """o_proj, summed over the tensor-parallel ranks (each holds its heads' columns)."""
        return self.tp.all_reduce(self.o_proj(o))


class MLP(nn.Module):
    """gate_up_proj: gate and up stacked by output rows (built at load)."""

    def __init__(self, args: LlamaArgs, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.intermediate_size = args.intermediate_size
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x, fused: bool = False, fp8: bool = False):
        """x: the normed rows, or on the fused path Fp8Rows of them. fp8 (the fused path only): down_proj
        gets its input quantized by the SiLU-and-mul kernel."""
        if fused:
            gate_up = self.gate_up_proj(x)
            a = (Fp8Rows(*silu_and_mul_fp8(gate_up, use_triton=True), gate_up.dtype) if fp8
                 else silu_and_mul(gate_up, use_triton=True))
        else:
            gate, up = split_linear(self.gate_up_proj, x, [self.intermediate_size] * 2)
            a = F.silu(gate) * up
        return self.tp.all_reduce(self.down_proj(a))


class DecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, attention: AttentionFn, tp: TensorParallel):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, attention, tp)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args, tp)

    def forward(self, h, residual, step: _Step, k_cache, v_cache, meta):
        """h: the previous layer's output (its MLP's), residual: the running sum before it (None at the
        first layer, where h is the embeddings). Returns this layer's (MLP output, residual): the hidden
        state is their sum, added by the next norm (fused with it). On the fused path, where Fp8Linears
        quantize their rows (more than WEIGHT_ONLY_MAX_M), the kernels before qkv_proj, gate_up_proj and
        down_proj (the norms, SiLU-and-mul) quantize them instead."""
        fp8 = step.fused and h.shape[0] > WEIGHT_ONLY_MAX_M and self.takes_fp8_rows
        x, residual = self.input_layernorm.add_norm(h, residual, step.fused, fp8)
        h = self.self_attn(x, step, k_cache, v_cache, meta)
        x, residual = self.post_attention_layernorm.add_norm(h, residual, step.fused, fp8)
        return self.mlp(x, step.fused, fp8), residual

    @property
    def takes_fp8_rows(self) -> bool:
        """The linears after the norms and SiLU-and-mul are Fp8Linears (quantization fp8)."""
        return all(isinstance(m, Fp8Linear) for m in (self.self_attn.qkv_proj, self.mlp.gate_up_proj,
                                                       self.mlp.down_proj))


class LlamaModel(nn.Module):
    def __init__(self, args: LlamaArgs, attention: AttentionFn, tp: TensorParallel):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, attention, tp) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Llama(nn.Module):
    """Module names equal HF's LlamaForCausalLM (model.embed_tokens, model.layers.i..., model.norm,
    lm_head), except the merged self_attn.qkv_proj and mlp.gate_up_proj (load_llama builds them).

    args: the model's sizes; under tensor parallelism (tp.world_size > 1) the layers hold this rank's
    slice (local_args: its heads and its part of the MLP), embeddings, norms and lm_head are whole.
    fused: run the Triton kernels (add+RMSNorm, rotary, SiLU-and-mul) and one GEMM per merged
    projection; off: the plain torch ops (the CPU path, bit-identical to separate projections).
    load_llama sets it (fused_kernels_default); it may be changed at any time before a forward."""

    def __init__(self, args: LlamaArgs, attention: AttentionFn = sdpa_paged_attention,
                 tp: TensorParallel | None = None, fused: bool = False):
        super().__init__()
        self.args = args
        self.tp = tp or TensorParallel()
        self.local_args = local_args(args, self.tp.world_size)
        self.model = LlamaModel(self.local_args, attention, self.tp)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.fused = fused
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
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata | DecodeMetadata,
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """The one layer loop, for prefill, decode and mixed steps, eager or captured in a CUDA graph.

        input_embeds (T, hidden); positions (T,); kv_caches[i] = (k, v), each (num_blocks, block_size,
        Hkv, D); meta: AttentionMetadata (the attention function given at construction) or
        DecodeMetadata (the decode kernels); logits_indices (S,) rows to compute logits for (None: every
        row) -> logits (S, vocab) in fp32."""
        step = _Step(self.fused, positions, self.rope_cos, self.rope_sin)
        if not self.fused:
            step.cos = self.rope_cos[positions].unsqueeze(1)  # (T, 1, D)
            step.sin = self.rope_sin[positions].unsqueeze(1)
        h, residual = input_embeds, None
        with sdpa_kernel(SDPA_BACKENDS):
            for layer, (k_cache, v_cache) in zip(self.model.layers, kv_caches):
                h, residual = layer(h, residual, step, k_cache, v_cache, meta)
        if logits_indices is not None:  # per-row norm: select first
            h = h.index_select(0, logits_indices)
            residual = None if residual is None else residual.index_select(0, logits_indices)
        h, _ = self.model.norm.add_norm(h, residual, self.fused)
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


# the merged projections: (our key, the checkpoint's keys whose weights it stacks by output rows)
MERGED = (("self_attn.qkv_proj.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                         "self_attn.v_proj.weight")),
          ("mlp.gate_up_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")))


def merge_projections(weights: dict[str, torch.Tensor], num_layers: int, *, device, dtype,
                      source: Mapping | None = None) -> dict[str, torch.Tensor]:
    """In place on `weights` (sanitized, sharded): q/k/v -> qkv_proj and gate/up -> gate_up_proj of every
    layer, each one new (rows, in) tensor on `device` in `dtype` (the parts copied in, no intermediate).
    Per layer, the parts leave `weights`; where they are CUDA tensors they also leave `source` (the
    caller's dict, under their key or its `language_model.` form), so a state dict already on the GPU is
    never held twice: the unmerged copies are freed layer by layer (the policy quantize_model_ follows)."""
    for i in range(num_layers):
        p = f"model.layers.{i}."
        for merged, parts in MERGED:
            tensors = [weights.pop(p + k) for k in parts]
            out = torch.empty(sum(t.shape[0] for t in tensors), tensors[0].shape[1], device=device, dtype=dtype)
            row = 0
            for t in tensors:
                out[row:row + t.shape[0]].copy_(t)
                row += t.shape[0]
            weights[p + merged] = out
            if isinstance(source, MutableMapping) and any(t.is_cuda for t in tensors):
                for k in parts:
                    source.pop(p + k, None)
                    source.pop("language_model." + p + k, None)
            del tensors
    return weights


def load_llama(config, state_dict: Mapping[str, torch.Tensor], *, device, dtype,
               attention: AttentionFn = sdpa_paged_attention, tp: TensorParallel | None = None,
               fused_kernels: bool | None = None) -> Llama:
    """Build Llama on the meta device and take the state dict's tensors (moved/cast only where needed:
    a state dict already on `device` in `dtype` is used without a copy). Under tensor parallelism the
    full state dict is given and this rank's slices are taken (parallel.shard_state_dict); then q/k/v
    and gate/up are merged (merge_projections: CUDA tensors leave the caller's dict as they are merged).
    fused_kernels: None -> fused_kernels_default(device)."""
    args = LlamaArgs.from_config(config)
    tp = tp or TensorParallel()
    weights = shard_state_dict(sanitize_state_dict(state_dict, args), tp.rank, tp.world_size)
    with torch.device("meta"):
        model = Llama(args, attention, tp)
    a = model.local_args
    part_shapes = {"self_attn.q_proj.weight": (a.num_attention_heads * a.head_dim, a.hidden_size),
                   "self_attn.k_proj.weight": (a.num_key_value_heads * a.head_dim, a.hidden_size),
                   "self_attn.v_proj.weight": (a.num_key_value_heads * a.head_dim, a.hidden_size),
                   "mlp.gate_proj.weight": (a.intermediate_size, a.hidden_size),
                   "mlp.up_proj.weight": (a.intermediate_size, a.hidden_size)}
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, value in weights.items():  # the checkpoint's layout, before merging: errors name its keys
        want = shapes.get(key) or next(s for suffix, s in part_shapes.items() if key.endswith("." + suffix))
        if tuple(value.shape) != want:
            raise ValueError(f"{key}: shape {tuple(value.shape)}, expected {want} from the config")
    merge_projections(weights, args.num_hidden_layers, device=device, dtype=dtype, source=state_dict)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in weights.items()},
                          strict=True, assign=True)
    model.requires_grad_(False)
    model.init_rope(torch.device(device), dtype)
    model.fused = fused_kernels_default(device) if fused_kernels is None else bool(fused_kernels)
    return model.eval()
