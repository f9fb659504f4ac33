"""Paged attention for our LLaMA: per-step metadata and the attention of a step (the K/V write before it,
one for every layer of every step, is the model's: engine/llama.py).

A step's tokens are flattened (T of them, all sequences); `build_attention_metadata` says where each
token's K/V go (slot_mapping) and how the sequences attend: decodes (one query each) and prefill chunks
(causal with an offset: query i of a chunk sees keys 0..ctx+i). `paged_attention` is the AttentionFn the
engine uses: on CUDA it runs the varlen paged kernel (kernels/prefill_attention.py: queries of every
sequence read their keys through the block tables, no gather), elsewhere, or when switched off, the
reference `sdpa_paged_attention`, which gathers each group's K/V through the block tables and runs
scaled_dot_product_attention on padded tensors (correct everywhere; memory bounded by
`max_gather_tokens` per call). The kernel's tiles are built with the metadata; the reference's groups
only when the reference first reads them (once per step, shared by all layers).

Switch: `build_attention_metadata(prefill_kernel=...)`; None reads INTERNVL_PREFILL_KERNEL: unset, on for
CUDA block tables when triton imports; 0, off (the fallback if the kernel fails on a GPU); 1, on (also on
the CPU under TRITON_INTERPRET=1, which the tests use).

Isolation: a group gathers L keys for every sequence, so a shorter sequence's tail reads slots of free
blocks or of other requests. Those keys and values are replaced by zeros by selection (`kv_valid`), not
only masked: a mask works by multiplication or by adding -inf, and 0 * NaN = NaN, so NaN left in a freed
block would otherwise reach every later request that shares a batch with a longer one. (The kernel never
loads a key at or past a sequence's length.)

Cache layout: per layer K and V, each (num_blocks, block_size, num_kv_heads, head_dim); slot s is block
s // block_size, offset s % block_size. Does not own the cache tensors (runner.py) or block ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from internvl_serve.engine.host_copy import to_device
from internvl_serve.env_switch import env_switch
from internvl_serve.kernels import prefill_attention
from internvl_serve.kernels.paged_attention import cache_rows

# cuDNN attention rebuilds its graph for every new key length (each decode step): ~1.5 ms of CPU per
# call on the H100 host. Flash (no mask) and memory-efficient (masks) attention have no such cost.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# -- metadata: built once per step, shared by all layers ----------------------------------------

@dataclass
class AttentionGroup:
    """Sequences attended in one SDPA call: n sequences padded to Qmax queries and L keys."""
    q_index: torch.Tensor            # (n, Qmax) int64: token index in the step of each query (padding -> 0)
    kv_slots: torch.Tensor           # (n, L) int64: cache slot of key position j (past a sequence's end: junk)
    mask: torch.Tensor | None        # (n, 1, Qmax, L) bool, True = attend; None = attend all L keys
    kv_valid: torch.Tensor | None    # (n, L) bool: key j < the sequence's length; None = all L keys are its own
    out_rows: torch.Tensor | None    # (V,) rows of the (n*Qmax) padded output that are real queries; None = all
    out_tokens: torch.Tensor         # (V,) their token indices in the step
    identity: bool = False           # the group is every token of the step, in order, one query each


@dataclass
class PrefillTiles:
    """The varlen kernel's grid: tile k is queries tile_start[k] .. + block_m of sequence tile_seq[k]."""
    tile_seq: torch.Tensor           # (n_tiles,) int32
    tile_start: torch.Tensor         # (n_tiles,) int32
    block_m: int


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor       # (T,) int64: cache slot where token t's K/V go
    # the raw per-sequence view, for fused kernels
    query_start_loc: torch.Tensor    # (B+1,) int32
    seq_lens: torch.Tensor           # (B,) int32: context length after this step (cached + this step's)
    block_tables: torch.Tensor       # (B, M) int32
    prefill_tiles: PrefillTiles | None = None  # set: paged_attention runs the varlen kernel
    _group_inputs: tuple | None = field(default=None, repr=False)
    _groups: list[AttentionGroup] | None = field(default=None, repr=False)

    @property
    def groups(self) -> list[AttentionGroup]:
        """The reference's SDPA groups, built on first use (once per step: every layer shares them)."""
        if self._groups is None:
            self._groups = _build_groups(self.block_tables.long(), *self._group_inputs)
        return self._groups


PREFILL_KERNEL_ENV = "INTERNVL_PREFILL_KERNEL"  # "0" off (the reference, the GPU fallback); "1" on; unset: CUDA


