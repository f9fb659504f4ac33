"""The ensemble's contract (serving/contract.py) and the parsing and validation of its requests
(serving/parsing.py, serving/limits.py; Triton-free): every error message."""
import base64
import json

import numpy as np
import pytest

from internvl_serve.serving import contract as c
from internvl_serve.serving.contract import ChatRequest, InvalidInput, ServingLimits, response_arrays
from internvl_serve.serving.parsing import check_request_parameters, parse_chat_request, parse_generation_request

PNG = b"\x89PNG\r\n\x1a\nfake-but-nonempty"


def b(*values) -> np.ndarray:
    return np.array([v.encode() if isinstance(v, str) else v for v in values], dtype=object)


def i32(*values) -> np.ndarray:
    return np.array(values, dtype=np.int32)


def f32(*values) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def chat(**inputs) -> ChatRequest:
    inputs.setdefault("text_input", b("What is it?"))
    return parse_chat_request(inputs)


def chat_error(limits=ServingLimits(), **inputs) -> str:
    inputs.setdefault("text_input", b("What is it?"))
    with pytest.raises(InvalidInput) as e:
        parse_chat_request(inputs, limits)
    return str(e.value)


# ---- the table ----------------------------------------------------------------------------------


def test_table_names_are_unique_and_only_text_input_is_required():
    names = [s.name for s in c.ENSEMBLE_INPUTS]
    assert len(names) == len(set(names))
    assert [s.name for s in c.ENSEMBLE_INPUTS if not s.optional] == ["text_input"]
    assert {s.datatype for s in c.ENSEMBLE_INPUTS + c.OUTPUTS} <= {"BYTES", "INT32", "FP32", "UINT64", "BOOL"}
    assert c.SPECS["text_input"].config_type == "TYPE_STRING"
    assert c.SPECS["max_tokens"].config_type == "TYPE_INT32"


def test_markdown_table_lists_every_tensor_with_its_default():
    table = c.contract_table_markdown()
    for s in c.ENSEMBLE_INPUTS + c.OUTPUTS:
        assert f"| `{s.name}` | {s.datatype} |" in table
    assert "| `max_tokens` | INT32 | [1] | 1024 | [1, 2^31-1] |" in table
    assert "| `top_p` | FP32 | [1] | 1.0 | (0, 1] |" in table
    assert "| `text_input` | BYTES | [1] | required |  |" in table


# ---- chat: the happy paths ----------------------------------------------------------------------


def test_text_only_defaults():
    r = chat()
    assert r == ChatRequest(question="What is it?", images=[], video=None, num_segments=8, history=None,
                            num_patches_list=None)


def test_images_raw_and_as_data_urls():
    url = b"data:image/png;base64," + base64.b64encode(PNG)
    r = chat(images=b(PNG, url, "data:image/jpeg;name=x.jpg;base64," + base64.encodebytes(PNG).decode()))
    assert r.images == [PNG, PNG, PNG]


def test_empty_images_tensor_means_no_images():
    assert chat(images=np.zeros((0,), dtype=object)).images == []


def test_history_and_num_patches_list():
    history = json.dumps([["<image>\nWhat is it?", "A cat."], ["And?", "Grey."]])
    r = chat(history=b(history), images=b(PNG, PNG), num_patches_list=i32(1, 1))
    assert r.history == [("<image>\nWhat is it?", "A cat."), ("And?", "Grey.")]
    assert r.num_patches_list == [1, 1]
    assert chat(history=b("[]")).history == []


def test_video_and_num_segments():
    r = chat(video=b(b"\x00\x00\x00\x18ftypmp42"), num_segments=i32(4))
    assert r.video.startswith(b"\x00\x00") and r.num_segments == 4
    url = "data:video/mp4;base64," + base64.b64encode(b"movie").decode()
    assert chat(video=b(url)).video == b"movie"


def test_str_elements_are_accepted_as_utf8():
    assert chat(text_input=np.array(["Qué es?"], dtype=object)).question == "Qué es?"


# ---- chat: every error --------------------------------------------------------------------------


def test_missing_question():
    with pytest.raises(InvalidInput, match=r"input 'text_input' is required \(BYTES \[1\]\)"):
        parse_chat_request({})


