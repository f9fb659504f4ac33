"""Vision encoder speed at the real V1-1 shapes (random bf16 weights, made on the GPU): eager against
torch.compile of each encoder block, at batch 1 and 8, and where the eager time goes (CUDA time by
kernel family from torch.profiler). Writes vision_speed.json and prints a small table.

    python bench/vision_speed.py --out DIR
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from internvl_serve.checkpoint import load_model  # noqa: E402
from internvl_serve.model.vision import InternRMSNorm  # noqa: E402
from internvl_serve.random_weights import make_random_checkpoint  # noqa: E402
from internvl_serve.tiny import make_tiny_checkpoint  # noqa: E402


def cuda_ms(fn, warmup=3, iters=10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def family(name: str) -> str:
    n = name.lower()
    if "gemm" in n or "cutlass" in n or "sm90" in n or "matmul" in n or "cublas" in n or "nvjet" in n:
        return "matmul"
    if "flash" in n or "fmha" in n or "attention" in n or "mem_eff" in n:
        return "attention"
    if "triton" in n:
        return "fused (triton)"
    return "elementwise/other"


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("/tmp"))
    p.add_argument("--work", type=Path, default=Path("/tmp/internvl-vision"))
    args = p.parse_args(argv)
    tiny = make_tiny_checkpoint(args.work / "tiny", fmt="bin", seed=0)
    ckpt = make_random_checkpoint(args.work / "random", tokenizer_from=tiny)
    model = load_model(ckpt, dtype=torch.bfloat16, device="cuda", parts=("vision",), trim_vision_layers=True,
                       progress=False)
    results = {"device": torch.cuda.get_device_name()}
    pix = {b: torch.randn(b, 3, 448, 448, device="cuda", dtype=torch.bfloat16) for b in (1, 8)}
    with torch.inference_mode():
        model.float()                                   # the fp32 answer, to judge each bf16 variant
        ref32 = model(pix[1].float()).float()
        model.bfloat16()                                # (bf16 -> fp32 -> bf16 is exact)

        def err(out):
            return float((out.float() - ref32).norm() / ref32.norm())

        for b in (1, 8):
            results[f"eager_ms_per_image_b{b}"] = cuda_ms(lambda: model(pix[b])) / b
        results["eager_rel_err_vs_fp32_b1"] = err(model(pix[1]))
        original = InternRMSNorm.forward

        def fused(self, x):  # the same math through one fused kernel
            return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

        InternRMSNorm.forward = fused
        for b in (1, 8):
            results[f"fused_norm_ms_per_image_b{b}"] = cuda_ms(lambda: model(pix[b])) / b
        results["fused_norm_rel_err_vs_fp32_b1"] = err(model(pix[1]))
        InternRMSNorm.forward = original
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model(pix[8])
            torch.cuda.synchronize()
        by = defaultdict(float)
        for e in prof.key_averages():
            by[family(e.key)] += e.self_device_time_total / 1000.0
        results["eager_b8_cuda_ms_by_family"] = dict(by)
        ref = model(pix[8]).float()
        t0 = time.perf_counter()
        for layer in model.vision_model.encoder.layers:
            layer.compile()
        out = model(pix[8]).float()
        results["compile_first_call_s"] = time.perf_counter() - t0
        results["compiled_max_abs_diff_b8"] = float((out - ref).abs().max())
        results["compiled_rel_err_b8"] = float((out - ref).norm() / ref.norm())
        for b in (1, 8):
            results[f"compiled_ms_per_image_b{b}"] = cuda_ms(lambda: model(pix[b])) / b
        results["compiled_rel_err_vs_fp32_b1"] = err(model(pix[1]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vision_speed.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
