"""IncrementalDetokenizer: text deltas of one request from the cumulative decode of all its tokens.

Every update decodes ALL generated ids at once (`tokenizer.decode(ids, skip_special_tokens=True)`),
never token by token: SentencePiece drops a piece's leading space at the start of a decode, and a
multi-byte character split across byte-fallback tokens only decodes whole. The emitted text is the
stable part of that decode, so that all deltas concatenate to the card's post-processing,
`full_text.split(stop)[0].strip()`, with generation ending at the first stop string (the text is cut
before it). The stop strings are the request's (SamplingParams.stop: the conversation template's, e.g.
'</s>', and the client's); none is built in. Held back until later: leading whitespace (until text
starts), trailing whitespace (until more text follows), a trailing incomplete UTF-8 character
('\\ufffd'), and any suffix that could be the start of a stop string.

This is the one place where the answer is stripped: everything downstream (serving/llm.py's
ResponseStream, the clients) passes the deltas on unchanged.

Cost: one decode of the whole output per token, O(n^2) characters over a request; fine for
answers of a few thousand tokens with SentencePiece's C++ decode.

Does not own: the tokenizer (injected), which stop strings a request has (prompt.py's template, the
client), when an answer ends: stop tokens (never decoded), the length limit and when to flush (stopping.py;
its AnswerText is the one user of this class, in the engine and in the serving path alike).
"""
from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(dict.fromkeys(stop))  # unique, in order
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self.token_ids: list[int] = []
        self.emitted = ""       # concatenation of all deltas so far
        self._text = ""         # current stripped-left, stop-cut text candidate
        self.stopped = False    # a stop string was found
        self.finished = False

    @property
    def text(self) -> str:
        return self.emitted

    def _decode(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)

    def _find_stop(self, text: str) -> int:
        """Earliest start of a stop string in text (searching only where one can still start), or -1."""
        lo = max(0, len(self.emitted) - self._max_stop + 1)
        best = -1
        for word in self.stop:
            i = text.find(word, lo)
            if i != -1 and (best == -1 or i < best):
                best = i
        return best

    def _stable_end(self, text: str) -> int:
        """How much of text can be emitted now."""
        end = len(text)
        while end and text[end - 1] == "\ufffd":  # incomplete UTF-8 tail
            end -= 1
        for word in self.stop:                     # a suffix that may grow into a stop string
            for k in range(min(len(word) - 1, len(text)), 0, -1):
                if text.endswith(word[:k]):
                    end = min(end, len(text) - k)
                    break
        end = len(text[:end].rstrip())             # trailing whitespace waits for more text
        return max(end, len(self.emitted))

    def update(self, new_token_ids: list[int]) -> tuple[str, bool]:
        """Add tokens; return (delta, stopped). After stopped, the caller finishes the request (the delta
        already holds the rest of the text)."""
        if self.finished:
            raise RuntimeError("update after finish")
        self.token_ids.extend(new_token_ids)
        text = self._decode().lstrip()
        cut = self._find_stop(text)
        if cut != -1:
            self.stopped = True
            self._text = text[:cut]
            return self.finish(), True
        self._text = text
        end = self._stable_end(text)
        delta = text[len(self.emitted):end]
        self.emitted += delta
        return delta, False

    def finish(self) -> str:
        """The last delta: the rest of the text, trailing whitespace dropped."""
        if self.finished:
            return ""
        self.finished = True
        final = self._text.rstrip()
        if not final.startswith(self.emitted):  # a tokenizer whose decode is not prefix-stable:
            return ""                           # text already sent cannot be taken back
        delta = final[len(self.emitted):]
        self.emitted = final
        return delta
