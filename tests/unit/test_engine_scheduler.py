"""Scheduler + BlockAllocator through LLMEngine with a FakeRunner (pure Python, no model): join/leave,
queueing when the cache is full, preemption and resume, abort, prefix reuse, no leaked blocks.
Every test runs with the synchronous loop and with overlap scheduling (tokens one step late)."""
from __future__ import annotations

import random
import time

import pytest

from internvl_serve.engine import (BlockAllocator, FakeRunner, LLMEngine, Request, SamplingParams,
                                   SchedulerConfig)
from internvl_serve.engine.fake_runner import default_next_token

VOCAB, EOS = 1000, 2


MODE = {"async_scheduling": False}


@pytest.fixture(autouse=True, params=[False, True], ids=["sync", "overlap"])
def scheduling_mode(request, monkeypatch):
    monkeypatch.setitem(MODE, "async_scheduling", request.param)
    return request.param


def engine_with(num_blocks=64, block_size=4, budget=16, max_seqs=8, prefix=True, **runner_kw):
    runner = FakeRunner(num_blocks=num_blocks, block_size=block_size, vocab_size=VOCAB, eos_token_id=EOS,
                        **runner_kw)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, enable_prefix_caching=prefix,
                          watermark=0.0, async_scheduling=MODE["async_scheduling"])
    return LLMEngine(runner, None, eos_token_id=EOS, scheduler_config=cfg)


def expected(prompt, max_tokens, next_token=None, window=4096):
    next_token = next_token or (lambda ctx: default_next_token(ctx, VOCAB, EOS))
    toks, out = list(prompt), []
    while len(out) < max_tokens and len(toks) < window:
        t = next_token(toks)
        out.append(t)
        toks.append(t)
        if t == EOS:
            break
    return out


def req(rid, n, max_tokens=8, seed=0, prefix=()):
    rng = random.Random(seed)
    return Request(rid, list(prefix) + [rng.randrange(3, VOCAB) for _ in range(n)], None,
                   SamplingParams(max_tokens=max_tokens))


def run(engine, schedule: dict[int, list[Request]], max_steps=2000, check=None):
    results: dict[str, list] = {}
    step = 0
    while step <= max(schedule, default=0) or engine.has_unfinished():
        for r in schedule.get(step, []):
            engine.add_request(r)
            results[r.request_id] = []
        for out in engine.step():
            results[out.request_id].append(out)
        if check:
            check(engine, step)
        engine.allocator.check_consistency()
        step += 1
        assert step < max_steps, "no progress"
    return results


def toks(outs):
    return [t for o in outs for t in o.new_token_ids]


def assert_all_free(engine):
    a = engine.allocator
    assert a.num_free == a.num_blocks
    assert all(a.ref_count(b) == 0 for b in range(a.num_blocks))
    a.check_consistency()


# -- block allocator ----------------------------------------------------------------------------------

def test_allocator_refcounts_and_lru_eviction():
    a = BlockAllocator(4, 2)
    b = a.allocate_n(4)
    assert a.num_free == 0 and not a.can_allocate(1)
    with pytest.raises(RuntimeError):
        a.allocate()
    a.register(b[0], b"h0")
    a.register(b[1], b"h1")
    a.register(b[2], b"h0")   # duplicate content: stays uncached
    a.share(b[0])
    a.free(b[0])
    assert a.ref_count(b[0]) == 1 and a.num_free == 0
    a.free_blocks([b[0], b[1]])  # tail first: b[1] becomes older than b[0] on the LRU list
    a.free(b[2])
    assert a.num_free == 3 and a.num_cached == 2
    assert a.lookup(b"h0") == b[0] and a.lookup(b"h1") == b[1]
    assert a.allocate() == b[2]        # the never-cached block goes first
    assert a.allocate() == b[1]        # then the least recently freed cached one
    assert a.lookup(b"h1") is None and a.lookup(b"h0") == b[0]
    a.share(b[0])                      # a hit on an evictable block takes it off the LRU list
    assert a.num_free == 0
    with pytest.raises(RuntimeError):
        a.free(b[3]) or a.free(b[3])
    a.check_consistency()


# -- join / leave ----------------------------------------------------------------------------------

