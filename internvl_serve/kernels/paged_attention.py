"""Decode attention over a paged KV cache (flash-decoding), and the KV-cache write.

Owns: the Triton kernels for one-query-token-per-sequence attention over a block-paged KV cache,
the kernel that writes new tokens' K/V into their slots, and plain-torch versions of both (used as
test references and as the CPU fallback). Does not own: the cache allocation, the block tables or the
slot mapping (the engine's block manager builds those), nor prefill attention.

Cache layout: one K and one V tensor per layer, each with the logical dims
(num_blocks, block_size, num_kv_heads, head_dim) and ANY strides (the strides are passed to the
kernels), so a cache stored as (num_blocks, num_kv_heads, block_size, head_dim) is handed over as a
permuted view. head_dim stride 1 gives 16-byte loads on the GPU.

Cache dtype: the model's (bf16) or float8 e4m3 (the llm's opt-in `kv_cache_dtype: fp8`: half the bytes
each decode step reads). An e4m3 cache holds the values themselves, with no scale (as vLLM's fp8 cache
without calibrated scales): `to_cache_dtype` saturates at +-448 and rounds to nearest even; the kernels
read any cache dtype into float32 (or q's dtype for the prefill kernel's dots).

Two ways, chosen from the grid's static size (decode_single):
- Flash-decoding (few sequences): the context of each (sequence, query head) is cut into partitions of
  `partition_size` tokens; one program per (sequence, query head, partition of the table's width)
  runs an online softmax over its tokens and writes a partial output with its running max and sum; a
  second kernel merges the partitions inside the context. Programs past the context write nothing.
- Single (once the (sequence, head) pairs alone fill the GPU): one program per (sequence, query head)
  runs the online softmax over its whole context and writes the output; no partials, no second kernel,
  and no programs for the empty part of a table much wider than the contexts (the engine's CUDA graphs
  take one as wide as the model's maximum length).
The products: elementwise in float32 (q times each K row, p times each V row, summed), or with dot on
the tensor cores, the query as row 0 of a 16-row tile. Compiled for an H100, only the second gets
Triton's pipelined loads (the next tokens' K/V copied into shared memory while these are used). The
grid's order: one head of consecutive sequences (sequence fastest), or with heads_first consecutive heads
of one sequence, so the programs resident at once read neighbouring bytes of the same cache blocks (the
cache keeps a token's heads side by side) instead of one row in each of many blocks. By default both
with one program per pair over a bf16 cache (-21 % per layer at 32 x 512 on an H100), neither elsewhere
(decode_dot, decode_heads_first; INTERNVL_SERVE_DECODE_DOT / _HEADS_FIRST = 1 / 0 force either).
The grid depends only on B, Hq and block_tables.shape[1], never on data (context_lens is read inside
the kernels), so a launch can be captured in a CUDA graph and replayed with other context lengths and
block tables.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from internvl_serve.env_switch import env_switch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install has no triton: the torch paths below still work
    triton = None
    tl = None

_LOG2E = 1.4426950408889634
FP8_CACHE_DTYPES = (torch.float8_e4m3fn,)
FP8_E4M3_MAX = 448.0  # the largest finite e4m3fn value: larger K/V saturate there


def to_cache_dtype(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """K/V values as the cache stores them: e4m3 saturating at +-448 (round to nearest even, as the
    Triton write does on the GPU), any other dtype by a plain cast."""
    if cache_dtype in FP8_CACHE_DTYPES:
        return x.float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(cache_dtype)
    return x.to(cache_dtype)


def cache_rows(cache: torch.Tensor, index) -> torch.Tensor:
    """cache[index], in the cache's dtype (CUDA's advanced indexing has no float8 kernels: an e4m3 cache
    is indexed through its bytes)."""
    if cache.dtype in FP8_CACHE_DTYPES:
        return cache.view(torch.uint8)[index].view(cache.dtype)
    return cache[index]


def put_cache_rows(cache: torch.Tensor, index, values: torch.Tensor) -> None:
    """cache[index] = values as the cache stores them (to_cache_dtype), for any cache dtype."""
    values = to_cache_dtype(values, cache.dtype)
    if cache.dtype in FP8_CACHE_DTYPES:
        cache, values = cache.view(torch.uint8), values.view(torch.uint8)
    cache[index] = values


# --------------------------------------------------------------------------------------------------
# torch versions: references and CPU fallback
# --------------------------------------------------------------------------------------------------


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Reference: per sequence, gather its tokens and run softmax attention in float64.

    q (B, Hq, D); caches (num_blocks, block_size, Hkv, D); returns (B, Hq, D) in out_dtype (q's
    dtype by default). A sequence with context length 0 gets zeros. Loops over the batch: for tests.
    """
    B, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    out = torch.zeros(B, Hq, D, dtype=torch.float64, device=q.device)
    for b in range(B):
        n = int(context_lens[b])
        if n == 0:
            continue
        blocks = block_tables[b, : (n + block_size - 1) // block_size].long()
        k = cache_rows(k_cache, blocks).reshape(-1, Hkv, D)[:n].double()  # (n, Hkv, D)
        v = cache_rows(v_cache, blocks).reshape(-1, Hkv, D)[:n].double()
        k = k.repeat_interleave(group, dim=1)  # (n, Hq, D)
        v = v.repeat_interleave(group, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].double(), k) * scale  # (Hq, n)
        out[b] = torch.einsum("hn,nhd->hd", s.softmax(dim=-1), v)
    return out.to(out_dtype or q.dtype)


