"""Varlen attention of prefill chunks (and decodes) over a paged KV cache: the "context attention" kernel.

Owns: the Triton kernel that runs the attention of a whole step (any mix of prefill chunks and single
decode tokens) straight from the block-paged cache, and `prefill_tiles`, the host-side split of the
step's queries into tiles. Does not own: the KV write (paged_attention.write_kv or
fused_ops.rotary_write_kv_, which must run first: a chunk's own K/V are read back from the cache), the
cache, the block tables or the per-step metadata (engine/attention.py builds those once per step), nor
the reference (engine/attention.py `sdpa_paged_attention`, the tests' oracle).

What one program does: one tile of BLOCK_M consecutive queries of one sequence, one query head.
Query i of a sequence with ctx cached tokens and q new ones sits at absolute position ctx + i and sees
keys 0..ctx+i (causal by absolute position: the cached context plus the chunk's earlier tokens).
Keys are read BLOCK_N at a time through the block table (any block size: each key's block is looked
up), with an online softmax in float32 (base 2). GQA: query head h reads KV head h // (Hq // Hkv).
Keys at or past a sequence's length are never loaded (masked loads give 0), so junk or NaN in free
slots cannot leak. Tiles of padding rows (past a chunk's end) compute and are not stored.

The grid is (number of tiles, Hq); the tiles come from the host (numpy over the step's q_lens, no
device sync). Every tile is a power-of-two block with masks: D is padded to a power of two.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install has no triton: the engine then keeps the reference path
    triton = None
    tl = None

_LOG2E = 1.4426950408889634


def prefill_block_m(max_query_len: int) -> int:
    """Queries per tile: 16 for steps of short chunks / decodes, 64 otherwise."""
    return 16 if max_query_len <= 16 else 64


def prefill_tiles(q_lens, block_m: int, ctx_lens=None) -> tuple[np.ndarray, np.ndarray]:
    """(tile_seq, tile_start), int32: tile k covers queries tile_start[k] .. + block_m of sequence
    tile_seq[k] (positions within the sequence's chunk). Sequences with no query get no tile.
    With ctx_lens (tokens cached before each chunk), the tiles that read the most keys come first, so
    the longest programs start in the first wave instead of trailing the last one."""
    q_lens = np.asarray(q_lens, dtype=np.int64)
    n_tiles = (q_lens + block_m - 1) // block_m
    tile_seq = np.repeat(np.arange(len(q_lens)), n_tiles)
    first = np.zeros(len(q_lens) + 1, dtype=np.int64)
    np.cumsum(n_tiles, out=first[1:])
    tile_start = (np.arange(int(first[-1])) - first[:-1][tile_seq]) * block_m
    if ctx_lens is not None:
        keys = np.asarray(ctx_lens, dtype=np.int64)[tile_seq] + tile_start  # keys a tile reads, less block_m
        order = np.argsort(-keys, kind="stable")
        tile_seq, tile_start = tile_seq[order], tile_start[order]
    return tile_seq.astype(np.int32), tile_start.astype(np.int32)


if triton is not None:

    # The table's width (stride_btb) changes from step to step: no recompile for each divisibility class.
    @triton.jit(do_not_specialize=["stride_btb"])
    def _prefill_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr,
        qsl_ptr, seq_lens_ptr, bt_ptr, tile_seq_ptr, tile_start_ptr,
        qk_scale,  # softmax scale * log2(e)
        stride_qt, stride_qh, stride_qd,
        stride_kn, stride_kt, stride_kh, stride_kd,
        stride_vn, stride_vt, stride_vh, stride_vd,
        stride_ot, stride_oh, stride_od,
        stride_btb, stride_btn,
        block_size,
        GROUP: tl.constexpr,  # query heads per KV head
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of 2
        BLOCK_M: tl.constexpr,  # queries per tile
        BLOCK_N: tl.constexpr,  # keys per loop step
        DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no TF32 rounding), else "tf32" (unused)
    ):
        tile = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // GROUP
        b = tl.load(tile_seq_ptr + tile)
        m0 = tl.load(tile_start_ptr + tile)
        q_begin = tl.load(qsl_ptr + b)
        q_len = tl.load(qsl_ptr + b + 1) - q_begin
        seq_len = tl.load(seq_lens_ptr + b)
        ctx = seq_len - q_len

        offs_m = m0 + tl.arange(0, BLOCK_M)  # query index within the chunk
        mask_m = offs_m < q_len
        q_pos = ctx + offs_m  # absolute position of each query
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        tok = (q_begin + offs_m).to(tl.int64)  # row of each query in the step
        q = tl.load(q_ptr + tok[:, None] * stride_qt + h * stride_qh + offs_d[None, :] * stride_qd,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

        m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        # keys this tile can see: up to its last valid query's position (causal), never past seq_len
        end = tl.minimum(seq_len, ctx + m0 + BLOCK_M)
        for n0 in range(0, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end
            blk = tl.load(bt_ptr + b * stride_btb + (offs_n // block_size) * stride_btn, mask=mask_n, other=0)
            blk = blk.to(tl.int64)  # block * stride can pass 2**31 elements in a large cache
            slot = offs_n % block_size
            k = tl.load(k_ptr + blk[None, :] * stride_kn + slot[None, :] * stride_kt + kvh * stride_kh
                        + offs_d[:, None] * stride_kd,
                        mask=mask_n[None, :] & mask_d[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
            v = tl.load(v_ptr + blk[:, None] * stride_vn + slot[:, None] * stride_vt + kvh * stride_vh
                        + offs_d[None, :] * stride_vd,
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
            k = k.to(q.dtype)  # an e4m3 cache: its values in q's dtype for the dots (else a no-op)
            v = v.to(q.dtype)
            s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N) fp32, log2 units
            visible = (offs_n[None, :] <= q_pos[:, None]) & mask_n[None, :]
            s = tl.where(visible, s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new > -float("inf"), m_new, 0.0)  # a row that sees nothing yet: no NaN
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])  # masked keys: exp2(-inf) = 0
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + tok[:, None] * stride_ot + h * stride_oh + offs_d[None, :] * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    tile_seq: torch.Tensor,
    tile_start: torch.Tensor,
    scale: float,
    block_m: int,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Causal attention of every query of a step over its sequence's paged context.

    q (T, Hq, D), any strides (the step's tokens, each sequence's contiguous, in sequence order);
    k_cache, v_cache with logical dims (num_blocks, block_size, Hkv, D), any strides, in q's dtype or
    e4m3 (read into q's dtype), holding every key of each sequence up to seq_lens (this step's K/V
    already written); query_start_loc (B+1,) int32; seq_lens (B,) int32 = cached context + this step's queries; block_tables (B, M) int32;
    tile_seq / tile_start (n_tiles,) int32 from `prefill_tiles(q_lens, block_m, ctx_lens)` (any order).
    Returns (T, Hq, D) in q's dtype. Needs triton (CUDA tensors, or any tensors under TRITON_INTERPRET=1).
    """
    if triton is None:
        raise RuntimeError("paged_prefill_attention needs triton (pip install triton)")
    T, Hq, D = q.shape
    _, block_size, Hkv, Dk = k_cache.shape
    assert v_cache.shape == k_cache.shape and Dk == D, (q.shape, k_cache.shape, v_cache.shape)
    assert Hq % Hkv == 0, f"query heads {Hq} not a multiple of KV heads {Hkv}"
    assert block_m >= 16 and block_m & (block_m - 1) == 0, block_m
    if out is None:
        out = torch.empty_like(q)
    n_tiles = tile_seq.shape[0]
    if n_tiles == 0 or T == 0:
        return out
    block_n = block_n or 64
    assert block_n >= 16 and block_n & (block_n - 1) == 0, block_n
    _prefill_kernel[(n_tiles, Hq)](
        q, k_cache, v_cache, out,
        query_start_loc, seq_lens, block_tables, tile_seq, tile_start,
        scale * _LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), *block_tables.stride(),
        block_size,
        GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps or 4,
    )
    return out
