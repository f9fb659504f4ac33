"""A SentencePiece-like fake tokenizer for detokenizer / stop / response tests: a single-token decode loses
the leading space; a multi-byte character is split over byte tokens; ids 0..2 are <unk>, <s>, </s>."""
from __future__ import annotations

PIECES = ["<unk>", "<s>", "</s>", "▁Hello", "▁world", "!", "<0xC3>", "<0xA9>", "▁caf", "▁", "<0x0A>", "ST",
          "OP", "▁ST", "</", "s>", "xSTOPy", "ar", "▁▁", "<0xE2>", "<0x82>", "<0xAC>", "ok", "▁</s>", "▁ok", "▁</"]
ID = {p: i for i, p in enumerate(PIECES)}
SPECIAL = {0, 1, 2}


class FakeSentencePiece:
    """decode joins pieces ('▁' -> ' '), merges <0xNN> byte pieces as UTF-8 (invalid -> '\\ufffd') and
    drops the one leading space of the text, as SentencePiece does."""
    eos_token_id = 2

    def __init__(self):
        self.calls = []

    def decode(self, ids, skip_special_tokens=False):
        self.calls.append(len(ids))
        out, buf = [], bytearray()
        for i in ids:
            if skip_special_tokens and i in SPECIAL:
                continue
            p = PIECES[i]
            if p.startswith("<0x"):
                buf.append(int(p[3:5], 16))
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf.clear()
            out.append(p.replace("▁", " "))
        out.append(buf.decode("utf-8", errors="replace"))
        text = "".join(out)
        return text[1:] if text.startswith(" ") else text


def ids(*pieces):
    return [ID[p] for p in pieces]
