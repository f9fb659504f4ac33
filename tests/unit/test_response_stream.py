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


@pytest.mark.parametrize("deltas", [
    [" ", " a", " b ", " ", "c \n", "\n"],
    ["hello", " world"],
    ["\n\n", "x"],
    ["   "],
    ["a", "", "b", ""],
    ["多", "语言 ", " 文本\t"],
])
def test_stream_deltas_concatenate_to_the_stripped_answer(deltas):
    out = run(deltas)
    assert "".join(t for t, *_ in out) == "".join(deltas).strip()
    assert [r for _, r, *_ in out] == [""] * (len(out) - 1) + ["stop"]  # one final, reason only there
    assert all(t for t, *_ in out[:-1])  # no empty non-final responses


def test_non_stream_sends_one_response_with_the_whole_text():
    out = run([" The", " cat", " sat. "], stream=False, reason="length")
    assert out == [("The cat sat.", "length", 7, 3)]


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
