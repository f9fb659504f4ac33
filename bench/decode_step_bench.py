"""GPU benchmark of one captured decode step of the full LLaMA2-13B layer stack, fused kernels on vs off.

    python bench/decode_step_bench.py                       # 13B sizes, bf16, batch 1 and 32, ctx 512
    python bench/decode_step_bench.py --fused on --int8     # only the fused path, weight-only int8
    python bench/decode_step_bench.py --layers 4            # a quick smoke run
    python bench/decode_step_bench.py --fused on --batches 32 --ctx 416 --profile   # where a step goes
    python bench/decode_step_bench.py --batches 32,64 --attention-variants elementwise,default,dot,heads-first+dot
    python bench/decode_step_bench.py --batches 1,32,64 --ctx 416 --linear-variants cublas,triton

Random weights (drawn on the GPU in the checkpoint's layout, so load_llama merges q/k/v and gate/up
as in serving), every sequence at the same context length. For each path (`--fused off`: the torch
ops with separate projections, as before the fusion; `on`: merged projections, add+RMSNorm, rotary and
SiLU-and-mul kernels) the decode graphs (engine/decode_graphs.py) are captured for the batch sizes and
replayed; ms/step is the median over --repeats of --steps back-to-back graph replays timed with CUDA
events (the GPU's time for the step; the engine's host work per step is not in it). Before timing, the fused logits are
checked against the unfused ones (max abs difference and greedy agreement are printed). `--profile`
adds, per path and batch, the kernels of --steps replays under torch.profiler, grouped by name: µs per
step and share of the step (the kernels' own time; the gaps between them are the rest of ms/step).
`--attention-variants` times the fused step with the decode attention's launch variants instead
(kernels/paged_attention.py: the grid's order, the products on the tensor cores; each set through its
environment switches before the graphs are captured, `default` with both unset, `elementwise` the
default before 2026-12-07f), and compares each one's logits with the first's; `--linear-variants` the
same with the bf16 projections through cuBLAS (the default) or, up to 64 rows, the Triton matrix kernel
(kernels/decode_linear.py, the engine's INTERNVL_SERVE_BF16_TRITON_ROWS).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from internvl_serve.engine.decode_graphs import DecodeGraphs  # noqa: E402
from internvl_serve.engine.llama import load_llama  # noqa: E402
from internvl_serve.engine.quantize import ENGINE_PROJECTION_PATHS, quantize_model_  # noqa: E402
from internvl_serve.kernels.decode_linear import use_triton_decode_linears_  # noqa: E402
from internvl_serve.kernels.paged_attention import DOT_ENV, HEADS_FIRST_ENV  # noqa: E402

LLAMA2_13B = dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                  num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096,
                  rms_norm_eps=1e-5, rope_theta=10000.0)


def random_state_dict(cfg: dict, device, dtype) -> dict[str, torch.Tensor]:
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * H // cfg["num_attention_heads"]
    g = torch.Generator(device=device).manual_seed(0)

    def w(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype)

    sd = {"model.embed_tokens.weight": w(V, H, std=1.0), "model.norm.weight": 1 + w(H, std=0.1),
          "lm_head.weight": w(V, H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": w(H, H), p + "self_attn.k_proj.weight": w(kv, H),
                   p + "self_attn.v_proj.weight": w(kv, H), p + "self_attn.o_proj.weight": w(H, H),
                   p + "mlp.gate_proj.weight": w(I, H), p + "mlp.up_proj.weight": w(I, H),
                   p + "mlp.down_proj.weight": w(H, I), p + "input_layernorm.weight": 1 + w(H, std=0.1),
                   p + "post_attention_layernorm.weight": 1 + w(H, std=0.1)})
    return sd


def step_inputs(batch: int, ctx: int, block_size: int, max_blocks: int):
    """batch sequences at position ctx (ctx tokens already cached), disjoint blocks."""
    per = math.ceil((ctx + 1) / block_size)
    tables = np.arange(batch * per, dtype=np.int32).reshape(batch, per)
    tables = np.pad(tables, ((0, 0), (0, max_blocks - per)))
    positions = np.full(batch, ctx, dtype=np.int64)
    slots = tables[np.arange(batch), positions // block_size].astype(np.int64) * block_size + positions % block_size
    tokens = np.random.default_rng(batch).integers(3, 32000, batch)
    return tokens, positions, slots, tables, positions + 1


def load_bucket(graphs: DecodeGraphs, inputs):
    """Fill the captured bucket's static buffers (the bucket is the batch size: no padding); returns
    its graph and logits buffer. Uses the buffers, not DecodeGraphs.run, whose input side may change."""
    tokens, positions, slots, tables, context_lens = inputs
    st = graphs._static[len(tokens)]
    for dst, src in ((st.token_ids, tokens), (st.positions, positions), (st.slots, slots),
                     (st.block_tables, tables), (st.context_lens, context_lens)):
        dst.copy_(torch.from_numpy(np.ascontiguousarray(src)).to(dst.dtype))
    return st.graph, st.logits


def time_steps(graph, steps: int, repeats: int) -> float:
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / steps)
    return statistics.median(times)


ATTENTION_VARIANTS = {  # name: the environment switches of kernels/paged_attention.py it sets (unset: the default)
    "default": {},
    "elementwise": {HEADS_FIRST_ENV: "0", DOT_ENV: "0"},  # the default before 2026-12-07f
    "heads-first": {HEADS_FIRST_ENV: "1", DOT_ENV: "0"},
    "dot": {HEADS_FIRST_ENV: "0", DOT_ENV: "1"},
    "heads-first+dot": {HEADS_FIRST_ENV: "1", DOT_ENV: "1"},
}


LINEAR_VARIANTS = {  # name: the rows up to which the bf16 projections run in Triton (kernels/decode_linear.py)
    "cublas": 0,  # F.linear: the default
    "triton": 64,
}


def set_attention_variant(model, variant: str) -> None:
    for name in (HEADS_FIRST_ENV, DOT_ENV):
        os.environ.pop(name, None)
    os.environ.update(ATTENTION_VARIANTS[variant])


def set_linear_variant(model, variant: str) -> None:
    use_triton_decode_linears_(model.model.layers, ENGINE_PROJECTION_PATHS, LINEAR_VARIANTS[variant])


def compare_variants(model, kv, variants: list[str], setup, batches: list[int], args, max_blocks: int,
                     block_size: int, device) -> None:
    """The fused step captured once per variant (after setup(model, variant)); a table of ms/step, then
    each variant's logits against the first variant's."""
    model.fused = True
    results, logits = {}, {}
    for variant in variants:
        setup(model, variant)
        time_buckets(model, kv, batches, args, max_blocks, block_size, device, variant, results, logits)
    print("\n| batch | " + " | ".join(f"{v} ms/step" for v in variants) + " |")
    print("|---" * (len(variants) + 1) + "|")
    for b in batches:
        print(f"| {b} | " + " | ".join(f"{results[v, b]:.3f}" for v in variants) + " |")
    first = variants[0]
    for v in variants[1:]:
        for b in batches:
            ref, got = logits[first, b], logits[v, b]
            agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
            print(f"batch {b}: {v} against {first}: logits rel L2 {((got - ref).norm() / ref.norm()).item():.2e}, "
                  f"greedy agreement {agree:.2f}")


def time_buckets(model, kv, batches: list[int], args, max_blocks: int, block_size: int, device, key,
                 results: dict, logits: dict) -> None:
    """Capture the decode graphs of `model` as it is now set, replay each batch's bucket: its ms/step into
    results[key, batch], its logits into logits[key, batch] (and its kernels printed with --profile)."""
    graphs = DecodeGraphs(model, kv, max_blocks=max_blocks, device=device, buckets=tuple(batches),
                          max_batch=max(batches))
    graphs.capture()
    for b in batches:
        graph, out = load_bucket(graphs, step_inputs(b, args.ctx, block_size, max_blocks))
        graph.replay()  # writes the same K/V slots every replay: the inputs stay valid
        logits[key, b] = out.clone()
        results[key, b] = time_steps(graph, args.steps, args.repeats)
        label = key if isinstance(key, str) else f"fused {'on ' if key else 'off'}"
        print(f"{label} batch {b:3d}: {results[key, b]:7.3f} ms/step", flush=True)
        if args.profile:
            print(kernel_table(graph, args.steps), flush=True)
    del graphs
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def kernel_table(graph, steps: int, top: int = 25) -> str:
    """The kernels of `steps` replays of `graph`, grouped by name, as a markdown table: µs per step,
    launches per step, share of the kernels' time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None)
        us = e.cuda_time_total if us is None else us
        if us > 0:
            rows.append((us / steps, e.count / steps, e.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    lines = [f"kernels' time per step {total / 1000:.3f} ms ({sum(r[1] for r in rows):.0f} launches)",
             "| µs per step | launches per step | share | kernel |", "|---|---|---|---|"]
    for us, count, name in rows[:top]:
        lines.append(f"| {us:.1f} | {count:.0f} | {100 * us / total:.1f} % | {name[:110]} |")
    return "\n".join(lines)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fused", choices=("both", "on", "off"), default="both")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--ctx", type=int, default=512, help="tokens already in each sequence's cache")
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--int8", action="store_true", help="weight-only int8 projections")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="also print each step's kernels (torch.profiler)")
    ap.add_argument("--attention-variants", default="",
                    help=f"comma-separated, of {', '.join(ATTENTION_VARIANTS)}: the fused step with each instead")
    ap.add_argument("--linear-variants", default="",
                    help=f"comma-separated, of {', '.join(LINEAR_VARIANTS)}: the fused step with each instead")
    args = ap.parse_args()
    if args.attention_variants and args.linear_variants:
        ap.error("--attention-variants or --linear-variants, not both")
    option, known, setup = (("--linear-variants", LINEAR_VARIANTS, set_linear_variant) if args.linear_variants
                            else ("--attention-variants", ATTENTION_VARIANTS, set_attention_variant))
    variants = [v for v in (args.linear_variants or args.attention_variants).split(",") if v]
    unknown = set(variants) - set(known)
    if unknown:
        ap.error(f"{option}: unknown {sorted(unknown)}; known: {', '.join(known)}")

    device, dtype, bs = torch.device("cuda", 0), torch.bfloat16, 16
    torch.cuda.set_device(device)
    cfg = dict(LLAMA2_13B, num_hidden_layers=args.layers)
    batches = [int(b) for b in args.batches.split(",")]
    sd = random_state_dict(cfg, device, dtype)
    model = load_llama(cfg, sd, device=device, dtype=dtype, fused_kernels=False)
    quantize_model_(model, "int8" if args.int8 else None, sd)
    del sd
    a = model.local_args
    max_blocks = math.ceil((args.ctx + 1) / bs)
    num_blocks = max(batches) * max_blocks
    cache = torch.randn(a.num_hidden_layers, 2, num_blocks, bs, a.num_key_value_heads, a.head_dim,
                        dtype=dtype, device=device)
    kv = [(cache[i, 0], cache[i, 1]) for i in range(a.num_hidden_layers)]
    print(f"device {torch.cuda.get_device_name(device)}, torch {torch.__version__}, layers {args.layers}, "
          f"{'int8' if args.int8 else 'bf16'} weights, ctx {args.ctx}, "
          f"weights {torch.cuda.memory_allocated(device) / 2**30 - cache.numel() * 2 / 2**30:.1f} GiB", flush=True)

    if variants:
        compare_variants(model, kv, variants, setup, batches, args, max_blocks, bs, device)
        return
    paths = {"both": (False, True), "on": (True,), "off": (False,)}[args.fused]
    results: dict[tuple[bool, int], float] = {}
    logits: dict[tuple[bool, int], torch.Tensor] = {}
    for fused in paths:
        model.fused = fused
        time_buckets(model, kv, batches, args, max_blocks, bs, device, fused, results, logits)
    print("\n| batch | " + " | ".join(f"fused {'on' if f else 'off'} ms/step" for f in paths)
          + (" | speed-up |" if len(paths) == 2 else " |"))
    print("|---" * (len(paths) + 1 + (len(paths) == 2)) + "|")
    for b in batches:
        row = [f"{results[f, b]:.3f}" for f in paths]
        if len(paths) == 2:
            row.append(f"{results[False, b] / results[True, b]:.2f}x")
        print(f"| {b} | " + " | ".join(row) + " |")
    if len(paths) == 2:
        for b in batches:
            off, on = logits[False, b], logits[True, b]
            agree = (off.argmax(-1) == on.argmax(-1)).float().mean().item()
            print(f"batch {b}: fused vs unfused logits max abs diff {(off - on).abs().max().item():.3e}, "
                  f"rel L2 {((off - on).norm() / off.norm()).item():.2e}, greedy agreement {agree:.2f}")


if __name__ == "__main__":
    main()
