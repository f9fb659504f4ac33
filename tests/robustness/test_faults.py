"""Faults against the real server: clients that vanish mid-stream, a burst far above capacity, a full
queue, a Python stub killed (what Triton 2.51 really does, and the launcher's watchdog), and a shutdown
with streams in flight. Healthy requests are checked against the card's answers, character for character.

What Triton 2.51 does, as these tests hold it:
- a client that disconnects or cancels mid-generation is not seen by the llm step (the ensemble passes
  a cancellation only to steps scheduled after it): its generation runs on to max_tokens, then its KV
  blocks are freed; the other requests are not disturbed (strict xfail for the abort);
- a killed stub is never restarted and its model stays "ready": requests routed to that instance fail
  with "Stub process '<instance>' is not healthy." (the other instances serve), and streams in flight
  in a killed llm stub never end (strict xfail); the launcher's watchdog (on_stub_death="exit", the CLI's
  default) stops the server instead, so those streams end with an error and the supervisor restarts it;
- SIGTERM with streams in flight: Triton waits --exit-timeout-secs, then may crash and hang on its way
  out; the launcher kills it kill_grace_s later, and the streams end with an error (UNAVAILABLE).
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import tritonclient.grpc as grpcclient

from robustness_helpers import (Traffic, assert_answer, chat_inputs, image_bytes, in_parallel, metric, repository_copy,
                                running_server, send, stub_pid, wait_until)

LONG = 1500  # tokens of the generations that are cut off (several seconds on the tiny model)
LONGEST = 4000  # ~10 s on the tiny model: outlives a shutdown (exit timeout + kill grace)
EXIT_TIMEOUT_S, KILL_GRACE_S = 2, 3


class StubDeathNotHandled(AssertionError):
    """The precise failures the strict xfail below expects: the stream hangs, or tritonserver aborts."""


def wait_for_exit(server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while server.is_running() and time.monotonic() < deadline:
        time.sleep(0.1)  # polling the process, not synchronising
    assert not server.is_running(), f"tritonserver still running {timeout_s}s later"


def long_inputs(i: int = 0, max_tokens: int = LONG):
    return chat_inputs(f"Talk for a long time, {i}.", max_tokens=max_tokens, ignore_eos=True)


def run_all(server, inputs_list, **kwargs) -> list:
    """Each request on its own thread and gRPC stream, all sent at once."""
    return in_parallel(lambda i=i, inputs=inputs: send(server, inputs, request_id=f"burst-{i}", **kwargs)
                       for i, inputs in enumerate(inputs_list))


# ---- one server: disconnects, a burst, a shutdown ------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    with running_server(tiny_checkpoint, tmp_path_factory.mktemp("faults"), exit_timeout_s=EXIT_TIMEOUT_S,
                        kill_grace_s=KILL_GRACE_S) as s:
        yield s


@pytest.fixture(scope="module")
def healthy(oracle):
    image = image_bytes(21)
    text_q, image_q = "Hello, who are you?", "<image>\nDescribe the image."
    return [("text", lambda: chat_inputs(text_q), oracle(text_q)),
            ("image", lambda: chat_inputs(image_q, [image]), oracle(image_q, [image]))]


CLIENT = """
import queue, sys, tritonclient.grpc as g
from e2e_client import make_inputs
c = g.InferenceServerClient(sys.argv[1])
q = queue.Queue()
c.start_stream(callback=lambda result, error: q.put(error))
c.async_stream_infer("internvl_chat", make_inputs(text_input="Talk.", max_tokens=int(sys.argv[2]), ignore_eos=True,
                     stream=True), request_id="vanishing-client")
print("first response", q.get(timeout=120), flush=True)
q.get()  # blocks until it is killed
"""


def start_vanishing_client(server) -> subprocess.Popen:
    """A client process mid-stream (its first response arrived); the caller SIGKILLs it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "e2e"),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, server.grpc_url, str(LONG)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("first response None"):
        proc.kill()
        pytest.fail(f"the client did not start streaming: {line!r} {proc.stderr.read()}")
    return proc