@pytest.mark.parametrize("question", ["", "   ", "\n\t"])
def test_empty_question(question):
    assert chat_error(text_input=b(question)) == "input 'text_input' is empty: send a non-blank question"


def test_invalid_utf8():
    assert chat_error(text_input=b(b"caf\xe9")) == "input 'text_input' is not valid UTF-8 (bad byte at offset 3)"


def test_question_too_long():
    msg = chat_error(ServingLimits(max_question_bytes=8), text_input=b("x" * 9))
    assert msg == "input 'text_input' is 9 bytes; at most 8 allowed"


def test_wrong_dtype():
    assert chat_error(text_input=f32(1.0)) == "input 'text_input' must be BYTES, got FP32"
    assert chat_error(num_segments=np.array([8], np.int64)) == "input 'num_segments' must be INT32, got INT64"
    assert chat_error(images=i32(1)) == "input 'images' must be BYTES, got INT32"


def test_wrong_shape():
    assert chat_error(text_input=b("a", "b")) == "input 'text_input' must have shape [1], got [2]"
    assert chat_error(images=np.array([[PNG]], dtype=object)) == "input 'images' must have shape [-1], got [1,1]"


def test_too_many_images():
    msg = chat_error(ServingLimits(max_images=2), images=b(PNG, PNG, PNG))
    assert msg == "input 'images' holds 3 images; at most 2 allowed"


def test_empty_image():
    assert chat_error(images=b(PNG, b"")) == "input 'images[1]' is empty: send an encoded image file"


def test_image_too_big():
    msg = chat_error(ServingLimits(max_image_bytes=10), images=b(b"x" * 11))
    assert msg == "input 'images[0]' is 11 bytes; at most 10 allowed"
    url = "data:image/png;base64," + base64.b64encode(b"x" * 100).decode()
    assert chat_error(ServingLimits(max_image_bytes=10), images=b(url)) == \
        "input 'images[0]' decodes to more than 10 bytes"


def test_malformed_data_urls():
    assert chat_error(images=b("data:image/png;base64,@@@@")) == \
        "input 'images[0]' has a data URL whose payload is not valid base64"
    assert chat_error(images=b("data:text/plain;base64,aGk=")) == (
        "input 'images[0]' starts with 'data:' but is not a 'image' data URL; "
        "expected data:image/<type>;base64,<payload>")
    assert chat_error(images=b("data:image/png,rawtext")).startswith("input 'images[0]' starts with 'data:'")
    assert chat_error(video=b("data:image/png;base64,aGk=")).startswith("input 'video' starts with 'data:' but is not a 'video'")


def test_video_errors():
    assert chat_error(video=b(b"")) == "input 'video' is empty: send an encoded video file"
    assert chat_error(ServingLimits(max_video_bytes=3), video=b(b"abcd")) == \
        "input 'video' is 4 bytes; at most 3 allowed"
    assert chat_error(video=b(b"mp4"), images=b(PNG)) == "send either 'images' or 'video', not both"
    assert chat_error(ServingLimits(max_frames=8), video=b(b"mp4"), num_segments=i32(9)) == \
        "input 'num_segments' must be between 1 and 8, got 9"
    assert chat_error(video=b(b"mp4"), num_segments=i32(0)) == "input 'num_segments' must be between 1 and 12, got 0"
    assert chat_error(video=b(b"mp4"), num_patches_list=i32(1)) == \
        "input 'num_patches_list' does not apply to a video (one frame per <image>)"
    assert chat_error(num_patches_list=i32(*[1] * 13)) == \
        "input 'num_patches_list' holds 13 counts; at most 12 allowed (one per <image> placeholder)"


