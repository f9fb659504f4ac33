"""EngineThread: thread-safe submit/abort, callbacks, no busy polling when idle, failures reported per
request without killing the thread, shutdown finishes everyone with an error."""
from __future__ import annotations

import threading
import time

import pytest

from internvl_serve.engine import (EngineBusy, EngineError, EngineThread, FakeRunner, InvalidRequest, LLMEngine, Request,
                                   SamplingParams, SchedulerConfig)
from internvl_serve.engine.fake_runner import default_next_token


class CountingRunner(FakeRunner):
    def __init__(self, delay=0.0, **kw):
        super().__init__(**kw)
        self.delay, self.calls = delay, 0

    def launch(self, batch, prev=None):
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        return super().launch(batch, prev)


class Collector:
    def __init__(self):
        self.outputs, self.done = {}, {}
        self.lock = threading.Lock()

    def callback(self, rid):
        self.done[rid] = threading.Event()

        def on_output(out):
            with self.lock:
                self.outputs.setdefault(out.request_id, []).append(out)
            if out.finished:
                self.done[out.request_id].set()
        return on_output

    def wait(self, rid, timeout=10):
        assert self.done[rid].wait(timeout), f"{rid} did not finish"
        return self.outputs[rid]


def expected(prompt, n):
    toks, out = list(prompt), []
    for _ in range(n):
        out.append(default_next_token(toks, 1000, 2))
        toks.append(out[-1])
    return out


def make(delay=0.0, **kw):
    runner = CountingRunner(delay=delay, num_blocks=64, block_size=4, **kw)
    thread = EngineThread(LLMEngine(runner, None, eos_token_id=2, scheduler_config=SchedulerConfig(
        max_num_batched_tokens=16)))
    return runner, thread


def test_concurrent_submits_from_many_threads():
    runner, thread = make()
    col = Collector()
    reqs = [Request(f"r{i}", [10 + i] * (3 + i), None, SamplingParams(max_tokens=5 + i)) for i in range(8)]
    callbacks = {r.request_id: col.callback(r.request_id) for r in reqs}
    workers = [threading.Thread(target=thread.submit, args=(r, callbacks[r.request_id])) for r in reqs]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for r in reqs:
        outs = col.wait(r.request_id)
        assert [t for o in outs for t in o.new_token_ids] == expected(r.prompt_token_ids, r.sampling.max_tokens)
        assert outs[-1].finished and sum(o.finished for o in outs) == 1
    thread.shutdown()


def test_idle_thread_sleeps_instead_of_polling():
    runner, thread = make()
    col = Collector()
    thread.submit(Request("a", [5, 6], None, SamplingParams(max_tokens=3)), col.callback("a"))
    col.wait("a")
    calls = runner.calls
    time.sleep(0.3)
    assert runner.calls == calls
    assert thread.num_unfinished == 0
    thread.submit(Request("b", [5, 7], None, SamplingParams(max_tokens=2)), col.callback("b"))  # wakes up
    assert len(col.wait("b")) == 2
    thread.shutdown()


def test_invalid_request_raises_in_the_caller_and_duplicates_are_refused():
    runner, thread = make(delay=0.01)
    col = Collector()
    with pytest.raises(InvalidRequest, match="max_tokens"):
        thread.submit(Request("x", [5], None, SamplingParams(max_tokens=0)), col.callback("x"))
    thread.submit(Request("y", [5], None, SamplingParams(max_tokens=200)), col.callback("y"))
    with pytest.raises(InvalidRequest, match="already"):
        thread.submit(Request("y", [6], None, SamplingParams()), col.callback("y2"))
    thread.abort("y")
    assert col.wait("y")[-1].finish_reason == "abort"
    thread.shutdown()