def disconnect_three_clients(server) -> None:
    """A killed client process, a cancelled stream and a client deadline, each mid-generation."""
    proc = start_vanishing_client(server)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    for how in ("cancel", "deadline"):
        client = grpcclient.InferenceServerClient(server.grpc_url)
        seen = []  # (result, error) in arrival order
        client.start_stream(callback=lambda result, error: seen.append((result, error)),
                            stream_timeout=1.5 if how == "deadline" else None)
        client.async_stream_infer("internvl_chat", long_inputs(1), request_id=how)
        if how == "cancel":
            wait_until(server, lambda: seen, timeout_s=120, what="the first response")
        else:
            wait_until(server, lambda: any(e is not None for _, e in seen), timeout_s=30, what="the deadline")
        client.stop_stream(cancel_requests=True)
        client.close()
        assert seen[0][1] is None, seen[0]  # mid-stream: a response had arrived
        if how == "deadline":
            assert "Deadline Exceeded" in str(seen[-1][1])


def test_clients_that_vanish_mid_stream_do_not_disturb_the_others(server, healthy):
    traffic = Traffic(server, healthy, threads=2).start()
    try:
        started = time.monotonic()
        disconnect_three_clients(server)
        assert traffic.overlapped(started, time.monotonic())
    finally:
        traffic.stop()
    assert not traffic.failures, traffic.failures
    assert set(traffic.done) == {"text", "image"}
    # the cut-off generations end (at max_tokens: see the xfail below) and give their KV blocks back
    wait_until(server, lambda: metric(server, "internvl_requests_running") == 0
               and metric(server, "internvl_kv_cache_blocks_used") == 0, timeout_s=120,
               what="the cut-off generations to end and free their KV blocks")
    assert requests.get(f"{server.http_url}/v2/health/ready", timeout=10).status_code == 200
    name, make, expected = healthy[1]
    assert_answer(send(server, make()), expected)


# A client that vanishes mid-stream (SIGKILL) has its generation aborted by the launcher's gRPC guard, which
# sends the llm side channel's cancel for it: tests/robustness/test_grpc_guard.py (Triton 2.51's ensemble
# alone never tells the running llm step; docs/security.md).


def test_a_burst_far_above_capacity_is_answered_exactly(server, oracle):
    """40 streams at once on a server with 2 preprocess instances, 1 vision and 1 llm instance: all
    complete, each with its own exact answer (the queues are not full at 40)."""
    questions = ["Hello, who are you?", "What is the capital of France?", "Tell me a joke.", "Count to five."]
    images = [image_bytes(30 + i) for i in range(4)]
    cases = [(q, []) for q in questions] + [("<image>\nDescribe the image.", [im]) for im in images]
    burst = [cases[i % len(cases)] for i in range(40)]
    expected = [oracle(q, im) for q, im in burst]
    assert len(set(expected)) > 4
    answers = run_all(server, [chat_inputs(q, im) for q, im in burst], timeout_s=300)
    for answer, want in zip(answers, expected):
        assert_answer(answer, want)


