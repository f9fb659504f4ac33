"""The gRPC guard (internvl_serve/serving/grpc_guard.py) in front of a real tritonserver: it refuses the
requests that would crash the server (a shape whose element count overflows 64 bits aborts Triton 2.51's
Python backend stub), the steps' models and the admin methods, and forwards everything else unchanged:
answers through the guard equal the direct ones. One server and one guard (in-process) per module; a
throwaway second server shows the overflow request really stops a server without the guard.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from internvl_client import Client
from internvl_client.errors import InvalidInputError, ModelNotReadyError, from_grpc_status
from internvl_serve.serving.grpc_checks import GuardPolicy
from internvl_serve.serving.grpc_guard import GrpcGuard
from internvl_serve.serving.launcher import ADMIN_GRPC_HEADER

from robustness_helpers import MAX_TOKENS, chat_inputs, image_bytes, metric, running_server, send, wait_until

QUESTION = "Hello, who are you?"


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    with running_server(tiny_checkpoint, tmp_path_factory.mktemp("guarded")) as s:
        yield s


@pytest.fixture(scope="module")
def guard(server):
    with GrpcGuard("127.0.0.1:0", server.triton_grpc_url, GuardPolicy(admin_key=server.admin_key)) as g:
        yield g


@dataclass
class Through:
    """The server as robustness_helpers.send sees it, reached through the guard."""

    server: object
    guard: GrpcGuard

    @property
    def grpc_url(self) -> str:
        return self.guard.url

    def is_running(self) -> bool:
        return self.server.is_running()

    def log_tail(self, lines: int = 40) -> str:
        return self.server.log_tail(lines)


def overflow_inputs():
    """num_patches_list INT32 of shape [2^62 + 1] with 4 bytes: 2^62+1 elements x 4 bytes wraps to 4."""
    inputs = chat_inputs(QUESTION)
    tensor = grpcclient.InferInput("num_patches_list", [2**62 + 1], "INT32")
    tensor._raw_content = np.array([1], dtype=np.int32).tobytes()
    return inputs + [tensor]


def assert_serves(target, direct_answer) -> None:
    answer = send(target, chat_inputs(QUESTION), request_id="after")
    assert answer.error is None and answer.text == direct_answer.text


@pytest.fixture(scope="module")
def direct_answer(server):
    answer = send(server, chat_inputs(QUESTION), request_id="direct")
    assert answer.error is None and answer.text
    return answer


def test_the_overflowing_shape_is_refused_in_band_naming_the_input(server, guard, direct_answer):
    answer = send(Through(server, guard), overflow_inputs(), request_id="overflow")
    assert answer.error is not None and "'num_patches_list'" in answer.error, answer
    assert "needs 18446744073709551620 bytes" in answer.error
    assert_serves(Through(server, guard), direct_answer)


def test_a_refused_message_leaves_its_stream_open(guard, direct_answer):
    """Like Triton's own errors on a stream: in-band, with the request's id; the next request is served."""
    import queue

    client = grpcclient.InferenceServerClient(guard.url)
    seen: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: seen.put((result, error)))
    try:
        client.async_stream_infer("internvl_chat", overflow_inputs(), request_id="bad")
        result, error = seen.get(timeout=60)
        assert result is None and "'num_patches_list'" in str(error)
        client.async_stream_infer("internvl_chat", chat_inputs(QUESTION), request_id="good",
                                  enable_empty_final_response=True)
        text = ""
        while True:
            result, error = seen.get(timeout=60)
            assert error is None, error
            assert result.get_response().id == "good"
            text += "".join(t.decode() for t in result.as_numpy("text_output") or [])
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        assert text == direct_answer.text
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def test_the_overflowing_shape_unary_gets_invalid_argument(server, guard, direct_answer):
    client = grpcclient.InferenceServerClient(guard.url)
    with pytest.raises(InferenceServerException) as e:
        client.infer("internvl_chat", overflow_inputs())
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "unexpected shape for input 'num_patches_list'" in e.value.message()
    assert_serves(Through(server, guard), direct_answer)


def test_the_sdk_maps_the_guards_refusals_to_its_errors(server, direct_answer):
    """Through the SDK: a request over the guard's byte limit is an InvalidInputError naming the input."""
    with GrpcGuard("127.0.0.1:0", server.triton_grpc_url, GuardPolicy(max_request_bytes=1000)) as small:
        with pytest.raises(InvalidInputError, match="unexpected shape for input 'images'"):
            Client(small.url).chat("<image>\nDescribe it.", images=[image_bytes(5)])
        assert Client(small.url).chat(QUESTION, generation_config=dict(max_new_tokens=MAX_TOKENS)) == direct_answer.text


