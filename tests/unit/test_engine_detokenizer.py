"""IncrementalDetokenizer with a SentencePiece-like fake tokenizer (a single-token decode loses the leading
space; a multi-byte character is split over byte tokens): the deltas concatenate to the card's
`text.split('</s>')[0].strip()`; stop strings across token boundaries end generation, text cut before."""
from __future__ import annotations

import random

import pytest

from internvl_serve.engine import FakeRunner, LLMEngine, Request, SamplingParams, SchedulerConfig
from internvl_serve.engine.detokenizer import IncrementalDetokenizer
from internvl_serve.prompt import INTERNVL_ZH

from fake_sentencepiece import PIECES, FakeSentencePiece, ids

TEMPLATE_STOP = INTERNVL_ZH.stop_strings  # ("</s>",): the engine is given it, as the serving path does


def run(token_ids, stop=()):
    d = IncrementalDetokenizer(FakeSentencePiece(), TEMPLATE_STOP + tuple(stop))
    deltas = []
    for t in token_ids:
        delta, stopped = d.update([t])
        deltas.append(delta)
        if stopped:
            return deltas, True
    deltas.append(d.finish())
    return deltas, False


def card(token_ids, stop=()):
    text = FakeSentencePiece().decode(token_ids, skip_special_tokens=True).lstrip()
    cuts = [i for i in (text.find(w) for w in ("</s>", *stop)) if i != -1]
    return (text[:min(cuts)] if cuts else text).strip()


def test_the_fake_tokenizer_behaves_like_sentencepiece():
    tok = FakeSentencePiece()
    assert tok.decode(ids("▁world")) == "world"
    assert tok.decode(ids("▁Hello", "▁world")) == "Hello world"
    assert tok.decode(ids("▁caf", "<0xC3>")) == "caf\ufffd"
    assert tok.decode(ids("▁caf", "<0xC3>", "<0xA9>")) == "café"


def test_leading_space_comes_from_the_cumulative_decode():
    deltas, _ = run(ids("▁Hello", "▁world", "!"))
    assert deltas == ["Hello", " world", "!", ""]


def test_split_multibyte_character_is_held_back_until_complete():
    deltas, _ = run(ids("▁caf", "<0xC3>", "<0xA9>", "ok"))
    assert deltas == ["caf", "", "é", "ok", ""]
    deltas, _ = run(ids("▁Hello", "▁", "<0xE2>", "<0x82>", "<0xAC>"))
    assert deltas == ["Hello", "", "", "", " €", ""]
    assert not any("\ufffd" in d for d in deltas)


def test_leading_whitespace_is_dropped_and_trailing_whitespace_held():
    deltas, _ = run(ids("<0x0A>", "▁", "▁Hello", "▁", "▁▁"))
    assert "".join(deltas) == "Hello" and deltas[:3] == ["", "", "Hello"]
    deltas, _ = run(ids("▁Hello", "▁", "▁world"))
    assert deltas == ["Hello", "", "  world", ""]


def test_stop_word_across_tokens_cuts_the_text_before_it():
    deltas, stopped = run(ids("▁Hello", "▁ST", "OP", "▁world"), stop=("STOP",))
    assert stopped and deltas == ["Hello", ""] + [""] and "".join(deltas) == "Hello"


def test_held_stop_prefix_is_released_when_it_does_not_complete():
    deltas, stopped = run(ids("▁Hello", "▁ST", "ar"), stop=("STOP",))
    assert not stopped and deltas == ["Hello", "", " STar", ""]


def test_stop_word_inside_one_token():
    deltas, stopped = run(ids("▁Hello", "xSTOPy", "▁world"), stop=("STOP",))
    assert stopped and "".join(deltas) == "Hellox"


def test_the_template_stop_string_in_the_text_stops():
    deltas, stopped = run(ids("▁Hello", "▁</", "s>", "▁world"))
    assert stopped and "".join(deltas) == "Hello"
    deltas, stopped = run(ids("▁ok", "▁</s>"))
    assert stopped and "".join(deltas) == "ok"


def test_no_stop_string_is_built_in():
    """The stop strings are the request's (the template's come with it), not the detokenizer's."""
    d = IncrementalDetokenizer(FakeSentencePiece())
    text = "".join(d.update([t])[0] for t in ids("▁ok", "▁</s>", "▁ok")) + d.finish()
    assert text == "ok </s> ok" and not d.stopped


@pytest.mark.parametrize("seed", range(40))
def test_random_sequences_concatenate_to_the_card_text(seed):
    rng = random.Random(seed)
    pool = list(range(3, len(PIECES)))
    token_ids = [rng.choice(pool) for _ in range(rng.randrange(1, 25))]
    stop = tuple(rng.sample(["STOP", "d!", "\n", "ST ok", "é"], rng.randrange(0, 3)))
    deltas, stopped = run(token_ids, stop)
    consumed = token_ids[: len(deltas) - (0 if stopped else 1)]
    assert "".join(deltas) == card(consumed, stop)
    assert "".join(deltas) == card(token_ids, stop)  # stopping early never changes the answer
    assert not any(w in "".join(deltas) for w in ("</s>", *stop))