def test_shutdown_with_streams_in_flight_ends_them_with_an_error(server):
    """server.shutdown() (what the launcher does on SIGTERM): every stream ends, with an error or its final
    response, within exit_timeout + kill_grace (+ slack); none is left hanging; the server is gone."""
    first = [threading.Event() for _ in range(3)]
    answers = {}

    def streaming(i):
        answers[i] = send(server, long_inputs(10 + i, LONGEST), on_first=first[i].set, timeout_s=120,
                          server_may_exit=True)

    threads = [threading.Thread(target=streaming, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for f in first:
        assert f.wait(120), "a stream did not start"
    stopped = time.monotonic()
    server.shutdown()
    for t in threads:
        t.join(EXIT_TIMEOUT_S + KILL_GRACE_S + 60)
    assert not any(t.is_alive() for t in threads), "a stream hung after the shutdown"
    ended = [answers[i].ended - stopped for i in range(3)]
    assert max(ended) < EXIT_TIMEOUT_S + KILL_GRACE_S + 20, ended
    for answer in answers.values():  # cut off: the connection went with the server
        assert answer.error is not None and "UNAVAILABLE" in answer.error, answer
    wait_for_exit(server, EXIT_TIMEOUT_S + KILL_GRACE_S + 20)


# ---- a server with a small preprocess queue and no watchdog: a full queue, killed stubs --------------------


@pytest.fixture(scope="module")
def fragile_server(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fragile")
    repo = repository_copy(folder, {"preprocess": ("max_queue_size: 256", "max_queue_size: 2")})
    with running_server(tiny_checkpoint, folder, model_repository=repo, exit_timeout_s=EXIT_TIMEOUT_S,
                        kill_grace_s=KILL_GRACE_S) as s:
        yield s


def slow_image() -> bytes:
    """A smooth 2400x2400 JPEG: small to send, but ~0.1 s to decode and resize (the queue fills up)."""
    import io

    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, 2400, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.stack([np.tile(ramp, (2400, 1))] * 3, -1)).save(buffer, format="JPEG", quality=70)
    return buffer.getvalue()


def test_a_full_queue_refuses_at_once_with_a_clear_error(fragile_server, oracle):
    image = slow_image()
    question = "<image>\nDescribe the image."
    expected = oracle(question, [image])
    answers = run_all(fragile_server, [chat_inputs(question, [image]) for _ in range(16)], timeout_s=300)
    refused = [a for a in answers if a.error is not None]
    for a in refused:
        assert "Exceeds maximum queue size" in a.error, a.error
    for a in answers:
        if a.error is None:
            assert_answer(a, expected)
    assert refused and len(refused) < len(answers), [a.error for a in answers]
    assert_answer(send(fragile_server, chat_inputs(question, [image])), expected)  # and it goes on


def test_a_killed_preprocess_stub_gives_clear_errors_and_the_other_instance_serves(fragile_server, oracle):
    os.kill(stub_pid(fragile_server, "preprocess_0_0"), signal.SIGKILL)
    question = "Hello, who are you?"
    answers = [send(fragile_server, chat_inputs(question)) for _ in range(8)]
    failed = [a.error for a in answers if a.error is not None]
    assert failed, "no request reached the dead instance"
    assert all("Stub process 'preprocess_0_0' is not healthy" in e for e in failed), failed
    served = [a for a in answers if a.error is None]
    assert served, failed  # preprocess_0_1 still serves
    for a in served:
        assert_answer(a, oracle(question))
    # Triton 2.51 neither restarts the stub nor marks the model unready (hence the launcher's watchdog)
    assert "preprocess_0_0" not in fragile_server.stub_processes().values()
    assert requests.get(f"{fragile_server.http_url}/v2/models/preprocess/ready", timeout=10).status_code == 200
    assert fragile_server.is_running()


# Not strict: what Triton 2.51 does here varies from run to run (a clean-clone CI run of 2026-12-05 saw the
# stream end with an error and the server stay up); any failure other than StubDeathNotHandled still fails.
@pytest.mark.xfail(strict=False, raises=StubDeathNotHandled, reason=(
    "Triton 2.51, when a decoupled model's stub dies mid-stream, often never ends the streams in flight (no "
    "error, no final response) or aborts tritonserver itself (boost::interprocess::lock_exception in "
    "libtriton_python.so: the stub died holding a shared-memory lock), and sometimes ends them with an error. "
    "The launcher's watchdog (on_stub_death='exit', the CLI default) bounds the first by stopping the server."))
def test_a_stream_in_flight_when_the_llm_stub_dies_gets_an_error_and_the_server_stays_up(fragile_server):
    started = threading.Event()
    result = {}

    def streaming():  # preprocess_0_0 is dead (previous test): retry until a stream runs
        for attempt in range(8):
            try:
                result["answer"] = send(fragile_server, long_inputs(20 + attempt), on_first=started.set,
                                        timeout_s=15, server_may_exit=True)
            except BaseException as e:
                result["failed"] = e
                return
            if started.is_set() or "preprocess_0_0" not in str(result["answer"].error):
                return

    t = threading.Thread(target=streaming)
    t.start()
    assert started.wait(120), result
    os.kill(stub_pid(fragile_server, "llm_0_0"), signal.SIGKILL)
    t.join(60)
    if "no final response" in str(result.get("failed", "")):
        raise StubDeathNotHandled(f"the stream never ended: {result['failed']}")
    assert "answer" in result, result.get("failed")
    assert result["answer"].error is not None
    if not fragile_server.is_running():
        raise StubDeathNotHandled(f"tritonserver died: {fragile_server.log_tail(5)}")


# ---- the launcher's watchdog ---------------------------------------------------------------------------------


def test_the_watchdog_stops_the_server_when_a_stub_dies(tiny_checkpoint, tmp_path):
    """on_stub_death="exit": a dead stub stops the server (the supervisor restarts it); a stream in flight
    ends with an error (UNAVAILABLE) within the exit timeout and the kill grace, instead of hanging."""
    with running_server(tiny_checkpoint, tmp_path, on_stub_death="exit", exit_timeout_s=EXIT_TIMEOUT_S,
                        kill_grace_s=KILL_GRACE_S) as server:
        started = threading.Event()
        result = {}

        def streaming():
            result["answer"] = send(server, long_inputs(30, LONGEST), on_first=started.set, timeout_s=120,
                                    server_may_exit=True)

        t = threading.Thread(target=streaming)
        t.start()
        assert started.wait(120)
        killed = time.monotonic()
        os.kill(stub_pid(server, "preprocess_0_0"), signal.SIGKILL)  # idle: Triton itself survives this
        t.join(60)
        assert not t.is_alive() and result["answer"].error is not None, result
        assert "UNAVAILABLE" in result["answer"].error, result["answer"].error
        assert result["answer"].ended - killed < 2 + EXIT_TIMEOUT_S + KILL_GRACE_S + 15
        wait_for_exit(server, 30)
        assert server.stub_failure == "preprocess_0_0"


# ---- a stop after clients that cancel right after their last response -------------------------------------


def cancel_after_the_last_response(server, i: int) -> None:
    """A stream left (cancelled) as soon as the response with a finish_reason arrives, before Triton's
    empty final response."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    seen = []
    client.start_stream(callback=lambda result, error: seen.append((result, error)))
    client.async_stream_infer("internvl_chat", chat_inputs(f"Hello {i}", max_tokens=8), request_id=f"leave-{i}",
                              enable_empty_final_response=True)

    def last_response():
        return any(e is not None or (r is not None and r.as_numpy("finish_reason") is not None
                                     and r.as_numpy("finish_reason").reshape(-1)[0]) for r, e in seen)

    wait_until(server, last_response, timeout_s=120, what=f"the last response of leave-{i}")
    client.stop_stream(cancel_requests=True)
    client.close()


def test_a_stop_after_clients_cancel_after_their_last_response(tiny_checkpoint, tmp_path):
    """The stop completes whatever the clients did: tritonserver and its stubs are gone, no shared memory
    is left, and the llm model let go of every request. (Seen in 1 of 3 runs: the ensemble itself stayed
    live until the exit timeout, "Exit timeout expired", code 1: held in Triton's ensemble scheduler,
    not reproducible on demand; docs/serving.md.)"""
    with running_server(tiny_checkpoint, tmp_path, exit_timeout_s=20, kill_grace_s=5) as server:
        for round_ in range(3):
            in_parallel(lambda i=i: cancel_after_the_last_response(server, i) for i in range(round_ * 16, round_ * 16 + 16))
        regions = set(server.shm_regions)
        pgid = server.pid
        code = server.stop()
    assert regions and not any(os.path.exists(r) for r in regions)
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    log = (tmp_path / "server.log").read_text()
    assert "successfully unloaded 'llm' version 1" in log  # our decoupled model let go of every request
    assert code == 0 or "Exit timeout expired" in log, code  # graceful, or Triton's own bounded exit
