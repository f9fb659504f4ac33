"""Tensor parallelism for our LLaMA (Megatron-style), and the step channel between the ranks.

Split over N ranks (one process and one device each):
  - attention: q/k/v_proj split by heads (rows of the weight), o_proj by its input columns, then an
    all-reduce of the output; each rank holds the K/V cache of its own num_key_value_heads / N heads;
  - MLP: gate/up_proj split by rows of the intermediate size, down_proj by columns, then an all-reduce;
  - embeddings, norms and lm_head are replicated (lm_head is ~1% of the weights; only rank 0 samples).

Rank 0 runs the engine (scheduler, sampling, the Triton adapter); ranks 1..N-1 are worker processes
(`python -m internvl_serve.engine.tp_worker`) that load their shard, build the same ModelRunner and
then loop: receive a step from rank 0 over `StepChannel` (a header and int64 payload broadcast, plus
the step's input embeddings for eager steps), run the same forward (its all-reduces pair with rank 0's),
drop the logits. CUDA graphs work unchanged: every rank captures the same buckets, NCCL all-reduces
are captured inside them. On CPU the backend is gloo (the tests); on CUDA, NCCL.

Does not own: which sequences run, sampling (rank 0 only), process start-up of workers (tp_worker.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import numpy as np
import torch
import torch.distributed as dist

# column-parallel: output features split (weight rows); row-parallel: input features split (columns)
_COLUMN = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
           "mlp.gate_proj.weight", "mlp.up_proj.weight")
_ROW = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


@dataclass
class TensorParallel:
    """This process's place in a tensor-parallel group. world_size 1: no communication at all."""

    rank: int = 0
    world_size: int = 1
    group: object | None = None  # torch.distributed ProcessGroup (None: the default group)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def min_across_ranks(self, value: int, device) -> int:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    @classmethod
    def initialize(cls, *, rank: int, world_size: int, init_method: str, backend: str,
                   timeout_s: float = 600.0) -> "TensorParallel":
        """Join the group (blocks until every rank has joined)."""
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=timeout_s))
        return cls(rank=rank, world_size=world_size)

    def destroy(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def check_divisible(args, world_size: int) -> None:
    """The sizes a world_size split needs; a clear error instead of a shape mismatch later."""
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(args, name)
        if value % world_size:
            raise ValueError(f"tensor_parallel_size {world_size} does not divide {name} {value}")


def shard_state_dict(weights: Mapping[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Our Llama's (sanitized) state dict -> this rank's slice of every split weight (contiguous copies)."""
    if world_size == 1:
        return dict(weights)
    out = {}
    for key, value in weights.items():
        if key.endswith(_COLUMN):
            value = value.chunk(world_size, dim=0)[rank].contiguous()
        elif key.endswith(_ROW):
            value = value.chunk(world_size, dim=1)[rank].contiguous()
        out[key] = value
    return out


def load_device(checkpoint, device: str, world_size: int) -> str:
    """Where a rank reads the checkpoint before keeping its slice: the CPU under tensor parallelism
    (the shards are memory-mapped, so only the slice is ever copied and moved to the GPU: a rank never
    holds the whole 26 GB LLM, which is what lets the model fit on 24-48 GB cards), except for the
    benchmarks' random weights, which are drawn on the device (drawing 13B numbers on a CPU is slow)."""
    from internvl_serve.random_weights import is_random_checkpoint

    if world_size > 1 and not is_random_checkpoint(checkpoint):
        return "cpu"
    return device


def local_args(args, world_size: int):
    """LlamaArgs with the per-rank head counts and intermediate size (head_dim unchanged)."""
    if world_size == 1:
        return args
    check_divisible(args, world_size)
    return dataclasses.replace(args, num_attention_heads=args.num_attention_heads // world_size,
                               num_key_value_heads=args.num_key_value_heads // world_size,
                               intermediate_size=args.intermediate_size // world_size,
                               hidden_size=args.hidden_size, head_dim=args.head_dim)


# ------------------------------------------------------------------------------------------------
# the step channel: rank 0 -> every worker, once per engine step
# ------------------------------------------------------------------------------------------------

STOP, EAGER, DECODE = 0, 1, 2
_HEADER = 6


@dataclass
class EagerStep:
    embeds: torch.Tensor         # (T, hidden) in the model dtype, on the device
    q_lens: np.ndarray           # (B,) int64
    ctx_lens: np.ndarray         # (B,) int64
    tables: np.ndarray           # (B, width) int32
    logits_rows: np.ndarray      # (S,) int64: token rows whose logits are computed


@dataclass
class DecodeStep:
    token_ids: np.ndarray        # (n,) int64
    positions: np.ndarray        # (n,) int64
    slots: np.ndarray            # (n,) int64
    tables: np.ndarray           # (n, width) int32
    context_lens: np.ndarray     # (n,) int64


class StepChannel:
    """Broadcasts of one step's inputs from rank 0 (send_*) to the workers (receive)."""

    def __init__(self, tp: TensorParallel, device: torch.device, hidden_size: int, dtype: torch.dtype):
        self.tp, self.device, self.hidden_size, self.dtype = tp, device, hidden_size, dtype

    def _bcast(self, t: torch.Tensor) -> torch.Tensor:
        dist.broadcast(t, src=0, group=self.tp.group)
        return t

    def _send(self, header: list[int], payload: list[np.ndarray]) -> None:
        h = torch.tensor(header + [0] * (_HEADER - len(header)), dtype=torch.int64)
        self._bcast(h.to(self.device))
        if payload:
            flat = np.concatenate([np.asarray(p, dtype=np.int64).ravel() for p in payload])
            self._bcast(torch.from_numpy(flat).to(self.device))

    def send_eager(self, step: EagerStep) -> None:
        B, width = step.tables.shape
        self._send([EAGER, B, width, len(step.logits_rows), step.embeds.shape[0]],
                   [step.q_lens, step.ctx_lens, step.tables, step.logits_rows])
        self._bcast(step.embeds.contiguous())

    def send_decode(self, step: DecodeStep) -> None:
        n, width = step.tables.shape
        self._send([DECODE, n, width], [step.token_ids, step.positions, step.slots, step.context_lens,
                                        step.tables])

    def send_stop(self) -> None:
        self._send([STOP], [])

    def receive(self) -> EagerStep | DecodeStep | None:
        """The next step (None: stop)."""
        h = self._bcast(torch.zeros(_HEADER, dtype=torch.int64, device=self.device)).tolist()
        kind = h[0]
        if kind == STOP:
            return None
        if kind == EAGER:
            B, width, S, T = h[1:5]
            flat = self._bcast(torch.empty(2 * B + B * width + S, dtype=torch.int64, device=self.device))
            flat = flat.cpu().numpy()
            q_lens, ctx, rest = flat[:B], flat[B:2 * B], flat[2 * B:]
            tables, rows = rest[:B * width].reshape(B, width).astype(np.int32), rest[B * width:]
            embeds = self._bcast(torch.empty(T, self.hidden_size, dtype=self.dtype, device=self.device))
            return EagerStep(embeds, q_lens, ctx, tables, rows)
        if kind == DECODE:
            n, width = h[1:3]
            flat = self._bcast(torch.empty(4 * n + n * width, dtype=torch.int64, device=self.device))
            flat = flat.cpu().numpy()
            ids, pos, slots, ctx, tables = (flat[:n], flat[n:2 * n], flat[2 * n:3 * n], flat[3 * n:4 * n],
                                            flat[4 * n:].reshape(n, width).astype(np.int32))
            return DecodeStep(ids, pos, slots, tables, ctx)
        raise RuntimeError(f"tensor parallel: unknown step kind {kind}")
