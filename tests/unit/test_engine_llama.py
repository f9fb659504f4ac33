"""Our paged-KV LLaMA forward vs transformers' LlamaForCausalLM (tiny random config, fp32, CPU):
logits match for prefill, chunked prefill and cached decode, batch 1 and batch 3 of different lengths."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from internvl_serve.engine.attention import build_attention_metadata
from internvl_serve.engine.llama import LlamaArgs, load_llama, sanitize_state_dict

BLOCK = 4
TOL = 1e-4


def tiny_hf(seed=0, kv_heads=2, rope_theta=10000.0, **kw):
    torch.manual_seed(seed)
    cfg = HFLlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                        rms_norm_eps=1e-5, rope_theta=rope_theta, tie_word_embeddings=False, **kw)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the default init: sharper, more distinct logits
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
            else:
                p.uniform_(0.8, 1.2)
    return model


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


class PagedHarness:
    """Runs our forward over chunks of several sequences with scattered block tables."""

    def __init__(self, model, num_blocks=64, seed=0, max_gather_tokens=32768):
        self.args = model.args
        a = self.args
        self.model = model
        self.k = torch.zeros(a.num_hidden_layers, num_blocks, BLOCK, a.num_key_value_heads, a.head_dim)
        self.v = torch.zeros_like(self.k)
        self.caches = [(self.k[i], self.v[i]) for i in range(a.num_hidden_layers)]
        self.free = list(np.random.default_rng(seed).permutation(num_blocks))  # non-contiguous blocks
        self.tables: dict[int, list[int]] = {}
        self.max_gather_tokens = max_gather_tokens

    def step(self, chunks: list[tuple[int, list[int], int]]) -> list[torch.Tensor]:
        """chunks: (seq id, token ids of the chunk, tokens already cached) -> logits of every chunk token."""
        q_lens, ctx, ids = [], [], []
        for sid, toks, start in chunks:
            table = self.tables.setdefault(sid, [])
            while len(table) * BLOCK < start + len(toks):
                table.append(int(self.free.pop()))
            q_lens.append(len(toks))
            ctx.append(start)
            ids.extend(toks)
        width = max(len(self.tables[sid]) for sid, _, _ in chunks)
        bt = torch.zeros(len(chunks), width + 2, dtype=torch.int32)  # extra junk columns must be harmless
        bt[:, width:] = 7
        for i, (sid, _, _) in enumerate(chunks):
            bt[i, :len(self.tables[sid])] = torch.tensor(self.tables[sid])
        meta, pos = build_attention_metadata(q_lens, ctx, bt, BLOCK, max_gather_tokens=self.max_gather_tokens)
        with torch.inference_mode():
            emb = self.model.embed(torch.tensor(ids))
            logits = self.model(emb, pos, self.caches, meta, torch.arange(len(ids)))
        return list(torch.split(logits, q_lens))


@pytest.fixture(scope="module", params=[2, 4], ids=["gqa", "mha"])
def pair(request):
    hf = tiny_hf(kv_heads=request.param)
    ours = load_llama(hf.config, hf.state_dict(), device="cpu", dtype=torch.float32)
    return hf, ours


def seqs_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in lengths]


def test_prefill_batch1(pair):
    hf, ours = pair
    (ids,) = seqs_of([23])
    (got,) = PagedHarness(ours).step([(0, ids, 0)])
    assert (got - hf_logits(hf, ids)).abs().max() < TOL


def test_prefill_batch3_different_lengths(pair):
    hf, ours = pair
    seqs = seqs_of([5, 31, 12])
    got = PagedHarness(ours).step([(i, s, 0) for i, s in enumerate(seqs)])
    for g, s in zip(got, seqs):
        assert (g - hf_logits(hf, s)).abs().max() < TOL


def test_chunked_prefill_and_cached_decode_batch3(pair):
    """Prefill in chunks of different sizes, interleaved across sequences, then decode one token at a time
    from the cache; every chunk's logits equal HF's full-sequence logits at those positions."""
    hf, ours = pair
    seqs = seqs_of([40, 9, 26], seed=2)
    full = [s + seqs_of([8], seed=10 + i)[0] for i, s in enumerate(seqs)]  # prompt + 8 "generated" tokens
    ref = [hf_logits(hf, f) for f in full]
    h = PagedHarness(ours, seed=3)
    done = [0, 0, 0]
    plan = [[(0, 7), (1, 9), (2, 4)], [(0, 13), (2, 10)], [(0, 20), (2, 12)]]  # prefill chunks
    for step in plan:
        chunks = [(sid, full[sid][done[sid]:done[sid] + n], done[sid]) for sid, n in step]
        for (sid, toks, start), got in zip(chunks, h.step(chunks)):
            assert (got - ref[sid][start:start + len(toks)]).abs().max() < TOL, (sid, start)
            done[sid] += len(toks)
    assert done == [40, 9, 26]
    for _ in range(8):  # decodes: batch 3, contexts of different lengths
        chunks = [(sid, full[sid][done[sid]:done[sid] + 1], done[sid]) for sid in range(3)]
        for (sid, _, start), got in zip(chunks, h.step(chunks)):
            assert (got[0] - ref[sid][start]).abs().max() < TOL
            done[sid] += 1


def test_mixed_step_with_many_attention_groups(pair):
    """A step mixing decodes and prefill chunks, with a gather budget so small that every sequence gets
    its own SDPA group: same logits."""
    hf, ours = pair
    seqs = seqs_of([18, 11, 25, 6], seed=4)
    ref = [hf_logits(hf, s) for s in seqs]
    h = PagedHarness(ours, max_gather_tokens=1)
    h.step([(0, seqs[0][:17], 0), (1, seqs[1][:10], 0)])
    chunks = [(0, seqs[0][17:], 17), (2, seqs[2], 0), (1, seqs[1][10:], 10), (3, seqs[3][:4], 0)]
    for (sid, toks, start), got in zip(chunks, h.step(chunks)):
        assert (got - ref[sid][start:start + len(toks)]).abs().max() < TOL


def test_rope_theta_and_prefixed_checkpoint_keys():
    """rope_theta is read from the config; InternVL's `language_model.` prefix and the old
    rotary_emb.inv_freq buffers are accepted; vision keys next to them are ignored."""
    hf = tiny_hf(seed=5, rope_theta=500000.0)
    sd = {f"language_model.{k}": v for k, v in hf.state_dict().items()}
    sd["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    sd["vision_model.embeddings.class_embedding"] = torch.zeros(1, 1, 8)
    ours = load_llama(hf.config, sd, device="cpu", dtype=torch.float32)
    assert ours.args.rope_theta == 500000.0
    (ids,) = seqs_of([30], seed=6)
    (got,) = PagedHarness(ours).step([(0, ids, 0)])
    assert (got - hf_logits(hf, ids)).abs().max() < TOL


def test_state_dict_mismatch_is_reported():
    hf = tiny_hf()
    sd = dict(hf.state_dict())
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        sanitize_state_dict(sd, LlamaArgs.from_config(hf.config))
    sd = dict(hf.state_dict())
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="up_proj"):
        load_llama(hf.config, sd, device="cpu", dtype=torch.float32)


def test_args_from_our_config_object():
    """Any object with the LlamaConfig field names works, also nested as .llm_config."""
    class Cfg:
        vocab_size, hidden_size, intermediate_size, num_hidden_layers = 10, 8, 16, 1
        num_attention_heads, num_key_value_heads, max_position_embeddings = 2, 1, 32
        rms_norm_eps, rope_theta, rope_scaling, eos_token_id = 1e-5, 1e4, None, 2

    class Outer:
        llm_config = Cfg()

    a = LlamaArgs.from_config(Outer())
    assert (a.head_dim, a.num_key_value_heads, a.rms_norm_eps) == (4, 1, 1e-5)
