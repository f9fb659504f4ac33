"""The end of an answer belongs to the conversation template: the request carries the template's stop
token ids and stop strings (SamplingParams.ending_with), and the engine finishes on them, not on the LLM
config's EOS; a second template (Hermes-2, ChatML) needs only its entry in prompt.py."""
from __future__ import annotations

import pytest

from internvl_serve.engine import FakeRunner, LLMEngine, Request, SamplingParams, SchedulerConfig
from internvl_serve.engine.errors import InvalidRequest
from internvl_serve.prompt import HERMES_2, build_prompt

from fake_sentencepiece import PIECES, FakeSentencePiece, ids

CONFIG_EOS = 2  # '</s>': the runner's (LLM config's) eos_token_id in these tests


def scripted_engine(script: list[int], prompt_len: int, tokenizer, vocab_size: int) -> LLMEngine:
    """An engine whose model answers `script` token by token (whatever the prompt), EOS 2 in its config."""
    def next_token(ctx):
        return script[len(ctx) - prompt_len]

    runner = FakeRunner(next_token=next_token, vocab_size=vocab_size, eos_token_id=CONFIG_EOS)
    return LLMEngine(runner, tokenizer, scheduler_config=SchedulerConfig())


def run_one(engine: LLMEngine, prompt: list[int], sampling: SamplingParams):
    outs = engine.generate([Request("r", prompt, None, sampling)])["r"]
    tokens = [t for o in outs for t in o.new_token_ids]
    return tokens, "".join(o.text_delta for o in outs), outs[-1].finish_reason


def test_the_request_stop_token_ends_the_answer_not_the_config_eos():
    """A template whose stop token (here '!') differs from the config's EOS: generation runs past the EOS
    (as the card's generate does, whose eos_token_id is the template's) and stops on the template's."""
    script = ids("▁Hello") + [CONFIG_EOS] + ids("▁world", "!", "▁ok", "▁ok")
    engine = scripted_engine(script, 2, FakeSentencePiece(), len(PIECES))
    sampling = SamplingParams(max_tokens=10).ending_with((), (PIECES.index("!"),))
    tokens, text, reason = run_one(engine, [7, 7], sampling)
    assert tokens == script[:4] and reason == "stop"
    assert text == "Hello world"  # the stop token ends the answer and is not part of the text


def test_without_stop_token_ids_the_engine_eos_ends_the_answer():
    script = ids("▁Hello") + [CONFIG_EOS] + ids("▁world")
    engine = scripted_engine(script, 1, FakeSentencePiece(), len(PIECES))
    tokens, text, reason = run_one(engine, [7], SamplingParams(max_tokens=10))
    assert tokens == script[:2] and text == "Hello" and reason == "stop"


def test_ignore_eos_ignores_the_template_stop_token():
    script = ids("▁Hello", "!", "▁ok", "▁ok")
    engine = scripted_engine(script, 1, FakeSentencePiece(), len(PIECES))
    sampling = SamplingParams(max_tokens=4, ignore_eos=True).ending_with((), (PIECES.index("!"),))
    tokens, text, reason = run_one(engine, [7], sampling)
    assert tokens == script and reason == "length" and text == "Hello! ok ok"


def test_ending_with_puts_the_template_stops_first_and_keeps_the_clients():
    s = SamplingParams(stop=("STOP", "</s>")).ending_with(("</s>",), (2,))
    assert s.stop == ("</s>", "STOP") and s.stop_token_ids == (2,)


@pytest.mark.parametrize("value, message", [
    ((-1,), r"stop_token_ids\[0\] must be a token id"),
    (("2",), r"stop_token_ids\[0\] must be a token id"),
    (tuple(range(17)), "stop_token_ids must be a tuple of at most 16"),
    ((len(PIECES),), rf"stop_token_ids must lie in \[0, {len(PIECES) - 1}\]"),
])
def test_bad_stop_token_ids_are_refused(value, message):
    engine = scripted_engine(ids("▁ok"), 1, FakeSentencePiece(), len(PIECES))
    with pytest.raises(InvalidRequest, match=message):
        engine.validate_request(Request("r", [7], None, SamplingParams(stop_token_ids=value)))


# ---- a second template: Hermes-2 (ChatML) ------------------------------------------------------------
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


@pytest.fixture(scope="module")
def chatml_tokenizer(tmp_path_factory):
    """The tiny tokenizer with ChatML's two tokens added (as a later InternVL chat model's has them)."""
    from internvl_serve.tiny_tokenizer import make_tiny_tokenizer
    from internvl_serve.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("chatml_tokenizer")
    make_tiny_tokenizer(folder, extra_special_tokens=CHATML_TOKENS)
    return load_tokenizer(folder)


def test_chatml_template_stops_on_im_end(chatml_tokenizer):
    """Hermes-2's prompt, tokenized with <|im_start|>/<|im_end|> as single tokens; the engine, given the
    template's end of answer as the serving path gives it, runs past the config's EOS and stops on
    <|im_end|>, with the text the card's `decode(...).split('<|im_end|>')[0].strip()` gives."""
    tok = chatml_tokenizer
    im_start, im_end = tok.convert_tokens_to_ids(list(CHATML_TOKENS))
    stop, stop_token_ids = HERMES_2.end_of_answer(tok)
    assert stop == ("<|im_end|>",) and stop_token_ids == (im_end,) and im_end != tok.eos_token_id

    prompt = build_prompt("what is in this image?", [("describe it", "a cat")], [], 256, HERMES_2)
    prompt_ids = tok.encode(prompt)
    assert prompt_ids.count(im_start) == 5 and prompt_ids.count(im_end) == 4  # system, 2 user, 2 assistant

    answer = tok.encode("  a dog and a cat \n", add_special_tokens=False)
    script = answer + [CONFIG_EOS] + tok.encode(" sitting", add_special_tokens=False) + [im_end] + answer
    engine = scripted_engine(script, len(prompt_ids), tok, len(tok))
    sampling = SamplingParams(max_tokens=len(script)).ending_with(stop, stop_token_ids)
    tokens, text, reason = run_one(engine, prompt_ids, sampling)
    end = script.index(im_end) + 1
    assert reason == "stop" and tokens == script[:end]
    card = tok.decode(script[:end], skip_special_tokens=True).split(HERMES_2.stop_str)[0].strip()
    assert text == card == HERMES_2.clean(tok.decode(script[:end], skip_special_tokens=True))
    assert text.startswith("a dog and a cat") and text.endswith("sitting")
