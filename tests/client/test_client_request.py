"""Request tensors and response parsing against the contract (no server: real protobuf messages)."""

import json

import numpy as np
import pytest
from tritonclient.grpc import service_pb2
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from internvl_client.request import (
    FINAL_RESPONSE_PARAM,
    INPUTS,
    OUTPUTS,
    ChatRequest,
    ResponseAssembler,
    build_request,
    to_infer_inputs,
)


def _tensors(request):
    out = {}
    for t in to_infer_inputs(request):
        pb = t._get_tensor()
        raw = t._get_content()
        if pb.datatype == "BYTES":
            value = list(deserialize_bytes_tensor(raw))
        else:
            dtype = {"INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64, "BOOL": np.bool_}[pb.datatype]
            value = np.frombuffer(raw, dtype=dtype).tolist()
        out[pb.name] = (pb.datatype, list(pb.shape), value)
    return out


def test_minimal_request_sends_text_and_stream_only():
    got = _tensors(build_request("Hello"))
    assert got == {"text_input": ("BYTES", [1], [b"Hello"]), "stream": ("BOOL", [1], [True])}


def test_full_request_uses_contract_names_and_types():
    request = build_request(
        "Image-1: <image>\nImage-2: <image>\nCompare.",
        images=[b"img-a", b"img-b"],
        history=[("<image>\nfirst", "answer one")],
        num_patches_list=[1, 1],
        generation_config=dict(max_new_tokens=16, do_sample=True, temperature=0.5, top_p=0.9, top_k=3,
                               repetition_penalty=1.1, seed=2**63 + 5, stop=["###"]),
    )
    got = _tensors(request)
    for name, (datatype, _, _) in got.items():
        assert INPUTS[name] == datatype
    assert got["images"] == ("BYTES", [2], [b"img-a", b"img-b"])
    assert json.loads(got["history"][2][0]) == [["<image>\nfirst", "answer one"]]
    assert got["num_patches_list"] == ("INT32", [2], [1, 1])
    assert got["max_tokens"] == ("INT32", [1], [16])
    assert got["temperature"][2] == [pytest.approx(0.5)]
    assert got["top_p"][2] == [pytest.approx(0.9)]
    assert got["top_k"] == ("INT32", [1], [3])
    assert got["seed"] == ("UINT64", [1], [2**63 + 5])
    assert got["stop_words"] == ("BYTES", [1], [b"###"])
    assert "video" not in got and "num_segments" not in got


def test_video_request_sends_num_segments():
    got = _tensors(build_request("What happens?", video=b"mp4-bytes", num_segments=4))
    assert got["video"] == ("BYTES", [1], [b"mp4-bytes"])
    assert got["num_segments"] == ("INT32", [1], [4])


def test_unicode_question_and_history_are_utf8():
    got = _tensors(build_request("这是什么？", history=[("问", "答")]))
    assert got["text_input"][2] == ["这是什么？".encode()]
    assert json.loads(got["history"][2][0].decode("utf-8")) == [["问", "答"]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(images=[b"a"], video=b"v"), "not both"),
        (dict(images=[b"a", b"b"], num_patches_list=[1]), "sums to 1"),
        (dict(images=[b"a"], num_patches_list=[0]), "integers >= 1"),
        (dict(video=b"v", num_segments=0), "num_segments"),
        (dict(history=[("only one",)]), "pair"),
        (dict(history="not a list"), "pairs"),
    ],
)
def test_local_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build_request("q", **kwargs)


def test_client_names_match_the_servers_contract():
    contract = pytest.importorskip("internvl_serve.serving.contract")
    server_inputs = {s.name: s.datatype for s in contract.ENSEMBLE_INPUTS}
    server_outputs = {s.name: s.datatype for s in contract.OUTPUTS}
    assert INPUTS == server_inputs
    assert OUTPUTS == server_outputs


# ---- responses --------------------------------------------------------------------------------


def _response(text=None, finish_reason=None, counts=None, final=False):
    pb = service_pb2.ModelInferResponse(model_name="internvl_chat", id="r1")
    if text is not None:
        pb.outputs.add(name="text_output", datatype="BYTES", shape=[1])
        pb.raw_output_contents.append(serialize_byte_tensor(np.array([text], dtype=object)).item())
        pb.outputs.add(name="finish_reason", datatype="BYTES", shape=[1])
        pb.raw_output_contents.append(
            serialize_byte_tensor(np.array([finish_reason or b""], dtype=object)).item()
        )
        for name, value in zip(("num_input_tokens", "num_output_tokens"), counts or (3, 1)):
            pb.outputs.add(name=name, datatype="INT32", shape=[1])
            pb.raw_output_contents.append(np.array([value], dtype=np.int32).tobytes())
    pb.parameters[FINAL_RESPONSE_PARAM].bool_param = final
    return pb


def test_assembler_streams_deltas_then_final_metadata():
    asm = ResponseAssembler("r1")
    c1 = asm.add(_response(b"Hel", counts=(10, 1)))
    c2 = asm.add(_response(b"lo", b"stop", counts=(10, 2)))
    c3 = asm.add(_response(final=True))  # Triton's empty final response
    assert (c1.text, c1.finish_reason, c1.final) == ("Hel", None, False)
    assert (c2.text, c2.finish_reason, c2.num_output_tokens) == ("lo", "stop", 2)
    assert c3.final and c3.text == ""
    r = asm.response()
    assert (r.text, r.finish_reason, r.num_input_tokens, r.num_output_tokens) == ("Hello", "stop", 10, 2)


def test_assembler_joins_a_character_split_over_two_responses():
    snow = "❄".encode()  # 3 bytes
    asm = ResponseAssembler()
    assert asm.add(_response(b"a" + snow[:2])).text == "a"
    assert asm.add(_response(snow[2:] + b"b", b"length", final=True)).text == "❄b"
    assert asm.response().text == "a❄b"
    assert asm.response().finish_reason == "length"


def test_final_flag_on_a_non_empty_response():
    asm = ResponseAssembler()
    chunk = asm.add(_response(b"whole answer", b"stop", final=True))
    assert chunk.final and chunk.text == "whole answer" and chunk.finish_reason == "stop"


def test_chat_request_validate_rejects_unknown_contract_inputs():
    with pytest.raises(ValueError, match="unknown contract inputs"):
        ChatRequest("q", generation={"beam_width": 2}).validate()
