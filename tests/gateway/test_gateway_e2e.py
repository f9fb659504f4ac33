"""The OpenAI-compatible gateway against a real tritonserver, called with the official `openai` package.

Every answer is compared with what the client SDK (internvl_client, gRPC straight to Triton) gets for
the same request: the same text, finish reason and token counts. Also: streaming (SSE) with usage,
images as data URLs, multi-turn history, sampling with a seed, stop strings, the refusals (400 from
the gateway's checks and from the server's INVALID_ARG, 404 for an unknown model), http(s) images
only where allowed, and 503 when Triton is down. Issue #16: fields current clients send are accepted
(unknown ones logged), /v1/completions, OpenAI-shaped 404 / 405 on any route, usage in every chunk
with continuous_usage_stats, and the API key (401, /health open).
"""
from __future__ import annotations

import base64
import http.server
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from gateway_helpers import Gateway, png
from internvl_client import Client, separate_images_question

MAX_TOKENS = 12
MODEL = "InternVL-Chat-V1-1"


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def user(text: str, *images: bytes) -> dict:
    if not images:
        return {"role": "user", "content": text}
    parts = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def sdk(server):
    return Client(server.grpc_url, timeout=60)


@pytest.fixture(scope="module")
def oai(gateway):
    return gateway.openai()


def sdk_answer(sdk, question, images=None, history=None, **generation):
    config = dict(max_new_tokens=MAX_TOKENS, **generation)
    return sdk.generate(question, images=images, history=history, generation_config=config)


def assert_same(completion, expected):
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert completion.usage.prompt_tokens == expected.num_input_tokens
    assert completion.usage.completion_tokens == expected.num_output_tokens
    assert completion.usage.total_tokens == expected.num_input_tokens + expected.num_output_tokens
    assert completion.model == MODEL and completion.object == "chat.completion"


def test_models(oai):
    assert [m.id for m in oai.models.list().data] == [MODEL]
    assert oai.models.retrieve(MODEL).id == MODEL


