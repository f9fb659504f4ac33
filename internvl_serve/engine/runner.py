"""ModelRunner: owns the LLaMA weights and the KV-cache tensors; runs one ScheduledBatch.

One step: build the flattened inputs (token ids -> embed_tokens, then the image rows scattered into the
<IMG_CONTEXT> positions of the chunk being prefilled), the attention metadata (slots, block tables),
run llama.forward with logits only for the sequences that sample, and sample one token each.

KV cache: allocated here, after the weights (and their quantization), in kv_cache.py's layout; with
num_blocks=None sized by kv_cache.py (on CUDA from the free GPU memory after a profile forward).

Overlap scheduling: launch(batch, prev) queues one step on the device and returns a StepFuture at
once; the sampled tokens stay on the device and are copied to pinned host memory behind an event.
A token that `prev` (the step still running) samples appears in the sequences' token_ids as a
placeholder -(row + 1) (sequence.py); the inputs of the next step take its value on the device from
prev.tokens (torch.where + gather into the graph's static buffer or the eager ids), with no host sync.
Every host->device copy of a step's inputs goes through pinned memory (host_copy.to_device), so nothing
on the step path waits for the device (a copy from pageable memory may wait for the stream: the step
still running); the host waits only in StepFuture.result().

Does not own: which sequences run (scheduler.py), block ids (block_manager.py), the cache's layout and
size (kv_cache.py), text (detokenizer.py).
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch

from internvl_serve.engine import kv_cache
from internvl_serve.engine.attention import (AttentionFn, build_attention_metadata, paged_attention,
                                             prefill_kernel_default)
from internvl_serve.engine.host_copy import to_device
from internvl_serve.engine.llama import LlamaArgs, load_llama
from internvl_serve.engine.parallel import DecodeStep, EagerStep, StepChannel, TensorParallel
from internvl_serve.engine.quantize import ENGINE_PROJECTION_PATHS, quantize_model_, validate_quantization
from internvl_serve.engine.sampler import SamplingBatch, sample_tokens
from internvl_serve.engine.scheduler import ScheduledBatch, SchedulerConfig
from internvl_serve.engine.sequence import Sequence
from internvl_serve.kernels.decode_linear import triton_rows_from_environment, use_triton_decode_linears_


class BlockTableBuffer:
    """Persistent (rows, max_blocks) int32 copy of the block tables; per step only the blocks that are
    new since the last step are copied (O(new blocks), not O(all blocks))."""

    def __init__(self, max_blocks: int, rows: int = 64):
        self.max_blocks = max_blocks
        self.table = np.zeros((rows, max_blocks), dtype=np.int32)
        self.lens = np.zeros(rows, dtype=np.int64)
        self.epoch = np.zeros(rows, dtype=np.int64)
        self._row: dict[str, int] = {}
        self._free = list(range(rows - 1, -1, -1))

    def _row_of(self, seq: Sequence) -> int:
        row = self._row.get(seq.request_id)
        if row is None:
            if not self._free:
                n = len(self.table)
                self.table = np.concatenate([self.table, np.zeros_like(self.table)])
                self.lens = np.concatenate([self.lens, np.zeros(n, np.int64)])
                self.epoch = np.concatenate([self.epoch, np.zeros(n, np.int64)])
                self._free = list(range(2 * n - 1, n - 1, -1))
            row = self._row[seq.request_id] = self._free.pop()
            self.lens[row] = 0
            self.epoch[row] = seq.num_preemptions
        return row

    def rows_for(self, seqs: list[Sequence]) -> np.ndarray:
        rows = np.empty(len(seqs), dtype=np.int64)
        for i, seq in enumerate(seqs):
            row = rows[i] = self._row_of(seq)
            n, have = len(seq.block_table), int(self.lens[row])
            if self.epoch[row] != seq.num_preemptions or have > n:  # blocks were dropped: rewrite the row
                self.epoch[row], have = seq.num_preemptions, 0
            if n > have:
                self.table[row, have:n] = seq.block_table[have:n]
                self.lens[row] = n
        return rows

    def release(self, request_id: str) -> None:
        row = self._row.pop(request_id, None)
        if row is not None:
            self._free.append(row)


class StepFuture:
    """The sampled tokens of one launched step. tokens: (S,) int64 on the device, one row per sampling
    sequence of the batch in batch order; result() waits for the device copy to pinned memory (an
    event, not a stream sync) and returns one token per scheduled sequence (None where it does not
    sample)."""

    def __init__(self, sample_mask: list[bool], tokens: torch.Tensor | None):
        self.sample_mask = sample_mask
        self.tokens = tokens
        self._host, self._event = None, None
        if tokens is not None and tokens.device.type == "cuda":
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        elif tokens is not None:
            self._host = tokens
        self._result: list[int | None] | None = None

    def result(self) -> list[int | None]:
        if self._result is None:
            values: list[int] = []
            if self._host is not None:
                if self._event is not None:
                    self._event.synchronize()
                values = self._host.tolist()
            it = iter(values)
            self._result = [next(it) if m else None for m in self.sample_mask]
        return self._result


class ModelRunner:
    end_token_ids: tuple[int, ...] = ()  # the engine's end tokens: masked in rows below their min_tokens

    def __init__(self, config, state_dict: Mapping[str, torch.Tensor], *, device="cpu",
                 dtype: torch.dtype | None = None, block_size: int = 16, num_blocks: int | None = None,
                 gpu_memory_utilization: float = 0.9,
                 max_num_batched_tokens: int = SchedulerConfig.max_num_batched_tokens,
                 max_num_seqs: int = SchedulerConfig.max_num_seqs, attention: AttentionFn = paged_attention,
                 reserved_bytes: int = 0, cuda_graphs: bool | None = None,
                 tp: TensorParallel | None = None, quantization: str | None = None,
                 fused_kernels: bool | None = None, kv_cache_dtype: str | None = None,
                 fp8_fast_accum: bool = False, fp8_triton_max_rows: int = 0):
        # reserved_bytes: device memory that other processes (the vision model's Triton instance) will
        # hold, whether or not they have loaded yet: Triton loads models in parallel, in no fixed order.
        self.reserved_bytes = int(reserved_bytes)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type == "cuda":  # Triton kernels launch on the current device
            torch.cuda.set_device(self.device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.args = LlamaArgs.from_config(config)
        self.config = config
        self.block_size = block_size
        # Tensor parallelism: every rank builds this runner with its slice of the weights and of the KV
        # heads; rank 0 sends each step's inputs to the others through `channel` (parallel.py).
        self.tp = tp or TensorParallel()
        # fused_kernels: the Triton norm/rotary/SiLU kernels and merged-projection GEMMs (llama.py); None:
        # on for CUDA unless INTERNVL_SERVE_FUSED_KERNELS=0, off on the CPU.
        self.model = load_llama(self.args, state_dict, device=self.device, dtype=self.dtype, attention=attention,
                                tp=self.tp, fused_kernels=fused_kernels)
        # the varlen prefill kernel's tiles in each eager step's metadata: decided once (the environment
        # switch, attention.py), and only where the model's attention is the one that runs the kernel
        self.prefill_kernel = attention is paged_attention and prefill_kernel_default(self.device)
        # quantization "int8" / "fp8": quantized projections (quantize.py), before the KV cache is sized
        # and the decode graphs are captured; it empties state_dict so the bf16 weights can be freed.
        self.quantization = validate_quantization(quantization)
        quantize_model_(self.model, self.quantization, state_dict, fp8_fast_accum=fp8_fast_accum,
                        fp8_triton_max_rows=fp8_triton_max_rows)
        # an experiment, off unless INTERNVL_SERVE_BF16_TRITON_ROWS is set: bf16 decode products in Triton
        # instead of cuBLAS (kernels/decode_linear.py), before the decode graphs are captured
        self.bf16_triton_rows = 0
        if self.quantization is None and self.device.type == "cuda" and self.dtype == torch.bfloat16:
            self.bf16_triton_rows = triton_rows_from_environment()
            if self.bf16_triton_rows:
                use_triton_decode_linears_(self.model.model.layers, ENGINE_PROJECTION_PATHS, self.bf16_triton_rows)
        self.channel = (StepChannel(self.tp, self.device, self.args.hidden_size, self.dtype)
                        if self.tp.enabled else None)
        a = self.model.local_args  # this rank's heads
        # kv_cache_dtype "fp8": the cache in e4m3 (kv_cache.py, kernels/paged_attention.py); "": the model dtype
        self.kv_cache_dtype = kv_cache.validate_kv_cache_dtype(kv_cache_dtype)
        self.cache_dtype = kv_cache.cache_dtype_of(self.kv_cache_dtype, self.dtype)
        self.bytes_per_block = kv_cache.bytes_per_block(a, block_size, self.cache_dtype)
        self.kv_sizing: dict = {}  # the figures auto_num_blocks sized the cache with (bytes; CUDA only)
        if num_blocks is None:
            if self.device.type == "cuda":
                num_blocks = kv_cache.auto_num_blocks(
                    self.model, block_size=block_size, dtype=self.dtype, device=self.device,
                    utilization=gpu_memory_utilization, max_num_batched_tokens=max_num_batched_tokens,
                    max_num_seqs=max_num_seqs, reserved_bytes=self.reserved_bytes, report=self.kv_sizing,
                    cache_dtype=self.cache_dtype)
            else:
                num_blocks = kv_cache.cpu_num_blocks(a, block_size)
        num_blocks = self.tp.min_across_ranks(num_blocks, self.device)  # the same cache on every rank
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.kv_cache, self.kv_caches = kv_cache.allocate(a, num_blocks, block_size, dtype=self.cache_dtype,
                                                          device=self.device)
        self.max_model_len = min(a.max_position_embeddings, num_blocks * block_size)
        self._tables = BlockTableBuffer(math.ceil(self.max_model_len / block_size))
        self._generators: dict[str, torch.Generator] = {}
        # Pure-decode steps replay a captured CUDA graph with the fused paged-attention kernel
        # (decode_graphs.py); prefill chunks and mixed steps run eagerly. Default: on for CUDA.
        self.decode_graphs = None
        if cuda_graphs if cuda_graphs is not None else self.device.type == "cuda":
            from internvl_serve.engine.decode_graphs import DecodeGraphs
            self.decode_graphs = DecodeGraphs(self.model, self.kv_caches, max_blocks=self._tables.max_blocks,
                                              device=self.device, max_batch=max_num_seqs)
            self.decode_graphs.capture()

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.args.hidden_size

    @property
    def context_window(self) -> int:
        return self.args.max_position_embeddings

    @property
    def eos_token_id(self) -> int | None:
        return self.args.eos_token_id

    def cache_info(self) -> dict:
        return {"num_blocks": self.num_blocks, "block_size": self.block_size,
                "num_tokens": self.num_blocks * self.block_size, "bytes": self.num_blocks * self.bytes_per_block,
                "bytes_per_block": self.bytes_per_block, "dtype": str(self.cache_dtype).replace("torch.", ""),
                "device": str(self.device)}

    # -- one step ----------------------------------------------------------------------------------
    def release(self, request_id: str) -> None:
        """Forget a finished request's generator and block-table row."""
        self._generators.pop(request_id, None)
        self._tables.release(request_id)

    def _generator(self, seq: Sequence) -> torch.Generator:
        g = self._generators.get(seq.request_id)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(int(seq.sampling.seed))
            self._generators[seq.request_id] = g
        return g

    @property
    def supports_overlap(self) -> bool:
        """Whether launch() may see placeholders: not with tensor parallelism, whose channel sends token
        ids from the host (the engine then resolves each step before building the next)."""
        return self.channel is None

    def _h2d(self, array: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A host array or tensor on this runner's device without waiting for the device (host_copy.py)."""
        return to_device(array, self.device)

    def _token_ids(self, ids: np.ndarray, prev: torch.Tensor | None) -> torch.Tensor:
        """(T,) int64 token ids on the device; placeholders -(row + 1) take row of `prev`, the running
        step's sampled tokens, on the device."""
        dev = self._h2d(ids.astype(np.int64, copy=False))
        if len(ids) and int(ids.min()) < 0:
            assert prev is not None, "a pending token without the step that samples it"
            dev = torch.where(dev < 0, prev[(-dev - 1).clamp(min=0)], dev)
        return dev

    def _input_embeds(self, seqs, q_starts: np.ndarray, prev: torch.Tensor | None) -> torch.Tensor:
        token_ids: list[int] = []
        dst_parts, rows = [], []
        for s, offset in zip(seqs, q_starts):
            seq, start, end = s.seq, s.start, s.start + s.num_tokens
            token_ids.extend(seq.token_ids[start:end])
            if start < seq.prompt_len and len(seq.image_positions):
                a, b = seq.image_rows(start, min(end, seq.prompt_len))  # the per-sequence cursor
                if a < b:
                    dst_parts.append(seq.image_positions[a:b] - start + offset)
                    rows.append(seq.request.image_embeds[a:b])
        embeds = self.model.embed(self._token_ids(np.array(token_ids, dtype=np.int64), prev))  # (T, hidden)
        if rows:
            dst = self._h2d(np.concatenate(dst_parts))
            # copied as they are, converted on the device: a host-to-device copy that also changes the
            # dtype converts on the CPU first (ATen), into a fresh host buffer, on the engine thread
            src = torch.cat([self._h2d(r) for r in rows]).to(self.dtype)
            embeds.index_copy_(0, dst, src)
        return embeds

    @torch.inference_mode()
    def compute_logits(self, batch: ScheduledBatch, prev: torch.Tensor | None = None) -> torch.Tensor:
        """Run the forward of one step; (S, vocab) fp32 logits, one row per sequence that samples, in
        batch order. Writes the step's K/V into the cache. prev: the running step's sampled tokens (the
        values of this batch's placeholders)."""
        seqs = batch.seqs
        if self.decode_graphs is not None:
            decode = [i for i, s in enumerate(seqs) if s.num_tokens == 1 and s.sample]
            if decode and self.decode_graphs.bucket_for(len(decode)) is not None:
                if len(decode) == len(seqs):
                    return self._decode_with_graph(seqs, prev)
                # A mixed step: the decodes replay the graph, the prefill chunks run eagerly; they
                # write different cache slots, so the order does not matter. Logits in batch order.
                decode_set = set(decode)
                decode_logits = self._decode_with_graph([seqs[i] for i in decode], prev).clone()
                rest = [s for i, s in enumerate(seqs) if i not in decode_set]
                rest_logits = self._eager_logits(rest, prev)
                sampled = [i for i, s in enumerate(seqs) if s.sample]
                out = torch.empty(len(sampled), decode_logits.shape[1], dtype=decode_logits.dtype,
                                  device=decode_logits.device)
                pos = {i: k for k, i in enumerate(sampled)}
                dec_rows = self._h2d(np.array([pos[i] for i in decode], dtype=np.int64))
                out.index_copy_(0, dec_rows, decode_logits)
                rest_sampled = [pos[i] for i, s in enumerate(seqs) if s.sample and i not in decode_set]
                if rest_sampled:
                    out.index_copy_(0, self._h2d(np.array(rest_sampled, dtype=np.int64)), rest_logits)
                return out
        return self._eager_logits(seqs, prev)

    def _eager_logits(self, seqs, prev: torch.Tensor | None) -> torch.Tensor:
        """The eager forward (reference attention) of any mix of prefill chunks and decodes."""
        q_lens = np.fromiter((s.num_tokens for s in seqs), dtype=np.int64, count=len(seqs))
        ctx = np.fromiter((s.start for s in seqs), dtype=np.int64, count=len(seqs))
        q_starts = np.concatenate([[0], np.cumsum(q_lens)[:-1]]).astype(np.int64)
        rows = self._tables.rows_for([s.seq for s in seqs])
        width = max(1, math.ceil(int((q_lens + ctx).max()) / self.block_size))
        sample_rows = [i for i, s in enumerate(seqs) if s.sample]
        step = EagerStep(self._input_embeds(seqs, q_starts, prev), q_lens, ctx, self._tables.table[rows, :width],
                         (q_starts[sample_rows] + q_lens[sample_rows] - 1).astype(np.int64))
        if self.channel is not None:
            self.channel.send_eager(step)
        return self._forward_eager(step)

    def _forward_eager(self, step: EagerStep) -> torch.Tensor:
        tables = self._h2d(step.tables)
        meta, positions = build_attention_metadata(step.q_lens, step.ctx_lens, tables, self.block_size,
                                                   max_gather_tokens=kv_cache.MAX_GATHER_TOKENS,
                                                   prefill_kernel=self.prefill_kernel)
        logits_idx = self._h2d(step.logits_rows)
        return self.model(step.embeds, positions, self.kv_caches, meta, logits_idx)

    def _decode_with_graph(self, seqs, prev: torch.Tensor | None) -> torch.Tensor:
        """One new token per sequence through the captured graph of the smallest fitting bucket."""
        bs = self.block_size
        positions = np.fromiter((s.start for s in seqs), dtype=np.int64, count=len(seqs))
        token_ids = np.fromiter((s.seq.token_ids[s.start] for s in seqs), dtype=np.int64, count=len(seqs))
        rows = self._tables.rows_for([s.seq for s in seqs])
        tables = self._tables.table[rows]
        slots = tables[np.arange(len(seqs)), positions // bs].astype(np.int64) * bs + positions % bs
        step = DecodeStep(token_ids, positions, slots, tables, positions + 1)
        if self.channel is not None:
            self.channel.send_decode(step)
        return self.decode_graphs.run(self._token_ids(step.token_ids, prev), step.positions, step.slots, step.tables,
                                      step.context_lens)

    # -- tensor parallelism ------------------------------------------------------------------------
    @torch.inference_mode()
    def serve_steps(self) -> None:
        """Ranks 1..N-1: run the steps rank 0 sends, until it sends stop."""
        if self.tp.rank == 0:
            raise RuntimeError("serve_steps runs on the worker ranks; rank 0 drives the engine")
        while (step := self.channel.receive()) is not None:
            if isinstance(step, DecodeStep):
                self.decode_graphs.run(step.token_ids, step.positions, step.slots, step.tables, step.context_lens)
            else:
                self._forward_eager(step)

    def stop_workers(self) -> None:
        """Rank 0: tell the workers to leave serve_steps (idempotent)."""
        if self.channel is not None and self.tp.rank == 0:
            self.channel.send_stop()
            self.channel = None
            if self.device.type == "cuda":  # the stop has reached the workers before anyone leaves the group
                torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, prev: StepFuture | None = None) -> StepFuture:
        """Queue one step on the device and return at once. prev: the step still running, whose tokens
        appear as placeholders in this batch's inputs."""
        tokens = self._sample(batch, None if prev is None else prev.tokens) if batch.seqs else None
        return StepFuture([s.sample for s in batch.seqs], tokens)

    def _sample(self, batch: ScheduledBatch, prev: torch.Tensor | None) -> torch.Tensor | None:
        """The step's forward and sampling: (S,) int64 tokens on the device, or None if none samples."""
        logits = self.compute_logits(batch, prev)
        sampling = [s for s in batch.seqs if s.sample]
        if not sampling:
            return None
        params = [s.seq.sampling for s in sampling]
        needs_history = any(p.repetition_penalty != 1.0 for p in params)
        assert not (needs_history and any(s.seq.num_pending for s in sampling)), \
            "repetition_penalty needs the token history: the engine resolves pending tokens first"
        outputs = [s.seq.output_token_ids if needs_history and s.seq.sampling.repetition_penalty != 1.0 else []
                   for s in sampling]
        generators = [None if p.temperature == 0 else self._generator(s.seq) for p, s in zip(params, sampling)]
        # min_tokens counts every token generated before this one, the pending ones included
        return sample_tokens(logits, SamplingBatch.build(params, outputs, generators, self.device, [
            s.seq.num_scheduled_outputs for s in sampling], self.end_token_ids))
