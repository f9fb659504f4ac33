"""The speed benchmark: the card's transformers path against the Triton server, at the real V1-1 shapes.

One command on a GPU machine (random bf16 weights drawn on the GPU; nothing of size is carried):

    python bench/benchmark.py --out results/ [--levels 1,8,32,64] [--skip-baseline]

Measures, in one run and on one device:
  * the HBM floor of one decode step: LLM weight bytes read per step / device-to-device copy bandwidth;
  * vision ms per image at batch 1 and 8 (our VisionEncoder, bf16);
  * the baseline: reference.chat sequentially and reference.batch_chat (batch 8) on transformers
    generate, each request one 448 image + a ~30-token question + 256 new tokens (EOS suppressed);
  * the Triton server through gRPC streaming at each concurrency level, the same requests with
    ignore_eos: output tokens/s, time to first token p50/p95, inter-token latency p50/p95;
  * peak GPU memory (nvidia-smi, whole device) and the server's KV-cache report.
Writes results.json and results.md under --out and prints the table last.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from internvl_serve import reference  # noqa: E402
from internvl_serve.checkpoint import load_model  # noqa: E402
from internvl_serve.random_weights import make_random_checkpoint  # noqa: E402
from internvl_serve.tiny import make_tiny_checkpoint  # noqa: E402
from internvl_serve.tokenizer import load_tokenizer  # noqa: E402
from internvl_serve.imageproc import to_pixel_values  # noqa: E402

import loadgen  # noqa: E402

QUESTION = ("Please describe this image in detail: the objects, their colours, where they are, "
            "and what is happening in the scene right now.")   # ~30 tokens
NEW_TOKENS = 256


def test_image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def cuda_time_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy, bytes read + written per second (GB/s), median of repeats."""
    n = 2 * 1024 ** 3 // 2
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = cuda_time_ms(lambda: b.copy_(a), warmup=3, iters=20)
    del a, b
    return 2 * n * 2 / (ms / 1e3) / 1e9


