"""Overlap scheduling (engine.py): step N+1 is scheduled and launched before step N's tokens are read.
FakeRunner checks the KV content of every step; these tests check that the overlap really happens (the
next step's inputs hold placeholders), that a token sampled after a stop is never emitted, that
max_tokens costs no extra step, and where the engine falls back to the synchronous loop."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from internvl_serve.engine import FakeRunner, LLMEngine, Request, SamplingParams, SchedulerConfig
from internvl_serve.engine.fake_runner import default_next_token

VOCAB, EOS = 1000, 2


class RecordingRunner(FakeRunner):
    """Records, per launched step, the request ids whose inputs hold a pending token."""

    def __init__(self, **kw):
        super().__init__(num_blocks=64, block_size=4, vocab_size=VOCAB, eos_token_id=EOS, **kw)
        self.pending_inputs: list[list[str]] = []

    def launch(self, batch, prev=None):
        self.pending_inputs.append([s.seq.request_id for s in batch.seqs
                                    if min(s.seq.token_ids[s.start:s.start + s.num_tokens]) < 0])
        return super().launch(batch, prev)


def make(overlap: bool, **runner_kw):
    runner = RecordingRunner(**runner_kw)
    return LLMEngine(runner, None, eos_token_id=EOS, scheduler_config=SchedulerConfig(
        max_num_batched_tokens=16, watermark=0.0, async_scheduling=overlap))


def req(rid, n=6, max_tokens=8, seed=0, **sampling):
    rng = random.Random(seed)
    return Request(rid, [rng.randrange(3, VOCAB) for _ in range(n)], None,
                   SamplingParams(max_tokens=max_tokens, **sampling))


def outputs_of(engine, requests):
    res = engine.generate(requests)
    return {rid: [(o.new_token_ids, o.finished, o.finish_reason, o.num_output_tokens) for o in outs]
            for rid, outs in res.items()}


def test_the_next_step_is_launched_before_the_tokens_are_read():
    sync, overlap = make(False), make(True)
    reqs = [req("a", max_tokens=6, seed=1), req("b", n=20, max_tokens=5, seed=2)]
    assert outputs_of(overlap, reqs) == outputs_of(sync, [req("a", max_tokens=6, seed=1),
                                                          req("b", n=20, max_tokens=5, seed=2)])
    assert not any(sync.runner.pending_inputs)
    # every decode of the overlapped engine takes its input token from the step still running
    assert sum(len(p) for p in overlap.runner.pending_inputs) == (6 - 1) + (5 - 1)
    assert overlap.runner.computed_tokens == sync.runner.computed_tokens  # max_tokens: no extra step
    assert overlap.allocator.num_free == overlap.allocator.num_blocks


def test_a_token_sampled_after_eos_is_never_emitted_and_its_blocks_are_freed():
    r = req("a", max_tokens=30, seed=3)
    eos_at = 4  # the 4th generated token is EOS

    def next_token(ctx):
        return EOS if len(ctx) == len(r.prompt_token_ids) + eos_at - 1 else default_next_token(ctx, VOCAB, EOS)

    sync, overlap = make(False, next_token=next_token), make(True, next_token=next_token)
    want = outputs_of(sync, [req("a", max_tokens=30, seed=3)])
    assert outputs_of(overlap, [r]) == want
    assert want["a"][-1] == ([EOS], True, "stop", eos_at)
    # the overlapped engine had already launched the step after EOS (one more decode), then dropped it
    assert overlap.runner.computed_tokens == sync.runner.computed_tokens + 1
    assert overlap.allocator.num_free == overlap.allocator.num_blocks
    assert overlap.runner.released == ["a"]


def test_abort_drops_the_token_in_flight():
    sync, overlap = make(False), make(True)
    got = {}
    for engine in (sync, overlap):
        engine.add_request(req("a", max_tokens=50, seed=4))
        outs = []
        while engine.has_unfinished():
            for o in engine.step():
                outs.append((o.new_token_ids, o.finished, o.finish_reason, o.num_output_tokens))
                if o.num_output_tokens == 3 and not o.finished:
                    engine.abort("a")
        got[engine is overlap] = outs
        assert engine.allocator.num_free == engine.allocator.num_blocks
    assert got[True] == got[False]
    assert got[True][-1] == ([], True, "abort", 3)


def test_repetition_penalty_falls_back_to_the_synchronous_step():
    engine = make(True)
    outs = outputs_of(engine, [req("p", max_tokens=6, seed=5, repetition_penalty=1.3), req("q", seed=6)])
    # while p runs, every step waits for the previous one (p's history on the host); q overlaps after
    assert not any("p" in step for step in engine.runner.pending_inputs)
    assert any("q" in step for step in engine.runner.pending_inputs)
    assert [t for o in outs["p"] for t in o[0]] == [t for o in outputs_of(make(False), [
        req("p", max_tokens=6, seed=5, repetition_penalty=1.3)])["p"] for t in o[0]]


def test_a_runner_that_cannot_overlap_gets_the_synchronous_step():
    engine = make(True)
    engine.runner.supports_overlap = False  # as a tensor-parallel ModelRunner
    outputs_of(engine, [req("a", seed=7), req("b", seed=8)])
    assert not any(engine.runner.pending_inputs)


def test_async_scheduling_defaults_to_on_for_cuda_only():
    assert not make(None).async_scheduling  # FakeRunner: no device
    cuda = FakeRunner()
    cuda.device = SimpleNamespace(type="cuda")
    assert LLMEngine(cuda, None).async_scheduling
    assert not LLMEngine(cuda, None, scheduler_config=SchedulerConfig(async_scheduling=False)).async_scheduling


@pytest.mark.parametrize("eos_at", range(1, 6))
def test_the_prefix_cache_after_eos_is_the_synchronous_one(eos_at):
    """The step launched after EOS writes the EOS token's KV; a block it completes is not cached (it is
    not cached without overlap either), so a next turn gets the same prefix hits in both modes."""
    r = req("a", max_tokens=30, seed=3)

    def next_token(ctx):
        return EOS if len(ctx) == len(r.prompt_token_ids) + eos_at - 1 else default_next_token(ctx, VOCAB, EOS)

    got = {}
    for overlap in (False, True):
        engine = make(overlap, next_token=next_token)
        first = outputs_of(engine, [req("a", max_tokens=30, seed=3)])["a"]
        answer = [t for o in first for t in o[0]]
        turn2 = Request("b", r.prompt_token_ids + answer + [7, 8, 9], None, SamplingParams(max_tokens=2))
        second = engine.generate([turn2])["b"]
        got[overlap] = (first, engine.allocator.num_cached, second[-1].num_cached_tokens)
    assert got[True] == got[False]
