"""internvl_chat_bls (preprocess -> vision -> llm through BLS, decoupled): the same answers as the
model card, and a client that vanishes mid-generation (its process SIGKILLed, no cancel message sent)
has its generation aborted at once, which the ensemble cannot do in Triton 2.51."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

from e2e_client import wait_for
from test_ensemble import ask as ensemble_ask
from test_ensemble import assert_answer, image_bytes, oracle  # noqa: F401  (oracle: a fixture)

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
    question = "Hello, who are you?"
    assert_answer(ask(server, question), oracle(question))
    image = image_bytes(7)
    question = "<image>\nWhat is in the image?"
    assert_answer(ask(server, question, [image]), oracle(question, [image]))
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
