"""GPU checks of the engine (run on the lent GPU; skipped without CUDA): the same tiny model as the CPU
tests, on CUDA in fp32 (tokens equal HF generate) and bf16 (logits close to HF's), the KV cache sized from
free GPU memory, and seeded sampling independent of the batch on CUDA generators."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from internvl_serve.engine import LLMEngine, ModelRunner, Request, SamplingParams, SchedulerConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
IMG, EOS = 96, 2


def tiny(dtype):
    torch.manual_seed(0)
    cfg = HFLlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                        rms_norm_eps=1e-5, eos_token_id=EOS, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08) if p.ndim == 2 else p.uniform_(0.8, 1.2)
    return model.to("cuda", dtype)


def requests(n=4, max_tokens=12, **sampling):
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        text = torch.randint(3, IMG, (9 + 5 * i,), generator=g).tolist()
        n_img = 4 * (i % 2)
        ids = [1] + text[:4] + [IMG] * n_img + text[4:]
        rows = (torch.randn(n_img, 64, generator=g) * 0.5) if n_img else None
        out.append(Request(f"r{i}", ids, rows, SamplingParams(max_tokens=max_tokens, **sampling)))
    return out


def engine_for(hf, dtype, budget=8, num_blocks=64):
    runner = ModelRunner(hf.config, hf.state_dict(), device="cuda", dtype=dtype, block_size=4, num_blocks=num_blocks)
    return LLMEngine(runner, None, eos_token_id=EOS, image_context_token_id=IMG,
                     scheduler_config=SchedulerConfig(max_num_batched_tokens=budget, watermark=0.0))


def hf_embeds(hf, r):
    ids = torch.tensor(r.prompt_token_ids, device="cuda")
    emb = hf.model.embed_tokens(ids)
    if r.image_embeds is not None:
        emb[ids == IMG] = r.image_embeds.to("cuda", emb.dtype)
    return emb[None]


@torch.no_grad()
def test_fp32_on_cuda_equals_hf_generate():
    hf = tiny(torch.float32)
    reqs = requests()
    res = engine_for(hf, torch.float32).generate(reqs)
    for r in reqs:
        emb = hf_embeds(hf, r)
        want = hf.generate(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long,
                                                                         device="cuda"),
                           do_sample=False, max_new_tokens=12, eos_token_id=EOS, pad_token_id=0)[0].tolist()
        assert [t for o in res[r.request_id] for t in o.new_token_ids] == want


@torch.no_grad()
def test_bf16_prefill_logits_close_to_hf():
    hf = tiny(torch.bfloat16)
    engine = engine_for(hf, torch.bfloat16, budget=256)
    reqs = requests()
    for r in reqs:
        engine.add_request(r)
    batch = engine.scheduler.schedule()
    ours = engine.runner.compute_logits(batch)
    for i, r in enumerate(reqs):
        ref = hf(inputs_embeds=hf_embeds(hf, r)).logits[0, -1].float()
        assert (ours[i] - ref).abs().max() < 0.05 * ref.abs().max()


def test_cache_sized_from_free_memory():
    hf = tiny(torch.bfloat16)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    runner = ModelRunner(hf.config, hf.state_dict(), device="cuda", dtype=torch.bfloat16, block_size=16,
                         gpu_memory_utilization=0.3)
    info = runner.cache_info()
    assert info["num_blocks"] > 1000 and info["num_tokens"] == 16 * info["num_blocks"]
    assert info["bytes"] == runner.kv_cache.numel() * 2
    assert info["bytes"] <= 0.3 * total - (total - free)
    assert info["bytes"] > 0.5 * (0.3 * total - (total - free))
    sizing = runner.kv_sizing  # what the load log tells (serving/llm_engine.py kv_sizing_text)
    assert sizing["total"] == total and sizing["reserved"] == 0 and 0 < sizing["activations"] < total
    assert sizing["own"] > 0 and sizing["device_in_use"] >= total - free  # the weights came in between


def test_seeded_sampling_on_cuda_is_independent_of_the_batch():
    hf = tiny(torch.bfloat16)
    s = dict(temperature=1.0, top_k=40, top_p=0.95, seed=77)
    alone = engine_for(hf, torch.bfloat16).generate(requests(1, **s))["r0"]
    crowd = engine_for(hf, torch.bfloat16, budget=64).generate(requests(4, **s))["r0"]
    assert [o.new_token_ids for o in alone] == [o.new_token_ids for o in crowd]


@torch.no_grad()
def test_cuda_graph_decode_equals_eager_decode():
    """Decode rows replay captured graphs with the fused kernels (pure-decode steps, and the decode rows
    of steps mixed with prefill chunks: the 8-token budget interleaves them); greedy tokens equal the
    eager (reference attention) path in fp32."""
    hf = tiny(torch.float32)
    reqs = requests(4, max_tokens=16)

    def run(graphs: bool, dtype):
        runner = ModelRunner(hf.config, hf.state_dict(), device="cuda", dtype=dtype, block_size=4, num_blocks=64,
                             cuda_graphs=graphs)
        assert (runner.decode_graphs is not None) == graphs
        engine = LLMEngine(runner, None, eos_token_id=EOS, image_context_token_id=IMG,
                           scheduler_config=SchedulerConfig(max_num_batched_tokens=8, watermark=0.0))
        return {k: [t for o in v for t in o.new_token_ids] for k, v in engine.generate(requests(4, max_tokens=16)).items()}

    assert run(True, torch.float32) == run(False, torch.float32)
    assert len(reqs) == 4


@torch.no_grad()
def test_min_tokens_on_cuda_with_cuda_graphs():
    """min_tokens on CUDA (decode through CUDA graphs): EOS = the first greedy token of each request, so
    without min_tokens each answer is that one token; with min_tokens=5 no answer ends before 5 tokens."""
    hf = tiny(torch.float32)
    reqs = requests(n=2, max_tokens=1)
    firsts = {r.request_id: [t for o in out for t in o.new_token_ids][0]
              for r, out in ((r, engine_for(hf, torch.float32).generate([r])[r.request_id]) for r in reqs)}
    for r in requests(n=2, max_tokens=12, min_tokens=5):
        eos = firsts[r.request_id]
        runner = ModelRunner(hf.config, hf.state_dict(), device="cuda", dtype=torch.float32, block_size=4,
                             num_blocks=64)
        engine = LLMEngine(runner, None, eos_token_id=eos, image_context_token_id=IMG)
        got = [t for o in engine.generate([r])[r.request_id] for t in o.new_token_ids]
        assert len(got) >= 5 and eos not in got[:5], (r.request_id, got)


@torch.no_grad()
@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_overlap_scheduling_on_cuda_gives_the_synchronous_tokens(graphs):
    """Overlap scheduling on CUDA (decode inputs gathered on the device from the previous step's
    tokens, into the graphs' static buffers or the eager ids): greedy, seeded sampling, EOS, max_tokens,
    a mixed prefill/decode budget, a tiny cache that preempts, and an abort mid-stream give exactly the
    tokens of the synchronous loop; every block is free afterwards."""
    hf = tiny(torch.bfloat16)

    def run(overlap: bool, *, eos=EOS, num_blocks=64, sampling=None):
        runner = ModelRunner(hf.config, hf.state_dict(), device="cuda", dtype=torch.bfloat16, block_size=4,
                             num_blocks=num_blocks, cuda_graphs=graphs)
        engine = LLMEngine(runner, None, eos_token_id=eos, image_context_token_id=IMG,
                           scheduler_config=SchedulerConfig(max_num_batched_tokens=8, watermark=0.0,
                                                            async_scheduling=overlap))
        assert engine.async_scheduling == overlap
        reqs = requests(4, max_tokens=16, **(sampling or {}))
        got: dict[str, list] = {r.request_id: [] for r in reqs}
        for r in reqs:
            engine.add_request(r)
        while engine.has_unfinished():
            for o in engine.step():
                got[o.request_id].append(o)
                if o.request_id == "r3" and o.num_output_tokens == 5 and not o.finished:
                    engine.abort("r3")
        assert engine.allocator.num_free == engine.allocator.num_blocks
        return {k: ([t for o in v for t in o.new_token_ids], v[-1].finish_reason, v[-1].num_output_tokens)
                for k, v in got.items()}

    assert run(True) == run(False)
    greedy = run(False)
    eos = greedy["r0"][0][3]  # a token r0 produces: it stops there
    assert run(True, eos=eos) == run(False, eos=eos)
    assert run(True, num_blocks=14) == run(False, num_blocks=14)
    s = dict(temperature=1.0, top_k=40, top_p=0.95, seed=77)
    assert run(True, sampling=s) == run(False, sampling=s)


def test_page_locked_image_rows_reach_the_device_without_a_host_copy():
    """LLMService pins a request's image rows on its caller's thread (host_copy.page_locked); the engine
    thread's to_device then stages nothing for them, for any slice (a chunked prefill's rows)."""
    from internvl_serve.engine.host_copy import page_locked, to_device

    rows = torch.randn(256, 64)
    locked = page_locked(rows, "cuda")
    assert locked.is_pinned() and torch.equal(locked, rows) and page_locked(locked, "cuda") is locked
    part = locked[10:20]
    assert part.pin_memory().data_ptr() == part.data_ptr()  # what to_device does first: nothing to copy
    assert torch.equal(to_device(part, "cuda").cpu(), rows[10:20])
    assert page_locked(rows, "cpu") is rows
    half = page_locked(rows, "cuda", torch.bfloat16)  # the engine's dtype: converted on the way in
    assert half.is_pinned() and half.dtype == torch.bfloat16 and torch.equal(half, rows.to(torch.bfloat16))


def test_rows_past_the_page_locked_bound_stay_pageable_and_still_reach_the_device(monkeypatch):
    from internvl_serve.engine import host_copy

    def in_use() -> int:  # read again before each bound: to_device's staging copy holds pinned memory too
        stats = host_copy.torch.cuda.host_memory_stats()
        return stats.get("active_bytes.current", stats.get("allocated_bytes.current", 0))

    rows = torch.randn(256, 64)
    monkeypatch.setattr(host_copy, "PAGE_LOCKED_WAITING_BYTES", in_use() + rows.nbytes - 1)
    kept = host_copy.page_locked(rows, "cuda")
    assert kept is rows and not kept.is_pinned()
    assert torch.equal(host_copy.to_device(kept[10:20], "cuda").cpu(), rows[10:20])
    monkeypatch.setattr(host_copy, "PAGE_LOCKED_WAITING_BYTES", in_use() + rows.nbytes)
    assert host_copy.page_locked(rows, "cuda").is_pinned()
