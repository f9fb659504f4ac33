"""The response path off the engine thread: ResponsePath (mailboxes + sender threads) alone, then
through LLMService with the tiny checkpoint and sinks that block like a slow client: the engine keeps
stepping, the deltas are coalesced (all text, in order, once, the final response last), a cancel and a
shutdown while the sender is behind lose nothing, and stop strings end the answer as the engine did."""
from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from internvl_serve.serving.response_path import ResponsePath
from test_serving_services import (WAIT_S, RecordingSink, full_model, llm_request, preprocessor,  # noqa: F401
                                   reference_answer)


def wait_until(condition, what: str) -> None:
    """Wait for a condition another thread makes true (bounded; not a timing assumption)."""
    ev = threading.Event()
    for _ in range(WAIT_S * 100):
        if condition():
            return
        ev.wait(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class BlockingHandler:
    """Records each call's items; the first call blocks until released."""

    def __init__(self, done_when=None):
        self.calls: list[list] = []
        self.started, self.release = threading.Event(), threading.Event()
        self.done_when = done_when

    def __call__(self, items):
        self.started.set()
        assert self.release.wait(WAIT_S)
        self.calls.append(list(items))
        return self.done_when is not None and self.done_when in items


def test_a_blocked_sender_gets_everything_coalesced_in_order_once():
    path = ResponsePath(num_senders=2)
    h = BlockingHandler(done_when="final")
    path.open("a", h)
    path.post("a", 0)
    assert h.started.wait(WAIT_S)
    for i in range(1, 50):  # returns while the sender is blocked: post never waits for a sink
        path.post("a", i)
    path.post("a", "final")
    path.post("a", "after the final")  # may be posted; the handler has closed the request by then
    h.release.set()
    wait_until(lambda: path.num_open == 0, "the request to close")
    assert h.calls == [[0], list(range(1, 50)) + ["final", "after the final"]]
    path.post("a", "late")  # closed: dropped
    path.shutdown()
    assert len(h.calls) == 2


def test_other_requests_are_served_while_one_client_is_slow():
    path = ResponsePath(num_senders=2)
    slow, fast_got = BlockingHandler(), threading.Event()
    path.open("slow", slow)
    path.open("fast", lambda items: fast_got.set() or True)
    path.post("slow", 1)
    assert slow.started.wait(WAIT_S)
    path.post("fast", 1)
    assert fast_got.wait(WAIT_S) and not slow.release.is_set()
    slow.release.set()
    path.shutdown()


def test_shutdown_delivers_what_was_queued():
    path = ResponsePath(num_senders=1)
    h = BlockingHandler()
    path.open("a", h)
    for i in range(10):
        path.post("a", i)
    assert h.started.wait(WAIT_S)
    stopper = threading.Thread(target=path.shutdown)
    stopper.start()
    h.release.set()
    stopper.join(WAIT_S)
    assert not stopper.is_alive()
    assert [i for call in h.calls for i in call] == list(range(10))


def test_a_raising_handler_closes_its_request_only():
    path = ResponsePath(num_senders=1)
    got = []

    def bad(items):
        raise RuntimeError("boom")

    path.open("bad", bad)
    path.open("good", lambda items: got.extend(items) or "end" in items)
    path.post("bad", 1)
    path.post("good", 1)
    path.post("good", "end")
    wait_until(lambda: path.num_open == 0, "both requests to close")
    assert got == [1, "end"]
    path.shutdown()


# -- through LLMService --------------------------------------------------------------------------------

class SlowSink(RecordingSink):
    """A client that stops reading: send() blocks until released."""

    def __init__(self):
        super().__init__()
        self.sending, self.release = threading.Event(), threading.Event()

    def send(self, response, final):
        self.sending.set()
        assert self.release.wait(WAIT_S)
        super().send(response, final)


@pytest.fixture
def llm(tiny_checkpoint):
    from internvl_serve.serving.llm import LLMService

    service = LLMService(tiny_checkpoint, device="cpu", engine_options={"max_num_seqs": "8"})
    yield service
    service.shutdown()


def test_a_slow_client_does_not_stall_the_engine_and_gets_its_text_coalesced(llm, preprocessor, full_model):
    sink = SlowSink()
    question = "Hello, who are you?"
    llm.submit(llm_request(preprocessor, question, max_tokens=24, stream=True), sink)
    assert sink.sending.wait(WAIT_S)
    wait_until(lambda: llm.thread.num_unfinished == 0, "the engine to finish while the client is blocked")
    sink.release.set()
    sink.wait()
    assert "".join(sink.texts) == reference_answer(full_model, preprocessor.tokenizer, question, 24)
    assert [final for _, final in sink.responses] == [False] * (len(sink.responses) - 1) + [True]
    assert len(sink.responses) <= 3  # the first delta, then everything that piled up (and maybe a last one)
    assert int(sink.responses[-1][0]["num_output_tokens"][0]) > 3
    assert not sink.calls_after_final


def test_cancel_while_the_sender_is_behind(llm, preprocessor):
    sink = SlowSink()
    llm.submit(llm_request(preprocessor, "Talk.", max_tokens=3000, stream=True, ignore_eos=True), sink,
               client_id="c", cancel_key="k" * 32)
    assert sink.sending.wait(WAIT_S)
    assert llm.cancel("c", "k" * 32) == 1
    wait_until(lambda: llm.thread.num_unfinished == 0, "the engine to abort the request")
    sink.release.set()
    sink.wait()
    assert sink.reasons[-1] == "cancelled" and sink.responses[-1][1] is True
    assert [final for _, final in sink.responses] == [False] * (len(sink.responses) - 1) + [True]
    assert not sink.errors and not sink.calls_after_final
    assert llm.num_active == 0 and llm.responses.num_open == 0


def test_shutdown_with_queued_outputs_delivers_them_then_the_error(llm, preprocessor):
    sink = SlowSink()
    llm.submit(llm_request(preprocessor, "Talk.", max_tokens=3000, stream=True, ignore_eos=True), sink)
    assert sink.sending.wait(WAIT_S)
    stopper = threading.Thread(target=llm.shutdown)
    stopper.start()
    wait_until(lambda: not llm.thread._thread.is_alive(), "the engine thread to stop")
    sink.release.set()
    stopper.join(WAIT_S)
    assert not stopper.is_alive()
    assert len(sink.responses) >= 1 and not any(final for _, final in sink.responses)
    assert len(sink.errors) == 1 and "shut down" in sink.errors[0]
    assert not sink.calls_after_final


def test_stop_words_end_the_answer_as_the_engine_did(llm, preprocessor, tiny_checkpoint):
    """The stop string is found on the sender thread: same text and token count as the engine's own
    detokenizer (LLMEngine(detokenize=True)), and the engine's sequence is aborted."""
    from internvl_serve.checkpoint import load_state_dict
    from internvl_serve.config import InternVLChatConfig
    from internvl_serve.engine import LLMEngine, ModelRunner, Request

    request = llm_request(preprocessor, "Talk.", max_tokens=40, stream=True)
    free = RecordingSink()
    llm.submit(request, free)
    free.wait()
    answer = "".join(free.texts)
    assert len(answer) > 6
    stop = answer[len(answer) // 2:len(answer) // 2 + 2]
    sampling = dataclasses.replace(request.generation.sampling, stop=(stop,))
    stopped = dataclasses.replace(request, generation=dataclasses.replace(request.generation, sampling=sampling))
    sink = RecordingSink()
    llm.submit(stopped, sink)
    sink.wait()

    config = InternVLChatConfig.from_pretrained(tiny_checkpoint)
    state = load_state_dict(tiny_checkpoint, prefixes=("language_model.",), dtype=torch.float32, device="cpu",
                            progress=False)
    engine = LLMEngine(ModelRunner(config, state, device="cpu", dtype=torch.float32), llm.tokenizer)
    want = engine.generate([Request("x", request.input_ids.tolist(), None, sampling)])["x"]
    assert "".join(sink.texts) == "".join(o.text_delta for o in want).strip()
    assert sink.reasons[-1] == want[-1].finish_reason == "stop"
    assert int(sink.responses[-1][0]["num_output_tokens"][0]) == want[-1].num_output_tokens < 40
    wait_until(lambda: llm.thread.num_unfinished == 0, "the engine to drop the stopped sequence")
    assert llm.engine.allocator.num_free + llm.engine.allocator.num_cached >= llm.engine.allocator.num_blocks
