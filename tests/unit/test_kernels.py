"""Tests of internvl_serve.kernels: paged decode attention, the KV write, weight-only int8 linears.

Three tiers:
- torch-only tests (always run): the references and fallbacks, quantization, module swapping.
- Triton kernels under the CPU interpreter (TRITON_INTERPRET=1) at small shapes, float32 and float16
  (the interpreter mishandles bfloat16: its int8->bf16 casts and bf16 dots come out wrong, so bf16 is
  checked on the GPU). Triton fixes interpret-or-compile when a kernel is decorated, so these checks
  run in a subprocess that sets the variable before importing anything; this file is that
  subprocess's script too (see the bottom). Skipped only when triton is not installed.
- @pytest.mark.gpu: the compiled kernels at the real shapes in bfloat16, and under CUDA-graph replay.

Every check draws fresh random inputs, fills the output with NaN first, and compares with a float64
reference by ||out - ref|| / ||ref||.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
from kernel_helpers import HAS_TRITON, gpu, nan_paged_cache, needs_triton, rel_err, run_interpreted
from torch import nn

from internvl_serve.kernels import (Int8Linear, compare_logits, int8_linear, logit_error, paged_decode_attention,
                                    paged_decode_attention_ref, quantize_llama_linears,
                                    quantize_weight, write_kv)
from internvl_serve.kernels.fp8_linear import (quantize_rows_fp8_torch, quantize_weight_fp8, scaled_product,
                                               scaled_product_triton)
from internvl_serve.kernels.decode_linear import bf16_config
from internvl_serve.kernels.int8_linear import Int8MatmulConfig, int8_linear_torch, scaled_config
from internvl_serve.kernels.paged_attention import put_cache_rows, write_kv_ref

if HAS_TRITON:
    import triton

E4M3 = torch.float8_e4m3fn


# --------------------------------------------------------------------------------------------------
# builders shared by every tier
# --------------------------------------------------------------------------------------------------


def make_paged_case(
    B: int, Hq: int, Hkv: int, D: int, block_size: int, max_blocks: int, lens: list[int],
    dtype: torch.dtype, device: str = "cpu", layout: str = "bthd", cache_dtype: torch.dtype | None = None,
):
    """A paged cache (in cache_dtype, default q's dtype) where every slot no sequence owns holds NaN, so a read past a context, of a
    table entry past a sequence's last block, or of another sequence's block shows up as NaN.

    The cache and its layouts are kernel_helpers.nan_paged_cache's; block ids are handed out in its random
    order (non-contiguous); unused table entries point at a block full of NaN. Returns q, k_cache,
    v_cache, block_tables, context_lens.
    """
    need = [(n + block_size - 1) // block_size for n in lens]
    perm, k_cache, v_cache = nan_paged_cache(sum(need) + 3, block_size, Hkv, D, cache_dtype or dtype, device, layout)
    tables = torch.full((B, max_blocks), int(perm[-1]), dtype=torch.int32, device=device)
    first = 0
    for b, n in enumerate(lens):
        ids = perm[first : first + need[b]]
        first += need[b]
        tables[b, : need[b]] = ids.int()
        t = torch.arange(n, device=device)
        blk, off = ids[t // block_size], t % block_size
        put_cache_rows(k_cache, (blk, off), torch.randn(n, Hkv, D, device=device).to(dtype))
        put_cache_rows(v_cache, (blk, off), torch.randn(n, Hkv, D, device=device).to(dtype))
    # q as a strided slice of a wider projection output, the way a fused qkv hands it over
    q = torch.randn(B, Hq + 2 * Hkv, D, device=device).to(dtype)[:, :Hq]
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, tables, ctx


def check_attention(case, partition_size=None, tol=1e-5, use_triton=True, single=None, heads_first=None, dot=False):
    q, k, v, bt, ctx = case
    D = q.shape[-1]
    scale = D**-0.5
    ref = paged_decode_attention_ref(q, k, v, bt, ctx, scale, out_dtype=torch.float64)
    out = torch.full_like(q, float("nan"))
    res = paged_decode_attention(q, k, v, bt, ctx, scale, out=out, partition_size=partition_size,
                                 use_triton=use_triton, single=single, heads_first=heads_first, dot=dot)
    assert res.data_ptr() == out.data_ptr()
    zero = ctx == 0  # a zero-length context must give zeros, not NaN
    assert torch.equal(out[zero].float(), torch.zeros_like(out[zero].float())), "ctx 0 must give 0"
    err = rel_err(out, ref)
    shapes = (tuple(q.shape), tuple(k.shape), tuple(k.stride()), ctx.tolist()[:8], q.dtype, partition_size, single,
              heads_first, dot)
    assert err < tol, f"rel err {err:.2e} >= {tol} for {shapes}"
    return err


def check_write_kv(T, Hkv, D, block_size, num_blocks, dtype, device, layout="bthd", use_triton=True,
                   cache_dtype=None):
    """write_kv against write_kv_ref, byte for byte; an e4m3 cache (cache_dtype) also gets values past
    its range, which both must saturate at +-448."""
    shape = (num_blocks, block_size, Hkv, D) if layout == "bthd" else (num_blocks, Hkv, block_size, D)
    store = torch.randn(2, *shape).to(cache_dtype or dtype).to(device)
    caches = [s if layout == "bthd" else s.permute(0, 2, 1, 3) for s in store]
    slots = torch.randperm(num_blocks * block_size)[:T].to(torch.int64)
    slots[1:][torch.rand(T - 1) < 0.25] = -1  # padding rows (row 0 is written)
    slots = slots.to(device)
    new = torch.randn(3, T, Hkv, D)
    if cache_dtype == E4M3:  # past 448: row 0 for certain, others at random
        new[:, 0, :, 0] = torch.tensor([1000.0, 0.0, -1000.0])[:, None]
        new[:, 1::5, :, 1] *= 1000
    new = new.to(dtype).to(device)  # k_new, v_new from one buffer: strided
    k_new, v_new = new[0], new[2]
    ref = [c.clone() for c in caches]
    write_kv_ref(k_new, v_new, ref[0], ref[1], slots)
    write_kv(k_new, v_new, caches[0], caches[1], slots, use_triton=use_triton)
    as_bytes = lambda t: t.contiguous().view(torch.uint8)  # noqa: E731 (torch.equal has no float8 kernel)
    assert all(torch.equal(as_bytes(c), as_bytes(r)) for c, r in zip(caches, ref)), "write_kv differs from reference"
    if cache_dtype == E4M3:
        assert caches[0].float().max() == 448 and caches[1].float().min() == -448
        assert torch.isfinite(caches[0].float()).all() and torch.isfinite(caches[1].float()).all()


def check_int8(M, N, K, dtype, device, config=None, tol=1e-5, use_triton=True, x_strided=False):
    w = torch.randn(N, K, device=device)
    w_int8, scale = quantize_weight(w)
    if x_strided:
        x = torch.randn(M, 2 * K, device=device).to(dtype)[:, ::2]  # stride along K is 2
    else:
        x = torch.randn(M, K, device=device).to(dtype)
    ref = x.double() @ (w_int8.double() * scale.double()[:, None]).t()
    out = int8_linear(x, w_int8, scale, use_triton=use_triton, config=config)
    assert out.shape == (M, N) and out.dtype == dtype
    err = rel_err(out, ref)
    assert err < tol, f"rel err {err:.2e} >= {tol} for M={M} N={N} K={K} {dtype} {config}"
    return err


def check_w8a8(M, N, K, device, config=None, tol=1e-5):
    """fp8_linear.scaled_product_triton: e4m3 rows with a scale each times an e4m3 weight with a scale per
    output channel, against the float64 product of the same e4m3 values and scales."""
    xq, x_scale = quantize_rows_fp8_torch(torch.randn(M, K, device=device) * 3)
    w_fp8, w_scale = quantize_weight_fp8(torch.randn(N, K, device=device) * 0.02)
    ref = (xq.double() * x_scale.double()) @ (w_fp8.double() * w_scale.double()[:, None]).t()
    out = scaled_product_triton(xq, x_scale, w_fp8, w_scale, torch.float32 if device == "cpu" else torch.bfloat16,
                                config=config)
    assert out.shape == (M, N)
    err = rel_err(out, ref)
    assert err < tol, f"rel err {err:.2e} >= {tol} for M={M} N={N} K={K} {config}"
    return err


# The interpreted cases, run by the subprocess (see the bottom of the file).
ATTENTION_CASES = [
    # B, Hq, Hkv, D, block_size, max_blocks, lens, dtype, layout, partition_size
    (3, 4, 4, 32, 16, 6, [1, 16, 96], torch.float32, "bthd", None),  # MHA, one partition
    (3, 4, 4, 32, 16, 6, [1, 16, 96], torch.float32, "bthd", 32),  # split-K, ragged
    (4, 8, 2, 32, 16, 8, [17, 128, 33, 0], torch.float32, "bhtd", 16),  # GQA, permuted layout, ctx 0
    (2, 6, 3, 24, 12, 5, [60, 13], torch.float32, "bhtd", 32),  # D and block_size not powers of 2
    (3, 4, 1, 32, 16, 12, [192, 64, 65], torch.float16, "bthd", 64),  # MQA, fp16
    (2, 2, 2, 32, 16, 16, [256, 130], torch.float32, "bthd", 256),  # one partition, 4 loop steps
    (2, 2, 1, 32, 16, 16, [200, 129], torch.float32, "bhtd", 128),  # 2 partitions of 2 steps
]
# Tables much wider than the contexts (the engine's CUDA graphs take the model's maximum length): one
# program per (sequence, head) over its whole context (the default at the engine's larger batches), and
# partitions whose programs past the context write nothing
WIDE_TABLE_CASES = [
    # B, Hq, Hkv, D, block_size, max_blocks, lens, dtype, layout, partition_size, single, cache dtype
    (3, 4, 2, 32, 16, 32, [300, 17, 0], torch.float32, "bhtd", 64, True, None),  # one program: 5 loop steps
    (3, 4, 2, 32, 16, 32, [1, 200, 0], torch.float32, "bthd", 32, False, None),  # 7 of 16 partitions
    (2, 4, 4, 32, 16, 16, [250, 3], torch.float32, "bthd", 32, True, E4M3),
]
# The launch's variants: the grid in the other order (heads_first, INTERNVL_SERVE_DECODE_HEADS_FIRST:
# programs by (head, sequence); partitions keep their partial rows by (sequence, head)) and the products on
# the tensor cores (dot); one program per pair and partitions, GQA, ctx 0, D not a power of 2, an e4m3 cache
VARIANT_CASES = [
    # B, Hq, Hkv, D, block_size, max_blocks, lens, dtype, layout, partition_size, single, heads_first, dot, cache
    (3, 4, 2, 32, 16, 32, [300, 17, 0], torch.float32, "bhtd", 64, True, True, False, None),
    (4, 8, 2, 32, 16, 8, [17, 128, 33, 0], torch.float32, "bthd", 16, False, True, False, None),
    (3, 6, 6, 32, 16, 12, [1, 190, 64], torch.float16, "bthd", 32, False, True, False, None),
    (3, 4, 2, 32, 16, 32, [300, 17, 0], torch.float32, "bhtd", 64, True, False, True, None),
    (4, 8, 2, 32, 16, 8, [17, 128, 33, 0], torch.float32, "bthd", 16, False, True, True, None),
    (2, 6, 3, 24, 12, 5, [60, 13], torch.float32, "bhtd", 32, False, False, True, None),
    (3, 6, 6, 32, 16, 12, [1, 190, 64], torch.float16, "bthd", 32, True, True, True, None),
    (2, 4, 4, 32, 16, 16, [250, 3], torch.float32, "bthd", 32, True, False, True, E4M3),
]
# float32 queries over an e4m3 cache (the reference reads the same e4m3 values): the kernel's fp8 loads
E4M3_CACHE_CASES = [
    # B, Hq, Hkv, D, block_size, max_blocks, lens, layout, partition_size
    (3, 4, 4, 32, 16, 6, [1, 16, 96], "bthd", 32),
    (4, 8, 2, 32, 16, 8, [17, 128, 33, 0], "bhtd", None),
]
INT8_CASES = [
    # M, N, K, dtype, config, x_strided
    (1, 96, 256, torch.float32, Int8MatmulConfig(16, 64, 128, 1), False),
    (5, 80, 200, torch.float32, Int8MatmulConfig(16, 32, 64, 1), True),  # ragged N and K
    (20, 64, 512, torch.float32, Int8MatmulConfig(16, 32, 64, 2), False),  # split-K, two M tiles
    (33, 70, 2048, torch.float32, None, False),  # default config (split-K), M tile of 64
    (3, 48, 320, torch.float32, Int8MatmulConfig(16, 16, 64, 3), False),  # split-K not dividing K
    (7, 64, 384, torch.float16, Int8MatmulConfig(16, 32, 128, 2), False),
    (1, 70, 320, torch.float32, Int8MatmulConfig(1, 16, 64, 1, gemv=True), True),  # gemv, ragged N, K
    (3, 64, 512, torch.float32, Int8MatmulConfig(1, 32, 64, 3, gemv=True), False),  # gemv rows, split-K
    (2, 48, 256, torch.float16, Int8MatmulConfig(1, 16, 128, 2, gemv=True), False),
]
W8A8_CASES = [
    # M, N, K, config: e4m3 rows and weight on the matrix kernel's fp8 dot, both scales in the epilogue
    (2, 64, 256, Int8MatmulConfig(16, 32, 64, 1)),
    (20, 80, 200, Int8MatmulConfig(16, 32, 64, 2)),  # two M tiles, ragged N and K, split-K
    (33, 70, 2048, None),  # the default config: M tile of 64, K in steps of 256
    (40, 300, 128, None),  # the default config of wide products at M > 32: K in steps of 128
    (1, 48, 256, None),  # one row: the matrix kernel, not the gemv
]

# kernels/decode_linear.py: float rows and weights (no bf16 under the interpreter), no scales
DECODE_LINEAR_CASES = [
    # M, N, K, dtype, config
    (1, 96, 256, torch.float32, None),
    (20, 80, 200, torch.float16, Int8MatmulConfig(16, 32, 64, 2)),  # ragged N and K, split-K
    (40, 70, 384, torch.float16, None),  # the default tiles: M tile of 64
]


def run_interpreted_checks(which: str) -> None:
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    if which == "attention":
        for B, Hq, Hkv, D, bs, mb, lens, dtype, layout, part in ATTENTION_CASES:
            tol = 1e-5 if dtype == torch.float32 else 2e-3
            case = make_paged_case(B, Hq, Hkv, D, bs, mb, lens, dtype, "cpu", layout)
            err = check_attention(case, part, tol)
            print(f"attention {(B, Hq, Hkv, D, bs, lens, dtype, layout, part)} rel err {err:.1e}")
        for B, Hq, Hkv, D, bs, mb, lens, layout, part in E4M3_CACHE_CASES:
            case = make_paged_case(B, Hq, Hkv, D, bs, mb, lens, torch.float32, "cpu", layout, cache_dtype=E4M3)
            err = check_attention(case, part, 1e-5)
            print(f"attention e4m3 cache {(B, Hq, Hkv, D, bs, lens, layout, part)} rel err {err:.1e}")
        for B, Hq, Hkv, D, bs, mb, lens, dtype, layout, part, single, cache_dtype in WIDE_TABLE_CASES:
            case = make_paged_case(B, Hq, Hkv, D, bs, mb, lens, dtype, "cpu", layout, cache_dtype)
            err = check_attention(case, part, 1e-5, single=single)
            print(f"attention wide table {(B, Hq, Hkv, D, bs, mb, lens, layout, part, single, cache_dtype)} rel err {err:.1e}")
        for B, Hq, Hkv, D, bs, mb, lens, dtype, layout, part, single, heads_first, dot, cache_dtype in VARIANT_CASES:
            case = make_paged_case(B, Hq, Hkv, D, bs, mb, lens, dtype, "cpu", layout, cache_dtype)
            err = check_attention(case, part, 1e-5 if dtype == torch.float32 else 2e-3, single=single,
                                  heads_first=heads_first, dot=dot)
            shape = (B, Hq, Hkv, D, bs, mb, lens, dtype, layout, part, single, heads_first, dot, cache_dtype)
            print(f"attention variant {shape} rel err {err:.1e}")
    elif which == "write_kv":
        check_write_kv(20, 2, 32, 16, 6, torch.float32, "cpu", "bthd")
        check_write_kv(20, 3, 24, 8, 5, torch.float16, "cpu", "bhtd")
        print("write_kv ok")
    elif which == "int8":
        for M, N, K, dtype, cfg, strided in INT8_CASES:
            tol = 1e-5 if dtype == torch.float32 else 2e-3
            err = check_int8(M, N, K, dtype, "cpu", cfg, tol, x_strided=strided)
            print(f"int8 {(M, N, K, dtype, cfg)} rel err {err:.1e}")
        for M, N, K, cfg in W8A8_CASES:
            err = check_w8a8(M, N, K, "cpu", cfg)
            print(f"w8a8 {(M, N, K, cfg)} rel err {err:.1e}")
        from test_decode_linear import check_decode_linear
        for M, N, K, dtype, cfg in DECODE_LINEAR_CASES:
            err = check_decode_linear(M, N, K, dtype, "cpu", cfg, 1e-5 if dtype == torch.float32 else 2e-3)
            print(f"decode_linear {(M, N, K, dtype, cfg)} rel err {err:.1e}")
    else:
        raise SystemExit(f"unknown check {which}")


# --------------------------------------------------------------------------------------------------
# tier 1: torch only
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["bthd", "bhtd"])
@pytest.mark.parametrize("cache_dtype", [None, E4M3], ids=["model-dtype", "e4m3"])
def test_torch_attention_matches_reference(layout, cache_dtype):
    # the batched SDPA fallback ignores the NaN the builder leaves in unowned slots
    case = make_paged_case(4, 8, 2, 16, 4, 6, [1, 4, 21, 0], torch.float32, "cpu", layout, cache_dtype)
    check_attention(case, use_triton=False)


def test_decode_single_from_the_grid_size(monkeypatch):
    # one program per (sequence, head) from 4 pairs per SM on (the engine's larger decode batches), the
    # partitions below it or everywhere with the switch back
    from internvl_serve.kernels.paged_attention import PARTITIONS_ENV, decode_single

    monkeypatch.delenv(PARTITIONS_ENV, raising=False)
    assert decode_single(64, 40) and decode_single(14, 40, num_sms=132)
    assert not decode_single(13, 40) and not decode_single(8, 40) and not decode_single(1, 40)
    assert decode_single(8, 40, num_sms=80)
    monkeypatch.setenv(PARTITIONS_ENV, "1")
    assert not decode_single(64, 40)
    monkeypatch.setenv(PARTITIONS_ENV, "partitions")  # a misspelt switch is refused, not read as off
    with pytest.raises(ValueError, match="INTERNVL_SERVE_DECODE_PARTITIONS must be one of"):
        decode_single(64, 40)


def test_decode_dot_from_the_grid_and_the_cache_unless_switched(monkeypatch):
    # the tensor-core form where one program takes each (sequence, head) over a bf16 cache, with its own
    # tiles and the grid by heads; elementwise with the partitions (few sequences) and over e4m3 caches;
    # INTERNVL_SERVE_DECODE_DOT / _HEADS_FIRST force either way; a misspelt value is refused
    from internvl_serve.kernels import paged_attention as pa

    for env in (pa.DOT_ENV, pa.HEADS_FIRST_ENV, pa.PARTITIONS_ENV):
        monkeypatch.delenv(env, raising=False)
    assert pa.decode_dot(32, 40) and pa.decode_dot(64, 40, kv_bytes=2)
    assert not pa.decode_dot(8, 40) and not pa.decode_dot(64, 40, kv_bytes=1)
    assert pa.default_decode_tiles(32, 40, dot=True) == pa.DecodeTiles(256, 64, 4, num_stages=2)
    assert pa.default_decode_tiles(32, 40) == pa.DecodeTiles(256, 128, 4)  # elementwise: as before
    assert pa.default_decode_tiles(8, 40, dot=True) == pa.DecodeTiles(128, 128, 8)  # partitions: theirs
    assert pa.decode_heads_first(True) and not pa.decode_heads_first(False)
    monkeypatch.setenv(pa.PARTITIONS_ENV, "1")
    assert not pa.decode_dot(64, 40)
    monkeypatch.delenv(pa.PARTITIONS_ENV)
    monkeypatch.setenv(pa.DOT_ENV, "0")
    assert not pa.decode_dot(64, 40)
    monkeypatch.setenv(pa.DOT_ENV, "1")
    assert pa.decode_dot(8, 40) and pa.decode_dot(64, 40, kv_bytes=1)
    monkeypatch.setenv(pa.HEADS_FIRST_ENV, "0")
    assert not pa.decode_heads_first(True)
    monkeypatch.setenv(pa.HEADS_FIRST_ENV, "1")
    assert pa.decode_heads_first(False)
    reads = ((pa.DOT_ENV, lambda: pa.decode_dot(64, 40)), (pa.HEADS_FIRST_ENV, lambda: pa.decode_heads_first(True)))
    for env, read in reads:
        monkeypatch.setenv(env, "fast")
        with pytest.raises(ValueError, match=f"{env} must be one of"):
            read()
        monkeypatch.delenv(env)


def test_reference_matches_dense_attention():
    # the paged reference itself against plain attention on a contiguous copy
    q, k, v, bt, ctx = make_paged_case(2, 4, 2, 8, 4, 3, [5, 9], torch.float64)
    ref = paged_decode_attention_ref(q, k, v, bt, ctx, 0.3)
    assert torch.isfinite(ref).all()
    for b, n in enumerate([5, 9]):
        kk = torch.cat([k[int(i)] for i in bt[b, : (n + 3) // 4]])[:n].repeat_interleave(2, dim=1)
        vv = torch.cat([v[int(i)] for i in bt[b, : (n + 3) // 4]])[:n].repeat_interleave(2, dim=1)
        p = (torch.einsum("hd,nhd->hn", q[b], kk) * 0.3).softmax(-1)
        assert torch.allclose(ref[b], torch.einsum("hn,nhd->hd", p, vv))


def test_torch_write_kv_skips_padding():
    check_write_kv(12, 2, 8, 4, 5, torch.float32, "cpu", "bhtd", use_triton=False)
    k = torch.zeros(2, 4, 1, 2)
    v = torch.zeros(2, 4, 1, 2)
    write_kv_ref(torch.ones(2, 1, 2), torch.ones(2, 1, 2), k, v, torch.tensor([5, -1]))
    assert k.sum() == 2 and k[1, 1].sum() == 2 and v[1, 1].sum() == 2  # -1 must not hit the last slot


def test_quantize_weight_round_trip():
    w = torch.randn(32, 64, dtype=torch.bfloat16) * (0.1 + torch.rand(32, 1)).bfloat16()  # rows of varied size
    w[3] = 0
    w_int8, scale = quantize_weight(w)
    assert w_int8.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (32,)
    assert w_int8.abs().max() <= 127 and (w_int8.abs().amax(1)[torch.arange(32) != 3] == 127).all()
    deq = w_int8.float() * scale[:, None]
    assert ((deq - w.float()).abs() <= scale[:, None] / 2 + 1e-6).all()
    assert (w_int8[3] == 0).all() and torch.isfinite(scale).all()


def test_torch_int8_linear():
    check_int8(3, 40, 24, torch.float32, "cpu", use_triton=False)
    check_int8(5, 16, 32, torch.bfloat16, "cpu", tol=1e-2, use_triton=False)


class _TinyLlamaBlock(nn.Module):
    def __init__(self, h: int = 32, inter: int = 48) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(h, h, bias=False) for _ in range(4))
        self.gate_proj, self.up_proj = nn.Linear(h, inter, bias=False), nn.Linear(h, inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)

    def forward(self, x):
        x = x + self.o_proj(self.v_proj(x) * torch.sigmoid(self.q_proj(x) * self.k_proj(x)))
        return x + self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class _TinyLlama(nn.Module):
    def __init__(self, vocab: int = 50, h: int = 32) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, h)
        self.layers = nn.ModuleList([_TinyLlamaBlock(h), _TinyLlamaBlock(h)])
        self.lm_head = nn.Linear(h, vocab, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def test_quantize_llama_linears_swaps_projections_only():
    model = _TinyLlama()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        ref = model(ids)
    assert quantize_llama_linears(model) == 14
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.embed_tokens, nn.Embedding)
    assert all(isinstance(getattr(l, n), Int8Linear) for l in model.layers for n in ("q_proj", "down_proj"))
    with torch.no_grad():
        out = model(ids)
    assert 0 < rel_err(out, ref) < 2e-2  # changed, but only by int8 rounding
    assert quantize_llama_linears(_TinyLlama(), include_lm_head=True) == 15


def test_logit_error_reports_quantization_cost():
    model = _TinyLlama()
    ids = torch.randint(0, 50, (3, 9))
    res = logit_error(model, lambda m: m(ids))
    assert isinstance(model.layers[0].q_proj, Int8Linear)  # quantized in place
    assert 0 < res.rel_l2 < 2e-2 and 0 < res.max_abs and 0 < res.max_rel < 0.1
    assert 0.5 <= res.top1_agreement <= 1.0
    same = compare_logits(torch.eye(4), torch.eye(4) * 2)
    assert same.top1_agreement == 1.0 and same.max_abs == 1.0 and abs(same.rel_l2 - 1.0) < 1e-6
    with pytest.raises(ValueError):
        logit_error(nn.Sequential(nn.Linear(4, 4)), lambda m: m(torch.randn(2, 4)))


# --------------------------------------------------------------------------------------------------
# tier 2: Triton kernels in the CPU interpreter (subprocess)
# --------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("which", ["attention", "write_kv", "int8"])
def test_triton_kernel_interpreted(which):
    out = run_interpreted(__file__, which, timeout=300)
    if which == "attention":
        assert out.count("rel err") == (len(ATTENTION_CASES) + len(E4M3_CACHE_CASES) + len(WIDE_TABLE_CASES)
                                        + len(VARIANT_CASES)), out
    if which == "int8":
        assert out.count("w8a8") == len(W8A8_CASES), out
        assert out.count("decode_linear") == len(DECODE_LINEAR_CASES), out
    assert "rel err" in out or "ok" in out


@needs_triton
@pytest.mark.parametrize("kernel", ["decode partitions", "decode single", "decode single heads first",
                                    "decode single dot", "decode partitions dot", "write"])
def test_e4m3_cache_kernels_compile_for_the_h100(kernel):
    # Triton's real compiler down to an sm_90 cubin, without a GPU: the decode attention reading an e4m3
    # cache (flash-decoding's partitions, and one program per (sequence, head)) and the K/V write storing
    # into one, at the engine's shapes
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from internvl_serve.kernels import paged_attention as pa
    if kernel.startswith("decode"):
        fn, cache_ptrs = pa._decode_partition_kernel, ("k_ptr", "v_ptr")
        consts = dict(GROUP=1, PART_TOKENS=128, BLOCK_N=128, HEAD_DIM=128, BLOCK_D=128, SINGLE="single" in kernel,
                      HEADS_FIRST=kernel.endswith("heads first"), DOT=kernel.endswith("dot"))
    else:
        fn, cache_ptrs = pa._write_kv_kernel, ("k_ptr", "v_ptr")
        consts = dict(HEAD_DIM=128, BLOCK_D=128, SATURATE=True, FP8_MAX=448.0)
    names = fn.arg_names
    ints = ("bt_ptr", "lens_ptr", "slot_ptr")
    sig = {n: ("*fp8e4nv" if n in cache_ptrs else "*i32" if n in ints else "*fp32" if n.startswith("part_")
               else "*bf16") if n.endswith("_ptr")
           else "fp32" if n == "qk_scale" else "constexpr" if n in consts else "i32" for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    assert compiled.asm["cubin"]


ENGINE_FP8_SHAPES = [(15360, 5120), (5120, 5120), (27648, 5120), (5120, 13824)]  # (N, K): qkv, o, gate_up, down


@needs_triton
@pytest.mark.parametrize("cfg", sorted({scaled_config(M, N, K) for M in (1, 16, 32, 64) for N, K in ENGINE_FP8_SHAPES}
                                       | {Int8MatmulConfig(32, 32, 128, 4)}, key=repr), ids=repr)
def test_w8a8_matrix_kernel_compiles_for_the_h100(cfg):
    # the matrix kernel with e4m3 rows and weight (scaled_product_triton) in the tiles the engine's decode
    # takes (and a split-K one), Triton's real compiler down to an sm_90 cubin without a GPU: the fp8 x fp8
    # dot must lower to Hopper's FP8 tensor cores, the 64-wide weight tiles to its warpgroup MMA (wgmma)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    il = importlib.import_module("internvl_serve.kernels.int8_linear")  # the package exports a function of that name
    fn = il._int8_matmul_kernel
    consts = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, EVEN_K=True,
                  FP32_IEEE=False, X_SCALED=True, HAS_SCALE=True)
    out = "*bf16" if cfg.split_k == 1 else "*fp32"
    ptrs = {"x_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "x_scale_ptr": "*fp32", "out_ptr": out}
    sig = {n: ptrs.get(n, "constexpr" if n in consts else "i32") for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    assert compiled.asm["cubin"]
    assert ("wgmma" in compiled.asm["ptx"]) == (cfg.block_n >= 64), cfg
    assert "e4m3" in compiled.asm["ptx"]  # the dot takes the e4m3 operands as they are


@needs_triton
@pytest.mark.parametrize("cfg", sorted({bf16_config(M, N, K) for M in (1, 16, 32, 64) for N, K in ENGINE_FP8_SHAPES},
                                       key=repr), ids=repr)
def test_bf16_decode_linear_compiles_for_the_h100(cfg):
    # kernels/decode_linear.py's launch of the matrix kernel, bf16 rows and weights, no scales, in its
    # default tiles: Triton's real compiler down to an sm_90 cubin without a GPU (the interpreter cannot
    # check bf16), the 64-wide weight tiles on the warpgroup MMA (wgmma) with bf16 operands
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = importlib.import_module("internvl_serve.kernels.int8_linear")._int8_matmul_kernel
    consts = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, EVEN_K=True,
                  FP32_IEEE=False, X_SCALED=False, HAS_SCALE=False)
    sig = {n: "*bf16" if n.endswith("_ptr") else "constexpr" if n in consts else "i32" for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    assert compiled.asm["cubin"]
    assert "wgmma" in compiled.asm["ptx"] and ".bf16" in compiled.asm["ptx"], cfg


# --------------------------------------------------------------------------------------------------
# tier 3: compiled kernels on the GPU, real shapes, bfloat16
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("B,Hq,Hkv,lens", [
    (1, 40, 40, [4096]),
    (7, 40, 40, [1, 16, 17, 511, 2048, 4095, 4096]),
    (64, 40, 40, None),
    (5, 32, 8, [1, 33, 1000, 4096, 0]),
])
@pytest.mark.parametrize("layout", ["bthd", "bhtd"])
def test_gpu_attention_bf16(B, Hq, Hkv, lens, layout):
    if lens is None:
        lens = torch.randint(1, 4097, (B,)).tolist()
    case = make_paged_case(B, Hq, Hkv, 128, 16, 256, lens, torch.bfloat16, "cuda", layout)
    for part in (None, 64, 512):  # (None, None): the launcher's default (decode_dot and its tiles)
        for heads_first, dot in ((False, False), (True, False), (False, True), (True, True), (None, None)):
            check_attention(case, part, tol=1e-2, heads_first=heads_first, dot=dot)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("B", [8, 32])  # flash-decoding's partitions; one program per pair on the tensor cores
def test_gpu_attention_cuda_graph_replay(B):
    # Captured once, replayed with other lengths and tables copied into the same buffers.
    H, D, bs, mb = 40, 128, 16, 128
    lens_a = torch.randint(1, mb * bs + 1, (B,)).tolist()
    q, k, v, bt, ctx = make_paged_case(B, H, H, D, bs, mb, [mb * bs] * B, torch.bfloat16, "cuda")
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, k, v, bt, ctx, D**-0.5, out=out)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        paged_decode_attention(q, k, v, bt, ctx, D**-0.5, out=out)
    for lens in (lens_a, [1] * B, [mb * bs] * B):
        ctx.copy_(torch.tensor(lens, dtype=torch.int32))
        bt.copy_(bt[torch.randperm(B, device="cuda")])  # other tables, same buffer
        out.fill_(float("nan"))
        g.replay()
        ref = paged_decode_attention_ref(q, k, v, bt, ctx, D**-0.5, out_dtype=torch.float64)
        assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@gpu
def test_gpu_write_kv():
    check_write_kv(200, 40, 128, 16, 64, torch.bfloat16, "cuda", "bthd")
    check_write_kv(200, 8, 128, 16, 64, torch.bfloat16, "cuda", "bhtd")
    # e4m3: the Triton kernel's saturate-and-round gives the bytes of to_cache_dtype (torch's cast)
    check_write_kv(200, 40, 128, 16, 64, torch.bfloat16, "cuda", "bthd", cache_dtype=E4M3)
    check_write_kv(200, 8, 128, 16, 64, torch.bfloat16, "cuda", "bhtd", cache_dtype=E4M3)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("B,Hq,Hkv,lens", [(7, 40, 40, [1, 16, 17, 511, 2048, 4095, 4096]), (64, 40, 40, None)])
def test_gpu_attention_over_an_e4m3_cache(B, Hq, Hkv, lens):
    if lens is None:
        lens = torch.randint(1, 4097, (B,)).tolist()
    case = make_paged_case(B, Hq, Hkv, 128, 16, 256, lens, torch.bfloat16, "cuda", "bthd", cache_dtype=E4M3)
    for part in (None, 64, 512):
        for dot in (False, True):
            check_attention(case, part, tol=1e-2, dot=dot)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("M", [1, 8, 33, 64])
@pytest.mark.parametrize("N,K", [(5120, 5120), (13824, 5120), (5120, 13824)])
def test_gpu_int8_linear_bf16(M, N, K):
    for cfg in (None, Int8MatmulConfig(16, 32, 128, 1), Int8MatmulConfig(16, 64, 256, 4),
                Int8MatmulConfig(1, 16, 512, 2, num_stages=1, gemv=True)):
        check_int8(M, N, K, torch.bfloat16, "cuda", config=cfg, tol=1e-2)


@pytest.mark.gpu
@gpu
def test_gpu_int8_linear_cuda_graph_and_fallback():
    w_int8, scale = quantize_weight(torch.randn(5120, 13824, device="cuda"))
    x = torch.randn(4, 13824, device="cuda", dtype=torch.bfloat16)
    int8_linear(x, w_int8, scale)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = int8_linear(x, w_int8, scale)
    x.copy_(torch.randn_like(x))
    g.replay()
    ref = x.double() @ (w_int8.double() * scale.double()[:, None]).t()
    assert rel_err(y, ref) < 1e-2
    # M above TRITON_MAX_M takes the torch path: same function
    x = torch.randn(300, 13824, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ (w_int8.double() * scale.double()[:, None]).t()
    assert rel_err(int8_linear(x, w_int8, scale), ref) < 1e-2
    assert rel_err(int8_linear_torch(x, w_int8, scale), ref) < 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("M", [2, 17, 32, 64])
@pytest.mark.parametrize("N,K", [(15360, 5120), (5120, 5120), (27648, 5120), (5120, 13824)])
def test_gpu_w8a8_triton_matches_scaled_mm(M, N, K):
    # the engine's merged fp8 projections: the Triton W8A8 product against torch._scaled_mm's (the same
    # e4m3 inputs and scales), each against float64, in a CUDA graph too (the decode step is captured)
    for cfg in (None, Int8MatmulConfig(16 if M <= 16 else 64, 32, 128, 4)):
        err = check_w8a8(M, N, K, "cuda", cfg, tol=2e-2)
        xq, x_scale = quantize_rows_fp8_torch(torch.randn(M, K, device="cuda") * 3)
        w_fp8, w_scale = quantize_weight_fp8(torch.randn(N, K, device="cuda") * 0.02)
        cublas = scaled_product(xq, x_scale, w_fp8, w_scale, torch.bfloat16)
        assert rel_err(scaled_product_triton(xq, x_scale, w_fp8, w_scale, torch.bfloat16, cfg), cublas) < 2e-2, err
    scaled_product_triton(xq, x_scale, w_fp8, w_scale, torch.bfloat16)  # compiled outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = scaled_product_triton(xq, x_scale, w_fp8, w_scale, torch.bfloat16)
    xq.copy_(quantize_rows_fp8_torch(torch.randn(M, K, device="cuda"))[0])
    g.replay()
    assert rel_err(y, scaled_product(xq, x_scale, w_fp8, w_scale, torch.bfloat16)) < 2e-2


if __name__ == "__main__":
    # The interpreted tier's subprocess: `TRITON_INTERPRET=1 python tests/unit/test_kernels.py attention`
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    run_interpreted_checks(sys.argv[1])