def test_engine_streams_text_and_stops_on_stop_words_and_eos():
    script = {"a": ids("▁Hello", "▁world", "▁ST", "OP", "!"), "b": ids("▁caf", "<0xC3>", "<0xA9>") + [2, 5],
              "c": ids("▁ok", "▁", "▁ok", "▁", "▁")}
    prompts = {"a": [7, 7, 7], "b": [8, 8], "c": [9]}

    def next_token(ctx):
        rid = {7: "a", 8: "b", 9: "c"}[ctx[0]]
        return script[rid][len(ctx) - len(prompts[rid])]

    engine = LLMEngine(FakeRunner(next_token=next_token, vocab_size=len(PIECES), eos_token_id=2),
                       FakeSentencePiece(), eos_token_id=2, scheduler_config=SchedulerConfig())
    res = engine.generate([Request("a", prompts["a"], None, SamplingParams(stop=("STOP",))),
                           Request("b", prompts["b"], None, SamplingParams()),
                           Request("c", prompts["c"], None, SamplingParams(max_tokens=5))])
    text = {k: "".join(o.text_delta for o in v) for k, v in res.items()}
    assert text == {"a": "Hello world", "b": "café", "c": "ok  ok"}
    assert [o.finish_reason for o in (res["a"][-1], res["b"][-1], res["c"][-1])] == ["stop", "stop", "length"]
    assert res["a"][-1].num_output_tokens == 4  # ST, OP generated; generation ended at the stop word
    assert [t for o in res["b"] for t in o.new_token_ids] == ids("▁caf", "<0xC3>", "<0xA9>") + [2]
    assert res["b"][1].text_delta == ""  # the half character was held back


def test_ignore_eos_generates_max_tokens_past_eos():
    script = ids("▁caf", "<0xC3>", "<0xA9>") + [2, 5, 5, 5, 5]
    prompt = [8, 8]

    def next_token(ctx):
        return script[len(ctx) - len(prompt)]

    engine = LLMEngine(FakeRunner(next_token=next_token, vocab_size=len(PIECES), eos_token_id=2),
                       FakeSentencePiece(), eos_token_id=2, scheduler_config=SchedulerConfig())
    res = engine.generate([Request("x", prompt, None, SamplingParams(max_tokens=6, ignore_eos=True)),
                           Request("y", prompt, None, SamplingParams(max_tokens=6))])
    assert res["x"][-1].finish_reason == "length" and res["x"][-1].num_output_tokens == 6
    assert [t for o in res["x"] for t in o.new_token_ids] == script[:6]
    assert res["y"][-1].finish_reason == "stop" and res["y"][-1].num_output_tokens == 4


def test_ignore_eos_must_be_a_bool():
    import pytest
    from internvl_serve.engine.errors import InvalidRequest
    with pytest.raises(InvalidRequest, match="ignore_eos must be a bool"):
        SamplingParams(ignore_eos=1).validate()


class WholeDecodes:
    """A tokenizer that offers only the whole decode (no decode_continuation), and counts its calls."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def decode(self, token_ids, skip_special_tokens=True):
        self.calls += 1
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


class CountingDecodes(WholeDecodes):
    def decode_continuation(self, token_ids):
        return self.tokenizer.decode_continuation(token_ids)


def deltas_of(tokenizer, chunks, stop):
    d = IncrementalDetokenizer(tokenizer, TEMPLATE_STOP + tuple(stop))
    deltas = []
    for chunk in chunks:
        delta, stopped = d.update(chunk)
        deltas.append(delta)
        if stopped:
            return deltas
    return deltas + [d.finish()]


@pytest.mark.parametrize("seed", range(60))
def test_continuations_give_the_deltas_of_whole_decodes(tiny_tokenizer, seed):
    """With the checkpoint tokenizer's decode_continuation, every update's delta is the one that decoding
    all the ids gives, over random ids (byte pieces, spaces, special and added ids among them) in random
    chunks; and the deltas concatenate to the card's text."""
    rng = random.Random(seed)
    vocab = len(tiny_tokenizer)
    pool = list(range(vocab)) + [tiny_tokenizer.convert_tokens_to_ids("▁")] * 50 + list(range(3, 259)) * 2
    token_ids = [rng.choice(pool) for _ in range(rng.randrange(1, 60))]
    if seed % 3:  # most answers hold no added token (the checkpoint's are all special: skipped)
        token_ids = [t for t in token_ids if t < tiny_tokenizer.vocab_size]
    chunks, i = [], 0
    while i < len(token_ids):
        n = rng.choice([1, 1, 1, 2, 3])
        chunks.append(token_ids[i:i + n])
        i += n
    stop = tuple(rng.sample(["a", "in", "\n", "图片"], rng.randrange(0, 2)))
    fast = deltas_of(tiny_tokenizer, chunks, stop)
    assert fast == deltas_of(WholeDecodes(tiny_tokenizer), chunks, stop)
    text = tiny_tokenizer.decode(token_ids).lstrip()
    cuts = [j for j in (text.find(w) for w in ("</s>", *stop)) if j != -1]
    assert "".join(fast) == (text[:min(cuts)] if cuts else text).strip()


def test_a_long_answer_is_not_decoded_whole_at_every_token(tiny_tokenizer):
    """Work done: 400 tokens one at a time decode all the ids only while the text is empty, not per token
    (O(n^2) before: at 64 streams the senders' decodes held the GIL longer than the engine's own work)."""
    text = "这张图片 shows a cat on a mat, café 😀 and 12 dogs. " * 30
    token_ids = tiny_tokenizer.encode(text, add_special_tokens=False)[:400]
    assert len(token_ids) == 400 and any(3 <= t < 259 for t in token_ids)  # byte pieces among them
    counting = CountingDecodes(tiny_tokenizer)
    deltas = deltas_of(counting, [[t] for t in token_ids], ())
    assert "".join(deltas) == tiny_tokenizer.decode(token_ids).strip()
    assert counting.calls <= 2
    whole = WholeDecodes(tiny_tokenizer)
    assert deltas_of(whole, [[t] for t in token_ids], ()) == deltas and whole.calls == 400
