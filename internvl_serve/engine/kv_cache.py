"""The paged KV cache's tensors and their size: how they are laid out and how many blocks fit.

Layout: one tensor (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim) in the cache dtype
(the model dtype, or e4m3 with the llm's `kv_cache_dtype: fp8`: KV_CACHE_DTYPES);
layer i uses the views [i, 0] (K) and [i, 1] (V), each (num_blocks, block_size, Hkv, D), the layout of
vLLM/FlashAttention paged caches. Size: on CUDA, `auto_num_blocks` sizes it from the free GPU memory
after the weights are loaded and a profile forward of max_num_batched_tokens tokens has measured
activations; on the CPU, `cpu_num_blocks`.

Owns: the layout (`allocate`, `bytes_per_block`), the cache dtype's option (`cache_dtype_of`), the sizing
and its profile forward, the memory bound of the reference attention's gather (MAX_GATHER_TOKENS, which
every eager step passes on). Does not own: which blocks a sequence holds (block_manager.py), the block
tables and the steps that read and write the cache (runner.py, llama.py, decode_graphs.py), the slot
arithmetic (attention.py).
"""
from __future__ import annotations

import math

import torch

from internvl_serve.engine.attention import build_attention_metadata
from internvl_serve.engine.llama import Llama, LlamaArgs

CPU_DEFAULT_NUM_BLOCKS = 512
MAX_GATHER_TOKENS = 32768  # the reference attention's K/V gather per SDPA call (tokens, all layers share it)
CUDA_CONTEXT_BYTES = 600 * 2**20  # a CUDA context and cuBLAS workspaces, outside torch's allocator

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (K, V), each (num_blocks, block_size, Hkv, D)
# the llm's `kv_cache_dtype` values: "" keeps the model dtype; "fp8" stores e4m3 values with no scale,
# saturating at +-448 (kernels/paged_attention.py to_cache_dtype): half the bytes per token
KV_CACHE_DTYPES = {"": None, "fp8": torch.float8_e4m3fn}


def validate_kv_cache_dtype(value: str | None) -> str:
    """The option's value, normalized ("" for None, "auto" or the model dtype); ValueError naming the
    allowed values otherwise."""
    v = (value or "").strip().lower()
    v = "" if v in ("auto", "model") else v
    if v not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {value!r}: expected one of 'auto' (the model dtype), "
                         + ", ".join(repr(k) for k in KV_CACHE_DTYPES if k))
    return v


def cache_dtype_of(value: str | None, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype the cache is stored in for a `kv_cache_dtype` value."""
    return KV_CACHE_DTYPES[validate_kv_cache_dtype(value)] or model_dtype


def bytes_per_block(args: LlamaArgs, block_size: int, dtype: torch.dtype) -> int:
    """K and V of every layer for one block. args: this rank's sizes (its KV heads)."""
    return (args.num_hidden_layers * 2 * block_size * args.num_key_value_heads * args.head_dim
            * torch.empty((), dtype=dtype).element_size())


def allocate(args: LlamaArgs, num_blocks: int, block_size: int, *, dtype: torch.dtype,
             device) -> tuple[torch.Tensor, KVCaches]:
    """The zeroed cache tensor and its per-layer (K, V) views."""
    cache = torch.zeros(args.num_hidden_layers, 2, num_blocks, block_size, args.num_key_value_heads,
                        args.head_dim, dtype=dtype, device=device)
    return cache, [(cache[i, 0], cache[i, 1]) for i in range(args.num_hidden_layers)]


def cpu_num_blocks(args: LlamaArgs, block_size: int) -> int:
    """The CPU default: CPU_DEFAULT_NUM_BLOCKS, or enough for one sequence of the whole context."""
    return max(CPU_DEFAULT_NUM_BLOCKS, math.ceil(args.max_position_embeddings / block_size) + 1)


def auto_num_blocks(model: Llama, *, block_size: int, dtype: torch.dtype, device: torch.device,
                    utilization: float, max_num_batched_tokens: int, max_num_seqs: int,
                    reserved_bytes: int = 0, report: dict | None = None,
                    cache_dtype: torch.dtype | None = None) -> int:
    """Blocks that fit in total * utilization, after the weights, the CUDA context and the peak
    activations of a profile forward of max_num_batched_tokens tokens (plus the sampler's and the
    reference attention's largest gathers, which the profile does not reach). reserved_bytes: device
    memory that other processes will hold, whether or not they have loaded yet. report: filled with the
    figures it used, in bytes (for the load's log line: whether the others had loaded shows here).
    dtype: the model's (activations, the reference attention's gather); cache_dtype: the cache's
    (default: dtype)."""
    a = model.local_args
    cache_dtype = cache_dtype or dtype
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    _profile_forward(model, min(max_num_batched_tokens, a.max_position_embeddings - 1), max_num_seqs,
                     block_size=block_size, cache_dtype=cache_dtype, device=device)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    elem = torch.empty((), dtype=dtype).element_size()
    gather = MAX_GATHER_TOKENS * 2 * a.num_attention_heads * a.head_dim * elem * 2
    sampler = min(max_num_seqs, max_num_batched_tokens) * a.vocab_size * 4 * 6
    # Memory in use: what the device reports, or at least our own (+ CUDA context) plus what the
    # other models will take once loaded, whichever is larger (they may load after us).
    own = torch.cuda.memory_reserved(device) + CUDA_CONTEXT_BYTES
    in_use = max(total - free, own + reserved_bytes)
    available = total * utilization - in_use - peak - gather - sampler
    if report is not None:
        report.update(total=total, device_in_use=total - free, own=own, reserved=reserved_bytes, activations=peak)
    num_blocks = int(available // bytes_per_block(a, block_size, cache_dtype))
    if num_blocks < 1:
        raise RuntimeError(f"no GPU memory left for the KV cache: total {total / 2**30:.1f} GiB, in use "
                           f"{(total - free) / 2**30:.1f} GiB, activations {peak / 2**30:.2f} GiB, "
                           f"gpu_memory_utilization {utilization}")
    return num_blocks


@torch.inference_mode()
def _profile_forward(model: Llama, num_tokens: int, max_num_seqs: int, *, block_size: int,
                     cache_dtype: torch.dtype, device: torch.device) -> None:
    """One prefill of num_tokens tokens into a cache of its own, logits for max_num_seqs rows."""
    a, bs = model.local_args, block_size
    nb = math.ceil(num_tokens / bs)
    cache, caches = allocate(a, nb, bs, dtype=cache_dtype, device=device)
    tables = torch.arange(nb, dtype=torch.int32, device=device)[None]
    meta, positions = build_attention_metadata([num_tokens], [0], tables, bs, max_gather_tokens=MAX_GATHER_TOKENS)
    embeds = model.embed(torch.zeros(num_tokens, dtype=torch.long, device=device))
    n_logits = min(num_tokens, max_num_seqs)
    idx = torch.arange(num_tokens - n_logits, num_tokens, device=device)
    model(embeds, positions, caches, meta, idx)
    del cache, caches
