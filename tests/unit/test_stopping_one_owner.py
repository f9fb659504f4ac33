"""The end of an answer has one owner (engine/stopping.py): the engine's own text (LLMEngine(detokenize=True))
and the serving path's (LLMService: a token-only engine, the text made on the sender threads, stop strings
found there) are the same for the same requests — same text, finish reason and token count — when the
answer ends on a stop token (EOS), a stop string (anywhere in the text, also in the token at the limit),
the length limit, with ignore_eos and min_tokens; streamed, in one response, and coalesced behind a slow
client. If the two paths drift apart, these fail."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from test_response_path import SlowSink, wait_until
from test_serving_services import WAIT_S, RecordingSink, llm_request, preprocessor  # noqa: F401

QUESTION = "Talk."
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    from internvl_serve.serving.llm import LLMService

    service = LLMService(tiny_checkpoint, device="cpu", engine_options={"max_num_seqs": "8"})
    yield service
    service.shutdown()


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, llm):
    """The same weights and tokenizer, the engine detokenizing itself (the in-process path)."""
    from internvl_serve.checkpoint import load_state_dict
    from internvl_serve.engine import LLMEngine, ModelRunner

    state = load_state_dict(tiny_checkpoint, prefixes=("language_model.",), dtype=torch.float32, device="cpu",
                            progress=False)
    runner = ModelRunner(llm.config, state, device="cpu", dtype=torch.float32)
    return LLMEngine(runner, llm.tokenizer, detokenize=True)


@pytest.fixture(scope="module")
def greedy(engine, llm, preprocessor):  # noqa: F811
    """The model's greedy answer to QUESTION without any end: (token ids, the engine's text)."""
    from internvl_serve.engine import Request

    request = llm_request(preprocessor, QUESTION, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = engine.generate([Request("greedy", request.input_ids.tolist(), None, request.generation.sampling
                                    .ending_with(llm.stop, llm.stop_token_ids))])["greedy"]
    tokens = [t for o in outs for t in o.new_token_ids]
    assert len(tokens) == MAX_TOKENS and outs[-1].finish_reason == "length"
    return tokens, "".join(o.text_delta for o in outs)


def first_occurrences(tokens: list[int], upto: int) -> list[int]:
    return [k for k in range(1, upto) if tokens[k] not in tokens[:k] and tokens[k] != 2]


def cases(greedy) -> dict[str, tuple[dict, tuple[int, ...] | None]]:
    """name -> (generation inputs, the template's stop token ids in place of '</s>' or None)."""
    tokens, text = greedy
    out: dict[str, tuple[dict, tuple[int, ...] | None]] = {}
    for k in first_occurrences(tokens, 12):  # an EOS at k: before it, text may be held back (flushed)
        out[f"eos@{k}"] = (dict(max_tokens=MAX_TOKENS), (tokens[k],))
    for i in range(0, len(text) - 3, 6):      # stop strings across token boundaries and deltas
        out[f"stop_words@{i}"] = (dict(max_tokens=MAX_TOKENS, stop_words=text[i:i + 2]), None)
    for n in (1, 6, 7, 13, 25):               # the length limit, held-back text flushed
        out[f"length{n}"] = (dict(max_tokens=n), None)
    k = first_occurrences(tokens, 12)[-1]
    out["ignore_eos"] = (dict(max_tokens=k + 3, ignore_eos=True), (tokens[k],))
    out["min_tokens"] = (dict(max_tokens=MAX_TOKENS, min_tokens=k + 2), (tokens[k],))
    return out


def engine_answer(engine, llm, request, stop_token_ids):
    from internvl_serve.engine import Request

    sampling = request.generation.sampling.ending_with(llm.stop, stop_token_ids or llm.stop_token_ids)
    outs = engine.generate([Request("expected", request.input_ids.tolist(), None, sampling)])["expected"]
    return "".join(o.text_delta for o in outs), outs[-1].finish_reason, outs[-1].num_output_tokens


def served_answer(llm, request, stop_token_ids, sink):
    saved = llm.stop_token_ids
    if stop_token_ids is not None:
        llm.stop_token_ids = stop_token_ids  # as if the template's stop token were it
    try:
        llm.submit(request, sink)
    finally:
        llm.stop_token_ids = saved
    if isinstance(sink, SlowSink):  # let the engine finish behind the blocked client: the rest is coalesced
        assert sink.sending.wait(WAIT_S)
        wait_until(lambda: llm.thread.num_unfinished == 0, "the engine to finish behind the slow client")
        sink.release.set()
    sink.wait()
    assert not sink.errors and not sink.calls_after_final
    return "".join(sink.texts), sink.reasons[-1], int(sink.responses[-1][0]["num_output_tokens"][0])


def stop_words_request(preprocessor, generation):  # noqa: F811
    """stop_words is a list input: llm_request makes scalars only."""
    words = generation.pop("stop_words", None)
    request = llm_request(preprocessor, QUESTION, **generation)
    if words is None:
        return request
    sampling = dataclasses.replace(request.generation.sampling, stop=(words,))
    return dataclasses.replace(request, generation=dataclasses.replace(request.generation, sampling=sampling))


def test_engine_and_serving_path_end_every_answer_alike(llm, engine, greedy, preprocessor):  # noqa: F811
    seen = set()
    stop_at_the_limit = None
    for name, (generation, stop_token_ids) in cases(greedy).items():
        request = stop_words_request(preprocessor, dict(generation))
        want = engine_answer(engine, llm, request, stop_token_ids)
        seen.add((name.split("@")[0].rstrip("0123456789"), want[1]))
        if name.startswith("stop_words") and want[1] == "stop" and stop_at_the_limit is None:
            stop_at_the_limit = (generation, want[2])
        for stream, sink in ((True, RecordingSink()), (False, RecordingSink()), (True, SlowSink())):
            streamed = dataclasses.replace(request, generation=dataclasses.replace(request.generation, stream=stream))
            got = served_answer(llm, streamed, stop_token_ids, sink)
            assert got == want, (name, stream, type(sink).__name__)
    # every way of ending was exercised: EOS, stop strings, length, ignore_eos runs past the EOS, and
    # min_tokens holds it back
    assert {("eos", "stop"), ("stop_words", "stop"), ("length", "length"), ("ignore_eos", "length")} <= seen, seen
    assert ("min_tokens", "stop") in seen or ("min_tokens", "length") in seen, seen

    # a stop string completed by the last token the request may have: the stop string wins ('stop')
    generation, n = stop_at_the_limit
    request = stop_words_request(preprocessor, dict(generation, max_tokens=n))
    want = engine_answer(engine, llm, request, None)
    assert want[1] == "stop" and want[2] == n
    for stream, sink in ((True, RecordingSink()), (True, SlowSink())):
        streamed = dataclasses.replace(request, generation=dataclasses.replace(request.generation, stream=stream))
        assert served_answer(llm, streamed, None, sink) == want


def test_the_detokenizer_is_built_in_one_place():
    """Only stopping.AnswerText makes an IncrementalDetokenizer: the engine and the serving path get their
    text (and where it ends) from it, never from a detokenizer of their own."""
    package = Path(__file__).resolve().parents[2] / "internvl_serve"
    builders = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) \
                    == "IncrementalDetokenizer":
                builders.add(path.relative_to(package).as_posix())
    assert builders == {"engine/stopping.py"}