def test_abort_from_another_thread_frees_blocks():
    runner, thread = make(delay=0.005)
    col = Collector()
    thread.submit(Request("long", [5] * 9, None, SamplingParams(max_tokens=1000)), col.callback("long"))
    while "long" not in col.outputs:
        time.sleep(0.005)
    threading.Thread(target=thread.abort, args=("long",)).start()
    outs = col.wait("long")
    assert outs[-1].finished and outs[-1].finish_reason == "abort" and outs[-1].error is None
    assert len(outs) < 1000
    time.sleep(0.05)
    assert thread.engine.allocator.num_free == 64
    thread.shutdown()


def test_a_failing_step_fails_its_requests_and_the_thread_keeps_serving():
    runner, thread = make(fail_if=lambda batch: any(s.seq.request_id == "bad" for s in batch.seqs))
    col = Collector()
    thread.submit(Request("bad", [5, 6], None, SamplingParams(max_tokens=4)), col.callback("bad"))
    bad = col.wait("bad")
    assert bad[-1].finished and "fake runner failure" in bad[-1].error
    thread.submit(Request("good", [5, 6], None, SamplingParams(max_tokens=4)), col.callback("good"))
    good = col.wait("good")
    assert [t for o in good for t in o.new_token_ids] == expected([5, 6], 4) and good[-1].error is None
    thread.shutdown()


def test_a_raising_callback_does_not_kill_the_thread():
    runner, thread = make()
    thread.submit(Request("a", [5], None, SamplingParams(max_tokens=3)), lambda out: 1 / 0)
    col = Collector()
    thread.submit(Request("b", [6], None, SamplingParams(max_tokens=3)), col.callback("b"))
    assert len(col.wait("b")) == 3
    thread.shutdown()


def test_shutdown_finishes_everyone_with_an_error():
    runner, thread = make(delay=0.01)
    col = Collector()
    for i in range(3):
        thread.submit(Request(f"r{i}", [5 + i] * 4, None, SamplingParams(max_tokens=2000)), col.callback(f"r{i}"))
    while not col.outputs:
        time.sleep(0.005)
    thread.shutdown()
    for i in range(3):
        last = col.wait(f"r{i}", timeout=1)[-1]
        assert last.finished and last.finish_reason == "abort" and "shut down" in last.error
    with pytest.raises(EngineError):
        thread.submit(Request("late", [5], None, SamplingParams()), col.callback("late"))


def test_image_rows_are_hashed_at_submit_and_reused_across_requests():
    import torch
    runner = CountingRunner(num_blocks=64, block_size=4, hidden_size=8)
    thread = EngineThread(LLMEngine(runner, None, eos_token_id=2, image_context_token_id=999))
    col = Collector()
    rows = torch.randn(8, 8)
    prompt = [5, 6] + [999] * 8 + [7, 8, 9]
    first = Request("a", prompt, rows, SamplingParams(max_tokens=2))
    thread.submit(first, col.callback("a"))
    assert first.image_hashes is not None  # computed in the caller's thread
    col.wait("a")
    thread.submit(Request("b", prompt, rows.clone(), SamplingParams(max_tokens=2)), col.callback("b"))
    assert col.wait("b")[-1].num_cached_tokens == 12
    thread.submit(Request("c", prompt, rows + 1, SamplingParams(max_tokens=2)), col.callback("c"))
    assert col.wait("c")[-1].num_cached_tokens == 0  # other image content: the first block differs
    thread.shutdown()


def test_a_full_engine_refuses_more_requests_until_one_finishes():
    runner = CountingRunner(delay=0.01, num_blocks=64, block_size=4)
    thread = EngineThread(LLMEngine(runner, None, eos_token_id=2, scheduler_config=SchedulerConfig(
        max_num_batched_tokens=16)), max_pending=2)
    col = Collector()
    for rid in ("a", "b"):
        thread.submit(Request(rid, [5, 6], None, SamplingParams(max_tokens=500, ignore_eos=True)), col.callback(rid))
    with pytest.raises(EngineBusy, match=r"busy: 2 requests .*\(max_pending_requests 2\)"):
        thread.submit(Request("c", [5], None, SamplingParams(max_tokens=2)), col.callback("c"))
    thread.abort("a")
    col.wait("a")
    thread.submit(Request("c", [5], None, SamplingParams(max_tokens=2)), col.callback("c"))  # room again
    assert [t for o in col.wait("c") for t in o.new_token_ids] == expected([5], 2)
    thread.abort("b")
    thread.shutdown()


