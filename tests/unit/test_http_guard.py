"""The HTTP guard's checks (serving/http_guard.py), without a server: what it refuses and the message."""
import json

import pytest

from internvl_serve.serving.contract import ENSEMBLE_INPUTS
from internvl_serve.serving.http_guard import (MAX_JSON_DEPTH, GuardConfig, Refused, check_request, json_depth,
                                               parse_json)

CONFIG = GuardConfig(upstream="http://127.0.0.1:1")
GENERATE = "/v2/models/internvl_chat/generate"


def refused(path, body, method="POST", headers=None, config=CONFIG) -> Refused:
    with pytest.raises(Refused) as e:
        check_request(config, method, path, headers or {}, body if isinstance(body, bytes) else json.dumps(body).encode())
    return e.value


def test_json_depth():
    assert json_depth(1) == 0 and json_depth([]) == 1 and json_depth({"a": [1, [2]]}) == 3
    deep = []
    for _ in range(5000):
        deep = [deep]
    assert json_depth(deep) == 5001  # no recursion


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 200_000])
def test_deep_json_is_refused(depth):
    body = ('{"text_input": ' + "[" * depth + "]" * depth + "}").encode()
    for path in (GENERATE, "/v2/models/internvl_chat/infer", "/v2/logging"):
        e = refused(path, body)
        assert e.status == 400 and f"deeper than {MAX_JSON_DEPTH} levels" in str(e)


def test_malformed_json_is_refused():
    e = refused(GENERATE, b'{"text_input": "hi", ')
    assert e.status == 400 and "not valid JSON" in str(e)
    assert "not valid JSON" in str(refused(GENERATE, b"\xff\xfe"))
    assert "must be a JSON object of inputs, got a list" in str(refused(GENERATE, [1]))


@pytest.mark.parametrize("body, message", [
    ({"text_input": "hi", "max_tokens": 2**32 + 1}, "input 'max_tokens' must be in [-2147483648, 2147483647] (INT32), got 4294967297"),
    ({"text_input": "hi", "top_k": 2**32}, "input 'top_k' must be in [-2147483648, 2147483647] (INT32), got 4294967296"),
    ({"text_input": "hi", "seed": -1}, "input 'seed' must be in [0, 18446744073709551615] (UINT64), got -1"),
    ({"text_input": "hi", "max_tokens": "many"}, "input 'max_tokens' must hold integers (INT32), got a string"),
    ({"text_input": "hi", "max_tokens": 1.5}, "input 'max_tokens' must hold integers (INT32), got a number"),
    ({"text_input": "hi", "max_tokens": True}, "input 'max_tokens' must hold integers (INT32), got a boolean"),
    ({"text_input": "hi", "temperature": "hot"}, "input 'temperature' must hold numbers (FP32), got a string"),
    ({"text_input": "hi", "temperature": 1e39}, "input 'temperature' must be a finite FP32 number, got 1e+39"),
    ({"text_input": "hi", "stream": 1}, "input 'stream' must hold booleans (BOOL), got an integer"),
    ({"text_input": 5}, "input 'text_input' must hold strings (BYTES), got an integer"),
    ({"text_input": ["a", "b"]}, "input 'text_input' takes one value (BYTES), got a list of 2: a batch of one "
                                 "request at most"),
    ({"text_input": [["a"], ["b"]]}, "input 'text_input' takes one value (BYTES), got a list of 2"),
    ({"text_input": "hi", "max_tokens": []}, "input 'max_tokens' takes one value (INT32), got a list of 0"),
    ({"text_input": "hi", "max_tokens": [[2**31]]}, "input 'max_tokens' must be in [-2147483648, 2147483647]"),
    ({"text_input": "hi", "stop_words": [["a", "b"]]}, "input 'stop_words' must hold strings (BYTES), got a list"),
    ({"text_input": "hi", "images": ["data:", 3]}, "input 'images' must hold strings (BYTES), got an integer"),
    ({"text_input": "hi", "num_patches_list": [1, 2**31]}, "input 'num_patches_list' must be in"),
])
def test_generate_inputs_are_checked_against_their_type(body, message):
    for path in (GENERATE, "/v2/models/internvl_chat_bls/generate_stream", "/v2/models/internvl_chat/versions/1/generate"):
        e = refused(path, body)
        assert e.status == 400 and message in str(e)


