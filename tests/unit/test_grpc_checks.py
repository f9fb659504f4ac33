"""The gRPC guard's pure checks (grpc_checks.py) on hand-built ModelInferRequest messages; no server."""
from __future__ import annotations

import pytest
from tritonclient.grpc import service_pb2 as pb

from internvl_client.errors import InvalidInputError, ModelNotReadyError, from_grpc_status
from internvl_serve.serving.contract import ServingLimits
from internvl_serve.serving.grpc_checks import (
    ADMIN_METHODS, GuardPolicy, Refused, check_admin, check_infer_request, default_max_request_bytes,
)

POLICY = GuardPolicy()
HEADER = "triton-grpc-protocol-admin-key"


def request(model="internvl_chat", *tensors, raw=True):
    """tensors: (name, datatype, shape, data bytes) -> a ModelInferRequest with raw contents."""
    r = pb.ModelInferRequest(model_name=model, id="r1")
    for name, datatype, shape, data in tensors:
        r.inputs.add(name=name, datatype=datatype, shape=shape)
        if raw:
            r.raw_input_contents.append(data)
    return r


def text(value: bytes = b"hi"):
    return ("text_input", "BYTES", [1], len(value).to_bytes(4, "little") + value)


def refusal(r, policy=POLICY) -> Refused:
    with pytest.raises(Refused) as e:
        check_infer_request(r, policy)
    return e.value


def test_a_normal_chat_request_passes():
    check_infer_request(request("internvl_chat", text(), ("max_tokens", "INT32", [1], b"\x08\0\0\0")), POLICY)
    check_infer_request(request("internvl_chat_bls", text()), POLICY)


def test_a_shape_whose_product_overflows_64_bits_is_refused_naming_the_input():
    r = refusal(request("internvl_chat", text(), ("num_patches_list", "INT32", [2**62 + 1], b"\x01\0\0\0")))
    assert r.code == "INVALID_ARGUMENT"
    assert r.message == ("unexpected shape for input 'num_patches_list' for model 'internvl_chat': shape "
                         "[4611686018427387905] of INT32 needs 18446744073709551620 bytes, more than the "
                         f"{POLICY.max_request_bytes} a request may carry (refused by the gRPC guard)")
    # the SDK classifies it as the caller's mistake
    assert isinstance(from_grpc_status(None, r.message), InvalidInputError)
    assert isinstance(from_grpc_status(r.code, r.message), InvalidInputError)


def test_a_product_that_wraps_to_zero_with_no_data_is_refused():
    r = refusal(request("internvl_chat", text(), ("num_patches_list", "INT32", [2**62, 4], b"")))
    assert "'num_patches_list'" in r.message


@pytest.mark.parametrize("shape,data,why", [
    ([2], b"\x01\0\0\0", "needs 8 bytes but 4 were sent"),
    ([1], b"\x01\0\0\0\0", "needs 4 bytes but 5 were sent"),
    ([-1], b"", "has a negative dimension"),
    ([1] * 17, b"\x01\0\0\0", "17 dimensions, at most 16 allowed"),
])
def test_fixed_size_inputs_must_match_their_bytes(shape, data, why):
    assert why in refusal(request("internvl_chat", text(), ("max_tokens", "INT32", shape, data))).message


def test_bytes_inputs_need_a_length_prefix_per_element():
    r = refusal(request("internvl_chat", ("images", "BYTES", [3], b"\0" * 8)))
    assert "'images'" in r.message and "3 elements but only 8 bytes" in r.message
    check_infer_request(request("internvl_chat", ("images", "BYTES", [2], b"\0" * 8)), POLICY)


def test_typed_contents_are_counted_and_missing_data_refused():
    r = request("internvl_chat", ("max_tokens", "INT32", [3], b""), raw=False)
    r.inputs[0].contents.int_contents.extend([1, 2])
    assert "3 elements but 2 values" in refusal(r).message
    r.inputs[0].contents.int_contents.append(3)
    check_infer_request(r, POLICY)
    assert "no data was sent" in refusal(request("internvl_chat", ("seed", "UINT64", [1], b""), raw=False)).message


