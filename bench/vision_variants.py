"""The vision encoder's time per image under variants of how it is compiled and run, on one service
(random full-size V1-1 weights, `quantization: fp8` or the model dtype, blocks compiled as the vision
model builds them), to choose what to serve against the issue's <= 17 ms per image at batch 8:

- served: the compiled forward, as the vision model runs it (fp8: torch._scaled_mm with fast
  accumulation, serving/vision.py VISION_FP8_FAST_ACCUM);
- multi_kernel: the blocks compiled in inductor's multi-kernel mode (`triton.multi_kernel=1`), which also
  generates a persistent (one-pass) version of each reduction up to 16K wide and keeps the faster per
  shape at run time. Run it after `served`: as the first compile of a fresh process it raised inside
  inductor (torch 2.11: "TypeError: 'NoneType' object does not support the context manager protocol") and
  the blocks ran eagerly (28 ms per image against 16.4, H100, bench/results/h100-2026-12-06/937e289/),
  which is why it is not served, though 1.1 ms per image faster at batch 8 where it compiled;
- exact_accum (fp8 only): torch._scaled_mm without fast accumulation (Hopper's FP8 accumulation with
  periodic promotion; what was served before 2026-12-06). bench/fp8_matmul_probe.py gives each linear's
  error both ways.

Measured on an H100 (2026-12-06) and dropped since: cuDNN attention (no change), CUDA graphs of the
forward per batch (batch 8 no change, batch 1 -0.6 ms, TTFT unchanged in the server), a fused
bias + GELU + quantize kernel for fc1 (no change in the sum of kernel time); the results are in
bench/results/h100-2026-12-06/7077baf/.

For each: ms per image at batch 8 and at batch 1 (median of --iters, CUDA events, pixels on the device),
the CUDA time of one batch-8 forward by kernel family (torch.profiler), whether the blocks compiled, and
the relative L2 error of the embeddings against `served` on the same pixels (with random weights, any
change of summation order moves them by a few per cent after 45 blocks: compare variants with each
other, not with zero). A variant that fails says why and the others go on.

    python bench/vision_variants.py --out vision_variants.json [--quantization fp8|none] [--iters 10]

Owns: the variants and their table. Does not own: the service (serving/vision.py), the fp8 matmul
(kernels/fp8_linear.py), the encoder (model/vision.py).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from unittest import mock

import torch
import torch._inductor.config  # noqa: F401 - torch._inductor.config.patch below

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from internvl_serve.kernels.fp8_linear import relative_error  # noqa: E402
from internvl_serve.random_weights import make_random_checkpoint  # noqa: E402
from internvl_serve.serving.vision import VisionService  # noqa: E402
from internvl_serve.tiny import make_tiny_checkpoint  # noqa: E402
from fp8_matmul_probe import cuda_ms  # noqa: E402 - median CUDA-event time after 3 warm-up calls
from vision_speed import family  # noqa: E402

VARIANTS = {
    "served": (),
    "multi_kernel": ("multi_kernel",),
    "exact_accum": ("exact_accum",),
}


@contextlib.contextmanager
def variant(changes: tuple[str, ...]):
    """The changes in force while a variant is compiled and run; everything restored after."""
    with contextlib.ExitStack() as stack:
        if "multi_kernel" in changes:
            stack.enter_context(torch._inductor.config.patch({"triton.multi_kernel": 1}))
        if "exact_accum" in changes:
            scaled_mm = torch._scaled_mm
            stack.enter_context(mock.patch.object(
                torch, "_scaled_mm", lambda *args, **kw: scaled_mm(*args, **{**kw, "use_fast_accum": False})))
        yield


def cuda_ms_by_family(fn) -> dict[str, float]:
    """CUDA time of one fn() by kernel family (vision_speed.family), in ms."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    by = defaultdict(float)
    for e in prof.key_averages():
        if e.self_device_time_total > 0:
            by[family(e.key)] += e.self_device_time_total / 1e3
    return dict(sorted(by.items()))


def run_variant(service: VisionService, changes: tuple[str, ...], pixels8: torch.Tensor, iters: int,
                reference: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    torch._dynamo.reset()  # compile again under this variant's settings
    with variant(changes), torch.inference_mode():
        t0 = time.perf_counter()
        compiled = service._compile_blocks(print)
        for _ in range(2):
            service.encoder(pixels8)  # the batch-8 shape, and multi-kernel's own timing runs
        compile_s = time.perf_counter() - t0
        torch.cuda.synchronize()
        forward = service.encoder
        out = forward(pixels8).clone()
        row = {
            "changes": list(changes), "compiled": compiled, "compile_s": round(compile_s, 1),
            "b8_ms_per_image": cuda_ms(lambda: forward(pixels8), iters) / 8,
            "b1_ms_per_image": cuda_ms(lambda: forward(pixels8[:1]), iters),
            "b8_cuda_ms_by_family": cuda_ms_by_family(lambda: forward(pixels8)),
            "rel_error_vs_served": None if reference is None else relative_error(reference.float(), out.float()),
        }
    torch.cuda.empty_cache()
    return row, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)} (served first: the reference)")
    parser.add_argument("--quantization", choices=("fp8", "none"), default="fp8")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if args.quantization != "fp8" and "exact_accum" in names:
        parser.error("exact_accum is a variant of the fp8 encoder (--quantization fp8)")
    assert torch.cuda.is_available(), "the variants need a CUDA GPU (with FP8 tensor cores for fp8: H100)"
    work = Path(tempfile.mkdtemp(prefix="vision-variants-"))
    ckpt = make_random_checkpoint(work / "random", tokenizer_from=make_tiny_checkpoint(work / "tiny"))
    t0 = time.perf_counter()
    quantization = "" if args.quantization == "none" else args.quantization
    service = VisionService(ckpt, device="cuda", quantization=quantization, compile="false")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "quantization": args.quantization,
              "load_s": round(time.perf_counter() - t0, 1), "iters": args.iters, "variants": {}}
    pixels8 = torch.randn(8, 3, 448, 448, generator=torch.Generator().manual_seed(0)).to("cuda", service.dtype)
    reference = None
    for name in names:
        try:
            row, out = run_variant(service, VARIANTS[name], pixels8, args.iters, reference)
        except Exception as e:  # noqa: BLE001 - report it, run the rest
            row, out = {"changes": list(VARIANTS[name]), "error": f"{type(e).__name__}: {e}"[:500]}, None
        if name == "served" and out is not None:
            reference = out
        result["variants"][name] = row
        print(name, json.dumps(row), flush=True)
    print(f"\n{'variant':16s} {'b8 ms/img':>9s} {'b1 ms':>7s} {'rel err':>8s}  "
          "CUDA ms of one batch-8 forward by family")
    for name, row in result["variants"].items():
        if "error" in row:
            print(f"{name:16s} {row['error']}")
            continue
        err = "" if row["rel_error_vs_served"] is None else f"{row['rel_error_vs_served']:.4f}"
        fams = ", ".join(f"{k} {v:.1f}" for k, v in row["b8_cuda_ms_by_family"].items())
        print(f"{name:16s} {row['b8_ms_per_image']:9.2f} {row['b1_ms_per_image']:7.2f} {err:>8s}  {fams}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
