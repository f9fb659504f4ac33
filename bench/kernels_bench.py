"""GPU micro-benchmark of internvl_serve.kernels against their torch baselines.

    python bench/kernels_bench.py            # the tables
    python bench/kernels_bench.py --sweep    # also try other tile configs / partition sizes
    python bench/kernels_bench.py --only prefill   # just the prefill / mixed-step attention table
    python bench/kernels_bench.py --only attention --kv-dtype fp8   # the attention tables over an e4m3 cache
    python bench/kernels_bench.py --only attention --grid-sweep     # decode attention: grid order, stages
    python bench/kernels_bench.py --only rope     # RoPE + K/V write: two launches against one
    python bench/kernels_bench.py --only bf16     # bf16 decode products: cuBLAS, cuBLASLt, a Triton kernel

Decode attention (Hq = Hkv = 40, D = 128, block size 16, bf16): the decode kernel with a block table as
wide as the context, and with the engine-wide table of 256 blocks (4096 tokens: flash-decoding's grid is
fixed by the table, so shorter contexts pay for programs past them; one program per (sequence, head), the
default from 14 sequences on, does not), against the batched SDPA gather (`paged_decode_attention_torch`,
tight table). The tiles column says which (`single` or the partition size). `--grid-sweep` times the
default way (single or its partitions) with the grid in both orders (`hf`: heads first, consecutive programs
take one sequence's heads; `sf`: sequences first, the default) and with the products on the tensor cores
(`dot`, at 2-4 pipeline stages: only loads that feed tl.dot go through Triton's pipelined cp.async path),
and for one program per pair also other loop steps and warps; `*` marks today's default.
Prefill attention (same shape, one layer's call): the varlen paged kernel (kernels/prefill_attention.py)
against the engine's reference (`sdpa_paged_attention`: gather + SDPA per group), for one 2,048-token
chunk and for a mixed step of 32 decodes + one 512-token chunk; eager calls (as the engine runs them),
metadata built once outside the timing (the engine builds it once per step for all 40 layers).
Int8 linears: `int8_linear` against bf16 F.linear (cuBLAS) at the LLaMA-2-13B projection shapes.
Quantized projections (`--only quantized`): the engine's merged projections in bf16, int8 and fp8 at
decode and prefill row counts, and the step's GEMM time each gives; then the fp8 inputs the fused kernels
write (add_rmsnorm_fp8, silu_and_mul_fp8) against the kernel and the row quantizer one after the other;
then (also `--only w8a8`) decode batches' fp8 products in torch._scaled_mm against the Triton W8A8 kernel
(fp8_linear.scaled_product_triton; `--sweep`: its tile configs).

GB/s counts the fewest bytes each op must move (K/V read once; weight, input and output once).
The copy row is a device-to-device copy, bytes read plus written: the ceiling for those numbers.
Every kernel is checked against a float64 reference first; a wrong result exits non-zero.
Times: per call, median of 7 replays of one CUDA graph of >= 20 calls (no launch gaps, as in the
engine's captured decode step), cycling over enough input sets (>= 256 MB) that every call reads
its weights / KV from DRAM, not from the 50 MB L2.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402

from internvl_serve.engine.attention import (  # noqa: E402
    build_attention_metadata,
    paged_attention,
    sdpa_paged_attention,
)
from internvl_serve.kernels.fp8_linear import (fp8_linear, quantize_rows_fp8, quantize_weight_fp8,  # noqa: E402
                                               scaled_product, scaled_product_triton)
from internvl_serve.kernels.fused_ops import (add_rmsnorm, add_rmsnorm_fp8, rotary_, rotary_write_kv_,  # noqa: E402
                                              silu_and_mul, silu_and_mul_fp8)
from internvl_serve.kernels.int8_linear import Int8MatmulConfig, default_config, int8_linear, quantize_weight, scaled_config  # noqa: E402
from internvl_serve.kernels.decode_linear import bf16_config, decode_linear  # noqa: E402
from internvl_serve.kernels.paged_attention import (  # noqa: E402
    decode_dot,
    decode_heads_first,
    decode_single,
    default_decode_tiles,
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_decode_attention_torch,
    to_cache_dtype,
    write_kv,
)

H, D, BS, ENGINE_BLOCKS = 40, 128, 16, 256
KV_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}  # --kv-dtype: the attention tables' cache
cache_dtype = torch.bfloat16


def random_cache(num_blocks: int) -> torch.Tensor:
    """One paged K or V cache of standard-normal values, in the --kv-dtype."""
    return to_cache_dtype(torch.randn(num_blocks, BS, H, D, device="cuda", dtype=torch.bfloat16), cache_dtype)
LINEAR_SHAPES = [(5120, 5120), (13824, 5120), (5120, 13824)]  # (N, K): o/qkv-part, gate/up, down


class WrongResult(SystemExit):
    pass


class Rows(list):
    """A table's lines, echoed to stderr as they come (a run cut off at its time limit still shows
    what it measured); main() prints the whole table again at the end."""

    def __init__(self, header: list[str]) -> None:
        super().__init__()
        for line in header:
            self.append(line)

    def append(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)
        super().append(line)


def check(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-2, *,
          sub: slice = slice(None)) -> float:
    """Exit non-zero unless out[sub] is finite and within `tol` (relative L2) of the float64 ref."""
    out, ref = out[sub].double(), ref.double()
    if not torch.isfinite(out).all():
        raise WrongResult(f"WRONG RESULT {name}: NaN/inf in the output")
    err = ((out - ref).norm() / ref.norm()).item()
    if not err < tol:
        raise WrongResult(f"WRONG RESULT {name}: rel err {err:.2e} >= {tol}")
    return err


ROTATE_BYTES = 256 << 20  # inputs cycled per timing: 5x the H100's 50 MB L2, so every call reads DRAM


def graph_us(calls: list, iters: int | None = None) -> float:
    """Median microseconds per call of a CUDA graph that replays `calls` round-robin.

    calls: zero-argument callables, one per input set (several sets whose bytes add up past the L2,
    so each call reads its inputs from DRAM as a decode step does). One graph of `iters` calls, no
    launch gaps: what the engine's captured decode step sees. Each call runs once first (compiles).
    """
    for c in calls:
        c()
    if iters is None:
        iters = max(len(calls), 20)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(g, stream=s):
            for i in range(iters):
                calls[i % len(calls)]()
    torch.cuda.current_stream().wait_stream(s)
    g.replay()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / iters)
    del g
    return sorted(times)[len(times) // 2]


def ceilings() -> tuple[float, float]:
    """(copy GB/s counting read + write, read-only GB/s) over 512 MiB, outside and inside a graph;
    the best of each (a captured copy_ can become a copy-engine memcpy node, which runs slower)."""
    x = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    nbytes = x.numel() * 2
    copy_us = min(graph_us([lambda: y.copy_(x)], iters=5), graph_us([lambda: torch.mul(x, 1, out=y)], iters=5),
                  events_us(lambda: y.copy_(x)))
    read_us = min(graph_us([lambda: x.sum()], iters=5), events_us(lambda: x.sum()))
    return 2 * nbytes / copy_us / 1e3, nbytes / read_us / 1e3


def events_us(fn, iters: int = 10) -> float:
    """Microseconds per call of `iters` back-to-back eager calls (for large ops only)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def paged_inputs(B: int, ctx: int, table_blocks: int):
    """Every sequence at `ctx` tokens; blocks shuffled over the cache; table `table_blocks` wide."""
    need = triton.cdiv(ctx, BS)
    num_blocks = B * need
    k, v = random_cache(num_blocks), random_cache(num_blocks)
    perm = torch.randperm(num_blocks, device="cuda").int().view(B, need)
    table = torch.zeros(B, table_blocks, dtype=torch.int32, device="cuda")
    table[:, :need] = perm
    q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    return q, k, v, table, lens