def test_requests_join_and_leave_with_chunked_prefill():
    reqs = {0: [req("a", 30, 10, seed=1)], 2: [req("b", 5, 3, seed=2), req("c", 41, 6, seed=3)],
            9: [req("d", 1, 12, seed=4)]}
    budget, max_seqs = 16, 3

    def check(engine, step):
        last = engine.runner.steps[-1] if engine.runner.steps else []
        assert sum(n for _, _, n in last) <= budget
        assert engine.scheduler.num_running <= max_seqs

    engine = engine_with(budget=budget, max_seqs=max_seqs)
    results = run(engine, reqs, check=check)
    for rs in reqs.values():
        for r in rs:
            outs = results[r.request_id]
            assert toks(outs) == expected(r.prompt_token_ids, r.sampling.max_tokens)
            assert outs[-1].finished and outs[-1].finish_reason == "length"
    # a 41-token prompt under a 16-token budget: prefilled in several chunks, decodes kept going meanwhile
    chunks_c = [n for step in engine.runner.steps for rid, _, n in step if rid == "c"]
    assert chunks_c[:3] != [1, 1, 1] and sum(chunks_c) >= 41
    assert sorted(engine.runner.released) == ["a", "b", "c", "d"]
    assert_all_free(engine)


def test_decodes_are_not_starved_by_a_long_prefill():
    engine = engine_with(budget=8)
    engine.add_request(req("short", 3, 20))
    engine.step()
    engine.add_request(req("long", 60, 2))
    for _ in range(5):
        engine.step()
        rids = {rid: n for rid, _, n in engine.runner.steps[-1]}
        assert rids.get("short") == 1 and rids.get("long") == 7


# -- cache full: wait, then run ----------------------------------------------------------------------

def test_request_waits_while_cache_is_full_then_runs():
    # 6 blocks x 4 tokens. a: 14 prompt + 8 new = 22 tokens (6 blocks). b needs 3 blocks for its first chunk.
    engine = engine_with(num_blocks=6, budget=16)
    a, b = req("a", 14, 8, seed=5), req("b", 10, 4, seed=6)
    engine.add_request(a)
    engine.step()
    engine.add_request(b)
    a_done_step, b_first_step, step = None, None, 1
    results = {"a": [], "b": []}
    while engine.has_unfinished():
        for out in engine.step():
            results[out.request_id].append(out)
            if out.request_id == "a" and out.finished:
                a_done_step = step
        if b_first_step is None and any(rid == "b" for rid, _, _ in engine.runner.steps[-1]):
            b_first_step = step
        if b_first_step is None:
            assert engine.scheduler.num_waiting == 1
        step += 1
    assert engine.scheduler.num_preemptions == 0
    assert b_first_step > a_done_step  # b waited for a's blocks
    assert toks(results["b"]) == expected(b.prompt_token_ids, 4)
    assert_all_free(engine)


def test_prompt_that_can_never_fit_is_refused():
    from internvl_serve.engine import InvalidRequest
    engine = engine_with(num_blocks=4)
    with pytest.raises(InvalidRequest, match="16"):
        engine.add_request(req("big", 16))


# -- preemption --------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", [True, False])
def test_preemption_and_resume_give_the_same_tokens(prefix):
    # 8 blocks x 4: two 10-token prompts growing by 12 each need 12 blocks: the newest gets preempted
    engine = engine_with(num_blocks=8, budget=32, prefix=prefix)
    reqs = {0: [req("old", 10, 12, seed=7)], 1: [req("new", 10, 12, seed=8)]}
    before = time.monotonic()
    results = run(engine, reqs)
    after = time.monotonic()
    assert engine.scheduler.num_preemptions >= 1
    for outputs in results.values():  # the first admission's time, kept through the preemption
        stamps = {o.first_scheduled for o in outputs if o.new_token_ids}
        assert len(stamps) == 1 and before <= stamps.pop() <= after
    for r in (reqs[0][0], reqs[1][0]):
        assert toks(results[r.request_id]) == expected(r.prompt_token_ids, 12)
        assert results[r.request_id][-1].finish_reason == "length"
    assert_all_free(engine)


# -- abort -------------------------------------------------------------------------------------------

def test_abort_running_and_waiting_frees_every_block():
    engine = engine_with(num_blocks=10, budget=8, max_seqs=2)
    for i, n in enumerate((9, 13, 6)):
        engine.add_request(req(f"r{i}", n, 50, seed=i))
    for _ in range(4):
        engine.step()
    assert engine.scheduler.num_running == 2 and engine.scheduler.num_waiting == 1
    assert engine.allocator.num_free < 10
    for i in range(3):
        engine.abort(f"r{i}")
    engine.abort("unknown")  # ignored
    outs = engine.step()
    assert sorted(o.request_id for o in outs) == ["r0", "r1", "r2"]
    assert all(o.finished and o.finish_reason == "abort" and o.new_token_ids == [] for o in outs)
    assert not engine.has_unfinished()
    assert_all_free(engine)


