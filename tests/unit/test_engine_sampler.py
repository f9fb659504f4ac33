"""Sampler: seeded determinism independent of the batch, top-k / top-p / temperature / repetition
penalty equal to HF's logits processors, greedy and sampled rows in one batch."""
from __future__ import annotations

import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from internvl_serve.engine import SamplingParams
from internvl_serve.engine.sampler import (SamplingBatch, apply_min_tokens, apply_repetition_penalty, apply_temperature,
                                           apply_top_k, apply_top_p, sample_tokens)

V = 50


def logits_rows(n, seed=0):
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_top_k_matches_hf_per_row():
    x = logits_rows(4)
    x[2, :10] = x[2].max() + 1  # ties at the k-th value are kept, as HF keeps them
    ks = [1, 7, 5, 0]
    got = apply_top_k(x, torch.tensor(ks))
    for i, k in enumerate(ks):
        want = x[i:i + 1] if k == 0 else TopKLogitsWarper(top_k=k)(None, x[i:i + 1].clone())
        assert torch.equal(got[i:i + 1], want)
    assert (got[0] > float("-inf")).sum() == 1 and (got[1] > float("-inf")).sum() == 7
    assert (got[2] > float("-inf")).sum() == 10


def test_top_p_matches_hf_per_row():
    x = logits_rows(5, seed=1)
    ps = [0.1, 0.5, 0.9, 1.0, 1e-6]
    got = apply_top_p(x, torch.tensor(ps))
    for i, p in enumerate(ps):
        want = x[i:i + 1] if p == 1.0 else TopPLogitsWarper(top_p=p)(None, x[i:i + 1].clone())
        assert torch.equal(got[i:i + 1], want), p
    assert (got[4] > float("-inf")).sum() == 1  # at least one token survives
    assert torch.equal(got[3], x[3])


def test_temperature_matches_hf():
    x = logits_rows(2, seed=2)
    got = apply_temperature(x, torch.tensor([0.7, 1.9]))
    for i, t in enumerate([0.7, 1.9]):
        assert torch.allclose(got[i:i + 1], TemperatureLogitsWarper(t)(None, x[i:i + 1].clone()))


def test_repetition_penalty_matches_hf_over_generated_tokens():
    x = logits_rows(3, seed=3)
    outs = [[4, 9, 4, 17, 0], [], [33, 2]]  # repeats and a row with nothing generated yet
    pens = [1.3, 1.5, 0.8]
    batch = SamplingBatch.build([SamplingParams(repetition_penalty=p) for p in pens], outs, [None] * 3, "cpu")
    got = apply_repetition_penalty(x, batch.output_ids, batch.repetition_penalty)
    for i, (p, o) in enumerate(zip(pens, outs)):
        want = x[i:i + 1] if not o else RepetitionPenaltyLogitsProcessor(p)(torch.tensor([o]), x[i:i + 1].clone())
        assert torch.allclose(got[i:i + 1], want)
    assert not torch.equal(got[0], x[0]) and torch.equal(got[1], x[1])


def _draw(rows_logits, params, seeds, steps=8):
    """Sample `steps` times with one generator per row (kept across steps, like the runner)."""
    gens = [None if p.temperature == 0 else gen(s) for p, s in zip(params, seeds)]
    out = []
    for _ in range(steps):
        batch = SamplingBatch.build(params, [[] for _ in params], gens, "cpu")
        out.append(sample_tokens(rows_logits.clone(), batch).tolist())
    return [list(col) for col in zip(*out)]


def test_seeded_sampling_is_independent_of_batch_composition():
    x = logits_rows(4, seed=4) / 3
    me = SamplingParams(temperature=1.0, top_k=30, top_p=0.95, seed=7)
    alone = _draw(x[1:2], [me], [7])[0]
    crowd = _draw(x, [SamplingParams(temperature=0.5, seed=1), me, SamplingParams(), SamplingParams(
        temperature=2.0, seed=7)], [1, 7, 0, 7])
    assert crowd[1] == alone
    assert len(set(alone)) > 1  # really sampled
    assert _draw(x[1:2], [SamplingParams(temperature=1.0, top_k=30, top_p=0.95, seed=8)], [8])[0] != alone
    assert crowd[2] == [int(x[2].argmax())] * 8  # a greedy row in the same batch


