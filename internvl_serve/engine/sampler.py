"""Sampler: logits (S, vocab) -> one token per row, as a chain of small named functions.

    apply_min_tokens -> apply_repetition_penalty -> greedy argmax (rows with temperature 0)
                             -> apply_temperature -> apply_top_k -> apply_top_p -> sample (other rows)

HF semantics throughout (RepetitionPenaltyLogitsProcessor over the tokens generated so far only, since
the card's generate runs on inputs_embeds; TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper).
Each sampled row draws from its own torch.Generator, seeded from the request's seed, so a request's
tokens do not depend on which other requests share its batch. Greedy and sampled rows share one batch.

apply_min_tokens masks the end tokens (EOS, and a request's stop token ids) of rows that have generated
fewer than their min_tokens (TensorRT-LLM's min_length, vLLM's min_tokens), so they cannot end early.

Does not own: the generators' lifetime (runner.py keeps one per request), stop conditions and which
tokens end a request (stopping.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from internvl_serve.engine.host_copy import to_device
from internvl_serve.engine.stopping import end_token_ids as request_end_token_ids


@dataclass
class SamplingBatch:
    """Per-row sampling inputs, on the logits' device; a step reads only those it needs, so only those are
    built: temperature/top_k/top_p unless every row is greedy, the penalty where one applies."""
    temperature: torch.Tensor | None   # (S,) float32; 0 = greedy; None when all_greedy
    top_k: torch.Tensor | None         # (S,) int64; 0 = off; None when all_greedy
    top_p: torch.Tensor | None         # (S,) float32; 1 = off; None when all_greedy
    repetition_penalty: torch.Tensor | None  # (S,) float32; 1 = off; None unless any_penalty
    generators: list[torch.Generator | None]  # one per row; None for greedy rows
    output_ids: torch.Tensor | None = None    # (S, N) int64 generated tokens, padded by repeating one
    all_greedy: bool = False
    any_top_k: bool = False
    any_top_p: bool = False
    any_penalty: bool = False
    end_mask: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, token ids) set to -inf (min_tokens)

    @classmethod
    def build(cls, params: list, output_token_ids: list[list[int]], generators: list, device,
              num_generated: list[int] | None = None, end_token_ids=()) -> "SamplingBatch":
        """params: SamplingParams per row; output_token_ids: the tokens each row generated so far (may be
        empty where no penalty needs them); num_generated: how many each row generated so far;
        end_token_ids: the model's end tokens (EOS) masked in rows below their min_tokens."""
        to = lambda t: to_device(t, device)  # noqa: E731
        all_greedy = all(p.temperature == 0 for p in params)
        temperature = top_k = top_p = penalty = output_ids = None
        if not all_greedy:
            temperature = to(torch.tensor([p.temperature for p in params], dtype=torch.float32))
            top_k = to(torch.tensor([p.top_k for p in params], dtype=torch.int64))
            top_p = to(torch.tensor([p.top_p for p in params], dtype=torch.float32))
        any_penalty = any(p.repetition_penalty != 1.0 and out for p, out in zip(params, output_token_ids))
        if any_penalty:
            penalty = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32)
            width = max(len(out) for out in output_token_ids)
            rows = []
            for p, out in zip(params, output_token_ids):
                if p.repetition_penalty == 1.0 or not out:
                    rows.append([0] * width)  # penalty 1 (set below for empty rows) leaves row unchanged
                else:
                    rows.append(out + [out[0]] * (width - len(out)))  # repeats are harmless (HF gathers too)
            output_ids = to(torch.tensor(rows, dtype=torch.int64))
            penalty = to(torch.where(torch.tensor([bool(out) for out in output_token_ids]), penalty,
                                     torch.ones_like(penalty)))
        return cls(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty,
                   generators=generators, output_ids=output_ids, all_greedy=all_greedy,
                   any_top_k=any(p.top_k > 0 and p.temperature > 0 for p in params),
                   any_top_p=any(p.top_p < 1.0 and p.temperature > 0 for p in params),
                   any_penalty=any_penalty,
                   end_mask=min_tokens_mask(params, num_generated, end_token_ids, device))


def min_tokens_mask(params: list, num_generated: list[int] | None, end_token_ids,
                    device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows, token ids) to mask: every end token of each row that generated fewer than its min_tokens.
    A row's end tokens are stopping.end_token_ids: its request's stop_token_ids (the conversation
    template's), or the engine's `end_token_ids` (its EOS) when the request gives none."""
    if num_generated is None:
        return None
    rows, ids = [], []
    for i, (p, n) in enumerate(zip(params, num_generated)):
        if n < p.min_tokens:
            for t in sorted(set(request_end_token_ids(p, end_token_ids))):
                rows.append(i)
                ids.append(t)
    if not rows:
        return None
    return (torch.tensor(rows, dtype=torch.int64, device=device), torch.tensor(ids, dtype=torch.int64, device=device))


def apply_min_tokens(logits: torch.Tensor, end_mask: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Set logits[row, token] to -inf for each (row, token) pair of the mask (a copy)."""
    rows, ids = end_mask
    return logits.index_put((rows, ids), torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))


def apply_repetition_penalty(logits: torch.Tensor, output_ids: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF: for every token already generated, logit < 0 ? logit * p : logit / p (once per token)."""
    score = logits.gather(1, output_ids)
    p = penalty[:, None]
    score = torch.where(score < 0, score * p, score / p)
    return logits.scatter(1, output_ids, score)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return logits / t[:, None]


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value kept, as HF); k = 0: row untouched."""
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    sorted_desc = logits.sort(dim=-1, descending=True).values
    kth = sorted_desc.gather(1, (k - 1)[:, None])
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """HF TopPLogitsWarper per row: drop the smallest tokens whose cumulative probability <= 1 - p,
    keeping at least the most likely one; p = 1: row untouched."""
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)[:, None]
    remove[:, -1] = False
    remove &= (top_p < 1.0)[:, None]
    remove = remove.scatter(1, sorted_idx, remove)
    return logits.masked_fill(remove, float("-inf"))


def sample(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row by the exponential race (argmax p / E, E ~ Exp(1)), which samples p exactly.
    Row i draws its noise from generators[i] only; rows without a generator get argmax."""
    q = torch.ones_like(probs)
    for i, g in enumerate(generators):
        if g is not None:
            q[i].exponential_(generator=g)
    return (probs / q).argmax(dim=-1)


def sample_tokens(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits (S, vocab) fp32 -> (S,) int64 token ids."""
    if batch.end_mask is not None:
        logits = apply_min_tokens(logits, batch.end_mask)
    if batch.any_penalty:
        logits = apply_repetition_penalty(logits, batch.output_ids, batch.repetition_penalty)
    greedy = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy
    logits = apply_temperature(logits, batch.temperature)
    if batch.any_top_k:
        logits = apply_top_k(logits, batch.top_k)
    if batch.any_top_p:
        logits = apply_top_p(logits, batch.top_p)
    sampled = sample(logits.softmax(dim=-1), batch.generators)
    return torch.where(batch.temperature == 0, greedy, sampled)
