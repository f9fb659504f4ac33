"""Why is the fp8 vision encoder slower than bf16 at one image? Times one InternViT-6B block's four
linears (qkv, proj, fc1, fc2 over 1,025 tokens per image) at batch 1 and batch 8 in bf16 (nn.functional
linear) and in fp8 (kernels/fp8_linear.fp8_linear), each eager and under torch.compile, and the parts of
the fp8 path alone (activation quantization, torch._scaled_mm, also with use_fast_accum: Hopper's FP8
accumulation without periodic promotion). Each linear's relative error against the float32 product of
the same bf16 inputs, for bf16, fp8 and fp8 with fast accumulation. CUDA with FP8 tensor cores only.

    python bench/fp8_matmul_probe.py [--iters 20] [--out fp8_probe.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from internvl_serve.kernels.fp8_linear import (fp8_linear, quantize_rows_fp8, quantize_weight_fp8,  # noqa: E402
                                                relative_error, scaled_product)

TOKENS_PER_IMAGE = 1025
HIDDEN, MLP = 3200, 12800
# (name, in features K, out features N) of one block's linears
LINEARS = (("qkv", HIDDEN, 3 * HIDDEN), ("proj", HIDDEN, HIDDEN), ("fc1", HIDDEN, MLP), ("fc2", MLP, HIDDEN))


def cuda_ms(fn, iters: int) -> float:
    """Median of per-call CUDA-event times after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def probe(images: int, iters: int) -> dict:
    device = torch.device("cuda")
    rows = {}
    for name, k, n in LINEARS:
        x = torch.randn(images * TOKENS_PER_IMAGE, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        bias = torch.zeros(n, device=device, dtype=torch.bfloat16)
        w_fp8, w_scale = quantize_weight_fp8(w)
        xq, x_scale = quantize_rows_fp8(x)
        compiled_fp8 = torch.compile(fp8_linear, dynamic=False)
        compiled_quant = torch.compile(quantize_rows_fp8, dynamic=False)
        tflop = 2 * x.shape[0] * k * n / 1e12

        def scaled_mm(fast_accum: bool = False) -> torch.Tensor:
            return scaled_product(xq, x_scale, w_fp8, w_scale, torch.bfloat16, fast_accum)

        exact = x.float() @ w.float().t()
        row = {
            "bf16_ms": cuda_ms(lambda: torch.nn.functional.linear(x, w, bias), iters),
            "fp8_eager_ms": cuda_ms(lambda: fp8_linear(x, w_fp8, w_scale, bias), iters),
            "fp8_compiled_ms": cuda_ms(lambda: compiled_fp8(x, w_fp8, w_scale, bias), iters),
            "quantize_eager_ms": cuda_ms(lambda: quantize_rows_fp8(x), iters),
            "quantize_compiled_ms": cuda_ms(lambda: compiled_quant(x), iters),
            "scaled_mm_ms": cuda_ms(scaled_mm, iters),
            "scaled_mm_fast_accum_ms": cuda_ms(lambda: scaled_mm(True), iters),
            "bf16_rel_error": relative_error(exact, (x @ w.t()).float()),
            "fp8_rel_error": relative_error(exact, scaled_mm().float()),
            "fp8_fast_accum_rel_error": relative_error(exact, scaled_mm(True).float()),
        }
        row["bf16_tflops"] = tflop / (row["bf16_ms"] / 1e3)
        row["scaled_mm_tflops"] = tflop / (row["scaled_mm_ms"] / 1e3)
        rows[name] = {key: round(value, 6 if key.endswith("error") else 4) for key, value in row.items()}
    totals = {key: round(sum(r[key] for r in rows.values()), 4) for key in next(iter(rows.values()))
              if key.endswith("_ms")}
    return {"images": images, "tokens": images * TOKENS_PER_IMAGE, "linears": rows, "per_block_ms": totals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("fp8_matmul_probe: needs CUDA")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "batches": [probe(images, args.iters) for images in (1, 8)]}
    for batch in result["batches"]:
        print(f"images {batch['images']}: per block (ms) " +
              ", ".join(f"{k} {v}" for k, v in batch["per_block_ms"].items()))
        for name, row in batch["linears"].items():
            print(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
