"""LLMEngine + ModelRunner + our LLaMA vs transformers generate(inputs_embeds=...) (tiny model, fp32, CPU):
greedy tokens equal token for token, with image rows injected, requests joining at different steps, chunked
prefill forced by a small token budget, preemption, prefix reuse and the context-window cap. Every test
runs with the synchronous loop and with overlap scheduling (the same tokens, one step late)."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from internvl_serve.engine import LLMEngine, ModelRunner, Request, SamplingParams, SchedulerConfig

IMG = 96  # <IMG_CONTEXT> id of the tiny vocabulary
EOS = 2


@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    cfg = HFLlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08) if p.ndim == 2 else p.uniform_(0.8, 1.2)
    return model


MODE = {"async_scheduling": False}


@pytest.fixture(autouse=True, params=[False, True], ids=["sync", "overlap"])
def scheduling_mode(request, monkeypatch):
    monkeypatch.setitem(MODE, "async_scheduling", request.param)
    return request.param


def make_engine(hf, *, num_blocks=64, block_size=4, budget=8, max_seqs=8, prefix=True, eos=EOS):
    runner = ModelRunner(hf.config, hf.state_dict(), device="cpu", dtype=torch.float32,
                         block_size=block_size, num_blocks=num_blocks)
    return LLMEngine(runner, None, eos_token_id=eos, image_context_token_id=IMG,
                     scheduler_config=SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                                      enable_prefix_caching=prefix, watermark=0.0,
                                                      async_scheduling=MODE["async_scheduling"]))


def make_request(rid, n_text, n_img=0, data=0, max_tokens=12, **sampling):
    g = torch.Generator().manual_seed(data)
    text = torch.randint(3, IMG, (n_text,), generator=g).tolist()
    ids = [1] + text[: n_text // 2] + [IMG] * n_img + text[n_text // 2:]
    rows = torch.randn(n_img, 64, generator=g) * 0.5 if n_img else None
    return Request(rid, ids, rows, SamplingParams(max_tokens=max_tokens, **sampling))


def hf_generate(hf, req: Request, eos=EOS, **kw) -> list[int]:
    ids = torch.tensor(req.prompt_token_ids)
    with torch.no_grad():
        emb = hf.model.embed_tokens(ids)
        if req.image_embeds is not None:
            emb[ids == IMG] = req.image_embeds
        out = hf.generate(inputs_embeds=emb[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=req.sampling.max_tokens, eos_token_id=eos,
                          pad_token_id=0, **kw)
    return out[0].tolist()


def tokens_of(outputs) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


def run_staggered(engine, requests, join_at):
    """Add requests[i] before step join_at[i]; step until everything finished."""
    results = {r.request_id: [] for r in requests}
    step = 0
    while step <= max(join_at) or engine.has_unfinished():
        for r, at in zip(requests, join_at):
            if at == step:
                engine.add_request(r)
        for out in engine.step():
            results[out.request_id].append(out)
        step += 1
        assert step < 500
    return results


def test_in_flight_batching_with_images_equals_hf_generate(hf):
    reqs = [make_request("a", 10, n_img=8, data=1, max_tokens=14),
            make_request("b", 17, n_img=0, data=2, max_tokens=9),
            make_request("c", 5, n_img=12, data=3, max_tokens=16),
            make_request("d", 23, n_img=4, data=4, max_tokens=11)]
    engine = make_engine(hf, budget=8)
    results = run_staggered(engine, reqs, join_at=[0, 2, 3, 7])
    runner_steps_with_chunks = 0
    for r in reqs:
        outs = results[r.request_id]
        assert tokens_of(outs) == hf_generate(hf, r), r.request_id
        assert outs[-1].finished and all(not o.finished for o in outs[:-1])
        assert outs[-1].finish_reason == ("stop" if outs[-1].new_token_ids == [EOS] else "length")
        assert outs[-1].num_prompt_tokens == len(r.prompt_token_ids)
        assert outs[-1].num_output_tokens == len(tokens_of(outs))
        runner_steps_with_chunks += len(r.prompt_token_ids) > 8
    assert runner_steps_with_chunks >= 2  # prompts longer than the budget: really chunked
    assert engine.allocator.num_free == engine.allocator.num_blocks
    engine.allocator.check_consistency()


def test_eos_stops_like_hf(hf):
    """With EOS = a token the model produces (38 for "a", 4th token), both stop there, EOS included."""
    reqs = [make_request("a", 10, n_img=8, data=1, max_tokens=14), make_request("b", 17, data=2, max_tokens=9)]
    out = make_engine(hf, eos=38).generate(reqs)
    for r in reqs:
        assert tokens_of(out[r.request_id]) == hf_generate(hf, r, eos=38)
    assert tokens_of(out["a"])[-1] == 38 and out["a"][-1].finish_reason == "stop"
    assert len(tokens_of(out["a"])) < 14


def test_image_rows_matter(hf):
    """Control: other image rows give other tokens (so the test above checks the injection)."""
    r = make_request("a", 6, n_img=8, data=5, max_tokens=8)
    r2 = Request("b", r.prompt_token_ids, r.image_embeds * -3.0, r.sampling)
    out = make_engine(hf).generate([r, r2])
    assert tokens_of(out["a"]) != tokens_of(out["b"])


def test_preemption_with_a_tiny_cache_keeps_greedy_tokens(hf):
    """12 blocks of 4 tokens for 3 requests that need ~8 each: sequences get preempted and recomputed;
    the tokens still equal HF's."""
    reqs = [make_request(f"r{i}", 14 + 3 * i, n_img=4 * (i % 2), data=10 + i, max_tokens=16) for i in range(3)]
    engine = make_engine(hf, num_blocks=12, budget=16)
    results = run_staggered(engine, reqs, join_at=[0, 1, 2])
    assert engine.scheduler.num_preemptions > 0
    for r in reqs:
        assert tokens_of(results[r.request_id]) == hf_generate(hf, r)
    assert engine.allocator.num_free == 12


