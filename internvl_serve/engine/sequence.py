"""Sequence: the engine's state for one request (pure Python; the scheduler's unit of work).

token_ids holds prompt + generated tokens. num_computed_tokens of them have their KV in the cache,
in the blocks of block_table. The scheduler moves a sequence between waiting and running; a preempted
sequence drops its blocks and computed count and is recomputed later (its generated tokens are kept,
so it continues where it stopped). Does not own tensors: the runner reads request.image_embeds.

Pending tokens (overlap scheduling, engine.py): a token sampled by a step still running on the device
is appended as a placeholder, `-(row + 1)`, where row is its row in that step's sampled-token tensor,
so the next step can be scheduled (lengths, positions and slots are known without the value) and its
input taken on the device. Placeholders are always the tail of token_ids; resolve_pending() puts the
value in place of the oldest one, drop_pending() forgets them (the sequence finished meanwhile).
num_tokens counts them; num_output_tokens / output_token_ids and the block hashes never do.
"""
from __future__ import annotations

import enum
import struct

import numpy as np

from internvl_serve.engine.block_manager import BlockHash, hash_block
from internvl_serve.engine.request import FinishReason, Request


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request: Request, *, block_size: int, max_len: int,
                 image_positions: np.ndarray | None = None, image_keys: list[bytes] | None = None):
        self.request = request
        self.request_id = request.request_id
        self.sampling = request.sampling
        self.token_ids: list[int] = [int(t) for t in request.prompt_token_ids]
        self.prompt_len = len(self.token_ids)
        self.block_size = block_size
        self.max_len = max_len  # prompt + output tokens at most (context window, cache capacity)
        self.max_output_tokens = min(self.sampling.max_tokens, max_len - self.prompt_len)
        # image rows: prompt position image_positions[j] takes request.image_embeds[j]
        self.image_positions = (np.zeros(0, np.int64) if image_positions is None
                                else np.asarray(image_positions, np.int64))
        self.image_keys = image_keys or []
        self.rows_per_image = (len(self.image_positions) // len(self.image_keys)) if self.image_keys else 0
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[BlockHash] = []  # hashes of the leading full blocks, computed lazily
        self.num_registered_blocks = 0            # leading blocks already in the prefix cache
        self.num_cached_tokens = 0                # prompt tokens served by the prefix cache (first admission)
        self.num_preemptions = 0
        self.first_scheduled: float | None = None  # time.monotonic() of its first admission
        self.finish_reason: FinishReason | None = None
        self.num_pending = 0                      # trailing placeholders in token_ids (see the docstring)

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_known_tokens(self) -> int:
        return len(self.token_ids) - self.num_pending

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens whose values are known (pending ones excluded)."""
        return self.num_known_tokens - self.prompt_len

    @property
    def num_scheduled_outputs(self) -> int:
        """Generated tokens, pending ones included (what the length limit counts when scheduling)."""
        return len(self.token_ids) - self.prompt_len

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:self.num_known_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        assert not self.num_pending, "a known token after a pending one"
        self.token_ids.append(token_id)

    def append_pending(self, row: int) -> None:
        """A token that row `row` of the step now running will sample."""
        self.token_ids.append(-(row + 1))
        self.num_pending += 1

    def resolve_pending(self, token_id: int) -> None:
        """The oldest pending token's value arrived."""
        assert self.num_pending, f"{self.request_id}: no pending token"
        self.token_ids[len(self.token_ids) - self.num_pending] = int(token_id)
        self.num_pending -= 1

    def drop_pending(self) -> None:
        if self.num_pending:
            del self.token_ids[len(self.token_ids) - self.num_pending:]
            self.num_pending = 0

    # -- image rows ------------------------------------------------------------------------------
    def image_rows(self, start: int, end: int) -> tuple[int, int]:
        """[row_start, row_end) of image_embeds for the prompt positions in [start, end)."""
        if not len(self.image_positions):
            return 0, 0
        a, b = np.searchsorted(self.image_positions, (start, end))
        return int(a), int(b)

    # -- prefix-cache hashes ---------------------------------------------------------------------
    def _image_extra(self, start: int, end: int) -> bytes:
        """Content keys of the image rows at positions [start, end): (image key, row range) per image."""
        a, b = self.image_rows(start, end)
        if a == b:
            return b""
        rpi = self.rows_per_image
        parts = []
        for k in range(a // rpi, (b - 1) // rpi + 1):
            lo, hi = max(a, k * rpi) - k * rpi, min(b, (k + 1) * rpi) - k * rpi
            parts.append(self.image_keys[k] + struct.pack("<II", lo, hi))
        return b"".join(parts)

    def block_hash(self, i: int) -> BlockHash:
        """Chain hash of full block i (its tokens must exist)."""
        bs = self.block_size
        while len(self.block_hashes) <= i:
            j = len(self.block_hashes)
            assert (j + 1) * bs <= self.num_known_tokens, "only full blocks of known tokens have a hash"
            parent = self.block_hashes[j - 1] if j else None
            self.block_hashes.append(hash_block(parent, self.token_ids[j * bs:(j + 1) * bs],
                                                self._image_extra(j * bs, (j + 1) * bs)))
        return self.block_hashes[i]

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")