def test_health(gateway):
    r = requests.get(f"{gateway.url}/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_text_matches_sdk(oai, sdk):
    expected = sdk_answer(sdk, "Hello, who are you?")
    completion = oai.chat.completions.create(model=MODEL, messages=[user("Hello, who are you?")],
                                             max_tokens=MAX_TOKENS)
    assert expected.text  # a real answer, not two empty strings
    assert_same(completion, expected)


def test_image_matches_sdk(oai, sdk):
    image = png(1)
    expected = sdk_answer(sdk, "What is in the image?", images=[image])
    completion = oai.chat.completions.create(model=MODEL, messages=[user("What is in the image?", image)],
                                             max_tokens=MAX_TOKENS)
    assert_same(completion, expected)
    assert expected.num_input_tokens > 256  # the image's 256 tokens are in the prompt
    other = oai.chat.completions.create(model=MODEL, messages=[user("What is in the image?", png(2))],
                                        max_tokens=MAX_TOKENS)
    assert other.choices[0].message.content != expected.text  # the image matters


def test_streaming_with_image_matches_sdk(oai, sdk):
    image = png(3)
    expected = sdk_answer(sdk, "Describe the image.", images=[image])
    chunks = list(oai.chat.completions.create(model=MODEL, messages=[user("Describe the image.", image)],
                                              max_tokens=MAX_TOKENS, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == expected.text
    assert sum(1 for c in with_choices if c.choices[0].delta.content) >= 2  # streamed in pieces
    reasons = [c.choices[0].finish_reason for c in with_choices]
    assert reasons[-1] == expected.finish_reason and all(r is None for r in reasons[:-1])
    assert not chunks[-1].choices  # the usage chunk comes last
    assert chunks[-1].usage.prompt_tokens == expected.num_input_tokens
    assert chunks[-1].usage.completion_tokens == expected.num_output_tokens
    assert len({c.id for c in chunks}) == 1


def test_multi_turn_matches_sdk_history(oai, sdk):
    image = png(4)
    first = sdk_answer(sdk, "What is in the image?", images=[image])
    history = [("<image>\nWhat is in the image?", first.text)]  # the card's history: questions as sent
    expected = sdk_answer(sdk, "And what colour is it?", images=[image], history=history)
    messages = [user("What is in the image?", image), {"role": "assistant", "content": first.text},
                user("And what colour is it?")]
    assert_same(oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS), expected)


def test_two_images_in_one_message_are_separate(oai, sdk):
    images = [png(5), png(6)]
    expected = sdk_answer(sdk, separate_images_question("What differs?", 2), images=images)
    completion = oai.chat.completions.create(model=MODEL, messages=[user("What differs?", *images)],
                                             max_tokens=MAX_TOKENS)
    assert_same(completion, expected)


def test_sampling_with_seed_matches_sdk(oai, sdk):
    expected = sdk_answer(sdk, "Tell me a story.", do_sample=True, temperature=0.9, top_p=0.95, seed=5)
    completion = oai.chat.completions.create(model=MODEL, messages=[user("Tell me a story.")],
                                             max_tokens=MAX_TOKENS, temperature=0.9, top_p=0.95, seed=5)
    assert_same(completion, expected)
    greedy = sdk_answer(sdk, "Tell me a story.")
    assert greedy.text != expected.text  # the sampling parameters reached the server


def test_stop_matches_sdk(oai, sdk):
    full = sdk_answer(sdk, "Hello, who are you?").text
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    expected = sdk_answer(sdk, "Hello, who are you?", stop=[stop])
    completion = oai.chat.completions.create(model=MODEL, messages=[user("Hello, who are you?")],
                                             max_tokens=MAX_TOKENS, stop=stop)
    assert_same(completion, expected)
    assert stop not in completion.choices[0].message.content
    assert full.startswith(completion.choices[0].message.content)
    assert completion.choices[0].finish_reason == "stop"


def test_concurrent_streams(oai, sdk):
    questions = [f"Question number {i}?" for i in range(4)]
    expected = [sdk_answer(sdk, q).text for q in questions]

    def stream(question):
        chunks = oai.chat.completions.create(model=MODEL, messages=[user(question)], max_tokens=MAX_TOKENS,
                                             stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(stream, questions)) == expected


def test_client_leaving_a_stream_early(oai, sdk, server):
    stream = oai.chat.completions.create(model=MODEL, messages=[user("A long story, please.")], max_tokens=200,
                                         stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    stream.close()  # the HTTP connection goes; the gateway cancels its gRPC call
    expected = sdk_answer(sdk, "Hello, who are you?")
    completion = oai.chat.completions.create(model=MODEL, messages=[user("Hello, who are you?")],
                                             max_tokens=MAX_TOKENS)
    assert_same(completion, expected)  # the gateway and the server go on
    assert server.is_running()


def test_fields_current_clients_send_are_accepted(oai, sdk, gateway):
    expected = sdk_answer(sdk, "Hello, who are you?")
    completion = oai.chat.completions.create(
        model=MODEL, messages=[user("Hello, who are you?")], max_tokens=MAX_TOKENS, tool_choice="auto",
        extra_body={"verbosity": "low", "prompt_cache_key": "k1", "safety_identifier": "s1",
                    "reasoning_effort": "low", "a_field_from_the_future": 1})
    assert_same(completion, expected)
    assert "ignored unknown request field(s): a_field_from_the_future" in gateway.log.read_text()


def test_completions_match_sdk(oai, sdk):
    expected = sdk_answer(sdk, "Hello, who are you?")
    completion = oai.completions.create(model=MODEL, prompt="Hello, who are you?", max_tokens=MAX_TOKENS)
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    choice = completion.choices[0]
    assert (choice.text, choice.finish_reason) == (expected.text, expected.finish_reason)
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        expected.num_input_tokens, expected.num_output_tokens)
    echoed = oai.completions.create(model=MODEL, prompt="Hello, who are you?", max_tokens=MAX_TOKENS, echo=True)
    assert echoed.choices[0].text == "Hello, who are you?" + expected.text


def test_streamed_completions_with_continuous_usage(oai, sdk):
    expected = sdk_answer(sdk, "Tell me a story.")
    chunks = list(oai.completions.create(model=MODEL, prompt="Tell me a story.", max_tokens=MAX_TOKENS, stream=True,
                                         stream_options={"include_usage": True, "continuous_usage_stats": True}))
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in with_choices) == expected.text
    assert sum(1 for c in with_choices if c.choices[0].text) >= 2  # streamed in pieces
    assert [c.choices[0].finish_reason for c in with_choices][-1] == expected.finish_reason
    assert all(c.usage is not None and c.usage.prompt_tokens == expected.num_input_tokens for c in chunks)
    completed = [c.usage.completion_tokens for c in chunks]
    assert completed == sorted(completed) and 0 < completed[0] and completed[-1] == expected.num_output_tokens
    assert not chunks[-1].choices  # include_usage: the usage-only chunk comes last


def test_chat_stream_with_continuous_usage(oai, sdk):
    expected = sdk_answer(sdk, "Describe a cat.")
    chunks = list(oai.chat.completions.create(model=MODEL, messages=[user("Describe a cat.")], max_tokens=MAX_TOKENS,
                                              stream=True, stream_options={"continuous_usage_stats": True}))
    assert all(c.choices for c in chunks)  # no include_usage: no usage-only chunk
    assert all(c.usage.prompt_tokens == expected.num_input_tokens for c in chunks)
    assert chunks[-1].usage.completion_tokens == expected.num_output_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    plain = list(oai.chat.completions.create(model=MODEL, messages=[user("Describe a cat.")], max_tokens=MAX_TOKENS,
                                             stream=True))
    assert all(c.usage is None for c in plain)


@pytest.mark.parametrize("method, path, status, code", [
    ("get", "/v1/no-such-route", 404, "not_found"),
    ("post", "/v1/embeddings", 404, "not_found"),
    ("get", "/v1/chat/completions", 405, "method_not_allowed"),
    ("delete", "/v1/models", 405, "method_not_allowed"),
])
def test_framework_errors_are_openai_shaped(gateway, method, path, status, code):
    r = getattr(requests, method)(f"{gateway.url}{path}", timeout=10)
    assert r.status_code == status
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.json()["error"]["code"] == code and path in r.json()["error"]["message"]


def test_bad_json_is_400_openai_shaped(gateway):
    for route in ("/v1/chat/completions", "/v1/completions"):
        r = requests.post(f"{gateway.url}{route}", data=b"{not json", timeout=10)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_api_key(server, sdk, tmp_path):
    gateway = Gateway(server.grpc_url, tmp_path / "gateway.log", api_key="s3cret")
    try:
        expected = sdk_answer(sdk, "Hello, who are you?")
        completion = gateway.openai().chat.completions.create(model=MODEL, messages=[user("Hello, who are you?")],
                                                              max_tokens=MAX_TOKENS)
        assert_same(completion, expected)
        for key in ("wrong", "s3cret-and-more"):
            with pytest.raises(openai.AuthenticationError) as e:
                gateway.openai(api_key=key).completions.create(model=MODEL, prompt="hi", max_tokens=2)
            assert e.value.body["code"] == "invalid_api_key" and e.value.body["type"] == "invalid_request_error"
        with pytest.raises(openai.AuthenticationError):
            gateway.openai(api_key="wrong").models.list()
        assert requests.post(f"{gateway.url}/v1/chat/completions", json={}, timeout=10).status_code == 401  # no header
        assert requests.get(f"{gateway.url}/v1/models", headers={"Authorization": "Basic s3cret"},
                            timeout=10).status_code == 401
        assert requests.get(f"{gateway.url}/health", timeout=10).status_code == 200  # open without the key
    finally:
        gateway.stop()


# ---- refusals -------------------------------------------------------------------------------------


def test_bad_base64_is_400(oai):
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}},
                                         {"type": "text", "text": "hi"}]}]
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=bad)
    assert "base64" in e.value.message