def test_sampling_follows_the_distribution():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    params = [SamplingParams(temperature=1.0, seed=0)]
    g = [gen(0)]
    counts = torch.zeros(4)
    for _ in range(4000):
        t = sample_tokens(p.log(), SamplingBatch.build(params, [[]], g, "cpu"))
        counts[t] += 1
    assert torch.allclose(counts / 4000, p[0], atol=0.03)


def test_greedy_uses_penalized_logits_and_ignores_top_k():
    x = torch.tensor([[1.0, 5.0, 4.9, -1.0]])
    params = [SamplingParams(repetition_penalty=1.1, top_k=1)]
    assert sample_tokens(x, SamplingBatch.build(params, [[1]], [None], "cpu")).tolist() == [2]
    assert sample_tokens(x, SamplingBatch.build(params, [[]], [None], "cpu")).tolist() == [1]


def test_a_positive_temperature_too_small_to_divide_by_is_greedy():
    """temperature 1e-45 overflowed logits / t to inf (softmax NaN: tokens that decode to ''); below
    MIN_TEMPERATURE a temperature means greedy, even with a generator (as the runner passes one)."""
    from internvl_serve.engine.sampling import MIN_TEMPERATURE

    x = logits_rows(3, seed=5)
    for t in (1e-45, 1e-30, MIN_TEMPERATURE / 2):
        params = [SamplingParams(temperature=t, seed=s) for s in range(3)]
        assert all(p.temperature == 0.0 and p.greedy for p in params)
        batch = SamplingBatch.build(params, [[] for _ in params], [gen(s) for s in range(3)], "cpu")
        assert sample_tokens(x.clone(), batch).tolist() == x.argmax(dim=-1).tolist()
    assert SamplingParams(temperature=MIN_TEMPERATURE).temperature == MIN_TEMPERATURE  # still sampling


def test_min_tokens_masks_the_end_token_until_enough_were_generated():
    """Rows below their min_tokens cannot pick the end token (greedy or sampled); rows at or past it,
    and rows without min_tokens, can. The other tokens' logits are untouched."""
    x = logits_rows(4, seed=7)
    eos = 3
    x[:, eos] = 100.0  # the end token wins every row unless masked
    params = [SamplingParams(min_tokens=2), SamplingParams(min_tokens=2), SamplingParams(),
              SamplingParams(min_tokens=5, temperature=1.0, seed=1)]
    generated = [1, 2, 0, 4]
    batch = SamplingBatch.build(params, [[] for _ in params], [None, None, None, gen(1)], "cpu", generated, (eos,))
    got = sample_tokens(x.clone(), batch).tolist()
    assert got[1] == eos and got[2] == eos  # reached min_tokens / none asked
    assert got[0] == x[0].topk(2).indices[1].item()  # the best token but the end token
    assert got[3] != eos
    masked = apply_min_tokens(x, batch.end_mask)
    assert masked[0, eos] == float("-inf") and masked[3, eos] == float("-inf")
    assert torch.equal(masked[:, :eos], x[:, :eos]) and torch.equal(masked[1:3], x[1:3])
    # no count given (as before min_tokens existed): nothing masked
    assert SamplingBatch.build(params, [[] for _ in params], [None] * 4, "cpu").end_mask is None


def test_min_tokens_masks_the_requests_own_stop_tokens_instead_of_the_engine_eos():
    """A request that brings its template's stop token ids has those masked, not the engine's EOS (which
    does not end that request, so masking it would change its distribution)."""
    from internvl_serve.engine.sampler import min_tokens_mask

    params = [SamplingParams(min_tokens=3, stop_token_ids=(5, 6)), SamplingParams(min_tokens=3)]
    rows, ids = min_tokens_mask(params, [0, 0], (2,), "cpu")
    assert list(zip(rows.tolist(), ids.tolist())) == [(0, 5), (0, 6), (1, 2)]


def test_min_tokens_range():
    import pytest

    from internvl_serve.engine import InvalidRequest

    for bad, words in (({"min_tokens": -1}, ">= 0"), ({"min_tokens": 5, "max_tokens": 4}, "<= max_tokens"),
                       ({"min_tokens": 1.5}, "integer")):
        with pytest.raises(InvalidRequest, match=words) as e:
            SamplingParams(**bad).validate()
        assert e.value.field == "min_tokens"
    SamplingParams(min_tokens=4, max_tokens=4).validate()