def paged_decode_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Batched torch version: gather all of block_tables' blocks, mask past context_lens, SDPA.

    Shape-static (no host sync), so it is the CPU fallback and the baseline the benchmark beats.
    Reads max_blocks * block_size tokens per sequence whatever the context length.
    """
    B, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    T = block_tables.shape[1] * block_size
    bt = block_tables.long().clamp(0, k_cache.shape[0] - 1)  # unused table slots may hold junk
    k = cache_rows(k_cache, bt).reshape(B, T, Hkv, D).transpose(1, 2).to(q.dtype)  # (B, Hkv, T, D)
    v = cache_rows(v_cache, bt).reshape(B, T, Hkv, D).transpose(1, 2).to(q.dtype)
    valid = torch.arange(T, device=q.device)[None, :] < context_lens.to(q.device)[:, None]  # (B, T)
    # Slots past a context may hold anything (torch.empty, NaN bit patterns): 0 * NaN would leak.
    k = torch.where(valid[:, None, :, None], k, 0)
    v = torch.where(valid[:, None, :, None], v, 0)
    out = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None, :], k, v, attn_mask=valid[:, None, None, :], scale=scale,
        enable_gqa=Hq != Hkv,
    )  # (B, Hq, 1, D); a row with no valid token comes out NaN
    out = out[:, :, 0, :]
    return torch.where((context_lens.to(q.device) > 0)[:, None, None], out, torch.zeros_like(out))


def write_kv_ref(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Reference: k_cache[slot // block_size, slot % block_size] = k_new; slots < 0 are skipped."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    put_cache_rows(k_cache, (slots // block_size, slots % block_size), k_new[keep])
    put_cache_rows(v_cache, (slots // block_size, slots % block_size), v_new[keep])


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _attend(q, k_ptr, v_ptr, bt_ptr, b, kvh, start, end,
                stride_kn, stride_kt, stride_kh, stride_kd,
                stride_vn, stride_vt, stride_vh, stride_vd,
                stride_btb, stride_btn, block_size,
                offs_d, mask_d, qk_scale,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr):
        """Online softmax of q over the tokens [start, end) of sequence b's context: (running max, sum,
        unnormalised output). An empty range leaves m=-inf, l=0, acc=0. q: (BLOCK_D,) float32, already
        scaled (log2 units); with DOT, (16, BLOCK_D) in q's dtype, the query in row 0 and zeros below,
        unscaled: both products then run on the tensor cores (tl.dot; the other 15 rows are wasted work,
        the loads go through Triton's pipelined shared-memory path), the weights p rounded to q's dtype
        for the second, as flash attention does."""
        m_i = tl.full((), -float("inf"), tl.float32)
        l_i = tl.full((), 0.0, tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for t0 in range(start, end, BLOCK_N):
            offs_t = t0 + tl.arange(0, BLOCK_N)
            mask_t = offs_t < end
            blk = tl.load(bt_ptr + b * stride_btb + (offs_t // block_size) * stride_btn, mask=mask_t, other=0)
            blk = blk.to(tl.int64)  # block * stride can pass 2**31 elements in a large cache
            slot = offs_t % block_size
            mask_td = mask_t[:, None] & mask_d[None, :]
            k = tl.load(
                k_ptr + blk[:, None] * stride_kn + slot[:, None] * stride_kt + kvh * stride_kh
                + offs_d[None, :] * stride_kd,
                mask=mask_td, other=0.0,
            )  # (BLOCK_N, BLOCK_D)
            v = tl.load(
                v_ptr + blk[:, None] * stride_vn + slot[:, None] * stride_vt + kvh * stride_vh
                + offs_d[None, :] * stride_vd,
                mask=mask_td, other=0.0,
            )
            if DOT:
                s = tl.sum(tl.dot(q, tl.trans(k.to(q.dtype))), axis=0) * qk_scale  # rows past 0 give 0
            else:
                s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)  # (BLOCK_N,) in log2 units
            s = tl.where(mask_t, s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))  # finite: the first step has a valid token
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new)
            if DOT:
                rows = tl.arange(0, 16)
                p_rows = tl.where(rows[:, None] == 0, p[None, :], 0.0).to(q.dtype)  # (16, BLOCK_N)
                acc = acc * alpha + tl.sum(tl.dot(p_rows, v.to(q.dtype)), axis=0)
            else:
                acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        return m_i, l_i, acc

    @triton.jit
    def _decode_partition_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr,
        out_ptr, part_o_ptr, part_m_ptr, part_l_ptr,
        qk_scale,  # softmax scale * log2(e): the kernel works in base 2
        stride_qb, stride_qh, stride_qd,
        stride_kn, stride_kt, stride_kh, stride_kd,
        stride_vn, stride_vt, stride_vh, stride_vd,
        stride_btb, stride_btn,
        stride_ob, stride_oh, stride_od,
        block_size,
        max_tokens,  # block_tables.shape[1] * block_size: longer contexts are cut there
        NUM_PARTS,  # partitions per (sequence, head): a run-time value, so table widths share a compile
        GROUP: tl.constexpr,  # query heads per KV head
        PART_TOKENS: tl.constexpr,  # tokens per partition, a multiple of BLOCK_N
        BLOCK_N: tl.constexpr,  # tokens per loop step
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of 2
        SINGLE: tl.constexpr,  # one program per (sequence, head): the whole context, then the output
        HEADS_FIRST: tl.constexpr,  # the grid is (Hq, B, parts), not (B, Hq, parts)
        DOT: tl.constexpr,  # the products on the tensor cores (_attend)
    ):
        if HEADS_FIRST:
            h = tl.program_id(0)
            b = tl.program_id(1)
            num_heads = tl.num_programs(0)
        else:
            b = tl.program_id(0)
            h = tl.program_id(1)
            num_heads = tl.num_programs(1)
        part = tl.program_id(2)
        kvh = h // GROUP
        ctx = tl.minimum(tl.load(lens_ptr + b), max_tokens)  # never read past the table's row

        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d * stride_qd, mask=mask_d, other=0.0)
        if DOT:  # (16, BLOCK_D): the query in row 0
            q = tl.where(tl.arange(0, 16)[:, None] == 0, q[None, :], 0.0).to(q_ptr.dtype.element_ty)
        else:
            q = q.to(tl.float32) * qk_scale  # (BLOCK_D,)

        if SINGLE:  # the whole context
            start = 0
            end = ctx
        else:  # this program's partition
            start = part * PART_TOKENS
            end = tl.minimum(start + PART_TOKENS, ctx)
        m_i, l_i, acc = _attend(q, k_ptr, v_ptr, bt_ptr, b, kvh, start, end,
                                stride_kn, stride_kt, stride_kh, stride_kd,
                                stride_vn, stride_vt, stride_vh, stride_vd,
                                stride_btb, stride_btn, block_size, offs_d, mask_d, qk_scale,
                                BLOCK_N, BLOCK_D, DOT)
        if SINGLE:
            o = acc / tl.where(l_i > 0, l_i, 1.0)  # context length 0: acc = 0 gives zeros, not NaN
            tl.store(
                out_ptr + b * stride_ob + h * stride_oh + offs_d * stride_od,
                o.to(out_ptr.dtype.element_ty), mask=mask_d,
            )
        else:
            if start < ctx:  # a partition past the context: the reduce kernel reads nothing of it
                row = (b * num_heads + h) * NUM_PARTS + part
                tl.store(part_o_ptr + row * BLOCK_D + offs_d, acc / l_i)  # l_i > 0: the partition has tokens
                tl.store(part_m_ptr + row, m_i)
                tl.store(part_l_ptr + row, l_i)

    @triton.jit
    def _decode_reduce_kernel(
        out_ptr, part_o_ptr, part_m_ptr, part_l_ptr, lens_ptr,
        stride_ob, stride_oh, stride_od,
        max_tokens,
        NUM_PARTS: tl.constexpr,
        BLOCK_P: tl.constexpr,  # NUM_PARTS rounded up to a power of 2
        PART_TOKENS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        ctx = tl.minimum(tl.load(lens_ptr + b), max_tokens)
        n_parts = tl.cdiv(ctx, PART_TOKENS)  # partitions past the context were not written
        offs_p = tl.arange(0, BLOCK_P)
        mask_p = offs_p < n_parts
        row0 = (b * tl.num_programs(1) + h) * NUM_PARTS
        m = tl.load(part_m_ptr + row0 + offs_p, mask=mask_p, other=-float("inf"))
        l = tl.load(part_l_ptr + row0 + offs_p, mask=mask_p, other=0.0)
        m_max = tl.max(m, axis=0)
        m_max = tl.where(m_max > -float("inf"), m_max, 0.0)  # all partitions empty: no -inf - -inf
        w = tl.where(l > 0, tl.exp2(m - m_max) * l, 0.0)  # (BLOCK_P,)
        w_sum = tl.sum(w, axis=0)
        offs_d = tl.arange(0, BLOCK_D)
        o = tl.load(
            part_o_ptr + (row0 + offs_p)[:, None] * BLOCK_D + offs_d[None, :],
            mask=mask_p[:, None], other=0.0,
        )  # (BLOCK_P, BLOCK_D)
        o = tl.sum(o * w[:, None], axis=0)
        o = o / tl.where(w_sum > 0, w_sum, 1.0)
        tl.store(
            out_ptr + b * stride_ob + h * stride_oh + offs_d * stride_od,
            o.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM,
        )

    @triton.jit
    def store_cache_row(cache_ptr, x, slot, h, stride_n, stride_t, stride_h, stride_d, block_size, offs_d, mask_d,
                        SATURATE: tl.constexpr, FP8_MAX: tl.constexpr):
        """x (the columns offs_d of one token's head h) into the cache row of `slot` (>= 0), as
        to_cache_dtype gives it: an e4m3 cache (SATURATE) clamps to +-FP8_MAX before the cast. For the
        K/V write here and fused_ops' rotary with the write."""
        if SATURATE:
            x = tl.clamp(x.to(tl.float32), -FP8_MAX, FP8_MAX)
        slot = slot.to(tl.int64)
        tl.store(
            cache_ptr + (slot // block_size) * stride_n + (slot % block_size) * stride_t + h * stride_h
            + offs_d * stride_d,
            x.to(cache_ptr.dtype.element_ty), mask=mask_d,
        )

    @triton.jit
    def _write_kv_kernel(
        k_new_ptr, v_new_ptr, k_ptr, v_ptr, slot_ptr,
        stride_knt, stride_knh, stride_knd,
        stride_vnt, stride_vnh, stride_vnd,
        stride_kn, stride_kt, stride_kh, stride_kd,
        stride_vn, stride_vt, stride_vh, stride_vd,
        block_size,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        SATURATE: tl.constexpr,  # an e4m3 cache: clamp to +-FP8_MAX before the (round-to-nearest) cast
        FP8_MAX: tl.constexpr,
    ):
        t = tl.program_id(0)
        h = tl.program_id(1)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:  # a padded row of a captured batch carries slot -1
            offs_d = tl.arange(0, BLOCK_D)
            mask_d = offs_d < HEAD_DIM
            k = tl.load(k_new_ptr + t * stride_knt + h * stride_knh + offs_d * stride_knd, mask=mask_d)
            v = tl.load(v_new_ptr + t * stride_vnt + h * stride_vnh + offs_d * stride_vnd, mask=mask_d)
            store_cache_row(k_ptr, k, slot, h, stride_kn, stride_kt, stride_kh, stride_kd, block_size,
                            offs_d, mask_d, SATURATE, FP8_MAX)
            store_cache_row(v_ptr, v, slot, h, stride_vn, stride_vt, stride_vh, stride_vd, block_size,
                            offs_d, mask_d, SATURATE, FP8_MAX)


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def num_sms_of(device: torch.device) -> int:
    """Multiprocessor count of a CUDA device (132 on an H100 SXM), 132 for anything else."""
    device = torch.device(device)
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


@dataclass(frozen=True)
class DecodeTiles:
    partition_size: int  # tokens per split-K partition
    block_n: int  # tokens per loop step
    num_warps: int
    num_stages: int | None = None  # Triton's software pipelining of the token loop; None: Triton's default


SINGLE_MIN_PAIRS_PER_SM = 4  # decode_single: (sequence, head) pairs per multiprocessor
PARTITIONS_ENV = "INTERNVL_SERVE_DECODE_PARTITIONS"  # "1": flash-decoding's partitions at every batch size
HEADS_FIRST_ENV = "INTERNVL_SERVE_DECODE_HEADS_FIRST"  # 1 / 0: the grid by one sequence's heads or not
DOT_ENV = "INTERNVL_SERVE_DECODE_DOT"  # 1 / 0: the products on the tensor cores (loads pipelined) or not


def decode_single(batch: int, num_heads: int, num_sms: int = 132) -> bool:
    """One program per (sequence, head) over its whole context, once the pairs give at least
    SINGLE_MIN_PAIRS_PER_SM per multiprocessor; flash-decoding's partitions below that, or at every size
    with INTERNVL_SERVE_DECODE_PARTITIONS=1 (the way before 2026-12-07, to compare or to fall back to).

    H100, 40 heads, an e4m3 cache, the engine's table of 256 blocks (bench/results/h100-2026-12-07b):
    one program per pair took 28.0 / 53.9 / 88.1 / 154.7 us at 8 / 16 / 32 / 64 sequences of 512
    tokens, the partitions before 31.1 / - / 110.1 / 210.7 (their programs past the context cost most of
    that: 28.2 / 81.8 / 151.5 with a table as wide as the context); at 2,048 tokens 99.7 / 198.9 / 318.7
    / 567.8 against 80.4 / - / 299.8 / 598.9. The engine's contexts at 32-64 streams are ~300-540
    tokens. Over a bfloat16 cache (bench/results/h100-2026-12-07d) 149.0 / 264.9 us against 151.7 /
    293.5 at 32 / 64 x 512 tokens, and through the server +0.6-2.0 % / +3.4 % output tok/s at 32 / 64
    streams in two pairs: one rule for both cache dtypes."""
    if env_switch(PARTITIONS_ENV):
        return False
    return batch * num_heads >= SINGLE_MIN_PAIRS_PER_SM * num_sms


def decode_dot(batch: int, num_heads: int, num_sms: int = 132, kv_bytes: int = 2) -> bool:
    """Whether the decode attention runs its two products on the tensor cores (_attend's DOT): by default
    where one program takes each (sequence, head) (decode_single) over a bfloat16 cache;
    INTERNVL_SERVE_DECODE_DOT=1 / 0 turns it on / off everywhere. Compiled for an H100 (sm_90), only that
    form gets Triton's pipelined loads (cp.async into shared memory from 2 stages on); the elementwise
    form loads into registers whatever num_stages says.

    H100, 40 heads, bf16 cache, the engine's table of 256 blocks (bench/results/h100-2026-12-07f,
    kernels_bench --grid-sweep): one program per pair, 64 tokens per step, 4 warps, 2 stages, heads
    first took 114.3 / 220.3 us at 32 / 64 sequences of 512 tokens and 434.3 / 854.1 at 2,048, against
    the elementwise kernel's 145.3 / 257.4 / 541.7 / 960.6 (-21 / -14 / -20 / -11 %); the 40-layer decode
    step at ctx 416, 14.90 -> 13.97 ms at 32 sequences and 18.87 -> 17.52 at 64 (heads first and dot,
    Triton's default tiles); the server +3.9 % output tok/s at 32 streams (one run, dot alone). With
    flash-decoding's partitions (fewer sequences) it lost: 80.0 against 44.4 us at 8 x 512. Numerics:
    the weights p are rounded to bfloat16 for the second product, as flash attention (and HF Llama's
    eager attention, which casts its softmax to the model dtype before the product with V) do; the step's
    logits moved 4.4-4.8 % relative L2 from the elementwise kernel's with random 13B weights, the size of
    the difference between the fused and the plain (torch) forward measured at those weights
    (bench/results/h100-2026-12-05: 4.7-5.0 %). Over an e4m3 cache not measured yet: off there."""
    forced = env_switch(DOT_ENV)
    if forced is not None:
        return forced
    return kv_bytes == 2 and decode_single(batch, num_heads, num_sms)


def decode_heads_first(dot: bool) -> bool:
    """Whether the decode attention's consecutive programs take consecutive heads of one sequence (grid
    (Hq, B, parts)) rather than one head of consecutive sequences: by default with the tensor-core form
    (`dot`), where it measured 0.5-1.5 % faster (114.3 against 115.6 us at 32 x 512; the step 13.97
    against 14.04 ms at 32 sequences), and not with the elementwise one, where it gained nothing;
    INTERNVL_SERVE_DECODE_HEADS_FIRST=1 / 0 turns it on / off everywhere."""
    forced = env_switch(HEADS_FIRST_ENV)
    return dot if forced is None else forced


def default_decode_tiles(batch: int, num_heads: int, num_sms: int = 132, kv_bytes: int = 2,
                         dot: bool = False) -> DecodeTiles:
    """Split-K tiles from the grid's static size, the cache's element size and the products' form only
    (never from context lengths).

    Measured on an H100 (bench/kernels_bench.py --sweep, Hq=40, D=128, ctx 512..2048, table of 256
    blocks): bf16 (kv_bytes 2): with few (sequence, head) pairs, 128-token partitions in one loop step of
    8 warps; once the pairs alone fill the SMs ~8 deep, 256-token partitions of 4 warps (2.7 TB/s at
    B=64, ctx 2048). Each was within ~10% of the best of 14 tilings on every measured shape. e4m3
    (kv_bytes 1): 128-token partitions of 4 warps everywhere, within 2% of the best tiling on every
    measured shape (B 1..64): 17-27% less time than the bf16 choice at B=8, 5-7% at B=32 and 64
    (ctx 2048). The tensor-core form (`dot`) with one program per pair: 64-token steps of 4 warps in 2
    stages, the best or within 1 % of it of 48 launches at 32 and 64 x 512 and 2,048 tokens
    (decode_dot; --grid-sweep, bench/results/h100-2026-12-07f).
    """
    if dot and decode_single(batch, num_heads, num_sms):
        return DecodeTiles(partition_size=256, block_n=64, num_warps=4, num_stages=2)
    if kv_bytes == 1:
        return DecodeTiles(partition_size=128, block_n=128, num_warps=4)
    if batch * num_heads >= 8 * num_sms:
        return DecodeTiles(partition_size=256, block_n=128, num_warps=4)
    return DecodeTiles(partition_size=128, block_n=128, num_warps=8)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    partition_size: int | None = None,
    use_triton: bool | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    single: bool | None = None,
    heads_first: bool | None = None,
    num_stages: int | None = None,
    dot: bool | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged context.

    q (B, Hq, D); k_cache, v_cache with logical dims (num_blocks, block_size, Hkv, D), any strides, in
    q's dtype or e4m3 (read into float32);
    block_tables (B, max_blocks) int32, entries past a sequence's last block never read;
    context_lens (B,) int32, the new token's K/V already in the cache (0 gives a zero output;
    the kernels cut a length past max_blocks * block_size there instead of reading out of bounds).
    Returns (B, Hq, D) in q's dtype (written into `out` when given). Hq must be a multiple of Hkv.
    use_triton: None runs the Triton kernels on CUDA tensors and the torch version elsewhere.
    partition_size (tokens per split-K partition, a power of 2 >= 16), block_n (tokens per loop step),
    num_warps, num_stages (Triton's software pipelining of the token loop), single (one program per
    (sequence, head), no partitions), dot (both products on the tensor cores; needs block_n >= 16) and
    heads_first (the grid's order): tuning knobs; None takes decode_dot(B, Hq, ..., the cache's element
    size), then default_decode_tiles(..., dot), decode_single and decode_heads_first(dot).
    """
    B, Hq, D = q.shape
    num_blocks, block_size, Hkv, Dk = k_cache.shape
    assert v_cache.shape == k_cache.shape and Dk == D, (q.shape, k_cache.shape, v_cache.shape)
    assert Hq % Hkv == 0, f"query heads {Hq} not a multiple of KV heads {Hkv}"
    assert block_tables.shape[0] == B and context_lens.shape == (B,)
    if use_triton is None:
        use_triton = q.is_cuda and triton is not None
    if not use_triton:
        res = paged_decode_attention_torch(q, k_cache, v_cache, block_tables, context_lens, scale)
        if out is None:
            return res
        out.copy_(res)
        return out
    if out is None:
        out = torch.empty_like(q)
    max_tokens = block_tables.shape[1] * block_size
    num_sms = num_sms_of(q.device)
    if dot is None:
        dot = decode_dot(B, Hq, num_sms, k_cache.element_size())
    tiles = default_decode_tiles(B, Hq, num_sms, k_cache.element_size(), dot)
    partition_size = partition_size or tiles.partition_size
    num_warps = num_warps or tiles.num_warps
    num_stages = num_stages or tiles.num_stages
    assert partition_size >= 16 and partition_size & (partition_size - 1) == 0, partition_size
    block_n = min(block_n or tiles.block_n, partition_size)
    if heads_first is None:
        heads_first = decode_heads_first(dot)
    assert not dot or (block_n >= 16 and D >= 16), "dot: tl.dot needs tiles of >= 16 tokens and dims"
    num_parts = triton.cdiv(max_tokens, partition_size)
    if single is None:
        single = decode_single(B, Hq, num_sms)
    single = single or num_parts == 1
    block_d = triton.next_power_of_2(D)
    if single:
        part_o = part_m = part_l = out  # unused
    else:
        part_o = torch.empty(B * Hq * num_parts, block_d, dtype=torch.float32, device=q.device)
        part_m = torch.empty(B * Hq * num_parts, dtype=torch.float32, device=q.device)
        part_l = torch.empty(B * Hq * num_parts, dtype=torch.float32, device=q.device)
    grid_parts = 1 if single else num_parts
    launch = {} if num_stages is None else {"num_stages": num_stages}
    _decode_partition_kernel[(Hq, B, grid_parts) if heads_first else (B, Hq, grid_parts)](
        q, k_cache, v_cache, block_tables, context_lens,
        out, part_o, part_m, part_l,
        scale * _LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
        block_size, max_tokens, num_parts,
        GROUP=Hq // Hkv, PART_TOKENS=partition_size, BLOCK_N=block_n,
        HEAD_DIM=D, BLOCK_D=block_d, SINGLE=single, HEADS_FIRST=heads_first, DOT=dot,
        num_warps=num_warps, **launch,
    )
    if not single:
        _decode_reduce_kernel[(B, Hq)](
            out, part_o, part_m, part_l, context_lens,
            *out.stride(), max_tokens,
            NUM_PARTS=num_parts, BLOCK_P=triton.next_power_of_2(num_parts), PART_TOKENS=partition_size,
            HEAD_DIM=D, BLOCK_D=block_d,
            num_warps=4,
        )
    return out


def write_kv(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    use_triton: bool | None = None,
) -> None:
    """Write new tokens' K/V into the cache in place: token t goes to block slot_mapping[t] //
    block_size, offset slot_mapping[t] % block_size. Slots < 0 are skipped (padding of a captured
    batch), with no host sync. k_new, v_new (T, Hkv, D); caches as in paged_decode_attention, in the
    model's dtype or e4m3 (values as to_cache_dtype gives them).
    """
    T, Hkv, D = k_new.shape
    assert v_new.shape == k_new.shape and k_cache.shape[2:] == (Hkv, D) and slot_mapping.shape == (T,)
    if use_triton is None:
        use_triton = k_new.is_cuda and triton is not None
    if not use_triton:
        write_kv_ref(k_new, v_new, k_cache, v_cache, slot_mapping)
        return
    if T == 0:
        return
    _write_kv_kernel[(T, Hkv)](
        k_new, v_new, k_cache, v_cache, slot_mapping,
        *k_new.stride(), *v_new.stride(), *k_cache.stride(), *v_cache.stride(),
        k_cache.shape[1],
        HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D),
        SATURATE=k_cache.dtype in FP8_CACHE_DTYPES, FP8_MAX=FP8_E4M3_MAX,
        num_warps=1,
    )
