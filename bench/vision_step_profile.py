"""Where the vision step's time goes for one new image, in-process (no Triton): the service's whole
embed() against its parts: the tile key, the encoder forward on the GPU, the copy back, the float32 copy.
Random full-size V1-1 weights, the service exactly as the `vision` model builds it (compiled blocks).

    python bench/vision_step_profile.py [--iters 10] [--out vision_step.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from internvl_serve.random_weights import make_random_checkpoint  # noqa: E402
from internvl_serve.serving.vision import VisionService, tile_key  # noqa: E402
from internvl_serve.tiny import make_tiny_checkpoint  # noqa: E402


def wall_ms(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--mmap-large-allocations", action="store_true",
                        help="set the malloc mmap threshold as the vision model's Triton adapter does "
                             "(serving/heap.py): every large host buffer a fresh mapping")
    args = parser.parse_args()
    if args.mmap_large_allocations:
        from internvl_serve.serving.heap import mmap_large_allocations

        assert mmap_large_allocations()
    work = Path(tempfile.mkdtemp(prefix="vision-step-"))
    ckpt = make_random_checkpoint(work / "random", tokenizer_from=make_tiny_checkpoint(work / "tiny"))
    t0 = time.perf_counter()
    service = VisionService(ckpt, device="cuda")
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    tiles = iter([rng.standard_normal((1, 3, 448, 448), dtype=np.float32) for _ in range(4 * args.iters + 8)])
    for _ in range(3):
        service.embed([next(tiles)])  # warm-up
    gpu_pixels = torch.from_numpy(next(tiles)).to("cuda", service.dtype)
    result = {
        "device": torch.cuda.get_device_name(), "load_and_compile_s": load_s, "compiled": service.compiled,
        "mmap_large_allocations": args.mmap_large_allocations,
        "embed_new_tile_ms": wall_ms(lambda: service.embed([next(tiles)]), args.iters),
        "encode_ms (CPU pixels -> CPU bf16 rows)": wall_ms(lambda: service._encode(torch.from_numpy(next(tiles))),
                                                          args.iters),
        "encoder_forward_ms (GPU in, GPU out)": wall_ms(lambda: service.encoder(gpu_pixels), args.iters),
        "tile_key_ms": wall_ms(lambda: tile_key(next(tiles)[0]), args.iters),
    }
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        service.embed([next(tiles)])
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    print(table)
    for k, v in result.items():
        print(f"{k:45s} {v}")
    if args.out:
        args.out.write_text(json.dumps({**result, "profile": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