def test_inputs_counts_and_datatypes_are_bounded():
    many = [(f"x{i}", "BOOL", [1], b"\x01") for i in range(65)]
    assert "65 inputs, at most 64" in refusal(request("internvl_chat", *many)).message
    r = request("internvl_chat", text())
    r.raw_input_contents.append(b"")
    assert "1 inputs but 2 raw input contents" in refusal(r).message
    assert "'FP128'" in refusal(request("internvl_chat", ("x", "FP128", [1], b"\0" * 16))).message


def test_the_byte_limit_is_configurable():
    small = GuardPolicy(max_request_bytes=10)
    assert "more than the 10" in refusal(request("internvl_chat", ("x", "BOOL", [11], b"\1" * 11)), small).message
    assert "'images' for model 'internvl_chat': 11 bytes, more than the 10" in refusal(
        request("internvl_chat", ("images", "BYTES", [1], b"\7\0\0\0" + b"\0" * 7)), small).message
    two = request("internvl_chat", ("a", "BOOL", [6], b"\1" * 6), ("b", "BOOL", [6], b"\1" * 6))
    assert "inputs of model 'internvl_chat': 12 bytes in all, more than the 10" in refusal(two, small).message
    # preprocess's own limits (contract.ServingLimits), with room for base64 data URLs
    assert default_max_request_bytes() == -(-64 * 2**20 * 4 // 3) + 32 * 2**10 + 256 * 2**10 + 2**20
    assert default_max_request_bytes(ServingLimits(max_request_bytes=3)) == 4 + 32 * 2**10 + 256 * 2**10 + 2**20


@pytest.mark.parametrize("model", ["preprocess", "vision", "llm", "nonexistent"])
def test_steps_and_unknown_models_are_not_served(model):
    r = refusal(request(model, ("input_ids", "INT32", [1], b"\0" * 4)))
    assert r.code == "NOT_FOUND" and f"'{model}'" in r.message
    assert isinstance(from_grpc_status(None, r.message), ModelNotReadyError)
    check_infer_request(request(model, ("input_ids", "INT32", [1], b"\0" * 4)), GuardPolicy(expose_all_models=True))


def test_the_llm_cancel_side_channel_passes_and_nothing_more():
    cancel = ("cancel_request_id", "BYTES", [1], b"\x02\0\0\0ab")
    key = ("cancel_key", "BYTES", [1], b"\x01\0\0\0k")
    check_infer_request(request("llm", cancel), POLICY)
    check_infer_request(request("llm", cancel, key), POLICY)
    assert refusal(request("llm", cancel, ("input_ids", "INT32", [1], b"\0" * 4))).code == "NOT_FOUND"
    assert refusal(request("llm")).code == "NOT_FOUND"
    # the shape checks apply to the side channel too
    assert refusal(request("llm", ("cancel_request_id", "BYTES", [2**62], b"ab"))).code == "INVALID_ARGUMENT"


def test_admin_methods_need_the_key():
    check_admin("ModelInfer", (), POLICY, HEADER)
    check_admin("ServerMetadata", (), POLICY, HEADER)
    keyed = GuardPolicy(admin_key="k" * 20)
    for method in ("RepositoryModelLoad", "RepositoryModelUnload", "SystemSharedMemoryRegister"):
        assert method in ADMIN_METHODS
        for policy, metadata in [(POLICY, ()), (POLICY, ((HEADER, "k" * 20),)), (keyed, ()),
                                 (keyed, ((HEADER, "wrong"),))]:
            with pytest.raises(Refused) as e:
                check_admin(method, metadata, policy, HEADER)
            assert e.value.code == "PERMISSION_DENIED" and method in e.value.message
        check_admin(method, ((HEADER, "k" * 20),), keyed, HEADER)


def test_the_guard_refuses_what_it_cannot_parse_and_names_requests_it_can_cancel():
    from internvl_serve.serving import grpc_guard

    with pytest.raises(Refused) as e:
        grpc_guard._parse(b"\xff\xff\xff")
    assert e.value.code == "INVALID_ARGUMENT" and "unable to parse" in e.value.message
    anonymous = request("internvl_chat", text())
    anonymous.id = ""
    forwarded, request_id, key = grpc_guard.cancellable(anonymous, anonymous.SerializeToString())
    assert request_id.startswith("guard-") and pb.ModelInferRequest.FromString(forwarded).id == request_id


def test_the_guard_adds_a_cancel_key_where_the_client_sent_none():
    from internvl_serve.serving import grpc_guard

    r = request("internvl_chat", text())
    forwarded, request_id, key = grpc_guard.cancellable(r, r.SerializeToString())
    sent = pb.ModelInferRequest.FromString(forwarded)
    assert [t.name for t in sent.inputs] == ["text_input", "cancel_key"]
    assert sent.raw_input_contents[1] == len(key).to_bytes(4, "little") + key.encode() and len(key) >= 32
    check_infer_request(sent, POLICY)
    keyed = request("internvl_chat", text(), ("cancel_key", "BYTES", [1], b"\3\0\0\0abc"))
    assert grpc_guard.cancellable(keyed, b"as sent") == (b"as sent", "r1", "abc")
    cancel = grpc_guard.cancel_request("r1", "abc")
    assert [t.name for t in cancel.inputs] == ["cancel_request_id", "cancel_key"]
    assert cancel.raw_input_contents[0] == b"\2\0\0\0r1"
    check_infer_request(cancel, POLICY)  # the guard's own cancel passes its checks


def test_a_leading_batch_dimension_of_one_is_dropped_from_the_chat_models_inputs():
    """TensorRT-LLM's clients send `text_input` [1,1], `max_tokens` [1,1]; the chat models take [1]."""
    from internvl_serve.serving.grpc_checks import batch_of_one, drop_batch_of_one

    for model in ("internvl_chat", "internvl_chat_bls"):
        r = request(model, ("text_input", "BYTES", [1, 1], b"\2\0\0\0hi"), ("max_tokens", "INT32", [1, 1], b"\x08\0\0\0"),
                    ("images", "BYTES", [1, 2], b"\1\0\0\0a\1\0\0\0b"), ("temperature", "FP32", [1], b"\0\0\0\0"))
        check_infer_request(r, POLICY)
        assert drop_batch_of_one(r)
        assert [list(t.shape) for t in r.inputs] == [[1], [1], [2], [1]]
        assert r.raw_input_contents[2] == b"\1\0\0\0a\1\0\0\0b"  # the data is untouched
        assert not drop_batch_of_one(r)  # nothing left to drop
    # not a chat model, not a contract input, or not one dim longer than declared: left as sent
    assert batch_of_one("llm", "max_tokens", [1, 1]) is None
    assert batch_of_one("internvl_chat", "pixel_values", [1, 1]) is None
    assert batch_of_one("internvl_chat", "max_tokens", [1, 1, 1]) is None
    assert batch_of_one("internvl_chat", "images", [3]) is None


@pytest.mark.parametrize("name,shape", [("max_tokens", [2, 1]), ("text_input", [3, 1]), ("images", [2, 5]),
                                        ("max_tokens", [0, 1])])
def test_a_batch_of_more_than_one_is_refused_naming_the_input(name, shape):
    from internvl_serve.serving.grpc_checks import drop_batch_of_one

    r = request("internvl_chat", text(), (name, "INT32" if name == "max_tokens" else "BYTES", shape, b""))
    with pytest.raises(Refused) as e:
        drop_batch_of_one(r)
    assert e.value.code == "INVALID_ARGUMENT"
    assert e.value.message.startswith(f"unexpected shape for input '{name}' for model 'internvl_chat': "
                                      f"shape {shape} is a batch of {shape[0]}; this model takes one request per call")
    assert isinstance(from_grpc_status("INVALID_ARGUMENT", e.value.message), InvalidInputError)
