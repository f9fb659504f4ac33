"""The public HTTP port against the real server (tiny checkpoint): the launcher's HTTP guard
(serving/http_guard.py) in front of tritonserver's own HTTP front end.

Findings held here (each failed before the guard): a JSON body nested 200k levels deep killed tritonserver
with SIGSEGV; `max_tokens` 2**32 + 1 and `top_k` 2**32 wrapped silently to 1 and 0; malformed or wrongly
typed bodies got 500 without the input's name; every model (the steps too) took inference over HTTP.
"""
from __future__ import annotations

import json

import pytest
import requests

from robustness_helpers import MAX_TOKENS, running_server

GENERATE = "/v2/models/internvl_chat/generate"
QUESTION = "Hello, who are you?"
MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    with running_server(tiny_checkpoint, tmp_path_factory.mktemp("http-front"), max_http_body_bytes=MAX_BODY) as s:
        yield s


def post(server, path, data, **kwargs):
    return requests.post(f"{server.http_url}{path}", data=data, timeout=120, **kwargs)


def assert_still_serving(server, oracle):
    assert server.is_running(), server.log_tail(40)
    r = post(server, GENERATE, json.dumps({"text_input": QUESTION, "max_tokens": MAX_TOKENS}))
    assert r.status_code == 200, r.text
    assert r.json()["text_output"] == oracle(QUESTION)


def sse_events(response) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in response.iter_lines(decode_unicode=True)
            if line.startswith("data: ")]


def sse_texts(response) -> list[str]:
    return [event["text_output"] for event in sse_events(response)]


@pytest.mark.parametrize("endpoint", ["generate", "generate_stream", "infer"])
def test_deeply_nested_json_is_refused_and_the_server_stays_up(server, oracle, endpoint):
    depth = 200_000
    body = '{"text_input": ' + "[" * depth + "]" * depth + "}"
    r = post(server, f"/v2/models/internvl_chat/{endpoint}", body)
    assert r.status_code == 400 and "nests JSON deeper than" in r.json()["error"], r.text
    assert_still_serving(server, oracle)


@pytest.mark.parametrize("name, value", [("max_tokens", 2**32 + 1), ("top_k", 2**32), ("num_segments", -2**31 - 1),
                                         ("min_length", 2**31)])
def test_integers_that_do_not_fit_their_type_are_refused_naming_the_input(server, oracle, name, value):
    r = post(server, GENERATE, json.dumps({"text_input": QUESTION, name: value}))
    assert r.status_code == 400, (r.status_code, r.text)
    assert f"input '{name}' must be in [-2147483648, 2147483647] (INT32), got {value}" in r.json()["error"]
    infer = {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": [QUESTION]},
                        {"name": name, "shape": [1], "datatype": "INT32", "data": [value]}]}
    r = post(server, "/v2/models/internvl_chat/infer", json.dumps(infer))
    assert r.status_code == 400 and f"input '{name}' must be in" in r.json()["error"], r.text
    assert_still_serving(server, oracle)


@pytest.mark.parametrize("body, message", [
    ('{"text_input": "hi", ', "the request body is not valid JSON"),
    ('{"text_input": "hi", "max_tokens": "many"}', "input 'max_tokens' must hold integers (INT32), got a string"),
    ('{"text_input": "hi", "temperature": [1, 0]}', "input 'temperature' takes one value (FP32), got a list of 2"),
    ('{"text_input": "hi", "max_tokens": [[4], [5]]}', "input 'max_tokens' takes one value (INT32), got a list of 2"),
    ('{"text_input": "hi", "max_tokens": [["4"]]}', "input 'max_tokens' must hold integers (INT32), got a string"),
    ('{"text_input": "hi", "stream": "yes"}', "input 'stream' must hold booleans (BOOL), got a string"),
    ('{"text_input": "hi", "min_length": "few"}', "input 'min_length' must hold integers (INT32), got a string"),
    ('{"text_input": "hi", "random_seed": -1}', "input 'random_seed' must be in [0, 18446744073709551615] (UINT64)"),
    ('{"text_input": "hi", "bad_words": 3}', "input 'bad_words' must hold strings (BYTES)"),
    ('["text_input"]', "the request body must be a JSON object of inputs, got a list"),
])
def test_malformed_or_wrongly_typed_bodies_get_400_naming_the_input(server, oracle, body, message):
    for endpoint in ("generate", "generate_stream"):
        r = post(server, f"/v2/models/internvl_chat/{endpoint}", body)
        assert r.status_code == 400 and message in r.json()["error"], (endpoint, r.status_code, r.text)
    assert_still_serving(server, oracle)


