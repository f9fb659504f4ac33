"""internvl_chat_bls (preprocess -> vision -> llm through BLS, decoupled): the same answers as the
model card; a client that vanishes mid-generation (its process SIGKILLed, no cancel message sent)
has its generation aborted at once, which the ensemble cannot do in Triton 2.51, and only its own
(another client's request with the same id goes on); a stream left early ends at once; and it refuses
what internvl_chat refuses, with the same errors."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import re

import pytest
import tritonclient.grpc as grpcclient

from e2e_client import make_inputs, metric, wait_for
from internvl_serve.serving.contract import ENSEMBLE
from test_ensemble import LONG, finish_stream, start_stream
from test_ensemble import ask as ensemble_ask
from test_ensemble import assert_text_and_image_answers, oracle  # noqa: F401  (oracle: a fixture)

BLS = "internvl_chat_bls"

# A client process that streams one long generation from the BLS model and prints once it is streaming.
CLIENT = r"""
import queue, sys
import tritonclient.grpc as grpcclient
from e2e_client import make_inputs
client = grpcclient.InferenceServerClient(sys.argv[1])
responses = queue.Queue()
client.start_stream(callback=lambda result, error: responses.put((result, error)))
client.async_stream_infer("internvl_chat_bls", make_inputs(text_input="Talk for a long time.", max_tokens=3000,
                          ignore_eos=True, stream=True), request_id="vanishing-1")
result, error = responses.get(timeout=120)
print("streaming", error, flush=True)
responses.get(timeout=600)  # never returns: the test kills this process
"""


def ask(server, question, images=(), **extra):
    return ensemble_ask(server, question, images, model=BLS, **extra)


def test_answers_equal_the_card(server, oracle):  # noqa: F811
    question, image = assert_text_and_image_answers(server, oracle, 7, model=BLS)
    single = ask(server, question, [image], stream=False)
    assert single.error is None and single.deltas == [oracle(question, [image])] and single.finals == 1


def test_a_bad_request_gets_the_steps_error(server):
    answer = ask(server, "<image> <image> two placeholders, no image")
    assert answer.error is not None and "placeholder" in answer.error


def test_a_vanished_client_has_its_generation_aborted(server):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, server.grpc_url], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        assert line.startswith("streaming None"), (line, proc.stderr.read() if not ready else "")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
    # 3000 tokens would take minutes on this CPU; the abort comes within a few engine steps
    wait_for(server, lambda: "request vanishing-1#" in server.log_tail(300)
             and "cancelled by the client; aborting it" in server.log_tail(300),
             timeout_s=30, what="the llm model to abort the vanished client's generation")


def aborted(server, request_id):
    """How many of the llm's requests sent with this id it logged as aborted."""
    return len(re.findall(rf"request {re.escape(request_id)}#\d+ cancelled by the client", server.log_tail(2000)))


def test_a_client_that_leaves_aborts_only_its_own_generation(server, oracle):
    """Finding (issue #14): a client disconnecting from internvl_chat_bls aborted another client's
    internvl_chat request that happened to use the same id. The BLS model now cancels its llm request
    with its own key: the other client's answer is the card's."""
    question = "Talk for a long time."
    before = aborted(server, "shared-bls")
    other = start_stream(server, ENSEMBLE, "shared-bls", question, LONG)
    client, _, _ = start_stream(server, BLS, "shared-bls", question, 1000)
    client.stop_stream(cancel_requests=True)  # this client leaves; its generation must stop
    client.close()
    wait_for(server, lambda: aborted(server, "shared-bls") > before, timeout_s=60,
             what="the BLS model to abort its generation")
    answer = finish_stream(server, *other)
    assert answer.error is None and answer.finish_reasons[-1] in ("stop", "length"), answer
    assert answer.text == oracle(question, max_tokens=LONG)
    assert aborted(server, "shared-bls") == before + 1  # its own, and only it


def test_a_stream_left_early_ends_and_frees_the_llm(server):
    """Finding (issue #14): once, a stream left early on internvl_chat_bls hung its client. Leaving
    returns, the generation is aborted (the llm runs nothing any more) and the same client goes on."""
    from internvl_client import Client

    with Client(server.grpc_url, model_name=BLS) as client:
        stream = client.stream("Talk for a long time.", generation_config=dict(max_new_tokens=1000))
        assert next(stream)  # streaming
        before = aborted(server, stream.request_id)
        stream.close()
        wait_for(server, lambda: aborted(server, stream.request_id) > before, timeout_s=60,
                 what="the left stream's generation to be aborted")
        wait_for(server, lambda: metric(server, "internvl_requests_running") == 0, timeout_s=60,
                 what="the llm to run nothing")
        assert client.chat("Hello, who are you?", generation_config=dict(max_new_tokens=4))


def refusal(server, model, inputs, parameters=None) -> str:
    """The error message of one refused request."""
    import queue

    client = grpcclient.InferenceServerClient(server.grpc_url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(model, inputs, parameters=parameters, enable_empty_final_response=True)
        result, error = responses.get(timeout=120)
        assert error is not None, f"{model} accepted it"
        return error.message()
    finally:
        client.stop_stream()
        client.close()


@pytest.mark.parametrize("values, parameters", [
    pytest.param({}, {"foo": "bar"}, id="unknown-request-parameter"),
    pytest.param({}, {"max_tokens": 5}, id="setting-as-request-parameter"),
    pytest.param({"cancel_key": "short"}, None, id="cancel-key-too-short"),
    pytest.param({"max_tokens": 0}, None, id="max-tokens-zero"),
    pytest.param({"text_input": ""}, None, id="empty-question"),
])
def test_refuses_what_the_ensemble_refuses_with_the_same_error(server, values, parameters):
    """Finding (issue #14): internvl_chat_bls ignored request parameters that internvl_chat refuses,
    and its errors lacked the prefix the SDK maps to typed errors."""
    from internvl_client.errors import InvalidInputError, from_grpc_status

    values = {"text_input": "Hello", "max_tokens": 4, **values}
    ensemble = refusal(server, ENSEMBLE, make_inputs(**values), parameters)
    bls = refusal(server, BLS, make_inputs(**values), parameters)
    assert bls == ensemble.replace(f"in ensemble '{ENSEMBLE}', ", f"in ensemble '{BLS}', ", 1)
    assert isinstance(from_grpc_status(None, bls), InvalidInputError), bls
