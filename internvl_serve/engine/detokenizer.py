"""IncrementalDetokenizer: text deltas of one request from the cumulative decode of all its tokens.

The text is that of one decode of ALL generated ids (`tokenizer.decode(ids, skip_special_tokens=True)`),
never of a token decoded alone: SentencePiece drops a piece's leading space at the start of a decode, and
a multi-byte character split across byte-fallback tokens only decodes whole. A tokenizer with
`decode_continuation` (tokenizer.py's) gives that text without decoding it all again at each token: the
text of the tokens up to the last whole character is kept, and only the tokens after it are decoded, after
it; without one, or after a token it declines, every update decodes all the ids. The emitted text is the
stable part of that decode, so that all deltas concatenate to the card's post-processing,
`full_text.split(stop)[0].strip()`, with generation ending at the first stop string (the text is cut
before it). The stop strings are the request's (SamplingParams.stop: the conversation template's, e.g.
'</s>', and the client's); none is built in. Held back until later: leading whitespace (until text
starts), trailing whitespace (until more text follows), a trailing incomplete UTF-8 character
('\\ufffd'), and any suffix that could be the start of a stop string.

This is the one place where the answer is stripped: everything downstream (serving/llm.py's
ResponseStream, the clients) passes the deltas on unchanged.

Cost: with `decode_continuation`, the new tokens' pieces per update (while a character is split, the
tokens since it began), plus string copies of the text; without it, one decode of the whole answer per
update, O(n^2) over a request, which at 64 streams kept the llm's sender threads longer on the GIL than
the engine thread's own work (bench/results/h100-2026-12-06, engine-steps-ae12b56).

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
        # decode(token_ids[:_kept_ids]) == _kept_text, kept only where decode_continuation may follow it
        self._continuation = getattr(tokenizer, "decode_continuation", None)
        self._kept_ids, self._kept_text = 0, ""
        self.emitted = ""       # concatenation of all deltas so far
        self._text = ""         # current stripped-left, stop-cut text candidate
        self.stopped = False    # a stop string was found
        self.finished = False

    @property
    def text(self) -> str:
        return self.emitted

    def _decode(self) -> str:
        """decode(all ids so far)."""
        after = None
        if self._continuation is not None:
            after = self._continuation(self.token_ids[self._kept_ids:])
            if after is None:  # a token whose text depends on its neighbours: decode all from now on
                self._continuation = None
        if after is None or not self._kept_text:  # at the start a decode strips a space: not a continuation
            text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        else:
            text = self._kept_text + after
        if self._continuation is not None and not text.endswith("\ufffd"):  # ends on a whole character
            self._kept_ids, self._kept_text = len(self.token_ids), text
        return text

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
