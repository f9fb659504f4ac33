"""Tests of the varlen paged prefill kernel (kernels/prefill_attention.py) and its wiring (engine/attention.py).

Three tiers, as tests/unit/test_kernels.py:
- torch only (always run): the tile split, the switch (CPU keeps the reference; INTERNVL_PREFILL_KERNEL=0
  turns the kernel off on CUDA), the reference's groups built lazily from the same metadata.
- the Triton kernel under the CPU interpreter (TRITON_INTERPRET=1, in a subprocess: this file is its
  script, see the bottom) at small shapes in float32 and float16, against the reference SDPA path
  (`sdpa_paged_attention`) run in float64: several sequences of different chunk and context lengths,
  decodes (one query) in the same step, GQA/MQA, block sizes that are and are not powers of two, a chunk
  whose context spans many blocks, a permuted cache layout, NaN in every slot no sequence owns.
- the whole engine on the CPU with the interpreted kernel (INTERNVL_PREFILL_KERNEL=1): a tiny model's greedy
  tokens through chunked prefills mixed with decodes are the same as with the reference.
- @pytest.mark.gpu: the compiled kernel at the 13B shapes in bfloat16, and a tiny model whose greedy
  tokens are the same with the kernel on and off.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from kernel_helpers import HAS_TRITON, gpu, nan_paged_cache, needs_triton, rel_err, run_interpreted

from internvl_serve.engine.attention import (PREFILL_KERNEL_ENV, build_attention_metadata, paged_attention,
                                             prefill_kernel_default, sdpa_paged_attention)
from internvl_serve.kernels.paged_attention import put_cache_rows
from internvl_serve.kernels.prefill_attention import prefill_block_m, prefill_tiles

E4M3 = torch.float8_e4m3fn

if HAS_TRITON:
    import triton


def make_step(seqs, Hq, Hkv, D, block_size, dtype, device="cpu", layout="bthd", extra_blocks=3,
              cache_dtype=None):
    """One step: seqs is a list of (ctx, q) = (tokens already cached, this step's tokens); the cache in
    cache_dtype (default: q's dtype).

    Returns q (T, Hq, D), k_cache, v_cache, block_tables (B, M) int32, q_lens, ctx_lens. Every key of a
    sequence up to ctx + q is written (as the engine writes the step's K/V before attention); every
    other slot holds NaN, and unused table entries point at a NaN block. Block ids are shuffled.
    """
    ctx_lens = [c for c, _ in seqs]
    q_lens = [q for _, q in seqs]
    need = [-(-(c + q) // block_size) for c, q in seqs]
    perm, k_cache, v_cache = nan_paged_cache(sum(need) + extra_blocks, block_size, Hkv, D, cache_dtype or dtype,
                                             device, layout)
    width = max(need) + 1
    tables = torch.full((len(seqs), width), int(perm[-1]), dtype=torch.int32, device=device)
    first = 0
    for b, (c, q) in enumerate(seqs):
        blocks = perm[first:first + need[b]]
        first += need[b]
        tables[b, :need[b]] = blocks.int()
        n = c + q
        kv = torch.randn(2, need[b] * block_size, Hkv, D, device=device).to(dtype)
        kv[:, n:] = float("nan")  # the tail of the last block is not this sequence's
        put_cache_rows(k_cache, blocks.long(), kv[0].view(need[b], block_size, Hkv, D))
        put_cache_rows(v_cache, blocks.long(), kv[1].view(need[b], block_size, Hkv, D))
    q = torch.randn(sum(q_lens), Hq, D, device=device).to(dtype)
    return q, k_cache, v_cache, tables, q_lens, ctx_lens


def reference(q, k_cache, v_cache, tables, q_lens, ctx_lens, block_size, scale):
    """The engine's reference attention (SDPA over gathered K/V) in float64."""
    meta, _ = build_attention_metadata(q_lens, ctx_lens, tables, block_size, prefill_kernel=False)
    k, v = k_cache.double().contiguous(), v_cache.double().contiguous()  # the reference needs (N, bs, Hkv, D) storage
    return sdpa_paged_attention(q.double(), k, v, meta, scale)


def check_kernel(seqs, Hq, Hkv, D, block_size, dtype, device, layout="bthd", tol=1e-5,
                 block_m=None, block_n=None, cache_dtype=None) -> float:
    q, k, v, bt, q_lens, ctx_lens = make_step(seqs, Hq, Hkv, D, block_size, dtype, device, layout,
                                              cache_dtype=cache_dtype)
    scale = D ** -0.5
    ref = reference(q, k, v, bt, q_lens, ctx_lens, block_size, scale)
    if block_m is None and block_n is None:  # the engine's path: metadata + paged_attention
        meta, _ = build_attention_metadata(q_lens, ctx_lens, bt, block_size, prefill_kernel=True)
        assert meta.prefill_tiles is not None
        out = paged_attention(q, k, v, meta, scale)
    else:  # other tilings, straight to the kernel
        from internvl_serve.kernels.prefill_attention import paged_prefill_attention
        meta, _ = build_attention_metadata(q_lens, ctx_lens, bt, block_size, prefill_kernel=False)
        ts, st = prefill_tiles(q_lens, block_m, ctx_lens)
        out = torch.full_like(q, float("nan"))
        paged_prefill_attention(q, k, v, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                torch.from_numpy(ts).to(device), torch.from_numpy(st).to(device), scale,
                                block_m, out=out, block_n=block_n)
    err = rel_err(out, ref)
    assert err < tol, f"{seqs} Hq={Hq} Hkv={Hkv} D={D} bs={block_size} {dtype} {layout} {cache_dtype}: rel err {err:.2e}"
    return err


# The interpreted cases, run by the subprocess (see the bottom of the file).
INTERPRETED_CASES = [
    # seqs [(ctx, q)], Hq, Hkv, D, block_size, dtype, layout, block_m, block_n
    ([(0, 37), (5, 1), (100, 20), (0, 1)], 4, 4, 32, 16, torch.float32, "bthd", None, None),  # MHA, mixed
    ([(300, 70), (250, 1), (17, 1), (0, 3)], 8, 2, 32, 16, torch.float16, "bthd", None, None),  # GQA, long ctx
    ([(45, 30), (0, 1), (11, 13)], 6, 1, 24, 12, torch.float32, "bhtd", None, None),  # MQA, D and bs not 2^k
    ([(0, 1), (1, 1), (31, 1), (64, 1)], 4, 2, 32, 16, torch.float32, "bthd", None, None),  # decodes only
    ([(200, 40), (0, 64), (3, 1)], 4, 2, 32, 8, torch.float32, "bhtd", 32, 16),  # many key steps
    ([(130, 50), (7, 2)], 4, 4, 16, 4, torch.float16, "bthd", 16, 32),  # tiny blocks: 4 per key step
]
# float32 queries over an e4m3 cache (the reference reads the same e4m3 values)
E4M3_CACHE_CASES = [
    # seqs [(ctx, q)], Hq, Hkv, D, block_size, layout
    ([(0, 37), (5, 1), (100, 20), (0, 1)], 4, 4, 32, 16, "bthd"),
    ([(45, 30), (0, 1), (11, 13)], 6, 2, 32, 8, "bhtd"),
]


def tiny_engine_tokens(kernel: str) -> tuple[list[list[int]], int]:
    """Greedy tokens of 4 requests through the real engine (tiny LLaMA, fp32, CPU, a budget of 8 tokens:
    chunked prefills mixed with decodes) with INTERNVL_PREFILL_KERNEL=kernel, and how many attention
    calls ran the kernel."""
    from test_engine_generate import make_engine, make_request  # the CPU engine tests' tiny model
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    import internvl_serve.kernels.prefill_attention as pa
    torch.manual_seed(0)
    cfg = HFLlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.08) if p.ndim == 2 else p.uniform_(0.8, 1.2)
    calls = [0]
    kernel_fn = pa.paged_prefill_attention

    def counted(*a, **kw):
        calls[0] += 1
        return kernel_fn(*a, **kw)

    os.environ[PREFILL_KERNEL_ENV] = kernel
    pa.paged_prefill_attention = counted
    try:
        reqs = [make_request(f"r{i}", 7 + 5 * i, n_img=4 * (i % 2), data=i, max_tokens=6) for i in range(4)]
        res = make_engine(hf, budget=8).generate(reqs)
    finally:
        pa.paged_prefill_attention = kernel_fn
        del os.environ[PREFILL_KERNEL_ENV]
    return [[t for o in res[r.request_id] for t in o.new_token_ids] for r in reqs], calls[0]


def run_interpreted_engine() -> None:
    on, calls_on = tiny_engine_tokens("1")
    off, calls_off = tiny_engine_tokens("0")
    assert calls_on > 0 and calls_off == 0, (calls_on, calls_off)
    assert on == off, f"tokens differ with the kernel on and off:\n{on}\n{off}"
    assert all(len(t) == 6 for t in on), on
    print(f"engine: same greedy tokens with the kernel on ({calls_on} kernel calls) and off")


def run_interpreted_checks() -> None:
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    for seqs, Hq, Hkv, D, bs, dtype, layout, bm, bn in INTERPRETED_CASES:
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        err = check_kernel(seqs, Hq, Hkv, D, bs, dtype, "cpu", layout, tol, bm, bn)
        print(f"prefill {seqs} Hq={Hq} Hkv={Hkv} D={D} bs={bs} {dtype} {layout} bm={bm} bn={bn}: rel err {err:.1e}")
    for seqs, Hq, Hkv, D, bs, layout in E4M3_CACHE_CASES:
        err = check_kernel(seqs, Hq, Hkv, D, bs, torch.float32, "cpu", layout, 1e-5, cache_dtype=E4M3)
        print(f"prefill {seqs} Hq={Hq} Hkv={Hkv} D={D} bs={bs} e4m3 cache {layout}: rel err {err:.1e}")


# --------------------------------------------------------------------------------------------------
# tier 1: torch only
# --------------------------------------------------------------------------------------------------


def test_prefill_tiles_cover_every_query_once():
    q_lens = [37, 1, 0, 64, 65]
    ts, st = prefill_tiles(q_lens, 16)
    covered = {(b, i) for b, s in zip(ts, st) for i in range(s, min(s + 16, q_lens[b]))}
    assert covered == {(b, i) for b, n in enumerate(q_lens) for i in range(n)}
    assert len(ts) == sum(-(-n // 16) for n in q_lens)  # no tile is empty; none for a zero-length sequence
    assert ts.dtype == np.int32 and st.dtype == np.int32
    assert prefill_block_m(1) == 16 and prefill_block_m(17) == 64
    ctx = [0, 500, 7, 30, 3]
    ts2, st2 = prefill_tiles(q_lens, 16, ctx)  # the same tiles, those with the most keys first
    assert sorted(zip(ts2, st2)) == sorted(zip(ts, st))
    keys = [ctx[b] + s for b, s in zip(ts2, st2)]
    assert keys == sorted(keys, reverse=True) and keys[0] == 500


def test_cpu_default_is_the_reference():
    q, k, v, bt, q_lens, ctx_lens = make_step([(5, 3), (0, 1)], 4, 2, 16, 4, torch.float32)
    meta, _ = build_attention_metadata(q_lens, ctx_lens, bt, 4)
    assert meta.prefill_tiles is None and not prefill_kernel_default(torch.device("cpu"))
    torch.testing.assert_close(paged_attention(q, k, v, meta, 0.25), sdpa_paged_attention(q, k, v, meta, 0.25))


def test_env_switches_the_kernel(monkeypatch):
    monkeypatch.setenv(PREFILL_KERNEL_ENV, "0")
    assert not prefill_kernel_default(torch.device("cuda"))
    monkeypatch.setenv(PREFILL_KERNEL_ENV, "1")  # the CPU too (under TRITON_INTERPRET=1)
    assert prefill_kernel_default(torch.device("cpu")) == HAS_TRITON
    monkeypatch.setenv(PREFILL_KERNEL_ENV, "Off")
    assert not prefill_kernel_default(torch.device("cuda"))
    monkeypatch.setenv(PREFILL_KERNEL_ENV, "2")
    with pytest.raises(ValueError, match="INTERNVL_PREFILL_KERNEL must be one of 1, true.*got '2'"):
        prefill_kernel_default(torch.device("cuda"))
    monkeypatch.delenv(PREFILL_KERNEL_ENV)
    assert prefill_kernel_default(torch.device("cuda")) == HAS_TRITON
    assert not prefill_kernel_default(torch.device("cpu"))


def test_reference_groups_are_built_once_and_only_when_read():
    q, k, v, bt, q_lens, ctx_lens = make_step([(9, 6), (2, 1), (0, 4)], 4, 4, 16, 4, torch.float32)
    meta, _ = build_attention_metadata(q_lens, ctx_lens, bt, 4)
    assert meta._groups is None
    groups = meta.groups
    assert meta.groups is groups and len(groups) == 2  # decodes and chunks


# --------------------------------------------------------------------------------------------------
# tier 2: the kernel in the CPU interpreter (subprocess)
# --------------------------------------------------------------------------------------------------


@needs_triton
def test_prefill_kernel_interpreted():
    assert run_interpreted(__file__, "kernel").count("rel err") == len(INTERPRETED_CASES) + len(E4M3_CACHE_CASES)


@needs_triton
def test_engine_with_interpreted_kernel_gives_the_same_tokens():
    # the whole path: engine -> runner -> build_attention_metadata -> paged_attention -> the kernel
    assert "same greedy tokens" in run_interpreted(__file__, "engine")


@needs_triton
@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("cache", ["bf16", "fp8e4nv"])
def test_kernel_compiles_for_the_h100(block_m, cache):
    # Triton's real compiler (not the interpreter) down to an sm_90 cubin, without a GPU: the engine's
    # shapes (D 128, bf16) must compile and fit the H100's shared memory before anyone rents one.
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from internvl_serve.kernels.prefill_attention import _prefill_kernel as fn
    names = fn.arg_names
    sig = {n: ("*bf16" if n in ("q_ptr", "out_ptr") else f"*{cache}" if n in ("k_ptr", "v_ptr") else "*i32")
           if n.endswith("_ptr")
           else "fp32" if n == "qk_scale" else "constexpr" if n.isupper() else "i32" for n in names}
    consts = dict(GROUP=1, HEAD_DIM=128, BLOCK_D=128, BLOCK_M=block_m, BLOCK_N=64, DOT_PRECISION="tf32")
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    assert kernel.asm["cubin"] and kernel.metadata.shared <= 227 * 1024


# --------------------------------------------------------------------------------------------------
# tier 3: the compiled kernel on the GPU
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("seqs", [
    [(0, 2048)],                                               # one whole prefill chunk
    [(1536, 512)],                                             # a chunk after 96 cached blocks
    [(int(c), 1) for c in torch.randint(1, 4000, (32,), generator=torch.Generator().manual_seed(0))]
    + [(700, 512)],                                            # 32 decodes + a chunk
    [(0, 1), (15, 1), (16, 1), (4095, 1)],                     # decodes at block edges
    [(33, 300), (0, 17), (2000, 100), (5, 1)],
], ids=["chunk2048", "chunk512-after-1536", "32-decodes+chunk512", "decodes", "mixed"])
@pytest.mark.parametrize("Hkv", [40, 8])
def test_gpu_prefill_kernel_bf16(seqs, Hkv):
    check_kernel(seqs, 40, Hkv, 128, 16, torch.bfloat16, "cuda", tol=1e-2)


@pytest.mark.gpu
@gpu
def test_gpu_prefill_kernel_fp32_and_permuted_layout():
    check_kernel([(100, 200), (0, 1), (7, 33)], 40, 40, 128, 16, torch.float32, "cuda", "bhtd", tol=1e-4)


@pytest.mark.gpu
@gpu
def test_gpu_prefill_kernel_bf16_over_an_e4m3_cache():
    mixed = [(int(c), 1) for c in torch.randint(1, 4000, (32,), generator=torch.Generator().manual_seed(1))]
    check_kernel(mixed + [(700, 512)], 40, 40, 128, 16, torch.bfloat16, "cuda", tol=1e-2, cache_dtype=E4M3)
    check_kernel([(0, 2048)], 40, 40, 128, 16, torch.bfloat16, "cuda", "bhtd", tol=1e-2, cache_dtype=E4M3)


@pytest.mark.gpu
@gpu
@torch.no_grad()
def test_gpu_tiny_model_greedy_tokens_same_with_kernel_on_and_off(monkeypatch):
    # the CPU-and-GPU tiny model of test_engine_gpu.py; a budget of 8 tokens chunks every prompt and
    # mixes chunks with decodes
    from test_engine_gpu import engine_for, requests, tiny
    hf = tiny(torch.float32)
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(PREFILL_KERNEL_ENV, flag)
        reqs = requests(n=6, max_tokens=16)
        res = engine_for(hf, torch.float32, budget=8).generate(reqs)
        runs[flag] = [[t for o in res[r.request_id] for t in o.new_token_ids] for r in reqs]
    assert runs["1"] == runs["0"]
    assert all(len(t) > 0 for t in runs["1"])


if __name__ == "__main__":
    # The interpreted tier's subprocess: `TRITON_INTERPRET=1 python tests/unit/test_prefill_attention.py kernel`
    # (or `engine`; tests/unit on PYTHONPATH for the engine check's tiny model)
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    {"kernel": run_interpreted_checks, "engine": run_interpreted_engine}[sys.argv[1]]()