def test_the_in_band_refusal_of_a_bytes_input_names_it(guard):
    message = send_raw(guard, "internvl_chat", chat_inputs(QUESTION) + [big_images()])
    assert "unexpected shape for input 'images' for model 'internvl_chat'" in message
    assert isinstance(from_grpc_status(None, message), InvalidInputError)


def big_images():
    tensor = grpcclient.InferInput("images", [2**40], "BYTES")
    tensor._raw_content = b"\0" * 8
    return tensor


def send_raw(guard, model, inputs) -> str:
    """The error message of one streamed request through the guard (it must fail)."""
    answer = send(Through(None, guard), inputs, model=model, server_may_exit=True, timeout_s=60)
    assert answer.error is not None, answer
    return answer.error


def batched(inputs, batch: int = 1):
    """The same tensors with a leading batch dimension, as TensorRT-LLM's clients send them ([1,1])."""
    out = []
    for tensor in inputs:
        array = tensor._get_content()  # raw bytes: the same data, only the shape changes
        shaped = grpcclient.InferInput(tensor.name(), [batch, *tensor.shape()], tensor.datatype())
        shaped._raw_content = array * batch
        out.append(shaped)
    return out


@pytest.mark.parametrize("model", ["internvl_chat", "internvl_chat_bls"])
def test_tensorrt_llm_shapes_with_a_batch_of_one_get_the_same_answer(server, guard, direct_answer, model):
    """text_input, max_tokens and stream shaped [1,1] (and images [1,N]) as TensorRT-LLM ensembles take
    them: through the guard the answer is the one [1] gets; tritonserver alone refuses them."""
    answer = send(Through(server, guard), batched(chat_inputs(QUESTION)), request_id="trtllm-shapes", model=model)
    assert answer.error is None and answer.text == direct_answer.text and answer.finals == 1, answer
    assert answer.num_output_tokens == direct_answer.num_output_tokens
    image = image_bytes(3)
    with_image = send(Through(server, guard), chat_inputs("<image>\nWhat is it?", images=[image]), model=model)
    batched_image = send(Through(server, guard), batched(chat_inputs("<image>\nWhat is it?", images=[image])),
                         model=model)
    assert with_image.error is None and batched_image.error is None
    assert batched_image.text == with_image.text and batched_image.num_input_tokens == with_image.num_input_tokens
    alone = send(server, batched(chat_inputs(QUESTION)), request_id="alone", model=model, direct=True)
    assert alone.error is not None and f"for model '{model}'. Expected [1], got [1,1]" in alone.error, alone


def test_a_batch_of_two_is_refused_naming_the_input(server, guard, direct_answer):
    inputs = chat_inputs(QUESTION)
    two = [t for t in inputs if t.name() != "max_tokens"] + batched([t for t in inputs if t.name() == "max_tokens"], 2)
    message = send_raw(guard, "internvl_chat", two)
    assert ("unexpected shape for input 'max_tokens' for model 'internvl_chat': shape [2, 1] is a batch of 2; "
            "this model takes one request per call") in message
    assert isinstance(from_grpc_status(None, message), InvalidInputError)
    assert_serves(Through(server, guard), direct_answer)