def prefill_kernel_default(device: torch.device) -> bool:
    """Whether steps on `device` run the varlen kernel: INTERNVL_PREFILL_KERNEL=0 turns it off, =1 on
    (on CUDA, or on the CPU under TRITON_INTERPRET=1: the tests); unset, on for CUDA when triton imports."""
    flag = env_switch(PREFILL_KERNEL_ENV)
    if flag is False or (flag is None and device.type != "cuda"):
        return False
    return prefill_attention.triton is not None


def _pack(order: np.ndarray, seq_lens: np.ndarray, q_lens: np.ndarray, max_tokens: int, max_mask: int):
    """Greedy groups of `order` (sorted by seq_len, longest first) with n*L <= max_tokens and
    n*Qmax*L <= max_mask (at least one sequence per group)."""
    groups, i = [], 0
    while i < len(order):
        L = int(seq_lens[order[i]])
        qmax = int(q_lens[order[i]])
        j = i + 1
        while j < len(order):
            q2 = max(qmax, int(q_lens[order[j]]))
            if (j - i + 1) * L > max_tokens or (j - i + 1) * q2 * L > max_mask:
                break
            qmax = q2
            j += 1
        groups.append(order[i:j])
        i = j
    return groups


def build_attention_metadata(q_lens, ctx_lens, block_tables: torch.Tensor, block_size: int,
                             *, max_gather_tokens: int = 32768, max_mask_elems: int = 1 << 26,
                             prefill_kernel: bool | None = None) -> tuple[AttentionMetadata, torch.Tensor]:
    """Metadata for one step and the (T,) int64 positions of its tokens.

    q_lens (B,): tokens of each sequence in this step (they are contiguous in the step, in this order);
    ctx_lens (B,): tokens already in the cache before them; block_tables (B, M) on the model's device,
    M >= ceil(max(ctx+q) / block_size). prefill_kernel: run the varlen kernel (None: see
    `prefill_kernel_default`). CPU work is O(B + T) in numpy; index tensors are built on the device;
    no host sync.
    """
    device = block_tables.device
    q_lens = np.asarray(q_lens, dtype=np.int64)
    ctx_lens = np.asarray(ctx_lens, dtype=np.int64)
    B = len(q_lens)
    seq_lens = ctx_lens + q_lens
    qsl = np.zeros(B + 1, dtype=np.int64)
    np.cumsum(q_lens, out=qsl[1:])
    T = int(qsl[-1])
    seq_of_token = np.repeat(np.arange(B), q_lens)
    positions_np = np.arange(T) - qsl[:-1][seq_of_token] + ctx_lens[seq_of_token]

    positions = to_device(positions_np, device)
    bt = block_tables.long()
    slot_mapping = bt[to_device(seq_of_token, device), positions // block_size] * block_size + positions % block_size

    if prefill_kernel is None:
        prefill_kernel = prefill_kernel_default(device)
    tiles = None
    if prefill_kernel:
        if prefill_attention.triton is None:
            raise RuntimeError("prefill_kernel=True needs triton (pip install triton)")
        block_m = prefill_attention.prefill_block_m(int(q_lens.max(initial=0)))
        tile_seq, tile_start = prefill_attention.prefill_tiles(q_lens, block_m, ctx_lens)
        tiles = PrefillTiles(to_device(tile_seq, device), to_device(tile_start, device), block_m)

    meta = AttentionMetadata(
        slot_mapping=slot_mapping,
        query_start_loc=to_device(qsl.astype(np.int32), device), seq_lens=to_device(seq_lens.astype(np.int32), device),
        block_tables=block_tables.int(), prefill_tiles=tiles,
        _group_inputs=(q_lens, ctx_lens, block_size, max_gather_tokens, max_mask_elems))
    return meta, positions


def _build_groups(bt: torch.Tensor, q_lens: np.ndarray, ctx_lens: np.ndarray, block_size: int,
                  max_gather_tokens: int, max_mask_elems: int) -> list[AttentionGroup]:
    """The reference's SDPA groups: decodes and chunks apart, packed under the gather/mask budgets."""
    device = bt.device
    B = len(q_lens)
    seq_lens = ctx_lens + q_lens
    qsl = np.zeros(B + 1, dtype=np.int64)
    np.cumsum(q_lens, out=qsl[1:])
    T = int(qsl[-1])

    def dev(a):
        return to_device(a, device)

    groups = []
    for rows in (np.flatnonzero(q_lens == 1), np.flatnonzero(q_lens > 1)):
        if not len(rows):
            continue
        n_all, l_all, q_all = len(rows), int(seq_lens[rows].max()), int(q_lens[rows].max())
        if n_all * l_all <= max_gather_tokens and n_all * q_all * l_all <= max_mask_elems:
            order = rows  # one group: keep the step's order
        else:
            order = rows[np.argsort(-seq_lens[rows], kind="stable")]  # pack similar lengths together
        for g in _pack(order, seq_lens, q_lens, max_gather_tokens, max_mask_elems):
            n, L, qmax = len(g), int(seq_lens[g].max()), int(q_lens[g].max())
            g_dev = dev(g)
            j = torch.arange(L, device=device)
            kv_slots = bt[g_dev].gather(1, (j // block_size).expand(n, L)) * block_size + j % block_size
            i = np.arange(qmax)
            valid = i[None, :] < q_lens[g][:, None]                       # (n, Qmax)
            q_index = np.where(valid, qsl[g][:, None] + i[None, :], 0)
            if qmax == 1:
                same_len = bool((seq_lens[g] == L).all())
                mask = None if same_len else (j[None, :] < dev(seq_lens[g])[:, None]).view(n, 1, 1, L)
                out_rows, out_tokens = None, dev(q_index.reshape(-1))
            else:
                qpos = dev(ctx_lens[g][:, None] + i[None, :])             # (n, Qmax) position of each query
                mask = (j[None, None, :] <= qpos[:, :, None]).unsqueeze(1)
                flat_valid = valid.reshape(-1)
                out_rows = None if flat_valid.all() else dev(np.flatnonzero(flat_valid))
                out_tokens = dev(q_index.reshape(-1)[flat_valid])
            # Slots past a sequence's end belong to free blocks or to other requests: their K/V are zeroed
            # by selection before SDPA (a mask alone leaks NaN: 0 * NaN and -inf + NaN are NaN).
            kv_valid = None if bool((seq_lens[g] == L).all()) else j[None, :] < dev(seq_lens[g])[:, None]
            identity = qmax == 1 and n == T and bool((g == np.arange(B)).all())
            groups.append(AttentionGroup(dev(q_index), kv_slots, mask, kv_valid, out_rows, out_tokens, identity))
    return groups


# -- attention -------------------------------------------------------------------------------------

def sdpa_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Reference paged attention: q (T, H, D) -> (T, H, D). The new tokens' K/V are already in the cache.
    Per group: gather K/V (n, L) from the block tables, SDPA with the causal-with-offset mask."""
    T, H, D = q.shape
    Hkv = k_cache.shape[2]
    k_flat, v_flat = k_cache.view(-1, Hkv, D), v_cache.view(-1, Hkv, D)
    out = None if len(meta.groups) == 1 and meta.groups[0].identity else torch.empty_like(q)
    for g in meta.groups:
        n, qmax = g.q_index.shape
        qg = (q[:, None] if out is None else q[g.q_index]).transpose(1, 2)  # (n, H, Qmax, D)
        kg = cache_rows(k_flat, g.kv_slots).transpose(1, 2).to(q.dtype)  # (n, Hkv, L, D), in q's dtype
        vg = cache_rows(v_flat, g.kv_slots).transpose(1, 2).to(q.dtype)
        if g.kv_valid is not None:  # junk past a sequence's end may be NaN: select zeros, never multiply
            keep = g.kv_valid[:, None, :, None]
            kg = torch.where(keep, kg, 0)
            vg = torch.where(keep, vg, 0)
        if Hkv != H:
            kg = kg.repeat_interleave(H // Hkv, dim=1)
            vg = vg.repeat_interleave(H // Hkv, dim=1)
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, scale=scale)  # (n, H, Qmax, D)
        o = o.transpose(1, 2).reshape(n * qmax, H, D)
        if out is None:  # a pure decode batch in step order: no scatter needed
            return o
        if g.out_rows is not None:
            o = o.index_select(0, g.out_rows)
        out.index_copy_(0, g.out_tokens, o)
    return out


def kernel_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The varlen paged kernel (kernels/prefill_attention.py) over metadata built with its tiles."""
    t = meta.prefill_tiles
    return prefill_attention.paged_prefill_attention(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens,
                                                     meta.block_tables, t.tile_seq, t.tile_start, scale, t.block_m)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The engine's attention of a step: the varlen kernel when the metadata has its tiles, else the
    reference. q (T, H, D) -> (T, H, D); the step's K/V are already in the cache."""
    if meta.prefill_tiles is not None:
        return kernel_paged_attention(q, k_cache, v_cache, meta, scale)
    return sdpa_paged_attention(q, k_cache, v_cache, meta, scale)


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor]
