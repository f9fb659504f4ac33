"""internvl_gateway.translate without a server: OpenAI messages -> the card's question / history /
images, sampling fields -> contract inputs, refusals (status, param), and the SDK's errors -> HTTP."""
from __future__ import annotations

import base64
import subprocess
import sys

import pytest

from gateway_helpers import GATEWAY_DIR, png
from internvl_client.errors import (
    InternVLError,
    InvalidInputError,
    ModelNotReadyError,
    RequestTimeoutError,
    ServerUnavailableError,
)
from internvl_gateway import GatewayConfig
from internvl_gateway.translate import (
    GatewayError,
    RemoteImage,
    from_client_error,
    parse_chat_completion,
    parse_completion,
    parse_data_url,
)

CONFIG = GatewayConfig()
IMAGE = png(1)
URL = "data:image/png;base64," + base64.b64encode(IMAGE).decode()


def image_part(url=URL):
    return {"type": "image_url", "image_url": {"url": url}}


def parse(config=CONFIG, **body):
    return parse_chat_completion({"model": "InternVL-Chat-V1-1", **body}, config)


def refused(config=CONFIG, **body) -> GatewayError:
    with pytest.raises(GatewayError) as e:
        parse(config, **body)
    return e.value


def test_single_question():
    r = parse(messages=[{"role": "user", "content": "Hello"}])
    c = r.conversation
    assert (c.question, c.history, c.images) == ("Hello", [], [])
    assert r.generation == {} and r.stream is False  # the server's defaults (greedy, 1024 tokens)


def test_image_gets_the_cards_placeholder_and_texts_are_joined():
    content = [image_part(), {"type": "text", "text": "What is it?"}, {"type": "text", "text": "Be brief."}]
    c = parse(messages=[{"role": "user", "content": content}]).conversation
    assert c.question == "<image>\nWhat is it?\nBe brief."
    assert c.images == [IMAGE]


def test_several_images_are_separate_and_turns_keep_theirs():
    other = "data:image/jpeg;base64," + base64.b64encode(b"jpeg bytes").decode()
    messages = [
        {"role": "user", "content": [image_part(), image_part(other), {"type": "text", "text": "Compare."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "They differ."}]},
        {"role": "user", "content": [image_part(), {"type": "text", "text": "And this one?"}]},
    ]
    c = parse(messages=messages).conversation
    assert c.history == [("Image-1: <image>\nImage-2: <image>\nCompare.", "They differ.")]
    assert c.question == "<image>\nAnd this one?"
    assert c.images == [IMAGE, b"jpeg bytes", IMAGE]
    placeholders = "".join(q for q, _ in c.history) + c.question
    assert placeholders.count("<image>") == len(c.images)  # one per image: the server's "separate" rule


def test_to_chat_request_carries_everything():
    r = parse(messages=[{"role": "user", "content": [image_part(), {"type": "text", "text": "Hi"}]}],
              max_tokens=7, temperature=0.5, top_p=0.9, seed=3, stop=["a", "b"], stream=True,
              stream_options={"include_usage": True}, top_k=5, repetition_penalty=1.1)
    assert r.stream and r.include_usage
    request = r.to_chat_request([IMAGE])
    assert request.question == "<image>\nHi" and request.images == [IMAGE] and request.stream is True
    assert request.generation == {"max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3,
                                  "stop_words": ["a", "b"], "top_k": 5, "repetition_penalty": 1.1}


def test_generation_fields():
    messages = [{"role": "user", "content": "x"}]
    assert parse(messages=messages, max_completion_tokens=5, max_tokens=9).generation == {"max_tokens": 5}
    assert parse(messages=messages, stop="END").generation == {"stop_words": ["END"]}
    assert parse(messages=messages, temperature=0).generation == {"temperature": 0.0}
    assert parse(messages=messages, n=1, presence_penalty=0, user="u", logprobs=False).generation == {}
    assert parse(messages=messages, stream_options={"include_usage": True}).include_usage is False  # not streaming


