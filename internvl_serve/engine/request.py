"""Request (what a caller submits) and RequestOutput (what the engine streams back).

A Request is token-only: the prompt's ids, the image rows that replace its <IMG_CONTEXT> positions, and
its SamplingParams. Owns the request-level checks (validate). Does not own tokenization or prompts
(prompt.py), nor the engine's per-request state (sequence.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from internvl_serve.engine.errors import InvalidRequest
from internvl_serve.engine.sampling import SamplingParams
from internvl_serve.hostbuf import all_finite

FinishReason = Literal["stop", "length", "abort"]


@dataclass(eq=False)
class Request:
    """One generation request.

    image_embeds (num_image_tokens, hidden): row j replaces the j-th prompt position whose id is the
    engine's image_context_token_id (the card's `E[input_ids == img_context_token_id] = vit_embeds`).
    image_hashes: optional content keys, one per image (rows split evenly among them; V1-1: 256 rows
    each), e.g. a hash of the image bytes. They make blocks holding image tokens reusable by the prefix
    cache across requests (the next turn of a chat). Without them the engine hashes the rows itself.
    """
    request_id: str
    prompt_token_ids: list[int]
    image_embeds: torch.Tensor | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    image_hashes: tuple[str | bytes, ...] | None = None

    def validate(self, *, image_context_token_id: int | None, vocab_size: int, hidden_size: int,
                 context_window: int, cache_capacity: int | None = None,
                 max_abs_embed: float | None = None) -> np.ndarray:
        """Raise InvalidRequest for anything the engine cannot run; return the prompt positions
        (sorted, int64) that take image rows. max_abs_embed: the largest magnitude of the engine's dtype
        (image rows beyond it would become infinite there)."""
        if not isinstance(self.request_id, str) or not self.request_id:
            raise InvalidRequest(f"request_id must be a non-empty string, got {self.request_id!r}")
        if not isinstance(self.sampling, SamplingParams):
            raise InvalidRequest(f"sampling must be a SamplingParams, got {type(self.sampling).__name__}")
        self.sampling.validate()
        ids = np.asarray(self.prompt_token_ids)
        if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
            raise InvalidRequest("prompt_token_ids must be a non-empty list of integer token ids")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise InvalidRequest(f"prompt_token_ids must lie in [0, {vocab_size - 1}] (the vocabulary), "
                                 f"got {lo if lo < 0 else hi}")
        for tid in self.sampling.stop_token_ids or ():
            if tid >= vocab_size:
                raise InvalidRequest(f"stop_token_ids must lie in [0, {vocab_size - 1}] (the vocabulary), got {tid}")
        n = ids.size
        if n >= context_window:
            raise InvalidRequest(f"the prompt has {n} tokens but the context window is {context_window} tokens "
                                 f"(max_position_embeddings); at most {context_window - 1} prompt tokens fit")
        if cache_capacity is not None and n >= cache_capacity:
            raise InvalidRequest(f"the prompt has {n} tokens but the KV cache holds only {cache_capacity} tokens; "
                                 f"at most {cache_capacity - 1} prompt tokens fit")
        if image_context_token_id is None:
            positions = np.zeros(0, dtype=np.int64)
        else:
            positions = np.flatnonzero(ids == image_context_token_id).astype(np.int64)
        rows = 0
        if self.image_embeds is not None:
            e = self.image_embeds
            if not isinstance(e, torch.Tensor) or e.ndim != 2 or e.shape[1] != hidden_size:
                shape = tuple(e.shape) if hasattr(e, "shape") else type(e).__name__
                raise InvalidRequest(f"image_embeds must be a tensor of shape (num_image_tokens, {hidden_size}), "
                                     f"got {shape}")
            if not e.is_floating_point():
                raise InvalidRequest(f"image_embeds must be floating point, got {e.dtype}")
            if not all_finite(e, max_abs_embed):  # NaN/inf would spread through attention to its KV
                beyond = "" if max_abs_embed is None else (f" or a value beyond ±{max_abs_embed:.4g}, the range "
                                                            "of the engine's dtype")
                raise InvalidRequest(f"image_embeds must be finite: it holds NaN or infinity{beyond}")
            if image_context_token_id is None:
                raise InvalidRequest("image_embeds given but the engine has no image_context_token_id")
            rows = e.shape[0]
        if rows != positions.size:
            raise InvalidRequest(f"image_embeds has {rows} rows but the prompt holds {positions.size} "
                                 f"<IMG_CONTEXT> tokens (id {image_context_token_id}); they must match")
        if self.image_hashes is not None:
            if self.image_embeds is None:
                raise InvalidRequest("image_hashes given without image_embeds")
            if (not isinstance(self.image_hashes, (tuple, list)) or not self.image_hashes
                    or not all(isinstance(h, (str, bytes)) and h for h in self.image_hashes)):
                raise InvalidRequest("image_hashes must be a non-empty tuple of non-empty str/bytes keys")
            if rows % len(self.image_hashes):
                raise InvalidRequest(f"image_embeds has {rows} rows, not divisible among "
                                     f"{len(self.image_hashes)} image_hashes")
        return positions


@dataclass
class RequestOutput:
    """One step's news for one request. new_token_ids: the tokens sampled this step (the final stop token
    included, as HF generate returns its EOS); text_delta: new text, "" with LLMEngine(detokenize=False)
    (all deltas concatenate to the card's `answer.split(stop)[0].strip()`: stripped once, in the
    detokenizer; stopping.AnswerText makes them); num_output_tokens counts every token generated so far.
    error: set when the engine failed this request (finish_reason 'abort', finished True)."""
    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    error: str | None = None
    # time.monotonic() when the engine first scheduled the request (CLOCK_MONOTONIC: comparable across
    # the machine's processes); None before that
    first_scheduled: float | None = None