class BusyEncoder:
    """encoder_busy for the EngineThread: a vision encoder that runs until finish(). `holding` is set
    once the thread waits for it with no step in flight."""

    def __init__(self):
        self.busy = True
        self.holding = threading.Event()
        self.engine = None
        self.calls = 0

    def __call__(self):
        self.calls += 1
        assert self.engine.next_step_decodes_only()  # asked only before a step of decodes only
        if self.busy and self.engine._inflight is None:
            self.holding.set()
        return self.busy

    def finish(self):
        self.busy = False


def with_encoder(encoder, priority_s):
    runner = CountingRunner(num_blocks=64, block_size=4)
    engine = LLMEngine(runner, None, eos_token_id=2, scheduler_config=SchedulerConfig(async_scheduling=True))
    encoder.engine = engine
    return runner, EngineThread(engine, encoder_busy=encoder, encoder_priority_s=priority_s)


def test_decode_steps_wait_for_a_running_encoder_and_a_new_request_prefill_does_not():
    encoder = BusyEncoder()
    runner, thread = with_encoder(encoder, priority_s=3600)  # the encoder's end is what ends the hold here
    col = Collector()
    firsts = {"a": threading.Event(), "b": threading.Event()}

    def first_then(rid):
        on_output = col.callback(rid)

        def callback(out):
            on_output(out)
            firsts[rid].set()
        return callback

    thread.submit(Request("a", [5, 6, 7], None, SamplingParams(max_tokens=6, ignore_eos=True)), first_then("a"))
    encoder.holding.wait()
    # a's prefill ran, its token was delivered before the hold, and no decode step was launched since
    assert runner.calls == 1 and len(col.outputs["a"]) == 1 and firsts["a"].is_set()
    encoder.holding.clear()
    thread.submit(Request("b", [8, 9], None, SamplingParams(max_tokens=4, ignore_eos=True)), first_then("b"))
    firsts["b"].wait()  # b's prefill ran although the encoder is still busy
    encoder.holding.wait()  # and then the decodes are held again
    assert [step for step in runner.steps if ("b", 0, 2) in step]
    assert len(col.outputs["a"]) < 6
    encoder.finish()
    for rid, prompt, n in (("a", [5, 6, 7], 6), ("b", [8, 9], 4)):
        assert [t for o in col.wait(rid) for t in o.new_token_ids] == expected(prompt, n)
    assert thread.encoder_wait_s > 0
    thread.shutdown()


def test_the_hold_is_bounded_and_off_without_a_priority():
    always = BusyEncoder()
    runner, thread = with_encoder(always, priority_s=0.001)  # never finishes: each hold ends at its bound
    col = Collector()
    thread.submit(Request("a", [5, 6], None, SamplingParams(max_tokens=5, ignore_eos=True)), col.callback("a"))
    assert [t for o in col.wait("a") for t in o.new_token_ids] == expected([5, 6], 5)
    assert always.calls >= 4 and thread.encoder_wait_s > 0  # four decode steps, each held first
    thread.shutdown()

    never = BusyEncoder()
    runner, thread = with_encoder(never, priority_s=0)
    thread.submit(Request("b", [5, 6], None, SamplingParams(max_tokens=5, ignore_eos=True)), col.callback("b"))
    assert [t for o in col.wait("b") for t in o.new_token_ids] == expected([5, 6], 5)
    assert never.calls == 0 and thread.encoder_wait_s == 0
    thread.shutdown()