class GpuMemoryPoller:
    """Peak device memory in use (MiB) from nvidia-smi, polled in a thread (covers every process)."""

    def __init__(self, period_s: float = 0.5):
        self.period_s, self.peak_mib, self._stop = period_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                self.peak_mib = max(self.peak_mib, max(int(x) for x in out.split()))
            except Exception:  # noqa: BLE001 - a missing reading must not stop the benchmark
                pass
            self._stop.wait(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_baseline(ckpt: Path, results: dict, sequential_requests: int, batch: int) -> None:
    model = load_model(ckpt, dtype=torch.bfloat16, device="cuda", progress=False)
    tokenizer = load_tokenizer(ckpt)
    llm_bytes = sum(p.numel() * p.element_size() for n, p in model.language_model.named_parameters()
                    if "embed_tokens" not in n)
    results["llm_weight_bytes_per_step"] = llm_bytes
    pix1 = torch.from_numpy(to_pixel_values([test_image(0)])).to("cuda", torch.bfloat16)
    pix8 = torch.from_numpy(to_pixel_values([test_image(i) for i in range(8)])).to("cuda", torch.bfloat16)
    with torch.inference_mode():
        results["vision_ms_per_image_b1"] = cuda_time_ms(lambda: model.extract_feature(pix1))
        results["vision_ms_per_image_b8"] = cuda_time_ms(lambda: model.extract_feature(pix8)) / 8
    config = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    reference.chat(model, tokenizer, pix1, QUESTION, dict(config, max_new_tokens=8, min_new_tokens=8))  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = 0
    for _ in range(sequential_requests):
        answer = reference.chat(model, tokenizer, pix1, QUESTION, config)
        tokens += NEW_TOKENS
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    results["baseline_sequential"] = {"requests": sequential_requests, "output_tok_per_s": tokens / wall,
                                      "s_per_request": wall / sequential_requests, "sample_answer_chars": len(answer)}
    t0 = time.perf_counter()
    reference.batch_chat(model, tokenizer, pix8[:batch], [QUESTION] * batch, config, num_patches_list=[1] * batch)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    results["baseline_batch_chat"] = {"batch": batch, "output_tok_per_s": batch * NEW_TOKENS / wall, "wall_s": wall}
    results["baseline_peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    del model
    gc.collect()
    torch.cuda.empty_cache()


def run_server(ckpt: Path, results: dict, levels: list[int], requests_per_stream: int, log_dir: Path) -> None:
    from internvl_serve.serving.launcher import TritonServer

    image = png_bytes(test_image(0))
    results["server"] = []
    with GpuMemoryPoller() as mem:
        t0 = time.perf_counter()
        with TritonServer(ckpt, ready_timeout_s=900, log_file=log_dir / "tritonserver.log",
                          tritonserver=os.environ.get("TRITONSERVER"),
                          backend_directory=os.environ.get("TRITON_BACKENDS")) as server:
            results["server_start_s"] = time.perf_counter() - t0
            url = server.grpc_url
            asyncio.run(loadgen.run_level(url, 1, 1, QUESTION, image, 16))   # warm-up
            for level in levels:
                n = max(level * requests_per_stream, 2)
                row = asyncio.run(loadgen.run_level(url, level, n, QUESTION, image, NEW_TOKENS))
                print(json.dumps(row), flush=True)
                results["server"].append(row)
        results["server_peak_gpu_mib"] = mem.peak_mib


def markdown(results: dict) -> str:
    floor_ms = results["hbm_floor_ms"]
    seq = results.get("baseline_sequential", {})
    lines = [
        f"Device: {results['device']}; date {results['date']}; commit {results['commit']}.",
        f"HBM floor of one decode step: {results['llm_weight_bytes_per_step'] / 1e9:.2f} GB of LLM weights / "
        f"{results['copy_bandwidth_gbs']:.0f} GB/s copy bandwidth = {floor_ms:.2f} ms.",
        f"Vision (bf16, our encoder): {results.get('vision_ms_per_image_b1', float('nan')):.1f} ms/image at batch 1, "
        f"{results.get('vision_ms_per_image_b8', float('nan')):.1f} ms/image at batch 8.",
        "",
        "| path | streams | output tok/s | TTFT p50 / p95 ms | ITL p50 / p95 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    if seq:
        lines.append(f"| transformers chat, sequential | 1 | {seq['output_tok_per_s']:.1f} | | "
                     f"{1e3 / seq['output_tok_per_s']:.1f} (mean) | 0 |")
    if "baseline_batch_chat" in results:
        b = results["baseline_batch_chat"]
        lines.append(f"| transformers batch_chat | {b['batch']} | {b['output_tok_per_s']:.1f} | | | 0 |")
    for row in results.get("server", []):
        lines.append(f"| Triton server (gRPC stream) | {row['concurrency']} | {row['output_tok_per_s']:.1f} | "
                     f"{row['ttft_p50_ms']:.0f} / {row['ttft_p95_ms']:.0f} | "
                     f"{row['itl_p50_ms']:.1f} / {row['itl_p95_ms']:.1f} | {row['errors']} |")
    lines += ["", f"Peak GPU memory: baseline {results.get('baseline_peak_gpu_mib', float('nan')):.0f} MiB "
                  f"(torch), server {results.get('server_peak_gpu_mib', float('nan')):.0f} MiB (nvidia-smi, device)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/internvl-bench"))
    parser.add_argument("--levels", default="1,8,32,64")
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--sequential-requests", type=int, default=2)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-server", action="store_true")
    args = parser.parse_args(argv)
    assert torch.cuda.is_available(), "the benchmark needs a CUDA GPU"
    args.out.mkdir(parents=True, exist_ok=True)
    tiny = make_tiny_checkpoint(args.work / "tiny")
    ckpt = make_random_checkpoint(args.work / "v1-1-random", tokenizer_from=tiny)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip() or os.environ.get("BENCH_COMMIT", "unknown")
    results = {"device": torch.cuda.get_device_name(), "date": dt.date.today().isoformat(), "commit": commit,
               "new_tokens": NEW_TOKENS, "question": QUESTION}
    results["copy_bandwidth_gbs"] = copy_bandwidth_gbs()
    if not args.skip_baseline:
        run_baseline(ckpt, results, args.sequential_requests, batch=8)
    else:
        results["llm_weight_bytes_per_step"] = 2 * (40 * (4 * 5120 * 5120 + 3 * 5120 * 13824) + 41840 * 5120 + 2 * 5120)
    results["hbm_floor_ms"] = results["llm_weight_bytes_per_step"] / (results["copy_bandwidth_gbs"] * 1e9) * 1e3
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    if not args.skip_server:
        run_server(ckpt, results, [int(x) for x in args.levels.split(",")], args.requests_per_stream, args.out)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
