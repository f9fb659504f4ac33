"""FakeRunner: a torch-free stand-in for ModelRunner, for scheduler/engine tests and adapter tests.

It simulates the paged KV cache: every scheduled token is "written" (its id and position) into the slot
its block table gives, and before sampling the runner reads the whole context back through the block
table and checks it equals the sequence's tokens. So a wrong block table, a block shared while still
being written, or a prefix-cache hit with other content fails loudly. The next token is a deterministic
function of the context only (not of the batch), so preempted and resumed sequences must reproduce the
same tokens.

launch(batch, prev) is the overlap-scheduling interface (runner.py): placeholders -(row + 1) in the
token ids take their value from prev, the step launched before (as the real runner does on the device).
"""
from __future__ import annotations

from typing import Callable

import torch

from internvl_serve.engine.scheduler import ScheduledBatch


def default_next_token(context: list[int], vocab_size: int, eos_token_id: int | None) -> int:
    h = (len(context) * 1000003) ^ (context[-1] * 7919) ^ (context[0] * 104729)
    token = 3 + h % (vocab_size - 3)  # never 0..2 (pad, bos, eos): runs until max_tokens by default
    return token


class DoneStep:
    """A launched step whose tokens are already known (the fake runs synchronously)."""

    def __init__(self, tokens: list[int | None]):
        self.tokens = [t for t in tokens if t is not None]  # row k: the k-th sampling sequence
        self._result = tokens

    def result(self) -> list[int | None]:
        return self._result


class FakeRunner:
    supports_overlap = True
    dtype = torch.float32  # of the image rows it would take

    def __init__(self, *, num_blocks: int = 64, block_size: int = 4, vocab_size: int = 1000,
                 hidden_size: int = 8, context_window: int = 4096, eos_token_id: int | None = 2,
                 next_token: Callable[[list[int]], int] | None = None,
                 fail_if: Callable[[ScheduledBatch], bool] | None = None):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.context_window, self.eos_token_id = context_window, eos_token_id
        self.next_token = next_token or (lambda ctx: default_next_token(ctx, vocab_size, eos_token_id))
        self.fail_if = fail_if
        self.slots: list[tuple[int, int] | None] = [None] * (num_blocks * block_size)
        self.steps: list[list[tuple[str, int, int]]] = []  # per step: (request_id, start, num_tokens)
        self.computed_tokens = 0
        self.released: list[str] = []

    def cache_info(self) -> dict:
        return {"num_blocks": self.num_blocks, "block_size": self.block_size,
                "num_tokens": self.num_blocks * self.block_size, "bytes": 0, "bytes_per_block": 0}

    def release(self, request_id: str) -> None:
        self.released.append(request_id)

    def _slot(self, table: list[int], pos: int) -> int:
        block = table[pos // self.block_size]
        assert 0 <= block < self.num_blocks, block
        return block * self.block_size + pos % self.block_size

    def launch(self, batch: ScheduledBatch, prev: DoneStep | None = None) -> DoneStep:
        if self.fail_if is not None and self.fail_if(batch):
            raise RuntimeError("fake runner failure")
        self.steps.append([(s.seq.request_id, s.start, s.num_tokens) for s in batch.seqs])
        out: list[int | None] = []
        for s in batch.seqs:
            seq, end = s.seq, s.start + s.num_tokens
            tokens = [t if t >= 0 else prev.tokens[-t - 1] for t in seq.token_ids[:end]]
            assert len(seq.block_table) * self.block_size >= end, "block table too short"
            for pos in range(s.start, end):
                self.slots[self._slot(seq.block_table, pos)] = (tokens[pos], pos)
            self.computed_tokens += s.num_tokens
            if not s.sample:
                out.append(None)
                continue
            context = [self.slots[self._slot(seq.block_table, p)] for p in range(end)]
            expected = [(t, p) for p, t in enumerate(tokens)]
            assert context == expected, f"{seq.request_id}: KV cache content differs from its tokens"
            out.append(self.next_token(tokens))
        return DoneStep(out)