def test_repetition_penalty_greedy_equals_hf(hf):
    r = make_request("p", 12, n_img=4, data=20, max_tokens=20, repetition_penalty=1.8)
    got = tokens_of(make_engine(hf).generate([r])["p"])
    assert got == hf_generate(hf, r, repetition_penalty=1.8)
    plain = Request("q", r.prompt_token_ids, r.image_embeds, SamplingParams(max_tokens=20))
    assert got != hf_generate(hf, plain)  # the penalty changed something


def test_second_turn_reuses_prefix_blocks_and_matches_hf(hf):
    """Turn 2 = turn 1's prompt + answer + more text: its leading full blocks (image blocks too, via
    image_hashes) come from the prefix cache, and its tokens still equal HF's."""
    engine = make_engine(hf, budget=64)
    t1 = make_request("t1", 10, n_img=8, data=30, max_tokens=6)
    t1 = Request("t1", t1.prompt_token_ids, t1.image_embeds, t1.sampling, image_hashes=("img-A",))
    answer = tokens_of(engine.generate([t1])["t1"])
    ids2 = t1.prompt_token_ids + answer + [5, 6, 7, 8, 9]
    t2 = Request("t2", ids2, t1.image_embeds, SamplingParams(max_tokens=6), image_hashes=("img-A",))
    out2 = engine.generate([t2])["t2"]
    cached = out2[-1].num_cached_tokens
    assert cached >= (len(t1.prompt_token_ids) // 4) * 4  # at least the whole first prompt's full blocks
    assert engine.stats()["prefix_cache_hits"] == cached // 4
    assert tokens_of(out2) == hf_generate(hf, t2)
    # other image content under the same token ids: no reuse past the first image block
    t3 = Request("t3", ids2, t1.image_embeds + 1.0, SamplingParams(max_tokens=6), image_hashes=("img-B",))
    out3 = engine.generate([t3])["t3"]
    assert out3[-1].num_cached_tokens < 4 * (1 + t1.prompt_token_ids.index(IMG) // 4)
    assert tokens_of(out3) == hf_generate(hf, t3)
    # without image_hashes the engine hashes the rows itself: same rows -> reuse
    t4 = Request("t4", ids2, t1.image_embeds.clone(), SamplingParams(max_tokens=6))
    t5 = Request("t5", ids2, t1.image_embeds.clone(), SamplingParams(max_tokens=6))
    engine.generate([t4])
    assert engine.generate([t5])["t5"][-1].num_cached_tokens == ((len(ids2) - 1) // 4) * 4
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_generation_is_capped_at_the_context_window(hf):
    r = make_request("w", 88, data=40, max_tokens=50)  # 89 prompt tokens, window 96
    out = make_engine(hf, budget=96).generate([r])["w"]
    assert out[-1].finished and out[-1].finish_reason == "length"
    assert len(tokens_of(out)) == 96 - 89
    assert tokens_of(out) == hf_generate(hf, Request("w", r.prompt_token_ids, None,
                                                     SamplingParams(max_tokens=96 - 89)))


def test_seeded_sampling_is_independent_of_the_batch(hf):
    s = dict(temperature=1.3, top_k=20, top_p=0.9, seed=1234, max_tokens=12)
    alone = tokens_of(make_engine(hf).generate([make_request("x", 9, n_img=4, data=50, **s)])["x"])
    others = [make_request(f"o{i}", 7 + i, data=60 + i, max_tokens=10, temperature=0.7, seed=i) for i in range(3)]
    crowd = make_engine(hf, budget=16)
    res = run_staggered(crowd, others + [make_request("x", 9, n_img=4, data=50, **s)], join_at=[0, 0, 1, 2])
    assert tokens_of(res["x"]) == alone
    other_seed = tokens_of(make_engine(hf).generate([make_request("x", 9, n_img=4, data=50,
                                                                  **{**s, "seed": 99})])["x"])
    assert other_seed != alone


def test_min_tokens_when_the_first_greedy_token_is_eos_equals_hf_min_new_tokens(hf):
    """EOS = the model's first greedy token: without min_tokens the answer is that token alone; with
    min_tokens=5 the engine generates at least 5 tokens, equal to HF's min_new_tokens (which masks EOS)."""
    probe = make_request("probe", 12, n_img=4, data=40, max_tokens=1)
    first = tokens_of(make_engine(hf).generate([probe])["probe"])[0]
    plain = make_request("plain", 12, n_img=4, data=40, max_tokens=12)
    out = make_engine(hf, eos=first).generate([plain])["plain"]
    assert tokens_of(out) == [first] and out[-1].finish_reason == "stop"
    held = make_request("held", 12, n_img=4, data=40, max_tokens=12, min_tokens=5)
    got = tokens_of(make_engine(hf, eos=first).generate([held])["held"])
    assert len(got) >= 5 and first not in got[:5]
    assert got == hf_generate(hf, held, eos=first, min_new_tokens=5)
