"""SamplingParams.validate and Request validation: InvalidRequest naming the field and the allowed range."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from internvl_serve.engine import FakeRunner, InvalidRequest, LLMEngine, Request, SamplingParams


@pytest.mark.parametrize("field, value, words", [
    ("max_tokens", 0, ">= 1"), ("max_tokens", 2.5, ">= 1"), ("max_tokens", True, ">= 1"),
    ("temperature", -0.1, ">= 0"), ("temperature", float("inf"), "finite"), ("temperature", float("nan"), "finite"),
    ("top_p", 0.0, "(0, 1]"), ("top_p", 1.01, "(0, 1]"), ("top_p", float("nan"), "(0, 1]"),
    ("top_k", -1, ">= 0"), ("top_k", 1.5, ">= 0"),
    ("repetition_penalty", 0.0, "> 0"), ("repetition_penalty", float("inf"), "finite"),
    ("seed", -1, "2**64-1"), ("seed", 2**64, "2**64-1"),
    ("stop", ("",), "non-empty"), ("stop", (b"x",), "non-empty string"), ("stop", tuple("x" * 33), "at most 32"),
    ("stop", "abc", "tuple"), ("min_tokens", -1, ">= 0"), ("min_tokens", 2000, "<= max_tokens"),
])
def test_invalid_sampling_params_name_the_field(field, value, words):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**{field: value}).validate()
    assert field in str(e.value) and words in str(e.value)
    assert e.value.field == field  # carried, so callers map it back without reading the message
    assert isinstance(e.value, ValueError)


def test_valid_sampling_params():
    assert SamplingParams().validate() == SamplingParams(1024, 0.0, 1.0, 0, 1.0, 0, ())
    p = SamplingParams(max_tokens=np.int32(5), temperature=np.float32(0.5), top_p=1.0, top_k=np.int64(3),
                       repetition_penalty=1.1, seed=2**64 - 1, stop=["a", "b"]).validate()
    assert p.stop == ("a", "b") and hash(p) is not None and not p.greedy
    assert SamplingParams(stop=tuple("x" * 32)).validate()  # the contract's 16 of the client's + the template's


@pytest.fixture
def engine():
    runner = FakeRunner(num_blocks=16, block_size=4, vocab_size=100, hidden_size=8, context_window=40)
    return LLMEngine(runner, None, eos_token_id=2, image_context_token_id=99)


def test_prompt_longer_than_the_window_names_both_numbers(engine):
    with pytest.raises(InvalidRequest, match=r"40 tokens.*40|40.*context window is 40"):
        engine.add_request(Request("r", [5] * 40, None, SamplingParams()))
    with pytest.raises(InvalidRequest, match="52 tokens"):
        engine.add_request(Request("r", [5] * 52, None, SamplingParams()))
    engine.add_request(Request("ok", [5] * 39, None, SamplingParams()))


@pytest.mark.parametrize("request_kwargs, words", [
    (dict(prompt_token_ids=[]), "non-empty"),
    (dict(prompt_token_ids=[5, 100]), "[0, 99]"),
    (dict(prompt_token_ids=[5, -1]), "[0, 99]"),
    (dict(prompt_token_ids=[5.0, 6.0]), "integer"),
    (dict(prompt_token_ids=[5, 99, 99], image_embeds=torch.zeros(3, 8)), "3 rows but the prompt holds 2"),
    (dict(prompt_token_ids=[5, 99, 99]), "0 rows but the prompt holds 2"),
    (dict(prompt_token_ids=[5, 99, 99], image_embeds=torch.zeros(2, 7)), "(num_image_tokens, 8)"),
    (dict(prompt_token_ids=[5, 99, 99], image_embeds=torch.zeros(2, 8, dtype=torch.long)), "floating"),
    (dict(prompt_token_ids=[5, 99, 99], image_embeds=torch.zeros(2, 8), image_hashes=("a", "b", "c")),
     "not divisible"),
    (dict(prompt_token_ids=[5], image_hashes=("a",)), "without image_embeds"),
    (dict(request_id=""), "request_id"),
    (dict(sampling=SamplingParams(top_p=0)), "top_p"),
    (dict(sampling=SamplingParams(stop=("x",))), "tokenizer"),
])
def test_invalid_requests(engine, request_kwargs, words):
    kw = dict(request_id="r", prompt_token_ids=[5, 6], image_embeds=None, sampling=SamplingParams())
    kw.update(request_kwargs)
    with pytest.raises(InvalidRequest) as e:
        engine.add_request(Request(**kw))
    assert words in str(e.value)
    assert not engine.has_unfinished()


def test_duplicate_request_id_is_refused(engine):
    engine.add_request(Request("r", [5, 6], None, SamplingParams()))
    with pytest.raises(InvalidRequest, match="already"):
        engine.add_request(Request("r", [7], None, SamplingParams()))


def test_image_rows_without_image_token_id():
    engine = LLMEngine(FakeRunner(vocab_size=100, hidden_size=8), None, eos_token_id=2)
    with pytest.raises(InvalidRequest, match="image_context_token_id"):
        engine.add_request(Request("r", [5, 6], torch.zeros(1, 8), SamplingParams()))


def test_max_tokens_is_capped_by_the_window(engine):
    out = engine.generate([Request("r", [5] * 30, None, SamplingParams(max_tokens=1000))])["r"]
    assert out[-1].finish_reason == "length" and out[-1].num_output_tokens == 10