@pytest.mark.parametrize("model", ["preprocess", "vision", "llm"])
def test_the_steps_are_not_served(server, guard, model):
    message = send_raw(guard, model, chat_inputs(QUESTION))
    assert f"Request for unknown model: '{model}' is not served here" in message
    client = grpcclient.InferenceServerClient(guard.url)
    with pytest.raises(InferenceServerException) as e:
        client.infer(model, chat_inputs(QUESTION))
    assert e.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(ModelNotReadyError):
        Client(guard.url, model_name=model).chat(QUESTION)


def test_the_llm_cancel_side_channel_passes(guard):
    from internvl_client.cancel import send_cancel

    assert send_cancel(grpcclient.InferenceServerClient(guard.url), "no-such-request", "k" * 32) == "not_found"


def cumulative(chunks) -> dict[int, str]:
    """A stream's text so far at each token count it reported (how it was cut into responses depends on
    timing: a sender that falls behind joins the deltas that piled up, serving/response_path.py)."""
    text, seen = "", {}
    for c in chunks:
        text += c.text
        seen[c.num_output_tokens] = text
    return seen


def test_streaming_chat_through_the_guard_equals_direct(server, guard):
    direct = list(Client(server.triton_grpc_url).stream_chunks(QUESTION, generation_config=dict(max_new_tokens=MAX_TOKENS)))
    guarded = list(Client(guard.url).stream_chunks(QUESTION, generation_config=dict(max_new_tokens=MAX_TOKENS)))
    through, straight = cumulative(guarded), cumulative(direct)
    assert len(straight) > 2 and max(through) == max(straight)  # streamed, and the same number of tokens
    assert all(straight.get(n, text) == text for n, text in through.items())  # the same text at every count
    assert through[max(through)] == straight[max(straight)]
    assert Client(guard.url, model_name="internvl_chat_bls").chat(QUESTION, generation_config=dict(
        max_new_tokens=MAX_TOKENS)) == "".join(c.text for c in direct)


def test_unary_infer_metadata_and_health_pass(server, guard):
    direct = grpcclient.InferenceServerClient(server.triton_grpc_url)
    client = grpcclient.InferenceServerClient(guard.url)
    # internvl_chat is decoupled: Triton's own refusal of unary infer comes back unchanged
    with pytest.raises(InferenceServerException) as through:
        client.infer("internvl_chat", chat_inputs(QUESTION))
    with pytest.raises(InferenceServerException) as plain:
        direct.infer("internvl_chat", chat_inputs(QUESTION))
    assert (through.value.status(), through.value.message()) == (plain.value.status(), plain.value.message())
    # a unary step, through a guard that exposes every model (tests, debugging)
    with GrpcGuard("127.0.0.1:0", server.triton_grpc_url, GuardPolicy(expose_all_models=True)) as open_guard:
        result = grpcclient.InferenceServerClient(open_guard.url).infer("preprocess", chat_inputs(QUESTION))
    expected = direct.infer("preprocess", chat_inputs(QUESTION))
    assert result.as_numpy("input_ids").tolist() == expected.as_numpy("input_ids").tolist()
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("internvl_chat")
    assert client.get_model_metadata("internvl_chat").name == "internvl_chat"
    assert client.get_server_metadata().version == direct.get_server_metadata().version
    assert client.get_inference_statistics("internvl_chat").model_stats


def test_repository_control_needs_the_admin_key(server, guard):
    client = grpcclient.InferenceServerClient(guard.url)
    for call in (lambda **kw: client.unload_model("vision", **kw), lambda **kw: client.load_model("vision", **kw),
                 lambda **kw: client.get_model_repository_index(**kw)):
        with pytest.raises(InferenceServerException) as e:
            call()
        assert e.value.status() == "StatusCode.PERMISSION_DENIED" and "admin key" in e.value.message()
    # with the key the guard forwards (Triton, started without model control, answers for itself)
    index = client.get_model_repository_index(headers={ADMIN_GRPC_HEADER: server.admin_key})
    assert {m.name for m in index.models} >= {"internvl_chat", "llm"}