@pytest.mark.parametrize("body, param", [
    (dict(temperature=-1), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=1.5), "max_tokens"),
    (dict(seed=-1), "seed"),
    (dict(seed=10**400), "seed"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=2.5), "min_tokens"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(top_k="many"), "top_k"),
    (dict(stop=[""]), "stop"),
    (dict(n=3), "n"),
    (dict(frequency_penalty=0.5), "frequency_penalty"),
    (dict(logprobs=True), "logprobs"),
    (dict(tools=[{"type": "function"}]), "tools"),
    (dict(response_format={"type": "json_object"}), "response_format"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(stream="yes"), "stream"),
])
def test_refused_fields(body, param):
    e = refused(messages=[{"role": "user", "content": "x"}], **body)
    assert (e.status, e.param) == (400, param)
    assert e.body()["error"]["type"] == "invalid_request_error"


def test_fields_current_clients_send_are_accepted():
    """openai-python / the Responses-era fields vLLM accepts: not a 400; the unknown ones are reported."""
    r = parse(messages=[{"role": "user", "content": "x"}], verbosity="low", prompt_cache_key="k",
              safety_identifier="s", reasoning_effort="minimal", tool_choice="auto", some_future_field={"a": 1},
              best_of=2)
    assert r.generation == {}
    assert r.ignored == ["best_of", "some_future_field"]  # logged by the app; the known ones are quiet


def test_stream_options():
    messages = [{"role": "user", "content": "x"}]
    r = parse(messages=messages, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    assert (r.include_usage, r.continuous_usage) == (True, True)
    r = parse(messages=messages, stream=True, stream_options={"continuous_usage_stats": True})
    assert (r.include_usage, r.continuous_usage) == (False, True)
    assert parse(messages=messages, stream_options={"continuous_usage_stats": True}).continuous_usage is False
    e = refused(messages=messages, stream=True, stream_options={"continuous_usage_stats": "yes"})
    assert e.param == "stream_options.continuous_usage_stats"


def completion(config=CONFIG, **body):
    return parse_completion({"model": "InternVL-Chat-V1-1", **body}, config)


def test_completion_prompt_is_the_question():
    r = completion(prompt="Hello", max_tokens=5, echo=True, stream=True, suffix="", best_of=1, logprobs=None,
                   tools=[{"x": 1}])
    assert r.endpoint == "completions" and r.stream
    assert (r.conversation.question, r.conversation.history, r.conversation.images) == ("Hello", [], [])
    assert r.generation == {"max_tokens": 5, "exclude_input_in_output": False}
    assert r.ignored == ["tools"]  # a chat field is unknown here: ignored
    assert completion(prompt=["Hi"]).conversation.question == "Hi"


@pytest.mark.parametrize("body, param", [
    (dict(), "prompt"),
    (dict(prompt=[1, 2, 3]), "prompt"),
    (dict(prompt=["a", "b"]), "prompt"),
    (dict(prompt="x", best_of=2), "best_of"),
    (dict(prompt="x", suffix="end"), "suffix"),
    (dict(prompt="x", logprobs=2), "logprobs"),
    (dict(prompt="x", echo="yes"), "echo"),
    (dict(prompt="x", max_tokens=0), "max_tokens"),
])
def test_completion_refusals(body, param):
    with pytest.raises(GatewayError) as e:
        completion(**body)
    assert (e.value.status, e.value.param) == (400, param), e.value.message


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ("hello", "messages"),
    ([{"role": "assistant", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1].role"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "messages"),
    ([{"role": "tool", "content": "a"}], "messages[0].role"),
    ([{"role": "system", "content": "a"}, {"role": "user", "content": "b"}], "messages[0]"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "input_audio"}]}], "messages[0].content[0]"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [image_part()]},
      {"role": "user", "content": "b"}], "messages[1].content[0]"),
    ([{"role": "user", "content": [image_part("data:image/png;base64,@@")]}], "messages[0].content[0].image_url.url"),
    ([{"role": "user", "content": [image_part("data:text/plain;base64,aGk=")]}], "messages[0].content[0].image_url.url"),
    ([{"role": "user", "content": [image_part("ftp://host/x.png")]}], "messages[0].content[0].image_url.url"),
    ([{"role": "user", "content": [image_part("https://host/x.png")]}], "messages[0].content[0].image_url.url"),
])
def test_refused_messages(messages, param):
    e = refused(messages=messages)
    assert (e.status, e.param) == (400, param), e.message