def test_good_generate_bodies_pass():
    body = {"text_input": "hi", "images": ["data:image/png;base64,AA=="], "max_tokens": 2**31 - 1, "top_k": 0,
            "temperature": 0.5, "top_p": 1, "seed": 2**64 - 1, "stream": True, "stop_words": ["###"],
            "num_patches_list": [1], "some_parameter": {"x": 1}}
    assert set(body) - {"some_parameter"} <= {spec.name for spec in ENSEMBLE_INPUTS}
    check_request(CONFIG, "POST", GENERATE, {}, json.dumps(body).encode())
    check_request(CONFIG, "GET", "/v2/health/ready", {}, b"")
    # one value as a list of one, or with TensorRT-LLM's leading batch dimension of 1: tritonserver reads it
    trtllm = {"text_input": [["hi"]], "max_tokens": [[4]], "temperature": [0.5], "stream": [[True]], "seed": [[2**64 - 1]]}
    check_request(CONFIG, "POST", GENERATE, {}, json.dumps(trtllm).encode())


def test_infer_data_is_checked_against_its_datatype():
    def infer(name, datatype, data):
        return {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["hi"]},
                           {"name": name, "shape": [1], "datatype": datatype, "data": data}]}

    path = "/v2/models/internvl_chat/infer"
    assert "input 'max_tokens' must be in" in str(refused(path, infer("max_tokens", "INT32", [2**32 + 1])))
    assert "input 'top_k' must be in" in str(refused(path, infer("top_k", "INT32", [[2**32]])))
    assert "input 'max_tokens' must be INT32, got FP32" in str(refused(path, infer("max_tokens", "FP32", [1.0])))
    assert "needs 'inputs'" in str(refused(path, {"outputs": []}))
    check_request(CONFIG, "POST", path, {}, json.dumps(infer("max_tokens", "INT32", [[16]])).encode())
    # binary tensor data: only the JSON header is parsed
    header = json.dumps(infer("max_tokens", "INT32", [2**32])).encode()
    headers = {"inference-header-content-length": str(len(header))}
    assert "input 'max_tokens' must be in" in str(refused(path, header + b"\x00\xff", headers=headers))
    good = json.dumps(infer("max_tokens", "INT32", [5])).encode()
    check_request(CONFIG, "POST", path, {"inference-header-content-length": str(len(good))}, good + b"\xff\x00")


def test_infer_shapes_must_fit_their_data():
    """Issue #14 "Crash 2": a shape whose element count wraps past 2**64 (here [2**62 + 1] INT32 with 4 bytes)
    passes Triton 2.51's byte-size check and aborts the Python stub; the guard counts exactly."""
    path = "/v2/models/internvl_chat/infer"

    def infer(tensor):
        return {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["hi"]}, tensor]}

    overflow = {"name": "num_patches_list", "shape": [2**62 + 1], "datatype": "INT32",
                "parameters": {"binary_data_size": 4}}
    header = json.dumps(infer(overflow)).encode()
    message = str(refused(path, header + b"\1\0\0\0", headers={"inference-header-content-length": str(len(header))}))
    assert "input 'num_patches_list' of shape [4611686018427387905] (INT32) needs 18446744073709551620 bytes" in message
    json_data = {"name": "num_patches_list", "shape": [2**62 + 1], "datatype": "INT32", "data": [1]}
    assert "needs 18446744073709551620 bytes" in str(refused(path, infer(json_data)))
    assert "has 2 values; its shape [3] holds 3" in str(refused(path, infer(
        {"name": "num_patches_list", "shape": [3], "datatype": "INT32", "data": [1, 2]})))
    assert "none negative" in str(refused(path, infer({"name": "x", "shape": [-1], "datatype": "INT32", "data": []})))
    assert "needs 'shape'" in str(refused(path, infer({"name": "x", "shape": "3", "datatype": "INT32", "data": [1]})))
    wrong = json.dumps(infer({**overflow, "shape": [1], "parameters": {"binary_data_size": 8}})).encode()
    assert "binary_data_size 8 does not fit shape [1] (INT32)" in str(
        refused(path, wrong + b"\0" * 8, headers={"inference-header-content-length": str(len(wrong))}))
    check_request(CONFIG, "POST", path, {}, json.dumps(infer(
        {"name": "num_patches_list", "shape": [1, 2], "datatype": "INT32", "data": [[1, 2]]})).encode())


def test_only_the_configured_models_take_inference():
    for path in ("/v2/models/llm/generate", "/v2/models/preprocess/infer", "/v2/models/vision/versions/1/infer"):
        e = refused(path, {"text_input": "hi"})
        assert e.status == 404 and "is not served over HTTP here" in str(e)
    check_request(CONFIG, "GET", "/v2/models/vision/stats", {}, b"")  # statistics and metadata stay open
    check_request(GuardConfig(upstream="x", models=("echo",)), "POST", "/v2/models/echo/infer", {},
                  b'{"inputs": []}')


def test_parse_json_refuses_beyond_the_limit():
    assert parse_json(b"[[1]]", max_depth=2) == [[1]]
    with pytest.raises(Refused, match="deeper than 1 levels"):
        parse_json(b"[[1]]", max_depth=1)
