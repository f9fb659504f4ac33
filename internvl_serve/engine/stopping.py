"""StopChecker: when one request's answer ends, and the text that goes with each new token.

The end of an answer is decided here, per token, in this order:
  1. a stop token (SamplingParams.stop_token_ids: the conversation template's, e.g. '</s>' for V1-1,
     '<|im_end|>' for ChatML; None: the engine's eos_token_id) -> "stop", unless ignore_eos;
  2. a stop string in the decoded text (the template's and the client's; detokenizer.py) -> "stop",
     the text cut before it;
  3. the request's token limit (max_tokens, the context window) -> "length".
The stop token itself is kept in the output ids (as HF generate keeps its EOS) but never decoded.

Owns: that decision. Does not own: which stops a request has (the template in prompt.py, passed by the
serving path in SamplingParams), the text itself (detokenizer.py), freeing the request (engine.py).
"""
from __future__ import annotations

from internvl_serve.engine.detokenizer import IncrementalDetokenizer
from internvl_serve.engine.request import FinishReason
from internvl_serve.engine.sampling import SamplingParams


class StopChecker:
    def __init__(self, sampling: SamplingParams, tokenizer=None, *, default_stop_token_ids: tuple[int, ...] = ()):
        """tokenizer: None for a token-only engine (no text, no stop strings);
        default_stop_token_ids: used when sampling.stop_token_ids is None (the engine's EOS)."""
        ids = sampling.stop_token_ids if sampling.stop_token_ids is not None else default_stop_token_ids
        self.stop_token_ids = frozenset() if sampling.ignore_eos else frozenset(ids)
        self.detokenizer = None if tokenizer is None else IncrementalDetokenizer(tokenizer, sampling.stop)

    def update(self, token: int, *, at_limit: bool) -> tuple[str, FinishReason | None]:
        """One new token -> (text delta, finish reason or None). at_limit: this token is the last the
        request may have. After a reason, the delta holds the rest of the text."""
        delta, reason = "", None
        if token in self.stop_token_ids:
            reason = "stop"
        elif self.detokenizer is not None:
            delta, stopped = self.detokenizer.update([token])
            reason = "stop" if stopped else None
        if reason is None and at_limit:
            reason = "length"
        if reason is not None and self.detokenizer is not None:
            delta += self.detokenizer.finish()
        return delta, reason
