"""CUDA-graph decode: one captured forward per batch-size bucket, with the fused paged-attention kernel.

A pure-decode step (every sequence adds one token and samples) has the same shapes at every step for a
given batch size, so its whole 40-layer forward is captured once per bucket (1, 2, 4, 8, 16, 24, 32,
48, 64, ...) and replayed: one launch instead of ~2,000, which is what makes decode reach the weights'
HBM floor. What is captured is the model's own forward (Llama.forward, the only layer loop; with the
fused norm/rotary/SiLU kernels and merged projections when model.fused) called with a DecodeMetadata,
which selects the decode attention: `kernels.paged_decode_attention` (split-K flash decoding over the
block tables; grids depend on shapes only); the K/V write (fused_ops.rotary_write_kv_ on the fused
path, `kernels.write_kv` on the plain one: padding rows carry slot -1 and are skipped). Block tables
and context lengths are static (bucket, max_blocks) buffers refreshed before each replay.

Owns: the static buffers, capture and replay. Does not own: the layer loop and the kernels' selection
(llama.py), scheduling, sampling (done on the graph's logits by the runner), prefill (eager, reference
attention), or the weights (the Llama module).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from internvl_serve.engine.llama import DecodeMetadata

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


@dataclass
class _Static:
    """One bucket's input/output buffers (graph-owned addresses, refreshed in place)."""
    token_ids: torch.Tensor      # (B,) int64
    positions: torch.Tensor      # (B,) int64
    slots: torch.Tensor          # (B,) int64; -1 for padding rows
    block_tables: torch.Tensor   # (B, max_blocks) int32
    context_lens: torch.Tensor   # (B,) int32 (includes the new token; 0 for padding rows)
    logits: torch.Tensor | None = None   # (B, vocab) fp32, written by the graph
    graph: torch.cuda.CUDAGraph | None = None


def decode_forward(model, token_ids, positions, slots, block_tables, context_lens, kv_caches) -> torch.Tensor:
    """One pure-decode step through the model's own forward (Llama.forward, the one layer loop) with
    DecodeMetadata, which selects the decode kernels: (B,) tokens -> (B, vocab) fp32 logits."""
    meta = DecodeMetadata(slot_mapping=slots, block_tables=block_tables, context_lens=context_lens)
    return model(model.embed(token_ids), positions, kv_caches, meta, None)


class DecodeGraphs:
    def __init__(self, model, kv_caches, *, max_blocks: int, device, buckets=DEFAULT_BUCKETS,
                 max_batch: int = 256):
        self.model, self.kv_caches, self.max_blocks, self.device = model, kv_caches, max_blocks, device
        self.buckets = tuple(b for b in buckets if b <= max_batch)
        self._static: dict[int, _Static] = {}
        self._pool = None

    def bucket_for(self, n: int) -> int | None:
        for b in self.buckets:
            if b >= n:
                return b
        return None

    def _buffers(self, b: int) -> _Static:
        z = lambda dtype: torch.zeros(b, dtype=dtype, device=self.device)  # noqa: E731
        return _Static(z(torch.long), z(torch.long), torch.full((b,), -1, dtype=torch.long, device=self.device),
                       torch.zeros(b, self.max_blocks, dtype=torch.int32, device=self.device), z(torch.int32))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, sharing one memory pool."""
        for b in sorted(self.buckets, reverse=True):
            st = self._buffers(b)
            run = lambda st=st: decode_forward(self.model, st.token_ids, st.positions, st.slots,  # noqa: E731
                                               st.block_tables, st.context_lens, self.kv_caches)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):        # compile the Triton kernels and warm cuBLAS outside the capture
                    run()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                st.logits = run()
            self._pool = graph.pool()
            st.graph = graph
            self._static[b] = st
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def run(self, token_ids: np.ndarray | torch.Tensor, positions: np.ndarray, slots: np.ndarray,
            tables: np.ndarray, context_lens: np.ndarray) -> torch.Tensor:
        """Replay for n <= largest bucket sequences; returns their (n, vocab) fp32 logits (a view of the
        graph's output buffer: consume it before the next replay). token_ids may be a device tensor
        (overlap scheduling computes it on the device from the previous step's tokens); the host arrays
        travel through pinned memory, so the replay is queued without waiting for the device."""
        n = len(token_ids)
        st = self._static[self.bucket_for(n)]
        b = st.token_ids.shape[0]

        def copy(dst: torch.Tensor, full: np.ndarray) -> None:
            src = torch.from_numpy(full)
            dst.copy_(src.pin_memory() if dst.device.type == "cuda" else src, non_blocking=True)

        def put(dst: torch.Tensor, src: np.ndarray, pad) -> None:
            full = np.full((b, *src.shape[1:]), pad, dtype=src.dtype)
            full[:n] = src
            copy(dst, full)

        if isinstance(token_ids, torch.Tensor):
            st.token_ids[:n].copy_(token_ids, non_blocking=True)
            st.token_ids[n:].zero_()
        else:
            put(st.token_ids, token_ids.astype(np.int64), 0)
        put(st.positions, positions.astype(np.int64), 0)
        put(st.slots, slots.astype(np.int64), -1)
        w = min(tables.shape[1], self.max_blocks)
        full = np.zeros((b, self.max_blocks), dtype=np.int32)
        full[:n, :w] = tables[:, :w]
        copy(st.block_tables, full)
        put(st.context_lens, context_lens.astype(np.int32), 0)
        st.graph.replay()
        return st.logits[:n]