@pytest.mark.parametrize("history, expected", [
    ("[[", "input 'history' is not valid JSON (Expecting value at char 2)"),
    ('{"q": "a"}', "input 'history' must be a JSON list of [question, answer] string pairs"),
    ('[["q"]]', "input 'history' entry 0 must be a [question, answer] pair of strings"),
    ('[["q", "a"], ["q", 1]]', "input 'history' entry 1 must be a [question, answer] pair of strings"),
    ('["qa"]', "input 'history' entry 0 must be a [question, answer] pair of strings"),
    ("[" * 10_000 + "]" * 10_000, "input 'history' nests JSON lists or objects too deeply"),  # was RecursionError
    ('[["q", "a"], ["\\ud800?", "a"]]', "input 'history' entry 1 holds '\\ud800' (a lone UTF-16 surrogate"),
])
def test_malformed_history(history, expected):
    msg = chat_error(history=b(history))
    assert msg.startswith(expected), msg
    assert 'e.g. [["<image>\\nWhat is it?", "A cat."]]' in msg or "surrogate" in msg


def test_images_and_video_bytes_of_a_request_are_limited_together():
    limits = ServingLimits(max_request_bytes=10)
    assert chat(images=b(b"x" * 5, b"y" * 5)).images == [b"x" * 5, b"y" * 5]  # the default allows it
    with pytest.raises(InvalidInput, match=r"^the request's images and video are 12 bytes in total; at most 10 allowed$"):
        parse_chat_request({"text_input": b("q"), "images": b(b"x" * 6, b"y" * 6)}, limits)
    url = "data:image/png;base64," + base64.b64encode(b"z" * 11).decode()  # counted decoded
    assert chat_error(limits, images=b(url)).startswith("the request's images and video are 11 bytes")
    assert chat_error(limits, video=b(b"v" * 11)).startswith("the request's images and video are 11 bytes")


def test_history_too_long_and_not_utf8():
    assert chat_error(ServingLimits(max_history_bytes=4), history=b("[[\"a\", \"b\"]]")) == \
        "input 'history' is 12 bytes; at most 4 allowed"
    assert chat_error(history=b(b"[\xff]")) == "input 'history' is not valid UTF-8 (bad byte at offset 1)"


def test_num_patches_list_must_be_positive():
    assert chat_error(num_patches_list=i32(1, 0)) == \
        "input 'num_patches_list' must list one positive count per <image> placeholder, got [1, 0]"
    assert chat_error(num_patches_list=np.zeros((0,), np.int32)).startswith("input 'num_patches_list' must list")


# ---- limits ---------------------------------------------------------------------------------------


def test_limit_defaults():
    limits = ServingLimits()
    assert limits.max_request_bytes == 64 * 2**20 and limits.max_output_tokens == 4096
    assert limits.max_request_bytes >= limits.max_image_bytes and limits.max_request_bytes >= limits.max_video_bytes


def test_limits_from_parameters():
    limits = ServingLimits.from_parameters({"max_images": "3", "device": "cuda", "max_frames": " 4 "})
    assert limits.max_images == 3 and limits.max_frames == 4
    assert limits.max_video_bytes == ServingLimits().max_video_bytes
    for bad in ("0", "-1", "many", ""):
        with pytest.raises(ValueError, match=f"parameter 'max_images' must be a positive integer, got '{bad}'"):
            ServingLimits.from_parameters({"max_images": bad})


# ---- generation -----------------------------------------------------------------------------------


def gen(**inputs):
    return parse_generation_request(inputs)


def gen_error(**inputs) -> str:
    with pytest.raises(InvalidInput) as e:
        parse_generation_request(inputs)
    return str(e.value)


def test_generation_defaults():
    r = gen()
    s = r.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.seed) == (1024, 0.0, 1.0, 0, 1.0, 0)
    assert tuple(s.stop) == ()
    assert r.stream is False and r.exclude_input_in_output is True


def test_generation_values():
    r = gen(max_tokens=i32(7), temperature=f32(0.5), top_p=f32(0.9), top_k=i32(5), repetition_penalty=f32(1.1),
            seed=np.array([2**63], np.uint64), stop_words=b("END", "。"), stream=np.array([True]),
            exclude_input_in_output=np.array([False]))
    s = r.sampling
    assert (s.max_tokens, s.top_k, s.seed) == (7, 5, 2**63)
    assert s.temperature == pytest.approx(0.5) and s.top_p == pytest.approx(0.9)
    assert s.repetition_penalty == pytest.approx(1.1)
    assert tuple(s.stop) == ("END", "。")
    assert r.stream is True and r.exclude_input_in_output is False