def grid_sweep_row(B: int, H: int, check_out, timed) -> str:
    """One "grid sweep" line: the elementwise tiles at this grid size in both grid orders, with the
    products elementwise or on the tensor cores at 2-4 pipeline stages (and, for one program per pair,
    other loop steps / warps), fastest first, the launcher's default marked *; a variant that does not
    launch (shared memory) is listed as failed."""
    kv_bytes = torch.empty((), dtype=cache_dtype).element_size()
    tiles = default_decode_tiles(B, H, kv_bytes=kv_bytes)
    single = decode_single(B, H)
    shapes = [(tiles.block_n, tiles.num_warps)]
    if single:
        shapes += [(bn, nw) for bn in (64, 128) for nw in (2, 4, 8) if (bn, nw) != shapes[0]]
    default_dot = decode_dot(B, H, kv_bytes=kv_bytes)
    chosen = default_decode_tiles(B, H, kv_bytes=kv_bytes, dot=default_dot)
    default_kw = (chosen.block_n, chosen.num_warps, decode_heads_first(default_dot), default_dot, chosen.num_stages)
    res, failed = [], []
    for bn, nw in shapes:
        for heads_first in (False, True):
            for dot, stages in ((False, None), (True, 2), (True, 3), (True, 4)):
                kw = dict(single=single, block_n=bn, num_warps=nw, heads_first=heads_first, dot=dot,
                          num_stages=stages)
                default = (bn, nw, heads_first, dot, stages) == default_kw
                name = (f"{'*' if default else ''}n{bn}/w{nw}/{'hf' if heads_first else 'sf'}"
                        + (f"/dot{stages}" if dot else ""))
                try:
                    check_out(kw)
                    res.append((timed(False, **kw), name))
                except (RuntimeError, triton.runtime.errors.OutOfResources) as e:  # not a wrong result
                    failed.append(f"{name} ({type(e).__name__})")
    res.sort()
    return (f"      grid sweep tbl256 ({'single' if single else f'p{tiles.partition_size}'}) "
            + " ".join(f"{n}:{t:.1f}" for t, n in res) + (f"; failed: {', '.join(failed)}" if failed else ""))


