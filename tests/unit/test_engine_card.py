"""The engine on the tiny checkpoint (real layout, real tokenizer) vs the card's chat on transformers
generate (internvl_serve.reference): the same answers, streamed as deltas, for several questions in flight,
with images, pure text, and a second turn that reuses the first turn's KV blocks."""
from __future__ import annotations

import pytest
import torch

from internvl_serve import reference
from internvl_serve.checkpoint import load_model, load_state_dict
from internvl_serve.config import InternVLChatConfig
from internvl_serve.engine import LLMEngine, ModelRunner, Request, SamplingParams, SchedulerConfig
from internvl_serve.tiny import make_tiny_checkpoint
from internvl_serve.tokenizer import load_tokenizer

GEN = dict(max_new_tokens=40, do_sample=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("engine_card") / "tiny")
    model = load_model(folder, dtype=torch.float32, device="cpu")
    tokenizer = load_tokenizer(folder)
    config = InternVLChatConfig.from_pretrained(folder)
    state = load_state_dict(folder, prefixes=("language_model.",), dtype=torch.float32, device="cpu", progress=False)
    return model, tokenizer, config, state


def engine_of(tiny, budget=96):
    model, tokenizer, config, state = tiny
    runner = ModelRunner(config, state, device="cpu", dtype=torch.float32, block_size=16)
    return LLMEngine(runner, tokenizer, scheduler_config=SchedulerConfig(max_num_batched_tokens=budget))


def engine_request(tiny, rid, pixel_values, question, history=None, **sampling):
    model, tokenizer, _, _ = tiny
    _, _, _, ids, _ = reference.prepare_chat(model, tokenizer, pixel_values, question, history, None)
    rows = None
    if pixel_values is not None:
        with torch.no_grad():
            rows = model.extract_feature(pixel_values).reshape(-1, model.config.llm_config.hidden_size)
    return Request(rid, ids[0].tolist(), rows, SamplingParams(max_tokens=GEN["max_new_tokens"], **sampling))


def text_of(outputs):
    return "".join(o.text_delta for o in outputs)


def test_answers_equal_the_card_chat(tiny):
    model, tokenizer, _, _ = tiny
    torch.manual_seed(0)
    images = torch.randn(3, 3, 448, 448)
    cases = [("img1", images[:1], "describe the image"), ("img2", images[1:3], "what differs?"),
             ("text", None, "hello there"), ("img3", images[2:3], "what is in it?")]
    engine = engine_of(tiny)
    assert engine.eos_token_id == 2 and engine.image_context_token_id == tokenizer.convert_tokens_to_ids(
        "<IMG_CONTEXT>")
    results = engine.generate([engine_request(tiny, rid, pv, q) for rid, pv, q in cases])
    for rid, pv, q in cases:
        want = reference.chat(model, tokenizer, pv, q, GEN)
        assert text_of(results[rid]) == want, rid
        assert results[rid][-1].finished
    assert len({text_of(results[rid]) for rid, _, _ in cases}) == 4


def test_second_turn_reuses_the_first_turns_blocks(tiny):
    model, tokenizer, _, _ = tiny
    torch.manual_seed(1)
    pv = torch.randn(1, 3, 448, 448)
    engine = engine_of(tiny, budget=2048)
    answer1, history = reference.chat(model, tokenizer, pv, "describe the image", GEN, return_history=True)
    out1 = engine.generate([engine_request(tiny, "t1", pv, "describe the image")])["t1"]
    assert text_of(out1) == answer1
    answer2 = reference.chat(model, tokenizer, pv, "and the colors?", GEN, history=history)
    out2 = engine.generate([engine_request(tiny, "t2", pv, "and the colors?", history=history)])["t2"]
    assert text_of(out2) == answer2
    assert out2[-1].num_cached_tokens >= 256  # at least the image block run of turn 1 was reused