def test_generation_wrong_types_and_shapes():
    assert gen_error(max_tokens=f32(16)) == "input 'max_tokens' must be INT32, got FP32"
    assert gen_error(temperature=np.array([0.0])) == "input 'temperature' must be FP32, got FP64"
    assert gen_error(seed=np.array([1], np.int64)) == "input 'seed' must be UINT64, got INT64"
    assert gen_error(stream=i32(1)) == "input 'stream' must be BOOL, got INT32"
    assert gen_error(max_tokens=i32(1, 2)) == "input 'max_tokens' must have shape [1], got [2]"


@pytest.mark.parametrize("name, value", [
    ("max_tokens", i32(0)), ("temperature", f32(-1.0)), ("top_p", f32(0.0)), ("top_p", f32(1.5)),
    ("top_k", i32(-1)), ("repetition_penalty", f32(0.0)), ("min_length", i32(-1)),
    ("random_seed", np.array([1], np.int64)),
])
def test_generation_out_of_range_names_the_tensor(name, value):
    assert gen_error(**{name: value}).startswith(f"input '{name}'")


def test_max_tokens_upper_bound():
    assert gen(max_tokens=i32(4096)).sampling.max_tokens == 4096
    assert gen_error(max_tokens=i32(4097)) == "input 'max_tokens' is 4097; at most 4096 allowed"
    assert gen_error(max_tokens=i32(2**31 - 1)) == f"input 'max_tokens' is {2**31 - 1}; at most 4096 allowed"
    with pytest.raises(InvalidInput, match="input 'max_tokens' is 9; at most 8 allowed"):
        parse_generation_request({"max_tokens": i32(9)}, ServingLimits(max_output_tokens=8))
    assert gen_error(max_tokens=i32(-1)).startswith("input 'max_tokens': max_tokens must be an integer >= 1")


@pytest.mark.parametrize("parameters", [None, "", "{}", {}])
def test_no_request_parameters_is_fine(parameters):
    check_request_parameters(parameters)


@pytest.mark.parametrize("parameters, message", [
    ('{"foo": "bar", "a": 1}', "unknown request parameter(s) 'a', 'foo': this model takes no request parameters; "
                               "its settings are the inputs max_tokens, min_length, temperature"),
    ({"max_token": 4}, "unknown request parameter(s) 'max_token'"),
    ({"max_tokens": 5, "x": 1}, "request parameter(s) 'max_tokens' must be sent as input tensors, not as request "
                                "parameters"),
    ("{not json", "the request's parameters are not valid JSON"),
])
def test_request_parameters_are_refused(parameters, message):
    with pytest.raises(InvalidInput) as e:
        check_request_parameters(parameters)
    assert str(e.value).startswith(message)


def test_text_input_is_required_but_declared_optional_to_triton():
    assert c.DECLARED_OPTIONAL == ("text_input",)
    assert all(not c.SPECS[name].optional for name in c.DECLARED_OPTIONAL)


def test_stop_words_errors():
    assert gen(stop_words=b("")).sampling.stop == ()  # TensorRT-LLM's "" for none (was refused)
    assert gen_error(stop_words=b(b"\xff")) == "input 'stop_words[0]' is not valid UTF-8 (bad byte at offset 0)"
    with pytest.raises(InvalidInput, match="input 'stop_words' holds 2 strings; at most 1 allowed"):
        parse_generation_request({"stop_words": b("a", "b")}, ServingLimits(max_stop_words=1))


# ---- responses ------------------------------------------------------------------------------------


def test_response_arrays_types():
    out = response_arrays("héllo", "stop", 12, 3)
    assert set(out) == {s.name for s in c.OUTPUTS}
    assert out["text_output"].dtype == object and out["text_output"][0] == "héllo".encode()
    assert out["finish_reason"][0] == b"stop"
    assert out["num_input_tokens"].dtype == np.int32 and out["num_output_tokens"][0] == 3


def test_readme_contract_table_is_the_generated_one():
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    begin, end = "<!-- contract-table:begin -->\n", "<!-- contract-table:end -->"
    table = readme[readme.index(begin) + len(begin): readme.index(end)]
    assert table.strip() == c.contract_table_markdown().strip()
