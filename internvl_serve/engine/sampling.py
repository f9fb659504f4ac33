"""SamplingParams: how one request picks its tokens (the card's generate options, per request).

Owns the values and their allowed ranges (validate: InvalidRequest with `field` set), including how the
answer ends: `stop_token_ids` (the conversation template's stop token, which replaces the LLM config's EOS
as in the card's generate) and `stop` strings (the template's and the client's). Does not own the sampling
math (sampler.py), the decision to finish (stopping.py), the stop-string matching (detokenizer.py), which
template's stops a request gets (the serving path reads them from prompt.py's template: `ending_with`), or
the wire names and defaults of the inputs that fill these fields (serving/contract.py GENERATION, tested
to agree with validate).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

from internvl_serve.engine.errors import InvalidRequest

MAX_STOP_WORDS = 32      # the serving contract's 16 client stop words plus the template's own
MAX_STOP_TOKEN_IDS = 16
MAX_SEED = 2**64 - 1
# A positive temperature below this is greedy: logits / 1e-45 overflow to inf and softmax gives NaN,
# while the limit of sampling as the temperature goes to 0 is the argmax (vLLM's _SAMPLING_EPS).
MIN_TEMPERATURE = 1e-5


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 1024           # new tokens at most (also capped by the context window)
    temperature: float = 0.0         # 0 (or below MIN_TEMPERATURE) -> greedy (the card's do_sample=False)
    top_p: float = 1.0               # (0, 1]; 1 -> off
    top_k: int = 0                   # 0 -> off
    repetition_penalty: float = 1.0  # HF semantics over the generated tokens; 1 -> off
    seed: int = 0                    # seed of this request's own torch.Generator
    stop: tuple[str, ...] = ()       # stop strings: the answer ends before the first one (the text is cut)
    # tokens that end the answer (kept in the output ids, as HF generate keeps its EOS; not in the text).
    # None: the engine's eos_token_id (the LLM config's, HF generate's default); the serving path always
    # passes the conversation template's (`ending_with`), as the card's chat() does.
    stop_token_ids: tuple[int, ...] | None = None
    ignore_eos: bool = False         # benchmarks: the stop tokens do not end the answer (vLLM's ignore_eos)
    min_tokens: int = 0              # the stop tokens are masked until this many were generated

    def __post_init__(self):
        for name in ("stop", "stop_token_ids"):  # keep the dataclass hashable
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if _is_real(self.temperature) and 0 < self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature", 0.0)  # greedy (see MIN_TEMPERATURE)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def ending_with(self, stop: tuple[str, ...], stop_token_ids: tuple[int, ...]) -> "SamplingParams":
        """These params with a conversation template's end of answer: its stop token ids, and its stop
        strings ahead of the client's (duplicates dropped)."""
        return replace(self, stop=tuple(dict.fromkeys(tuple(stop) + tuple(self.stop))),
                       stop_token_ids=tuple(stop_token_ids))

    def validate(self) -> "SamplingParams":
        """Raise InvalidRequest naming the first field out of range; return self when all are valid."""
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise InvalidRequest(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}", "min_tokens")
        if self.min_tokens > self.max_tokens:
            raise InvalidRequest(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})",
                                 "min_tokens")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequest(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}",
                                 "temperature")
        if not _is_real(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidRequest(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}", "top_k")
        if (not _is_real(self.repetition_penalty) or not math.isfinite(self.repetition_penalty)
                or self.repetition_penalty <= 0):
            raise InvalidRequest(f"repetition_penalty must be a finite number > 0 (1 = off), "
                                 f"got {self.repetition_penalty!r}", "repetition_penalty")
        if not _is_int(self.seed) or not (0 <= self.seed <= MAX_SEED):
            raise InvalidRequest(f"seed must be an integer in [0, 2**64-1], got {self.seed!r}", "seed")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequest(f"ignore_eos must be a bool, got {self.ignore_eos!r}", "ignore_eos")
        if not isinstance(self.stop, tuple):
            raise InvalidRequest(f"stop must be a tuple of strings, got {type(self.stop).__name__}", "stop")
        if len(self.stop) > MAX_STOP_WORDS:
            raise InvalidRequest(f"stop holds {len(self.stop)} strings; at most {MAX_STOP_WORDS} allowed", "stop")
        for i, word in enumerate(self.stop):
            if not isinstance(word, str) or not word:
                raise InvalidRequest(f"stop[{i}] must be a non-empty string, got {word!r}", "stop")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, tuple) or len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
                raise InvalidRequest(f"stop_token_ids must be a tuple of at most {MAX_STOP_TOKEN_IDS} token ids, "
                                     f"got {self.stop_token_ids!r}", "stop_token_ids")
            for i, tid in enumerate(self.stop_token_ids):
                if not _is_int(tid) or tid < 0:
                    raise InvalidRequest(f"stop_token_ids[{i}] must be a token id (an integer >= 0), got {tid!r}",
                                         "stop_token_ids")
        return self
