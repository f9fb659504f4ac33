"""Issue #16: the inputs TensorRT-LLM and vLLM clients send, on the real server, through gRPC, HTTP
`generate` and the OpenAI gateway: `min_length` (genai-perf's --output-tokens-mean-deterministic; the
gateway's `min_tokens`, aiperf's), `random_seed`, and TensorRT-LLM's documented empty
`"bad_words":"","stop_words":""`.

The server runs a copy of the tiny checkpoint whose lm_head makes `</s>` the first greedy token (its
row is twice the row of the token the model would pick first), so a plain request ends at once with an
empty answer and `min_length` visibly changes the answer.
"""
from __future__ import annotations

import json
import shutil

import pytest
import requests
import torch

from gateway_helpers import Gateway
from internvl_client import Client
from internvl_client.request import ChatRequest

QUESTION = "Hello, who are you?"
MODEL = "InternVL-Chat-V1-1"


def eos_first_checkpoint(tiny_checkpoint, folder):
    """A copy of the tiny checkpoint whose greedy first answer token to QUESTION is `</s>`."""
    from internvl_serve import reference
    from internvl_serve.checkpoint import load_model, save_checkpoint
    from internvl_serve.tokenizer import load_tokenizer

    shutil.copytree(tiny_checkpoint, folder)
    model = load_model(folder, dtype=torch.float32, parts=("vision", "language"), progress=False)
    tokenizer = load_tokenizer(folder)
    *_, ids, mask = reference.prepare_chat(model, tokenizer, None, QUESTION, None, None)
    with torch.inference_mode():
        logits = model.language_model(input_ids=ids, attention_mask=mask).logits[0, -1]
    first, eos = int(logits.argmax()), tokenizer.eos_token_id
    assert logits[first] > 0 and first != eos
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    head = next(k for k in state if k.endswith("lm_head.weight"))
    state[head][eos] = 2 * state[head][first]  # EOS logit = 2 x the best logit: greedy picks </s>
    save_checkpoint(state, folder, format="bin", num_shards=4)
    return folder


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    from internvl_serve.serving.launcher import TritonServer

    folder = eos_first_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("eos-first") / "tiny")
    log = tmp_path_factory.mktemp("triton") / "server.log"
    with TritonServer(folder, log_file=log, exit_timeout_s=5, ready_timeout_s=300) as s:
        yield s


@pytest.fixture(scope="module")
def sdk(server):
    return Client(server.grpc_url, timeout=60)


def ask(sdk, **generation):
    """A request with these contract inputs (any declared name: the SDK builds them from the declaration)."""
    stream = sdk.stream_request(ChatRequest(question=QUESTION, generation={"max_tokens": 12, **generation}))
    for _ in stream:
        pass
    return stream.response


def test_grpc_min_length_holds_back_the_end_token(sdk):
    plain = ask(sdk)
    assert (plain.text, plain.finish_reason, plain.num_output_tokens) == ("", "stop", 1)  # </s> first
    held = ask(sdk, min_length=5)
    assert held.num_output_tokens >= 5 and held.text
    assert held.finish_reason in ("stop", "length")
    # the model card's word for it, through the SDK's generation_config
    card = sdk.generate(QUESTION, generation_config=dict(max_new_tokens=12, min_new_tokens=5))
    assert (card.text, card.num_output_tokens) == (held.text, held.num_output_tokens)


def test_grpc_random_seed_is_seed(sdk):
    sampled = dict(min_length=8, temperature=1.0)
    by_trt_name = ask(sdk, random_seed=1234, **sampled)
    assert by_trt_name.num_output_tokens >= 8
    assert ask(sdk, random_seed=1234, **sampled).text == by_trt_name.text  # seeded: reproducible
    assert ask(sdk, seed=1234, **sampled).text == by_trt_name.text  # the same setting as seed
    others = {ask(sdk, random_seed=s, **sampled).text for s in (1, 2, 3)}
    assert others != {by_trt_name.text}  # the seed matters


def test_http_generate_with_tensorrt_llm_empty_word_lists(server):
    """TensorRT-LLM's documented generate body: "bad_words":"","stop_words":"" (was 400)."""
    body = {"text_input": QUESTION, "max_tokens": 12, "min_length": 4, "bad_words": "", "stop_words": ""}
    r = requests.post(f"{server.http_url}/v2/models/internvl_chat/generate", data=json.dumps(body), timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["num_output_tokens"] >= 4 and r.json()["text_output"]
    body["bad_words"] = "damn"
    r = requests.post(f"{server.http_url}/v2/models/internvl_chat/generate", data=json.dumps(body), timeout=60)
    assert r.status_code == 400 and "input 'bad_words' is not supported" in r.text, r.text


def test_gateway_min_tokens(server, sdk, tmp_path):
    gateway = Gateway(server.grpc_url, tmp_path / "gateway.log")
    try:
        oai = gateway.openai()
        messages = [{"role": "user", "content": QUESTION}]
        plain = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=12)
        assert plain.choices[0].message.content == "" and plain.usage.completion_tokens == 1
        held = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                           extra_body={"min_tokens": 5})
        expected = ask(sdk, min_length=5)
        assert held.choices[0].message.content == expected.text
        assert held.usage.completion_tokens == expected.num_output_tokens >= 5
        r = requests.post(f"{gateway.url}/v1/chat/completions", timeout=60,
                          json={"model": MODEL, "messages": messages, "min_tokens": -1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens", r.text
    finally:
        gateway.stop()
