"""Where the vision step's time goes for one new image, in-process (no Triton): the service's whole
embed() (as the adapter calls it: reuse_output) against its parts: the tile key, the encoder forward on
the GPU; and the minor page faults per embed() (median; getrusage), which the malloc setting the adapter
makes (--mmap-large-allocations, serving/heap.py) turns into a fresh mapping per large host buffer unless
the service reuses its buffers (internvl_serve/hostbuf.py). Random full-size V1-1 weights, the service exactly
as the `vision` model builds it (compiled blocks).

    python bench/vision_step_profile.py [--iters 10] [--mmap-large-allocations] [--quantization fp8] [--host-threads 1]
                                        [--out vision_step.json]
    python bench/vision_step_profile.py --tiny [--mmap-large-allocations]   # CPU, tiny checkpoint: faults only
"""
from __future__ import annotations

import argparse
import json
import resource
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


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def wall_ms(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def minor_faults(fn, iters: int) -> int:
    """Median minor page faults of the whole process per call (a 4 KiB page faulted in: one fault)."""
    counts = []
    for _ in range(iters):
        sync()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        sync()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return int(statistics.median(counts))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--mmap-large-allocations", action="store_true",
                        help="set the malloc mmap threshold as the vision model's Triton adapter does "
                             "(serving/heap.py): every large host buffer a fresh mapping")
    parser.add_argument("--quantization", default="", choices=["", "fp8"],
                        help="the vision model's `quantization` parameter (fp8: the blocks' matmuls in e4m3)")
    parser.add_argument("--host-threads", type=int, default=None,
                        help="the vision model's `host_threads` parameter (torch's CPU threads; default: torch's)")
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny checkpoint on the CPU (no GPU needed): the page faults of the service's "
                             "host buffers; its times say nothing about the GPU")
    args = parser.parse_args()
    if args.mmap_large_allocations:
        from internvl_serve.serving.heap import mmap_large_allocations

        assert mmap_large_allocations()
    work = Path(tempfile.mkdtemp(prefix="vision-step-"))
    tiny = make_tiny_checkpoint(work / "tiny")
    device = "cpu" if args.tiny else "cuda"
    ckpt = tiny if args.tiny else make_random_checkpoint(work / "random", tokenizer_from=tiny)
    np.core.multiarray._set_madvise_hugepage(False)  # numpy's big arrays in 4 KiB pages, as torch's: faults count pages
    t0 = time.perf_counter()
    service = VisionService(ckpt, device=device, quantization=args.quantization, host_threads=args.host_threads)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    tiles = iter([rng.standard_normal((1, 3, 448, 448), dtype=np.float32) for _ in range(8 * args.iters + 8)])
    for _ in range(3):
        service.embed([next(tiles)], reuse_output=True)  # warm-up
    gpu_pixels = torch.from_numpy(next(tiles)).to(device, service.dtype)
    gpu_pixels8 = gpu_pixels.expand(8, -1, -1, -1).contiguous()
    new_tile = lambda: service.embed([next(tiles)], reuse_output=True)  # noqa: E731 - as the adapter calls it
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (tiny checkpoint)",
        "load_and_compile_s": load_s, "compiled": service.compiled,
        "mmap_large_allocations": args.mmap_large_allocations, "quantization": args.quantization or "none",
        "host_threads": torch.get_num_threads(),
        "embed_new_tile_ms": wall_ms(new_tile, args.iters),
        "embed_new_tile_minor_faults": minor_faults(new_tile, args.iters),
        "embed_new_tile_owned_output_minor_faults": minor_faults(lambda: service.embed([next(tiles)]), args.iters),
        "encoder_forward_ms (device in, device out)": wall_ms(lambda: service.encoder(gpu_pixels), args.iters),
        "encoder_forward_b8_ms_per_image": wall_ms(lambda: service.encoder(gpu_pixels8), args.iters) / 8,
        "encoder_forward_minor_faults": minor_faults(lambda: service.encoder(gpu_pixels), args.iters),
        "host_buffer_pages (pixels in + float32 out)": (3 * 448 * 448 + service.num_image_token *
                                                       service.hidden_size) * 4 // 4096,
        "tile_key_ms": wall_ms(lambda: tile_key(next(tiles)[0]), args.iters),
    }
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda"
                                                          else [])
    with torch.profiler.profile(activities=activities) as prof:
        new_tile()
        sync()
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    print(table)
    for k, v in result.items():
        print(f"{k:45s} {v}")
    if args.out:
        args.out.write_text(json.dumps({**result, "profile": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
