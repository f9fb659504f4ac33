"""The end of an answer: where one request's generation ends, and the text that goes with it.

Every rule is written here once, in two halves (the engine needs the first without a tokenizer):

StopChecker (token level; the engine, for every request): per new token, in this order
  1. a stop token (SamplingParams.stop_token_ids: the conversation template's, e.g. '</s>' for V1-1,
     '<|im_end|>' for ChatML; None: the engine's eos_token_id) -> "stop", unless ignore_eos;
  2. the request's token limit (max_tokens, the context window) -> "length".
  The stop token itself is kept in the output ids (as HF generate keeps its EOS).

AnswerText (text level; whoever detokenizes: the engine itself with LLMEngine(detokenize=True), the
serving path's sender threads with detokenize=False, serving/llm.py): given the new tokens and the
engine's finish reason for them (StopChecker's, or 'abort'), the text delta and the final reason:
  - a stop token is never part of the text; it ends the answer and the rest of the text is flushed;
  - a stop string in the text (the template's and the client's) -> "stop", the text cut before it,
    even when the token also reached the limit (checked between 1. and 2. above);
  - "length": the rest of the text (held-back whitespace, a stop-string prefix) is flushed;
  - "abort": no flush (what was held back is dropped, as for a cancelled answer).
  The serving path gets "stop" from a stop string before the engine knows: it tells the engine to
  finish the sequence (EngineThread.abort(id, "stop")); tokens generated meanwhile are never sent.
  Deltas from one token at a time or from coalesced tokens concatenate to the same text.

min_tokens: the sampler masks the same stop tokens (end_token_ids, also with ignore_eos) below it
(sampler.py), so no stop token arrives early; stop strings still stop.

Does not own: which stops a request has (the template in prompt.py, passed by the serving path in
SamplingParams), decoding and the stop-string search itself (detokenizer.py), freeing the request
(engine.py), turning texts into responses (serving/llm.py).
"""
from __future__ import annotations

from typing import Sequence

from internvl_serve.engine.detokenizer import IncrementalDetokenizer
from internvl_serve.engine.request import FinishReason
from internvl_serve.engine.sampling import SamplingParams


def end_token_ids(sampling: SamplingParams, default: tuple[int, ...]) -> tuple[int, ...]:
    """The tokens that end this request: its stop_token_ids (the conversation template's), or `default`
    (the engine's EOS) when it gives none. ignore_eos aside, StopChecker finishes on them and the sampler
    masks them below min_tokens (sampler.min_tokens_mask)."""
    return tuple(sampling.stop_token_ids) if sampling.stop_token_ids is not None else tuple(default)


class StopChecker:
    """The token-level end of one request: stop tokens and the length limit (no text)."""

    def __init__(self, sampling: SamplingParams, *, default_stop_token_ids: tuple[int, ...] = ()):
        """default_stop_token_ids: used when sampling.stop_token_ids is None (the engine's EOS)."""
        ids = end_token_ids(sampling, default_stop_token_ids)
        self.stop_token_ids = frozenset() if sampling.ignore_eos else frozenset(ids)

    def check(self, token: int, *, at_limit: bool) -> FinishReason | None:
        """One new token -> its finish reason or None. at_limit: this token is the last the request may have."""
        if token in self.stop_token_ids:
            return "stop"
        return "length" if at_limit else None


class AnswerText:
    """The text-level end of one request: text deltas, stop strings and the final flush."""

    def __init__(self, tokenizer, sampling: SamplingParams):
        self.detokenizer = IncrementalDetokenizer(tokenizer, sampling.stop)

    @property
    def text(self) -> str:
        """All the text given out so far."""
        return self.detokenizer.text

    def update(self, token_ids: Sequence[int], reason: FinishReason | None) -> tuple[str, FinishReason | None]:
        """New tokens of the answer, in order, and the engine's finish reason at the last of them (None:
        not finished) -> (text delta, finish reason or None). A stop string overrides the engine's
        reason ("stop"); after a reason, the delta holds the rest of the text."""
        if reason == "stop":  # the last token is a stop token: not part of the text
            token_ids = token_ids[:-1]
        delta = ""
        if token_ids:
            delta, stopped = self.detokenizer.update(list(token_ids))
            if stopped:  # the delta already holds the rest of the text
                return delta, "stop"
        if reason in ("stop", "length"):
            delta += self.detokenizer.finish()
        return delta, reason