# -- prefix reuse ------------------------------------------------------------------------------------

def test_second_turn_reuses_the_shared_prefix():
    engine = engine_with(num_blocks=32, budget=64)
    t1 = req("t1", 21, 6, seed=9)
    out1 = toks(engine.generate([t1])["t1"])
    computed_before = engine.runner.computed_tokens
    ids2 = t1.prompt_token_ids + out1 + [7, 8, 9]
    t2 = Request("t2", ids2, None, SamplingParams(max_tokens=5))
    out2 = engine.generate([t2])["t2"]
    hit_tokens = out2[-1].num_cached_tokens
    # turn 1 computed 21 prompt + 5 generated tokens (the last one is never fed): 26 -> 6 full blocks
    assert hit_tokens == 24
    assert engine.allocator.prefix_hits == 6
    assert engine.runner.computed_tokens - computed_before == len(ids2) + 4 - hit_tokens
    assert toks(out2) == expected(ids2, 5)  # the FakeRunner also checked the reused KV content
    assert_all_free(engine)
    assert engine.allocator.num_cached > 0  # still cached after everyone left


def test_prefix_blocks_shared_by_concurrent_requests_and_evicted_when_needed():
    engine = engine_with(num_blocks=12, budget=64)
    shared = req("x", 16, 1, seed=10).prompt_token_ids
    engine.generate([Request("warm", shared + [5], None, SamplingParams(max_tokens=1))])
    a = Request("a", shared + [11, 12], None, SamplingParams(max_tokens=6))
    b = Request("b", shared + [13], None, SamplingParams(max_tokens=6))
    res = engine.generate([a, b])
    assert res["a"][-1].num_cached_tokens == 16 and res["b"][-1].num_cached_tokens == 16
    for r in (a, b):
        assert toks(res[r.request_id]) == expected(r.prompt_token_ids, 6)
    # a long unrelated request needs every block: cached ones are evicted, nothing breaks
    big = req("big", 40, 6, seed=11)
    assert toks(engine.generate([big])["big"]) == expected(big.prompt_token_ids, 6)
    assert_all_free(engine)


# -- failures ----------------------------------------------------------------------------------------

def test_a_failing_step_fails_only_that_batch():
    calls = {"n": 0}

    def fail_if(batch):
        calls["n"] += 1
        return any(s.seq.request_id == "bad" for s in batch.seqs) and calls["n"] > 1

    engine = engine_with(budget=64, fail_if=fail_if)
    engine.add_request(req("bad", 5, 5, seed=12))
    engine.step()
    outs = engine.step()
    assert [(o.request_id, o.finished, o.finish_reason) for o in outs] == [("bad", True, "abort")]
    assert "fake runner failure" in outs[0].error
    assert_all_free(engine)
    good = req("good", 5, 4, seed=13)
    assert toks(engine.generate([good])["good"]) == expected(good.prompt_token_ids, 4)


# -- randomized ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_random_traffic_with_aborts_and_a_tiny_cache(seed):
    rng = random.Random(seed)
    engine = engine_with(num_blocks=rng.choice([10, 16, 40]), block_size=rng.choice([2, 4]),
                         budget=rng.choice([4, 9, 32]), max_seqs=rng.choice([2, 4, 16]))
    capacity = engine.allocator.num_blocks * engine.allocator.block_size
    common = [rng.randrange(3, VOCAB) for _ in range(12)]
    schedule, aborted = {}, set()
    for i in range(14):
        n = rng.randrange(1, min(30, capacity - 1))
        prefix = common[: rng.randrange(0, 12)] if rng.random() < 0.5 else []
        r = req(f"q{i}", max(1, n - len(prefix)), rng.randrange(1, 12), seed=100 * seed + i, prefix=prefix)
        schedule.setdefault(rng.randrange(0, 40), []).append(r)
    to_abort = {f"q{i}": rng.randrange(0, 60) for i in rng.sample(range(14), 3)}

    def check(engine, step):
        for rid, at in to_abort.items():
            if at == step:
                engine.abort(rid)
                aborted.add(rid)

    results = run(engine, schedule, check=check)
    for rs in schedule.values():
        for r in rs:
            outs = results[r.request_id]
            assert outs and outs[-1].finished and sum(o.finished for o in outs) == 1
            want = expected(r.prompt_token_ids, r.sampling.max_tokens, window=capacity)
            if outs[-1].finish_reason == "abort":
                assert r.request_id in aborted and want[:len(toks(outs))] == toks(outs)
            else:
                assert toks(outs) == want
    assert_all_free(engine)