@pytest.mark.parametrize("stream", [False, True])
def test_server_invalid_argument_is_400(oai, stream):
    """Not an image: refused by the server's preprocess (INVALID_ARG), before any SSE byte."""
    messages = [user("What is it?", b"this is not an image")]
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, stream=stream)
    assert "image" in e.value.message.lower()
    assert e.value.body["type"] == "invalid_request_error"


def test_gateway_refusals(oai):
    cases = [
        (dict(messages=[user("hi")], n=2), "n"),
        (dict(messages=[{"role": "system", "content": "Be nice."}, user("hi")]), "messages[0]"),
        (dict(messages=[{"role": "assistant", "content": "hi"}]), "messages[0].role"),
        (dict(messages=[user("hi")], temperature=3), "temperature"),
        (dict(messages=[user("hi")], max_tokens=0), "max_tokens"),
        (dict(messages=[user("hi"), {"role": "assistant", "content": "ok"}]), "messages"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(model=MODEL, **kwargs)
        assert e.value.body["param"] == param, (kwargs, e.value.body)
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="gpt-4o", messages=[user("hi")])
    assert e.value.body["code"] == "model_not_found"


def test_remote_image_refused_by_default(oai):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}},
                                              {"type": "text", "text": "hi"}]}]
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=messages)
    assert e.value.body["code"] == "remote_images_disabled"


def test_remote_image_where_allowed(server, sdk, tmp_path):
    image = png(7)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    gateway = Gateway(server.grpc_url, tmp_path / "gateway.log", "--allow-remote-images",
                      "--remote-image-host", "127.0.0.1")
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/cat.png"
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                  {"type": "text", "text": "What is in the image?"}]}]
        completion = gateway.openai().chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS)
        assert_same(completion, sdk_answer(sdk, "What is in the image?", images=[image]))
        messages[0]["content"][0]["image_url"]["url"] = url.replace("127.0.0.1", "localhost")
        with pytest.raises(openai.BadRequestError) as e:  # not an allowed host
            gateway.openai().chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS)
        assert "allowed image hosts" in e.value.message
    finally:
        gateway.stop()
        httpd.shutdown()


def test_triton_down_is_503(tmp_path):
    from internvl_serve.serving.launcher import free_port

    gateway = Gateway(f"127.0.0.1:{free_port()}", tmp_path / "gateway.log", "--retries", "0")
    try:
        with pytest.raises(openai.InternalServerError) as e:
            gateway.openai().chat.completions.create(model=MODEL, messages=[user("hi")], max_tokens=4)
        assert e.value.status_code == 503
        assert e.value.body["code"] == "service_unavailable"
        with pytest.raises(openai.InternalServerError) as e:
            gateway.openai().chat.completions.create(model=MODEL, messages=[user("hi")], max_tokens=4, stream=True)
        assert e.value.status_code == 503
        assert requests.get(f"{gateway.url}/health", timeout=10).status_code == 503
    finally:
        gateway.stop()
