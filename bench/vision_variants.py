"""The opt-in fp8 vision encoder's time per image under variants of how it is compiled and run, on one
service (random full-size V1-1 weights, `quantization: fp8`, blocks compiled as the vision model builds
them), to choose what to build next against the issue's <= 17 ms per image at batch 8 (17.3 measured):

- served: the compiled forward, as the vision model runs it by default;
- multi_kernel: inductor's multi-kernel mode (`triton.multi_kernel=1`), which also generates persistent
  reductions for rows of up to 16K elements and keeps the faster per shape at run time. The per-token
  quantization of fc2's input (12,800 wide) was a looped two-pass reduction: 58.6 us per block, 2.6 of
  the 21.8 ms of kernels of a one-tile forward (bench/results/h100-2026-12-06/vision-step-fp8-dab87f5.json);
- fast_accum: `torch._scaled_mm(..., use_fast_accum=True)`, Hopper's FP8 accumulation without periodic
  promotion (faster, less exact: the table gives the embeddings' relative error against `served`);
- cudnn_attention: scaled_dot_product_attention through cuDNN's kernel instead of flash-attention 2;
- fused_mlp: fc1's bias, the GELU and that quantization in one Triton kernel per row, a custom op that
  inductor calls as it is (kernels/fp8_gelu_mlp.py), instead of inductor's fusion;
- cuda_graphs: the forward replayed from a CUDA graph per batch size (serving/encoder_graphs.py, the
  vision model's opt-in `cuda_graphs`: at one tile the compiled fp8 forward spent 32.8 ms of CPU on 21.8
  ms of kernels);
- all: the five together.

For each: ms per image at batch 8 and at batch 1 (median of --iters, CUDA events, pixels on the device),
the CUDA time of one batch-8 forward by kernel family (torch.profiler), and the relative L2 error of the
embeddings against `served` on the same pixels. A variant that fails says why and the others go on.

    python bench/vision_variants.py --out vision_variants.json [--variants served,multi_kernel] [--iters 10]

Owns: the variants and their table. Does not own: the service (serving/vision.py), the fp8 matmul
(kernels/fp8_linear.py), the encoder (model/vision.py).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch._inductor.config  # noqa: F401 - torch._inductor.config.patch below
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from internvl_serve.kernels.fp8_gelu_mlp import fuse_fp8_gelu_mlps_  # noqa: E402
from internvl_serve.kernels.fp8_linear import relative_error  # noqa: E402
from internvl_serve.random_weights import make_random_checkpoint  # noqa: E402
from internvl_serve.serving.encoder_graphs import EncoderGraphs  # noqa: E402
from internvl_serve.serving.vision import VisionService  # noqa: E402
from internvl_serve.tiny import make_tiny_checkpoint  # noqa: E402
from fp8_matmul_probe import cuda_ms  # noqa: E402 - median CUDA-event time after 3 warm-up calls
from vision_speed import family  # noqa: E402

VARIANTS = {
    "served": (),
    "multi_kernel": ("multi_kernel",),
    "fast_accum": ("fast_accum",),
    "cudnn_attention": ("cudnn_attention",),
    "fused_mlp": ("fused_mlp",),
    "cuda_graphs": ("cuda_graphs",),
    "all": ("multi_kernel", "fast_accum", "cudnn_attention", "fused_mlp", "cuda_graphs"),
}


@contextlib.contextmanager
def variant(changes: tuple[str, ...]):
    """The changes in force while a variant is compiled and run; everything restored after."""
    with contextlib.ExitStack() as stack:
        if "multi_kernel" in changes:
            stack.enter_context(torch._inductor.config.patch({"triton.multi_kernel": 1}))
        if "cudnn_attention" in changes:
            stack.enter_context(sdpa_kernel([SDPBackend.CUDNN_ATTENTION]))
        scaled_mm = torch._scaled_mm
        if "fast_accum" in changes:
            torch._scaled_mm = functools.partial(scaled_mm, use_fast_accum=True)
        try:
            yield
        finally:
            torch._scaled_mm = scaled_mm


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
    layers = service.encoder.vision_model.encoder.layers
    originals = fuse_fp8_gelu_mlps_(layers) if "fused_mlp" in changes else None
    try:
        return measure_variant(service, changes, pixels8, iters, reference)
    finally:
        for layer, original in zip(layers, originals or ()):
            layer.mlp = original


def measure_variant(service: VisionService, changes: tuple[str, ...], pixels8: torch.Tensor, iters: int,
                    reference: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    with variant(changes), torch.inference_mode():
        t0 = time.perf_counter()
        compiled = service._compile_blocks(print)
        for _ in range(2):
            service.encoder(pixels8)  # the batch-8 shape, and multi-kernel's own timing runs
        forward = service.encoder
        if "cuda_graphs" in changes:
            graphs = EncoderGraphs(service.encoder, tuple(pixels8.shape[1:]), service.dtype, service.device)
            graphs.capture()
            forward = graphs.run
        compile_s = time.perf_counter() - t0
        torch.cuda.synchronize()
        out = forward(pixels8).clone()
        row = {
            "changes": list(changes), "compiled": compiled, "compile_s": round(compile_s, 1),
            "b8_ms_per_image": cuda_ms(lambda: forward(pixels8), iters) / 8,
            "b1_ms_per_image": cuda_ms(lambda: forward(pixels8[:1]), iters),
            "b8_cuda_ms_by_family": cuda_ms_by_family(lambda: forward(pixels8)),
            "rel_error_vs_served": None if reference is None else relative_error(reference.float(), out.float()),
        }
    forward = graphs = None
    torch.cuda.empty_cache()
    return row, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)} (served first: the reference)")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    assert torch.cuda.is_available(), "the variants need a CUDA GPU with FP8 tensor cores (H100)"
    work = Path(tempfile.mkdtemp(prefix="vision-variants-"))
    ckpt = make_random_checkpoint(work / "random", tokenizer_from=make_tiny_checkpoint(work / "tiny"))
    t0 = time.perf_counter()
    service = VisionService(ckpt, device="cuda", quantization="fp8", compile="false", cuda_graphs="false")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
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