def attention_table(bw: float, sweep: bool, grid_sweep: bool = False) -> list[str]:
    rows = Rows([f"{'B':>3} {'ctx':>5} | {'triton us':>9} {'GB/s':>6} {'%copy':>5} | {'tbl256 us':>9} {'%copy':>5} | "
                 f"{'sdpa us':>8} {'GB/s':>6} | {'speedup':>7} | tiles"])
    scale = D**-0.5
    for ctx in (512, 2048):
        for B in (1, 8, 32, 64):
            kv_elem = torch.empty((), dtype=cache_dtype).element_size()
            nbytes = 2 * B * ctx * H * D * kv_elem + 2 * B * H * D * 2  # K and V once, q and out
            sets = []
            for _ in range(max(1, min(16, ROTATE_BYTES // nbytes))):
                q, k, v, table, lens = paged_inputs(B, ctx, ENGINE_BLOCKS)
                sets.append((q, k, v, table, table[:, : triton.cdiv(ctx, BS)].contiguous(), lens))
            q, k, v, table, tight, lens = sets[0]
            sub = slice(0, min(B, 8))  # the float64 reference loops over the batch
            ref = paged_decode_attention_ref(q[sub], k, v, tight[sub], lens[sub], scale, out_dtype=torch.float64)
            for name, tbl in (("tight", tight), ("tbl256", table)):
                out = torch.full_like(q, float("nan"))
                paged_decode_attention(q, k, v, tbl, lens, scale, out=out)
                check(f"attention {name} B={B} ctx={ctx}", out, ref, sub=sub)
            check(f"sdpa B={B} ctx={ctx}", paged_decode_attention_torch(q, k, v, tight, lens, scale), ref, sub=sub)

            def timed(tight_table: bool, fn=paged_decode_attention, **kw) -> float:
                return graph_us([
                    (lambda s=s: fn(s[0], s[1], s[2], s[4] if tight_table else s[3], s[5], scale, **kw))
                    for s in sets
                ])

            t_tri, t_256, t_sdpa = timed(True), timed(False), timed(True, paged_decode_attention_torch)
            dot = decode_dot(B, H, kv_bytes=k.element_size())
            tiles = default_decode_tiles(B, H, kv_bytes=k.element_size(), dot=dot)
            gb = lambda t: nbytes / t / 1e3
            rows.append(
                f"{B:>3} {ctx:>5} | {t_tri:>9.1f} {gb(t_tri):>6.0f} {100 * gb(t_tri) / bw:>5.0f} | "
                f"{t_256:>9.1f} {100 * gb(t_256) / bw:>5.0f} | {t_sdpa:>8.1f} {gb(t_sdpa):>6.0f} | "
                f"{t_sdpa / t_tri:>6.1f}x | {'single' if decode_single(B, H) else f'p{tiles.partition_size}'}"
                f"/n{tiles.block_n}/w{tiles.num_warps}/{'hf' if decode_heads_first(dot) else 'sf'}"
                + (f"/dot{tiles.num_stages}" if dot else "")
            )
            if sweep:  # the engine-wide table: partition sizes / tiles / warps, and one program per pair
                res = []
                for part, bn in ((32, 32), (64, 32), (64, 64), (128, 64), (128, 128), (256, 64), (256, 128),
                                 (None, 64), (None, 128)):
                    for nw in (4, 8):
                        kw = dict(single=True) if part is None else dict(single=False, partition_size=part)
                        out = paged_decode_attention(q, k, v, table, lens, scale, block_n=bn, num_warps=nw, **kw)
                        check(f"attention {kw} bn={bn} nw={nw}", out, ref, sub=sub)
                        t = timed(False, block_n=bn, num_warps=nw, **kw)
                        res.append((t, f"{'single' if part is None else f'p{part}'}/n{bn}/w{nw}"))
                res.sort()
                rows.append("      sweep tbl256 " + " ".join(f"{n}:{t:.1f}" for t, n in res))
            if grid_sweep:
                def check_out(kw):
                    out = paged_decode_attention(q, k, v, table, lens, scale, **kw)
                    check(f"attention {kw}", out, ref, sub=sub)
                rows.append(grid_sweep_row(B, H, check_out, timed))
            del sets, q, k, v, table, tight
    return rows


def prefill_step(seqs: list[tuple[int, int]]):
    """A step of sequences (ctx, q): every key up to ctx + q written, blocks shuffled over the cache."""
    need = [triton.cdiv(c + q, BS) for c, q in seqs]
    k, v = random_cache(sum(need)), random_cache(sum(need))
    perm = torch.randperm(sum(need), device="cuda").int()
    table = torch.zeros(len(seqs), max(need), dtype=torch.int32, device="cuda")
    first = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[first:first + n]
        first += n
    q = torch.randn(sum(q for _, q in seqs), H, D, device="cuda", dtype=torch.bfloat16)
    return q, k, v, table, [q for _, q in seqs], [c for c, _ in seqs]


def prefill_table(sweep: bool) -> list[str]:
    """One layer's attention call of a prefill / mixed step: kernel vs the reference, eager."""
    from internvl_serve.kernels.prefill_attention import paged_prefill_attention, prefill_tiles
    rows = Rows([f"{'step':<28} | {'kernel us':>9} {'TFLOP/s':>7} | {'reference us':>12} | {'speedup':>7} | "
                 f"{'x40 layers ms':>13} (kernel / reference)"])
    scale = D**-0.5
    g = torch.Generator().manual_seed(0)
    mixed = [(int(c), 1) for c in torch.randint(256, 2048, (32,), generator=g)] + [(1024, 512)]
    for name, seqs in (("one 2048-token chunk", [(0, 2048)]), ("32 decodes + 512-token chunk", mixed)):
        q, k, v, table, q_lens, ctx_lens = prefill_step(seqs)
        meta_k, _ = build_attention_metadata(q_lens, ctx_lens, table, BS, prefill_kernel=True)
        meta_r, _ = build_attention_metadata(q_lens, ctx_lens, table, BS, prefill_kernel=False)
        meta_r.groups  # built once per step in the engine, outside the per-layer call
        ref = sdpa_paged_attention(q.double(), k.double(), v.double(), meta_r, scale)
        check(f"prefill kernel {name}", paged_attention(q, k, v, meta_k, scale), ref)
        check(f"prefill reference {name}", sdpa_paged_attention(q, k, v, meta_r, scale), ref)
        del ref
        flops = 4 * H * D * sum(q * c + q * (q + 1) // 2 for c, q in seqs)  # QK^T and PV, causal
        t_k = events_us(lambda: paged_attention(q, k, v, meta_k, scale), iters=20)
        t_r = events_us(lambda: sdpa_paged_attention(q, k, v, meta_r, scale), iters=20)
        rows.append(f"{name:<28} | {t_k:>9.1f} {flops / t_k / 1e6:>7.1f} | {t_r:>12.1f} | {t_r / t_k:>6.1f}x | "
                    f"{40 * t_k / 1e3:>6.2f} / {40 * t_r / 1e3:.2f}")
        if sweep:
            res = []
            for bm in (16, 32, 64, 128):
                ts, st = (torch.from_numpy(a).cuda() for a in prefill_tiles(q_lens, bm, ctx_lens))
                for bn in (32, 64, 128):
                    for nw in (4, 8):
                        def call(bm=bm, bn=bn, nw=nw, ts=ts, st=st):
                            return paged_prefill_attention(q, k, v, meta_k.query_start_loc, meta_k.seq_lens,
                                                           meta_k.block_tables, ts, st, scale, bm,
                                                           block_n=bn, num_warps=nw)
                        try:
                            call()
                        except Exception as e:  # e.g. out of shared memory for the largest tiles
                            res.append((float("inf"), f"m{bm}/n{bn}/w{nw}:{type(e).__name__}"))
                            continue
                        res.append((events_us(call, iters=20), f"m{bm}/n{bn}/w{nw}"))
            res.sort(key=lambda r: r[0])
            rows.append("      sweep " + " ".join(f"{n}:{t:.1f}" for t, n in res[:12]))
        del q, k, v, table, meta_k, meta_r
    return rows


def sweep_configs(M: int) -> list[Int8MatmulConfig]:
    bm = max(16, triton.next_power_of_2(M))
    tiles = ((16, 128), (16, 256), (16, 512), (32, 128), (32, 256), (64, 128), (64, 256))
    dots = [Int8MatmulConfig(bm, bn, bk, sk, 4, 4) for bn, bk in tiles for sk in (1, 2, 4)]
    dots += [Int8MatmulConfig(bm, bn, 128, sk, 4, ns) for bn in (32, 64) for sk in (1, 4) for ns in (3, 5)]
    dots += [Int8MatmulConfig(bm, 128, 128, sk, 8, 4) for sk in (1, 2)]
    if M > 8:
        return dots
    gemv_tiles = ((4, 1024), (8, 1024), (8, 512), (8, 256), (16, 256), (16, 512), (32, 256), (32, 128), (64, 128))
    gemvs = [Int8MatmulConfig(1, bn, bk, sk, 4, 1, gemv=True) for bn, bk in gemv_tiles for sk in (1, 2, 4)]
    gemvs += [Int8MatmulConfig(1, 8, 512, 1, nw, 1, gemv=True) for nw in (2, 8)]
    return dots + gemvs


def config_name(c: Int8MatmulConfig) -> str:
    return f"{'gemv' if c.gemv else f'm{c.block_m}'} n{c.block_n} k{c.block_k} s{c.split_k} w{c.num_warps} st{c.num_stages}"


def sweep_row(name: str, configs: list[Int8MatmulConfig], product, weight_sets: list, ref: torch.Tensor,
              tol: float, top: int) -> str:
    """One "sweep" line: product(weights, config) for each config, checked against ref on weight_sets[0]
    and timed over every set; the `top` fastest, a config that fails to launch (e.g. out of shared
    memory) listed as infinitely slow."""
    res = []
    for c in configs:
        try:
            out = product(weight_sets[0], c)
        except Exception as e:  # a config, not a result, fails
            res.append((float("inf"), f"{c} {type(e).__name__}"))
            continue
        check(f"{name} {c}", out, ref, tol)
        res.append((graph_us([lambda w=w: product(w, c) for w in weight_sets]), config_name(c).replace(" ", "")))
    res.sort(key=lambda r: r[0])
    return "      sweep " + " ".join(f"{n}:{t:.1f}" for t, n in res[:top])


def linear_table(bw: float, sweep: bool) -> list[str]:
    rows = Rows([f"{'M':>3} {'N':>6} {'K':>6} | {'int8 us':>8} {'GB/s':>6} {'%copy':>5} | {'bf16 us':>8} {'GB/s':>6} "
                 f"{'%copy':>5} | {'speedup':>7} | config"])
    for N, K in LINEAR_SHAPES:
        n_sets = max(1, ROTATE_BYTES // (N * K))
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(max(1, n_sets // 2))]
        qs = [quantize_weight(ws[i % len(ws)] + 0.001 * i) for i in range(n_sets)]
        for M in (1, 8, 32, 64):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            w_int8, scale = qs[0]
            ref = x.double() @ (w_int8.double() * scale.double()[:, None]).t()
            cfg = default_config(M, N, K)
            check(f"int8_linear M={M} N={N} K={K}", int8_linear(x, w_int8, scale, use_triton=True), ref, 1e-2)
            check(f"bf16 linear M={M} N={N} K={K}", torch.nn.functional.linear(x, ws[0]),
                  x.double() @ ws[0].double().t(), 1e-2)
            t8 = graph_us([lambda q=q: int8_linear(x, q[0], q[1], use_triton=True) for q in qs])
            t16 = graph_us([lambda w=w: torch.nn.functional.linear(x, w) for w in ws])
            io = M * K * 2 + M * N * 2
            b8, b16 = N * K + N * 4 + io, 2 * N * K + io
            rows.append(
                f"{M:>3} {N:>6} {K:>6} | {t8:>8.1f} {b8 / t8 / 1e3:>6.0f} {100 * b8 / t8 / 1e3 / bw:>5.0f} | "
                f"{t16:>8.1f} {b16 / t16 / 1e3:>6.0f} {100 * b16 / t16 / 1e3 / bw:>5.0f} | {t16 / t8:>6.2f}x | "
                + config_name(cfg)
            )
            if sweep:
                rows.append(sweep_row("int8_linear", sweep_configs(M),
                                      lambda q, c: int8_linear(x, q[0], q[1], use_triton=True, config=c),
                                      qs, ref, 1e-2, top=12))
        del ws, qs
    return rows


LLM_PROJECTIONS = [("qkv", 15360, 5120), ("o", 5120, 5120), ("gate_up", 27648, 5120), ("down", 5120, 13824)]


def quantized_projection_table(bw: float) -> list[str]:
    """The engine's four merged projections (N, K) of one LLaMA-2-13B layer at decode and prefill row
    counts: bf16 F.linear, weight-only int8 (dequantize + matmul above 64 rows), fp8 (fp8_linear: the
    e4m3 weight times bf16 activations for one row, the Triton row quantizer + torch._scaled_mm above),
    and the latter's two parts alone at every row count, the product also with fast accumulation ("fast
    us": the llm's fp8_fast_accum), and both products' relative L2 error against float64. The layer's sum
    (x 40: the step's GEMMs)."""
    rows = Rows([f"{'M':>5} {'proj':>8} | {'bf16 us':>8} | {'int8 us':>8} | {'fp8 us':>8} {'GB/s':>6} | "
                 f"{'mm us':>7} {'fast us':>7} {'quant us':>8} | fp8 vs bf16 | {'err':>6} {'fast err':>8}"])
    for M in (1, 32, 64, 288, 2048):
        total = {"bf16": 0.0, "int8": 0.0, "fp8": 0.0}
        for name, N, K in LLM_PROJECTIONS:
            n_sets = max(2, ROTATE_BYTES // (N * K * 2))
            ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(n_sets)]
            qs = [quantize_weight(w) for w in ws]
            fs = [quantize_weight_fp8(w) for w in ws]
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            xq, xs = quantize_rows_fp8(x)
            ref = x.double() @ ws[0].double().t()
            err = check(f"fp8_linear M={M} {name}", scaled_product(xq, xs, *fs[0], torch.bfloat16), ref, 0.08)
            fast_err = check(f"fast accumulation M={M} {name}",
                             scaled_product(xq, xs, *fs[0], torch.bfloat16, True), ref, 0.08)
            check(f"fp8_linear M={M} {name}", fp8_linear(x, *fs[0]), ref, 0.08)
            check(f"int8_linear M={M} {name}", int8_linear(x, *qs[0]), ref, 1e-2)
            t = {"bf16": graph_us([lambda w=w: torch.nn.functional.linear(x, w) for w in ws]),
                 "int8": graph_us([lambda q=q: int8_linear(x, q[0], q[1]) for q in qs]),
                 "fp8": graph_us([lambda f=f: fp8_linear(x, f[0], f[1]) for f in fs])}
            mm = graph_us([lambda f=f: scaled_product(xq, xs, f[0], f[1], torch.bfloat16) for f in fs])
            fast = graph_us([lambda f=f: scaled_product(xq, xs, f[0], f[1], torch.bfloat16, True) for f in fs])
            quant = graph_us([lambda: quantize_rows_fp8(x)])
            for key in total:
                total[key] += t[key]
            fp8_bytes = N * K + N * 4 + M * K * 2 + M * N * 2
            rows.append(f"{M:>5} {name:>8} | {t['bf16']:>8.1f} | {t['int8']:>8.1f} | {t['fp8']:>8.1f} "
                        f"{fp8_bytes / t['fp8'] / 1e3:>6.0f} | {mm:>7.1f} {fast:>7.1f} {quant:>8.1f} | "
                        f"{t['bf16'] / t['fp8']:>10.2f}x | {err:>6.4f} {fast_err:>8.4f}")
            del ws, qs, fs
        rows.append(f"{M:>5} {'layer':>8} | {total['bf16']:>8.1f} | {total['int8']:>8.1f} | {total['fp8']:>8.1f} "
                    f"{'':>6} | {'':>7} {'':>7} {'':>8} | {total['bf16'] / total['fp8']:.2f}x  (x40 layers: bf16 "
                    f"{total['bf16'] * 40 / 1e3:.2f} ms, int8 {total['int8'] * 40 / 1e3:.2f}, fp8 "
                    f"{total['fp8'] * 40 / 1e3:.2f})")
    return rows


def w8a8_table(bw: float, sweep: bool) -> list[str]:
    """The fp8 products of decode batches, e4m3 rows times the engine's merged e4m3 projections: torch's
    _scaled_mm with fast accumulation (the llm's default path) against the Triton matrix kernel's fp8 dot
    (scaled_product_triton: swap-AB, scaled_config's tiles), µs per call and the share of the copy bandwidth the weight
    bytes reach; with --sweep the Triton kernel's best tile configs too. Per layer (x 40: a step's GEMMs)."""
    rows = Rows([f"{'M':>3} {'proj':>8} | {'cublas us':>9} {'%copy':>5} | {'triton us':>9} {'%copy':>5} | "
                 f"{'speedup':>7} | {'err':>6} | default config"])
    for M in (2, 16, 32, 64):
        total = {"cublas": 0.0, "triton": 0.0}
        for name, N, K in LLM_PROJECTIONS:
            n_sets = max(2, ROTATE_BYTES // (N * K))
            fs = [quantize_weight_fp8(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02)
                  for _ in range(n_sets)]
            xq, xs = quantize_rows_fp8(torch.randn(M, K, device="cuda", dtype=torch.bfloat16))
            ref = (xq.double() * xs.double()) @ (fs[0][0].double() * fs[0][1].double()[:, None]).t()
            check(f"_scaled_mm M={M} {name}", scaled_product(xq, xs, *fs[0], torch.bfloat16, True), ref, 2e-2)
            err = check(f"w8a8 triton M={M} {name}", scaled_product_triton(xq, xs, *fs[0], torch.bfloat16), ref, 2e-2)
            t = {"cublas": graph_us([lambda f=f: scaled_product(xq, xs, f[0], f[1], torch.bfloat16, True) for f in fs]),
                 "triton": graph_us([lambda f=f: scaled_product_triton(xq, xs, f[0], f[1], torch.bfloat16) for f in fs])}
            for key in total:
                total[key] += t[key]
            gbs = {k: (N * K + N * 4 + M * K + M * N * 2) / v / 1e3 for k, v in t.items()}
            rows.append(f"{M:>3} {name:>8} | {t['cublas']:>9.1f} {100 * gbs['cublas'] / bw:>5.0f} | "
                        f"{t['triton']:>9.1f} {100 * gbs['triton'] / bw:>5.0f} | {t['cublas'] / t['triton']:>6.2f}x | "
                        f"{err:>6.4f} | " + config_name(scaled_config(M, N, K)))
            if sweep:
                rows.append(sweep_row("w8a8 triton", [c for c in sweep_configs(M) if not c.gemv],
                                      lambda f, c: scaled_product_triton(xq, xs, f[0], f[1], torch.bfloat16, c),
                                      fs, ref, 2e-2, top=8))
            del fs
        rows.append(f"{M:>3} {'layer':>8} | {total['cublas']:>9.1f} {'':>5} | {total['triton']:>9.1f} {'':>5} | "
                    f"{total['cublas'] / total['triton']:>6.2f}x | (x40 layers: cublas {total['cublas'] * 40 / 1e3:.2f} "
                    f"ms, triton {total['triton'] * 40 / 1e3:.2f})")
    return rows


def bf16_skinny_configs(M: int, N: int, K: int) -> list[Int8MatmulConfig]:
    """The tiles bf16_table tries for decode_linear at M rows (K steps in bf16 elements), its default first."""
    bm = max(16, triton.next_power_of_2(M))
    default = bf16_config(M, N, K)
    tried = [Int8MatmulConfig(bm, bn, bk, 1, 4, st) for bn in (64, 128) for bk in (64, 128) for st in (4, 5)]
    tried += [Int8MatmulConfig(bm, 32, 128, 1, 4, 4), Int8MatmulConfig(bm, 64, 256, 1, 4, 3),
              Int8MatmulConfig(bm, 64, 128, 2, 4, 4)]
    return [default] + [c for c in tried if c != default]


def bf16_table(bw: float) -> list[str]:
    """The bf16 decode products (the engine's merged projections of one LLaMA-2-13B layer, M = 1-64 rows):
    F.linear through cuBLAS (torch's default) and through cuBLASLt (preferred_blas_library), against
    kernels/decode_linear.py (the int8 / fp8 products' Triton matrix kernel on bf16 weights): its default
    tiles (bf16_config) and its best of bf16_skinny_configs per shape; µs per call and the share of the
    copy bandwidth the weight bytes reach. Per layer (x 40: a step's GEMMs)."""
    rows = Rows([f"{'M':>3} {'proj':>8} | {'cublas us':>9} {'%copy':>5} | {'lt us':>7} {'%copy':>5} | "
                 f"{'default us':>10} | {'best us':>8} {'%copy':>5} | {'speedup':>7} | best config"])
    for M in (1, 16, 32, 64):
        total = {"cublas": 0.0, "lt": 0.0, "default": 0.0, "triton": 0.0}
        for name, N, K in LLM_PROJECTIONS:
            n_sets = max(2, ROTATE_BYTES // (N * K * 2))
            ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(n_sets)]
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = x.double() @ ws[0].double().t()
            check(f"bf16 F.linear M={M} {name}", torch.nn.functional.linear(x, ws[0]), ref, 1e-2)
            t = {"cublas": graph_us([lambda w=w: torch.nn.functional.linear(x, w) for w in ws])}
            torch.backends.cuda.preferred_blas_library("cublaslt")
            try:
                check(f"bf16 F.linear (cuBLASLt) M={M} {name}", torch.nn.functional.linear(x, ws[0]), ref, 1e-2)
                t["lt"] = graph_us([lambda w=w: torch.nn.functional.linear(x, w) for w in ws])
            finally:
                torch.backends.cuda.preferred_blas_library("cublas")
            best, default = (float("inf"), "none"), bf16_config(M, N, K)
            for c in bf16_skinny_configs(M, N, K):
                try:
                    out = decode_linear(x, ws[0], c)
                except Exception as e:  # a config, not a result, fails (e.g. shared memory)
                    print(f"bf16 triton M={M} {name} {config_name(c)}: {type(e).__name__}", file=sys.stderr)
                    continue
                try:
                    check(f"bf16 triton M={M} {name} {config_name(c)}", out, ref, 1e-2)
                except WrongResult as e:  # the probe's own kernel use; F.linear above must be right
                    print(e, file=sys.stderr)
                    continue
                us = graph_us([lambda w=w, c=c: decode_linear(x, w, c) for w in ws])
                if c == default:
                    t["default"] = us
                best = min(best, (us, config_name(c).replace(" ", "")))
            t["triton"] = best[0]
            t.setdefault("default", float("nan"))
            for key in total:
                total[key] += t[key]
            pct = {k: 100 * (N * K * 2 + M * K * 2 + M * N * 2) / v / 1e3 / bw for k, v in t.items()}
            rows.append(f"{M:>3} {name:>8} | {t['cublas']:>9.1f} {pct['cublas']:>5.0f} | {t['lt']:>7.1f} "
                        f"{pct['lt']:>5.0f} | {t['default']:>10.1f} | {t['triton']:>8.1f} {pct['triton']:>5.0f} | "
                        f"{t['cublas'] / t['triton']:>6.2f}x | {best[1]}")
            del ws
        rows.append(f"{M:>3} {'layer':>8} | {total['cublas']:>9.1f} {'':>5} | {total['lt']:>7.1f} {'':>5} | "
                    f"{total['default']:>10.1f} | {total['triton']:>8.1f} {'':>5} | "
                    f"{total['cublas'] / total['triton']:>6.2f}x | (x40 layers: cublas {total['cublas'] * 40 / 1e3:.2f} "
                    f"ms, cublasLt {total['lt'] * 40 / 1e3:.2f}, triton default {total['default'] * 40 / 1e3:.2f}, "
                    f"best {total['triton'] * 40 / 1e3:.2f})")
    return rows


def fp8_inputs_table() -> list[str]:
    """The fp8 linears' inputs as the fused fp8 path writes them, against the unfused pair of launches:
    add_rmsnorm + quantize_rows_fp8 (qkv_proj's and gate_up_proj's input, hidden 5,120) and silu_and_mul +
    quantize_rows_fp8 (down_proj's, 13,824), µs per call; each pair's bits checked equal first. Per layer:
    two norms and one SiLU-and-mul (x 40: a step)."""
    rows = Rows([f"{'M':>5} | {'norm+quant us':>13} {'fused us':>8} | {'silu+quant us':>13} {'fused us':>8} | "
                 f"per layer saved us (x40 ms)"])
    for M in (2, 32, 64, 288, 2048):
        n_sets = min(64, max(2, ROTATE_BYTES // (M * 2 * 13824 * 2)))  # small M: launch-bound, a few sets do
        hs = [torch.randn(M, 5120, device="cuda", dtype=torch.bfloat16) for _ in range(n_sets)]
        rs = [torch.randn(M, 5120, device="cuda", dtype=torch.bfloat16) for _ in range(n_sets)]
        gus = [torch.randn(M, 2 * 13824, device="cuda", dtype=torch.bfloat16) for _ in range(n_sets)]
        w = torch.rand(5120, device="cuda", dtype=torch.bfloat16) + 0.5
        for name, (q, scale), (want_q, want_scale) in [
                ("add_rmsnorm_fp8", add_rmsnorm_fp8(hs[0], rs[0], w, 1e-5)[:2],
                 quantize_rows_fp8(add_rmsnorm(hs[0], rs[0], w, 1e-5)[0])),
                ("silu_and_mul_fp8", silu_and_mul_fp8(gus[0]), quantize_rows_fp8(silu_and_mul(gus[0])))]:
            if not (torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(scale, want_scale)):
                raise WrongResult(f"WRONG RESULT {name} M={M}: not the row quantizer's bits")
        sets = list(zip(hs, rs, gus))
        norm2 = graph_us([lambda h=h, r=r: quantize_rows_fp8(add_rmsnorm(h, r, w, 1e-5)[0]) for h, r, _ in sets])
        norm1 = graph_us([lambda h=h, r=r: add_rmsnorm_fp8(h, r, w, 1e-5) for h, r, _ in sets])
        silu2 = graph_us([lambda g=g: quantize_rows_fp8(silu_and_mul(g)) for _, _, g in sets])
        silu1 = graph_us([lambda g=g: silu_and_mul_fp8(g) for _, _, g in sets])
        saved = 2 * (norm2 - norm1) + (silu2 - silu1)
        rows.append(f"{M:>5} | {norm2:>13.1f} {norm1:>8.1f} | {silu2:>13.1f} {silu1:>8.1f} | "
                    f"{saved:.1f} ({saved * 40 / 1e3:.2f})")
        del hs, rs, gus
    return rows


def rope_kv_table() -> list[str]:
    """RoPE and the K/V write, one layer of the fused path: rotary_ then write_kv (two launches, before
    rotary_write_kv_) against rotary_write_kv_ (one), µs per call at 1-512 tokens over a cache in the
    --kv-dtype; the one launch's cache bytes checked equal to the two launches' first."""
    rows = Rows([f"{'T':>5} | {'rotary_ + write_kv us':>21} {'rotary_write_kv_ us':>19} | per step saved (x40) ms"])
    cos = torch.randn(4096, D, device="cuda", dtype=torch.bfloat16)
    sin = torch.randn(4096, D, device="cuda", dtype=torch.bfloat16)
    for T in (1, 32, 64, 512):
        k_cache, v_cache = random_cache(ENGINE_BLOCKS * 4), random_cache(ENGINE_BLOCKS * 4)
        positions = torch.randint(0, 4096, (T,), device="cuda")
        slots = torch.randperm(ENGINE_BLOCKS * 4 * BS, device="cuda")[:T]
        qkv = torch.randn(T, 3 * H, D, device="cuda", dtype=torch.bfloat16)
        two, one = qkv.clone(), qkv.clone()
        caches_two, caches_one = [c.clone() for c in (k_cache, v_cache)], [c.clone() for c in (k_cache, v_cache)]
        rotary_(two, positions, cos, sin, 2 * H)
        write_kv(two[:, H:2 * H], two[:, 2 * H:], *caches_two, slots)
        rotary_write_kv_(one, positions, cos, sin, H, H, *caches_one, slots)
        if not (torch.equal(one, two) and all(torch.equal(c.view(torch.uint8), w.view(torch.uint8))
                                              for c, w in zip(caches_one, caches_two))):
            raise WrongResult(f"WRONG RESULT rotary_write_kv_ T={T}: not rotary_ then write_kv")
        del caches_two, caches_one
        t2 = graph_us([lambda: (rotary_(qkv, positions, cos, sin, 2 * H),
                                write_kv(qkv[:, H:2 * H], qkv[:, 2 * H:], k_cache, v_cache, slots))])
        t1 = graph_us([lambda: rotary_write_kv_(qkv, positions, cos, sin, H, H, k_cache, v_cache, slots)])
        rows.append(f"{T:>5} | {t2:>21.1f} {t1:>19.1f} | {(t2 - t1) * 40 / 1e3:.3f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="also time other tile configs / partition sizes")
    ap.add_argument("--grid-sweep", action="store_true",
                    help="decode attention: both grid orders, elementwise or on the tensor cores at 2-4 stages")
    ap.add_argument("--only", choices=["attention", "prefill", "linear", "quantized", "w8a8", "rope", "bf16"], default=None)
    ap.add_argument("--kv-dtype", choices=sorted(KV_DTYPES), default="bf16",
                    help="the KV cache of the attention tables (q stays bf16)")
    args = ap.parse_args()
    global cache_dtype
    cache_dtype = KV_DTYPES[args.kv_dtype]
    if not torch.cuda.is_available():
        raise SystemExit("kernels_bench needs a CUDA GPU")
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    props = torch.cuda.get_device_properties(0)
    bw, read_bw = ceilings()
    lines = [f"device {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
             f"triton {triton.__version__}; copy bandwidth {bw:.0f} GB/s (read + write; %copy below is "
             f"against it); read-only (sum) {read_bw:.0f} GB/s"]
    if args.only in (None, "attention"):
        lines += ["", f"decode attention, Hq=Hkv=40, D=128, q bf16, KV cache {args.kv_dtype}; every sequence at ctx"]
        lines += attention_table(bw, args.sweep, args.grid_sweep)
    if args.only in (None, "prefill"):
        lines += ["", f"prefill / mixed-step attention, one layer, Hq=Hkv=40, D=128, block 16, bf16, KV cache "
                      f"{args.kv_dtype}, eager"]
        lines += prefill_table(args.sweep)
    if args.only in (None, "linear"):
        lines += ["", "weight-only int8 linear vs bf16 F.linear"] + linear_table(bw, args.sweep)
    if args.only in (None, "quantized"):
        lines += ["", "the LLM's projections: bf16, int8, fp8 (engine quantization)"] + quantized_projection_table(bw)
        lines += ["", "the fp8 linears' inputs: fused (the norm / SiLU-and-mul kernel writes them quantized) "
                      "against the kernel then the row quantizer"] + fp8_inputs_table()
    if args.only in (None, "quantized", "w8a8"):
        lines += ["", "fp8 products of decode batches: torch._scaled_mm (fast accumulation) against the Triton "
                      "W8A8 kernel"] + w8a8_table(bw, args.sweep)
    if args.only in (None, "bf16"):
        lines += ["", "bf16 products of decode batches: F.linear (cuBLAS, cuBLASLt) against decode_linear (the "
                      "Triton matrix kernel on bf16 weights: default tiles, best tiles per shape)"] + bf16_table(bw)
    if args.only in (None, "rope"):
        lines += ["", f"RoPE + K/V write (40 q, k and v heads of 128, bf16; KV cache {args.kv_dtype}): two "
                      "launches against one"] + rope_kv_table()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