def test_system_messages_can_be_dropped():
    config = GatewayConfig(system_messages="ignore")
    c = parse(config, messages=[{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"}]).conversation
    assert (c.question, c.history) == ("Hi", [])


def test_remote_images_only_where_allowed():
    messages = [{"role": "user", "content": [image_part("https://example.com/cat.png")]}]
    assert refused(messages=messages).code == "remote_images_disabled"
    c = parse(GatewayConfig(allow_remote_images=True), messages=messages).conversation
    assert c.images == [RemoteImage("https://example.com/cat.png", "messages[0].content[0].image_url.url")]
    assert c.question == "<image>\n"


def test_model_is_required_and_checked():
    with pytest.raises(GatewayError) as e:
        parse_chat_completion({"messages": [{"role": "user", "content": "x"}]}, CONFIG)
    assert (e.value.status, e.value.param) == (400, "model")
    with pytest.raises(GatewayError) as e:
        parse_chat_completion({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, CONFIG)
    assert (e.value.status, e.value.code) == (404, "model_not_found")
    assert parse_chat_completion({"model": "internvl_chat", "messages": [{"role": "user", "content": "x"}]}, CONFIG)


def test_data_url_size_limit():
    big = "data:image/png;base64," + base64.b64encode(b"x" * 1000).decode()
    assert parse_data_url(big, "p", 1000) == b"x" * 1000
    with pytest.raises(GatewayError, match="larger than 100 bytes"):
        parse_data_url(big, "p", 100)


@pytest.mark.parametrize("error, status", [
    (InvalidInputError("bad", status="INVALID_ARGUMENT", server_message="in ensemble: bad image"), 400),
    (ServerUnavailableError("down", status="UNAVAILABLE"), 503),
    (ModelNotReadyError("no model"), 503),
    (RequestTimeoutError("slow", status="DEADLINE_EXCEEDED"), 504),
    (InternVLError("llm: RuntimeError: boom"), 500),
    (ValueError("num_patches_list sums to 2"), 400),
])
def test_client_errors_to_http(error, status):
    mapped = from_client_error(error)
    assert mapped.status == status
    assert mapped.body()["error"]["message"]
    if status == 400 and isinstance(error, InvalidInputError):
        assert mapped.message == "in ensemble: bad image"  # the server's own words


def test_gateway_does_not_import_torch():
    code = ("import sys, internvl_gateway.app, internvl_gateway.__main__; "
            "bad = [m for m in ('torch', 'internvl_serve') if m in sys.modules]; sys.exit(f'imported {bad}' if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=GATEWAY_DIR, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_answer_and_chunk_shapes():
    from internvl_gateway import answers

    a = answers.completion("completions", "cmpl-1", "m", "Hi.", "length", 10, 3, created=7)
    assert a == {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m",
                 "choices": [{"index": 0, "text": "Hi.", "finish_reason": "length", "logprobs": None}],
                 "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}}
    assert answers.completion("chat", "c", "m", "Hi.", "cancelled", 1, 1)["choices"][0]["message"] == {
        "role": "assistant", "content": "Hi."}
    u = answers.usage(10, 2)
    c = answers.chunk("completions", "cmpl-1", "m", 7, text="lo", usage_=u)
    assert c["object"] == "text_completion" and c["usage"] == u
    assert c["choices"] == [{"index": 0, "text": "lo", "logprobs": None, "finish_reason": None}]
    c = answers.chunk("chat", "c", "m", 7, role=True)
    assert c["choices"][0]["delta"] == {"role": "assistant", "content": ""} and "usage" not in c
    assert answers.chunk("chat", "c", "m", 7, reason="stop")["choices"][0] == {
        "index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    last = answers.chunk("chat", "c", "m", 7, usage_=u, choices=False)
    assert last["choices"] == [] and last["usage"] == u
    assert answers.new_id("chat").startswith("chatcmpl-") and answers.new_id("completions").startswith("cmpl-")
