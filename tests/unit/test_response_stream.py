"""ResponseStream: engine text deltas -> the llm model's responses (Triton-free)."""
import pytest

from internvl_serve.serving.llm import ResponseStream


def run(deltas, *, stream=True, echo=None, reason="stop"):
    rs = ResponseStream(echo or "Q?", stream=stream, exclude_input_in_output=echo is None)
    out = []
    for i, d in enumerate(deltas):
        last = i == len(deltas) - 1
        r = rs.add(d, finished=last, finish_reason=reason if last else None, num_input_tokens=7,
                   num_output_tokens=i + 1)
        if r is not None:
            out.append((r["text_output"][0].decode(), r["finish_reason"][0].decode(),
                        int(r["num_input_tokens"][0]), int(r["num_output_tokens"][0])))
    return out


def test_deltas_are_passed_on_unchanged():
    """The answer is stripped once, in the engine's detokenizer; the response path does not strip again."""
    out = run([" a", " b ", "c"])
    assert [t for t, *_ in out] == [" a", " b ", "c"]
    assert run([" a", " b "], stream=False)[0][0] == " a b "


def test_non_stream_sends_one_response_with_the_whole_text():
    out = run(["The", " cat", " sat."], stream=False, reason="length")
    assert out == [("The cat sat.", "length", 7, 3)]


@pytest.mark.parametrize("pieces", [
    ("<0x0A>", "▁", "▁Hello", "▁", "▁▁", "▁world", "▁", "<0x0A>", "</s>"),
    ("▁", "▁▁", "<0x0A>"),                                   # only whitespace: the answer is ""
    ("▁Hello", "▁▁", "▁</", "s>", "▁world"),                 # the stop string as text, after spaces
    ("▁caf", "<0xC3>", "<0xA9>", "▁", "<0x0A>", "▁ok", "▁▁"),  # inner whitespace kept, trailing dropped
])
@pytest.mark.parametrize("stream", [True, False])
def test_engine_and_response_stream_give_the_card_answer(pieces, stream):
    """Engine (detokenizer, the one strip) -> ResponseStream, streamed or not: the client's text is the
    card's `decode(ids).split('</s>')[0].strip()`."""
    from fake_sentencepiece import PIECES, FakeSentencePiece, ids

    from internvl_serve.engine import FakeRunner, LLMEngine, Request, SamplingParams, SchedulerConfig
    from internvl_serve.prompt import INTERNVL_ZH

    script = ids(*pieces)
    runner = FakeRunner(next_token=lambda ctx: script[len(ctx) - 1], vocab_size=len(PIECES), eos_token_id=2)
    engine = LLMEngine(runner, FakeSentencePiece(), scheduler_config=SchedulerConfig())
    sampling = SamplingParams(max_tokens=len(script)).ending_with(INTERNVL_ZH.stop_strings, (2,))
    outputs = engine.generate([Request("r", [7], None, sampling)])["r"]
    rs = ResponseStream("Q?", stream=stream)
    texts = []
    for o in outputs:
        r = rs.add(o.text_delta, finished=o.finished, finish_reason=o.finish_reason, num_input_tokens=1,
                   num_output_tokens=o.num_output_tokens)
        if r is not None:
            texts.append(r["text_output"][0].decode())
    generated = [t for o in outputs for t in o.new_token_ids]
    card = FakeSentencePiece().decode(generated, skip_special_tokens=True).split("</s>")[0].strip()
    assert "".join(texts) == card
    assert (len(texts) == 1) if not stream else all(texts[:-1])  # streamed: no empty non-final response


def test_echo_of_the_input_prefixes_the_first_response_only():
    out = run(["A", "B"], echo="Q: ")
    assert [t for t, *_ in out] == ["Q: A", "B"]
    assert run(["A", "B"], stream=False, echo="Q: ")[0][0] == "Q: AB"


def test_abort_is_reported_as_cancelled_and_counts_are_cumulative():
    out = run(["a", "b", ""], reason="abort")
    assert out[-1][1] == "cancelled"
    assert [n for *_, n in out] == [1, 2, 3]


def test_no_output_after_the_final_one():
    rs = ResponseStream("q", stream=True)
    rs.add("x", finished=True, finish_reason="stop", num_input_tokens=1, num_output_tokens=1)
    with pytest.raises(RuntimeError):
        rs.add("y", finished=True, finish_reason="stop", num_input_tokens=1, num_output_tokens=2)
