"""A full engine queue on a real tritonserver: with max_pending_requests 1 (set through the launcher's
layout, as `--llm-param max_pending_requests=1` does), a second request while one generates is refused
at once with UNAVAILABLE naming the limit, and is served once the first is cancelled. The same layout
asks for 3 preprocess instances (`--preprocess-instances 3`): three preprocess stubs run."""
from __future__ import annotations

import queue

import pytest
import tritonclient.grpc as grpcclient
from internvl_client import Client
from internvl_client.errors import ServerUnavailableError

from e2e_client import make_inputs, stream_chat, wait_for
from internvl_serve.serving.launcher import TritonServer
from internvl_serve.serving.layout import Layout


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("triton-busy") / "server.log"
    with TritonServer(tiny_checkpoint, log_file=log, exit_timeout_s=5, ready_timeout_s=300,
                      layout=Layout(llm_parameters={"max_pending_requests": "1"}, preprocess_instances=3)) as s:
        yield s

KEY = "b" * 32  # the long request's cancel_key (docs/contract.md, Cancellation)


def test_a_full_engine_refuses_with_a_clear_error_then_serves_again(server):
    long = grpcclient.InferenceServerClient(server.grpc_url)
    responses: queue.Queue = queue.Queue()
    try:
        long.start_stream(callback=lambda result, error: responses.put((result, error)))
        long.async_stream_infer("internvl_chat", make_inputs(text_input="Talk for a long time.", max_tokens=2000,
                                                             ignore_eos=True, stream=True, cancel_key=KEY),
                                request_id="busy-1")
        result, error = responses.get(timeout=120)  # generating
        assert error is None, str(error)

        refused = stream_chat(server, make_inputs(text_input="Hello", max_tokens=4))
        assert refused.error is not None and refused.finals == 0
        assert "the server is busy" in refused.error and "max_pending_requests 1" in refused.error
        with Client(server.grpc_url, retries=0) as sdk:  # what an SDK user sees: UNAVAILABLE
            with pytest.raises(ServerUnavailableError, match="the server is busy"):
                sdk.chat("Hello", generation_config=dict(max_new_tokens=4))

        # leaving the stream is enough: the launcher's gRPC guard sends the llm's side-channel cancel
        long.stop_stream(cancel_requests=True)
    finally:
        long.close()
    wait_for(server, lambda: "request busy-1#" in server.log_tail(200), timeout_s=120, what="the abort")
    answer = None
    for _ in range(50):  # the aborted request leaves the engine at its next step
        answer = stream_chat(server, make_inputs(text_input="Hello", max_tokens=4))
        if answer.error is None or "busy" not in answer.error:
            break
    assert answer.error is None, answer.error
    assert answer.finals == 1 and answer.num_output_tokens <= 4


def test_the_layout_sets_the_preprocess_instances(server):
    names = sorted(name for name in server.stub_processes().values() if name.startswith("preprocess_"))
    assert len(names) == 3, names