def test_one_value_in_a_batch_of_one_gets_the_same_answer(server, oracle):
    """TensorRT-LLM's clients send each value with a leading batch dimension of 1 (`[[4]]`), or as a list
    of one; tritonserver reads both as the value. The guard let only the bare value through.
    The two answers are compared as a whole (text, the last event's fields), not event for event: the llm
    coalesces the deltas of a stream whose sender is behind (serving/response_path.py), so the event
    boundaries of two requests can differ on a busy machine (seen in CI: the answer's last deltas in one
    event in one stream, in three in the other)."""
    answers = []
    for body in ({"text_input": QUESTION, "max_tokens": MAX_TOKENS, "stream": True},
                 {"text_input": [[QUESTION]], "max_tokens": [[MAX_TOKENS]], "stream": [[True]], "temperature": [0.0]}):
        with requests.post(f"{server.http_url}/v2/models/internvl_chat/generate_stream", json=body, stream=True,
                           timeout=120) as r:
            assert r.status_code == 200, r.text
            events = sse_events(r)
        last = {k: v for k, v in events[-1].items() if k != "text_output"}
        answers.append(("".join(e["text_output"] for e in events), last))
    assert answers[1] == answers[0]
    text, last = answers[1]
    assert text == oracle(QUESTION)
    assert last["finish_reason"] == "length" and last["num_output_tokens"] == MAX_TOKENS


def test_a_shape_that_overflows_is_refused_and_the_server_stays_up(server, oracle):
    """Issue #14 "Crash 2" over HTTP: num_patches_list INT32 of shape [2**62 + 1] with 4 bytes of binary data
    (the element count x 4 wraps to 4 in Triton 2.51's own check, and the Python stub aborts)."""
    header = json.dumps({"inputs": [
        {"name": "text_input", "shape": [1], "datatype": "BYTES", "data": [QUESTION]},
        {"name": "num_patches_list", "shape": [2**62 + 1], "datatype": "INT32", "parameters": {"binary_data_size": 4}},
    ]}).encode()
    r = post(server, "/v2/models/internvl_chat/infer", header + b"\1\0\0\0",
             headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 400 and "input 'num_patches_list' of shape [4611686018427387905]" in r.json()["error"], r.text
    assert_still_serving(server, oracle)


def test_a_body_over_the_limit_gets_413(server, oracle):
    body = json.dumps({"text_input": QUESTION, "images": ["data:image/png;base64," + "A" * MAX_BODY]})
    r = post(server, GENERATE, body)
    assert r.status_code == 413 and f"larger than {MAX_BODY} bytes" in r.json()["error"], r.text
    assert_still_serving(server, oracle)


def test_only_the_chat_models_take_inference_over_http(server, oracle):
    for path in ("/v2/models/llm/generate", "/v2/models/preprocess/infer", "/v2/models/vision/versions/1/infer"):
        r = post(server, path, json.dumps({"text_input": QUESTION}))
        assert r.status_code == 404 and "is not served over HTTP here" in r.json()["error"], (path, r.text)
    # health, metadata and statistics stay open, for every model
    for path in ("/v2/health/ready", "/v2", "/v2/models/llm/ready", "/v2/models/vision/stats"):
        assert requests.get(f"{server.http_url}{path}", timeout=10).status_code == 200, path
    # the BLS chat is open too
    r = post(server, "/v2/models/internvl_chat_bls/generate", json.dumps({"text_input": QUESTION, "max_tokens": MAX_TOKENS}))
    assert r.status_code == 200 and r.json()["text_output"] == oracle(QUESTION), r.text


def test_streams_pass_through_the_guard_unchanged(server, oracle):
    """generate_stream through the guard streams as tritonserver's own port does: several events, which
    join to the card's answer. Not compared event for event: the llm coalesces the deltas of a stream
    whose sender is behind into one response (serving/response_path.py), so two requests' event
    boundaries can differ on a busy machine (seen in CI: 'mountain street' in one event against two)."""
    body = json.dumps({"text_input": QUESTION, "max_tokens": MAX_TOKENS, "stream": True})
    for base in (server.http_url, server.triton_http_url):
        with requests.post(f"{base}/v2/models/internvl_chat/generate_stream", data=body, stream=True, timeout=120) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            texts = sse_texts(r)
        assert len(texts) > 1 and "".join(texts) == oracle(QUESTION), (base, texts)


def test_tritonserver_own_http_listens_on_loopback_only(server):
    from test_hardening import listening

    assert listening(server.ports["triton_http"]) == {"127.0.0.1"}