def assert_aborted(server, tokens_before: float) -> None:
    """The cut-off generation (LONG tokens, ignore_eos) ended and freed its KV blocks before making all
    its tokens: it was aborted, not run to max_tokens."""
    from test_faults import LONG

    wait_until(server, lambda: metric(server, "internvl_requests_running") == 0
               and metric(server, "internvl_kv_cache_blocks_used") == 0, timeout_s=120,
               what="the cut-off generation to end and free its KV blocks")
    made = metric(server, "internvl_generated_tokens_total") - tokens_before
    assert made < LONG, f"the generation ran to max_tokens ({made} tokens): it was not aborted"


def test_a_vanished_client_frees_its_kv_cache_through_the_guard(server, guard):
    """The guard sees the client's stream break with internvl_chat in flight and cancels it on llm."""
    from test_faults import start_vanishing_client

    wait_until(server, lambda: metric(server, "internvl_requests_running") == 0, timeout_s=120, what="an idle engine")
    before = metric(server, "internvl_generated_tokens_total")
    proc = start_vanishing_client(Through(server, guard))
    wait_until(server, lambda: metric(server, "internvl_kv_cache_blocks_used") > 0, timeout_s=120,
               what="the generation to hold KV blocks")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert_aborted(server, before)
    assert "vanishing-client" in guard.cancels_sent


@pytest.mark.parametrize("how", ["cancel", "deadline", "no-id"])
def test_a_cancelled_or_timed_out_stream_frees_its_kv_cache_through_the_guard(server, guard, how):
    """tritonclient alone (no SDK side channel): the client's cancel or deadline reaches the guard, which
    cancels the upstream call and the llm generation (also of a request sent without an id)."""
    from test_faults import long_inputs

    wait_until(server, lambda: metric(server, "internvl_requests_running") == 0, timeout_s=120, what="an idle engine")
    before = metric(server, "internvl_generated_tokens_total")
    client = grpcclient.InferenceServerClient(guard.url)
    seen = []  # (result, error) in arrival order
    client.start_stream(callback=lambda result, error: seen.append((result, error)),
                        stream_timeout=1.5 if how == "deadline" else None)
    client.async_stream_infer("internvl_chat", long_inputs(7), request_id="" if how == "no-id" else f"guard-{how}")
    if how != "deadline":
        wait_until(server, lambda: seen, timeout_s=120, what="the first response")
    else:
        wait_until(server, lambda: any(e is not None for _, e in seen), timeout_s=30, what="the deadline")
        assert "Deadline Exceeded" in str(seen[-1][1])
    client.stop_stream(cancel_requests=True)
    client.close()
    assert seen[0][1] is None, seen[0]  # mid-stream: a response had arrived
    assert_aborted(server, before)
    if how == "no-id":  # the guard named the request itself
        assert seen[0][0].get_response().id in guard.cancels_sent
    else:
        assert f"guard-{how}" in guard.cancels_sent


def test_without_the_guard_the_overflow_stops_the_server(tiny_checkpoint, tmp_path_factory, server, guard):
    """The finding itself, on a throwaway server: direct to Triton the request kills the Python stub and
    the launcher's watchdog stops the server."""
    with running_server(tiny_checkpoint, tmp_path_factory.mktemp("unguarded"), on_stub_death="exit") as doomed:
        send(doomed, overflow_inputs(), request_id="overflow", server_may_exit=True, timeout_s=60, direct=True)
        wait_until(doomed, lambda: not doomed.is_running(), timeout_s=60, what="the watchdog to stop the server")


def test_the_cli_serves_and_stops_on_sigterm(server):
    import subprocess
    import sys

    from internvl_serve.serving.launcher import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "internvl_serve.serving.grpc_guard", "--listen", f"127.0.0.1:{port}",
                             "--upstream", server.triton_grpc_url, "--max-request-bytes", "1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == f"grpc guard: 127.0.0.1:{port} -> {server.triton_grpc_url}\n"
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_ready() and client.is_model_ready("internvl_chat")
        with pytest.raises(InferenceServerException, match="more than the 1000 a request may carry"):
            client.infer("internvl_chat", chat_inputs(QUESTION, images=[image_bytes(5)]))
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
