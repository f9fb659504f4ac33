"""The speed benchmark: the card's transformers path against the Triton server, at the real V1-1 shapes.

One command on a GPU machine (random bf16 weights drawn on the GPU; nothing of size is carried):

    python bench/benchmark.py --out results/ [--levels 1,8,32,64] [--skip-baseline] [--int8] \
        [--engine-alone-compare async_scheduling=false] [--warm-levels 1,32] [--arrival-rates 1,2,4]
    python bench/benchmark.py --markdown-only --out bench/results      # rewrite results.md from results.json

Measures, in one run and on one device:
  * the HBM floor of one decode step: LLM weight bytes read per step / device-to-device copy bandwidth;
  * vision ms per image at batch 1 and 8 (our VisionEncoder, bf16);
  * the baseline: reference.chat sequentially and reference.batch_chat (batch 8) on transformers
    generate, each request one 448 image + a ~30-token question + 256 new tokens (EOS suppressed);
  * the llm service alone (engine_alone.py: in-process, no Triton, its own random image rows per
    request) at each level, and a per-step breakdown (wall vs GPU busy, torch.profiler) at
    --profile-levels; --engine-alone-compare KEY=VALUE adds the same rows with one llm parameter changed;
  * the Triton server through gRPC streaming at each concurrency level, the same requests with
    ignore_eos: output tokens/s, time to first token p50/p95, inter-token latency p50/p95;
  * peak GPU memory (nvidia-smi, whole device) and the server's KV-cache report;
  * after the last level, the llm's `internvl_kv_cache_blocks_used` gauge (Prometheus, the server's
    metrics port), polled until it reads 0 or --kv-free-timeout-s passes: every KV block must be free
    again after the run ("not available" when the server does not export it);
  * with --int8, the server again with the llm's `quantization` parameter "int8" (a copy of the model
    repository with that one value changed) at --int8-levels (default 1 stream).
Every request sends its own image (nothing cached, as real traffic); --warm-levels adds rows, on the
same server after those, where every request sends the same image (the vision embedding cache and the
KV prefix cache hit: the warm-cache case), as a second table. --arrival-rates adds the open loop on the
same server after the closed-loop levels (openloop.py): requests arrive by a seeded Poisson process at
each rate, each with its own new image, whatever the server is doing (--arrival-requests per rate, or
--arrival-duration-s; no cap on requests in flight unless --arrival-max-in-flight), in results.json's
`open_loop` section and its own table. The speed issue's TTFT targets stay those of the closed loop.
With --merge and --levels "" (and --skip-baseline --skip-engine-alone) a run adds only the open loop.
Writes results.json and results.md (the table, then the speed issue's targets beside the measured values)
under --out and prints the tables last.
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
sys.path.insert(0, str(ROOT / "loadtest"))

from internvl_serve import reference  # noqa: E402
from internvl_serve.checkpoint import load_model  # noqa: E402
from internvl_serve.random_weights import make_random_checkpoint  # noqa: E402
from internvl_serve.tiny import make_tiny_checkpoint  # noqa: E402
from internvl_serve.tokenizer import load_tokenizer  # noqa: E402
from internvl_serve.imageproc import to_pixel_values  # noqa: E402
from internvl_serve.kernels.fp8_linear import relative_error  # noqa: E402
from internvl_serve.serving.vision import quantize_vision_fp8_  # noqa: E402

import loadgen  # noqa: E402
import openloop  # noqa: E402
from servermetrics import kv_blocks_after_run  # noqa: E402


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
    # The card's path at its best: the official code picks flash_attention_2 when flash-attn is installed
    # and 'eager' otherwise; our reference builds transformers' LLaMA with 'sdpa'. Both are timed (the
    # attention implementation is read from the config at every forward) and the faster is the baseline.
    import transformers

    results["transformers_version"] = transformers.__version__
    by_attn = {}
    llm_config = model.language_model.config
    for attn in ("sdpa", "eager"):
        llm_config._attn_implementation = attn
        reference.chat(model, tokenizer, pix1, QUESTION, dict(config, max_new_tokens=8, min_new_tokens=8))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens = 0
        for _ in range(sequential_requests):
            answer = reference.chat(model, tokenizer, pix1, QUESTION, config)
            tokens += NEW_TOKENS
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        by_attn[attn] = {"requests": sequential_requests, "output_tok_per_s": tokens / wall, "attention": attn,
                         "s_per_request": wall / sequential_requests, "sample_answer_chars": len(answer)}
        print(json.dumps({"baseline_sequential": by_attn[attn]}), flush=True)
    llm_config._attn_implementation = "sdpa"
    results["baseline_sequential_by_attention"] = by_attn
    results["baseline_sequential"] = max(by_attn.values(), key=lambda r: r["output_tok_per_s"])
    t0 = time.perf_counter()
    reference.batch_chat(model, tokenizer, pix8[:batch], [QUESTION] * batch, config, num_patches_list=[1] * batch)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    results["baseline_batch_chat"] = {"batch": batch, "output_tok_per_s": batch * NEW_TOKENS / wall, "wall_s": wall}
    results["baseline_peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    # the server's encoder: each ViT block torch.compiled (VisionService, compile=auto on CUDA); timed
    # after the baseline so that the baseline runs the card's eager model
    with torch.inference_mode():
        for layer in model.vision_model.encoder.layers:
            layer.compile()
        for batch in (1, 3):
            model.extract_feature(pix8[:batch])
        results["vision_compiled_ms_per_image_b1"] = cuda_time_ms(lambda: model.extract_feature(pix1))
        results["vision_compiled_ms_per_image_b8"] = cuda_time_ms(lambda: model.extract_feature(pix8)) / 8
        # the vision model's opt-in `quantization: fp8` (serving/vision.py): the blocks' matmuls in e4m3
        bf16_out = model.extract_feature(pix8)
        quantize_vision_fp8_(model)
        for batch in (1, 3):
            model.extract_feature(pix8[:batch])
        results["vision_fp8_relative_error_b8"] = relative_error(bf16_out, model.extract_feature(pix8))
        results["vision_fp8_compiled_ms_per_image_b1"] = cuda_time_ms(lambda: model.extract_feature(pix1))
        results["vision_fp8_compiled_ms_per_image_b8"] = cuda_time_ms(lambda: model.extract_feature(pix8)) / 8
    del model
    gc.collect()
    torch.cuda.empty_cache()


def level_images(level: int, n: int) -> list[bytes]:
    """n distinct PNGs for one level (seeds never shared between levels or with the warm-up)."""
    return [png_bytes(test_image(1_000_000 + 10_000 * level + i)) for i in range(n)]


def open_loop_images(k: int, n: int) -> list[bytes]:
    """n distinct PNGs for the k-th open-loop rate (seeds apart from level_images' and each other's)."""
    return [png_bytes(test_image(5_000_000 + 100_000 * k + i)) for i in range(n)]


def run_server(ckpt: Path, results: dict, levels: list[int], requests_per_stream: int, log_dir: Path,
               *, key: str = "server", distinct_images: bool = True, warm_levels: list[int] = (),
               kv_free_timeout_s: float = 30.0, layout=None, open_loop: dict | None = None) -> None:
    """open_loop: openloop.run_rates' keyword arguments (rates, num_requests or duration_s, seed,
    max_in_flight), run after the closed-loop levels into results["open_loop"]."""
    from internvl_serve.serving.launcher import TritonServer

    image = png_bytes(test_image(0))
    log_file = log_dir / ("tritonserver.log" if key == "server" else f"tritonserver-{key}.log")
    if levels or key not in results:  # --levels "" with --merge keeps the closed-loop rows of before
        results[key] = []
    with GpuMemoryPoller() as mem:
        t0 = time.perf_counter()
        with TritonServer(ckpt, ready_timeout_s=900, log_file=log_file, layout=layout,
                          tritonserver=os.environ.get("TRITONSERVER"),
                          backend_directory=os.environ.get("TRITON_BACKENDS")) as server:
            results[f"{key}_start_s"] = time.perf_counter() - t0
            url = server.grpc_url
            asyncio.run(loadgen.run_level(url, 1, 1, QUESTION, image, 16))   # warm-up
            for level in levels:
                n = max(level * requests_per_stream, 2)
                images = level_images(level, n) if distinct_images else image
                row = asyncio.run(loadgen.run_level(url, level, n, QUESTION, images, NEW_TOKENS))
                print(json.dumps(row), flush=True)
                results[key].append(row)
            if open_loop:
                results["open_loop"] = openloop.run_rates(url, question=QUESTION, images_for=open_loop_images,
                                                          max_tokens=NEW_TOKENS, **open_loop)
            if warm_levels:  # the same image for every request: vision cache and KV prefix cache hit
                results[f"{key}_warm"] = []
                asyncio.run(loadgen.run_level(url, 1, 1, QUESTION, image, 16))
                for level in warm_levels:
                    row = asyncio.run(loadgen.run_level(url, level, max(level * requests_per_stream, 2),
                                                        QUESTION, image, NEW_TOKENS))
                    print(json.dumps({"warm": True, **row}), flush=True)
                    results[f"{key}_warm"].append(row)
            # every request has finished: each KV block must be free again
            results[f"{key}_after"] = kv_blocks_after_run(server.metrics_url, kv_free_timeout_s)
            print(json.dumps(results[f"{key}_after"]), flush=True)
        results[f"{key}_peak_gpu_mib"] = max(mem.peak_mib, results.get(f"{key}_peak_gpu_mib") or 0)


def run_engine_alone(ckpt: Path, results: dict, levels: list[int], requests_per_stream: int, out_dir: Path,
                     *, options: tuple[str, ...] = (), profile_levels: list[int] = ()) -> None:
    """engine_alone.py in a subprocess (all its GPU memory is returned when it exits); its rows go to
    results["engine_alone"] (default llm parameters) or results["engine_alone[k=v,...]"]."""
    key = "engine_alone" + (f"[{','.join(options)}]" if options else "")
    out = out_dir / (key.replace("[", "-").replace("]", "").replace(",", "-").replace("=", "_") + ".json")
    cmd = [sys.executable, str(ROOT / "bench" / "engine_alone.py"), "--checkpoint", str(ckpt), "--out", str(out),
           "--levels", ",".join(map(str, levels)), "--requests-per-stream", str(requests_per_stream),
           "--new-tokens", str(NEW_TOKENS), "--question", QUESTION,
           "--profile-levels", ",".join(map(str, profile_levels))]
    for option in options:
        cmd += ["--engine-option", option]
    proc = subprocess.run(cmd, text=True)
    if proc.returncode != 0 or not out.exists():
        results[key] = {"error": f"engine_alone.py exited {proc.returncode}"}
        return
    results[key] = json.loads(out.read_text())


def _engine_alone_keys(results: dict) -> list[str]:
    return [k for k in results if k.startswith("engine_alone") and isinstance(results[k], dict)]


LAYOUT_LABELS = {"tp2": "Triton server, tensor parallel over 2 GPUs", "tp4": "Triton server, tensor parallel over 4 GPUs",
                 "dp2": "Triton server, data parallel on 2 GPUs", "dp4": "Triton server, data parallel on 4 GPUs"}


def layout_named(name: str):
    """tp2 / tp4: one LLM split over GPUs 0..N-1; dp2 / dp4: one vision + llm instance per GPU."""
    from internvl_serve.serving.layout import Layout

    n = int(name[2:])
    return Layout(gpus=tuple(range(n)), tensor_parallel_size=n if name.startswith("tp") else 1)


def int8_weight_bytes_per_step(bf16_bytes: int, llm: dict | None = None) -> int:
    """The bf16 step's bytes with the seven projections int8 (1 byte per weight + a float32 scale per
    output channel), at the V1-1 LLaMA shapes."""
    from internvl_serve.random_weights import V1_1_SHEET_CONFIG

    c = llm or V1_1_SHEET_CONFIG["llm_config"]
    h, f, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    weights = n * (4 * h * h + 3 * h * f)
    scales = n * (5 * h + 2 * f)
    return bf16_bytes - 2 * weights + weights + 4 * scales


def _server_row(results: dict, key: str, streams: int) -> dict | None:
    return next((r for r in results.get(key, []) if r["concurrency"] == streams), None)


def targets(results: dict) -> list[dict]:
    """The speed issue's targets beside the measured values: name, goal, measured, status, gap."""
    floor = results.get("hbm_floor_ms")
    seq = results.get("baseline_sequential", {}).get("output_tok_per_s")
    rows = []

    def add(name, goal, value, limit, kind, unit="", fmt="{:.1f}"):
        if value is None or limit is None or value != value:
            rows.append({"target": name, "goal": goal, "measured": "not measured", "status": "n/a", "gap": ""})
            return
        met = value <= limit if kind == "max" else value >= limit
        factor = value / limit if kind == "max" else limit / value
        gap = "" if met else (f"{factor:.2f}x over ({100 * (factor - 1):.0f}% above the goal)" if kind == "max"
                              else f"{factor:.2f}x short (reaches {100 / factor:.0f}% of the goal)")
        rows.append({"target": name, "goal": goal, "measured": fmt.format(value) + unit,
                     "status": "met" if met else "missed", "gap": gap, "value": value, "limit": limit})

    for key, label in (("server", ""), ("server_int8", " (int8 weights)")):
        if key != "server" and key not in results:
            continue
        one = _server_row(results, key, 1)
        itl = one["itl_p50_ms"] if one else None
        goal = f"<= 1.2x the bf16 HBM floor ({1.2 * floor:.2f} ms)" if floor else "<= 1.2x the HBM floor"
        add(f"ITL p50 at 1 stream{label}", goal, itl, 1.2 * floor if floor else None, "max",
            " ms" + (f" = {itl / floor:.2f}x the floor" if itl and floor else ""))
        add(f"TTFT p50 at 1 stream{label}", "<= 80 ms", one["ttft_p50_ms"] if one else None, 80.0, "max", " ms",
            "{:.0f}")
    r32 = _server_row(results, "server", 32)
    r64 = _server_row(results, "server", 64)
    add("output tok/s at 32 streams", ">= 2000 tok/s", r32["output_tok_per_s"] if r32 else None, 2000.0, "min",
        " tok/s")
    add("output tok/s at 64 streams", ">= 2800 tok/s", r64["output_tok_per_s"] if r64 else None, 2800.0, "min",
        " tok/s")
    add("speed-up at 32 streams over sequential transformers chat", ">= 60x",
        r32["output_tok_per_s"] / seq if r32 and seq else None, 60.0, "min", "x")
    add("ITL p50 at 32 streams", "<= 20 ms", r32["itl_p50_ms"] if r32 else None, 20.0, "max", " ms")
    add("TTFT p50 at 32 streams", "<= 300 ms", r32["ttft_p50_ms"] if r32 else None, 300.0, "max", " ms", "{:.0f}")
    add("TTFT p95 at 32 streams", "<= 800 ms", r32["ttft_p95_ms"] if r32 else None, 800.0, "max", " ms", "{:.0f}")
    alone = results.get("engine_alone", {})
    a32 = next((r for r in alone.get("levels", []) if r["concurrency"] == 32), None) if "levels" in alone else None
    add("the server within 15 % of the engine alone at 32 streams", ">= 0.85x the engine alone",
        r32["output_tok_per_s"] / a32["output_tok_per_s"] if r32 and a32 else None, 0.85, "min", "x", "{:.2f}")
    add("vision ms/image at batch 8 (eager)", "<= 17 ms", results.get("vision_ms_per_image_b8"), 17.0, "max", " ms")
    if "vision_compiled_ms_per_image_b8" in results:
        add("vision ms/image at batch 8 (compiled blocks, as served)", "<= 17 ms",
            results["vision_compiled_ms_per_image_b8"], 17.0, "max", " ms")
    if "vision_fp8_compiled_ms_per_image_b8" in results:
        add("vision ms/image at batch 8 (fp8 matmuls, compiled; opt-in)", "<= 17 ms",
            results["vision_fp8_compiled_ms_per_image_b8"], 17.0, "max", " ms")
    after = results.get("server_after", {})
    kv = after.get("kv_blocks_used_after")
    if r64 is None:
        rows.append({"target": "64 streams", "goal": "no error, no OOM; every KV block free after the run",
                     "measured": "not measured", "status": "n/a", "gap": ""})
    else:
        kv_text = ("not measured" if "server_after" not in results else "not available") if kv is None else str(kv)
        status = "missed" if r64["errors"] or (kv is not None and kv != 0) else (
            "met" if kv == 0 else f"no errors; KV check {kv_text}")
        rows.append({"target": "64 streams", "goal": "no error, no OOM; every KV block free after the run",
                     "measured": f"{r64['errors']} errors of {r64['requests']}; KV blocks in use after: {kv_text}",
                     "status": status,
                     "gap": f"first error: {r64.get('first_error')}" if r64["errors"] else
                            (f"{kv} blocks still held" if kv else "")})
    return rows


def markdown(results: dict) -> str:
    floor_ms = results["hbm_floor_ms"]
    seq = results.get("baseline_sequential", {})
    int8_bytes = int8_weight_bytes_per_step(results["llm_weight_bytes_per_step"])
    lines = [
        f"Device: {results['device']}; date {results['date']}; commit {results['commit']}.",
        f"HBM floor of one decode step: {results['llm_weight_bytes_per_step'] / 1e9:.2f} GB of LLM weights / "
        f"{results['copy_bandwidth_gbs']:.0f} GB/s copy bandwidth = {floor_ms:.2f} ms"
        + (f" (int8 projections: {int8_bytes / 1e9:.2f} GB, "
           f"{int8_bytes / (results['copy_bandwidth_gbs'] * 1e9) * 1e3:.2f} ms)." if "server_int8" in results else "."),
        f"Vision (bf16, our encoder): {results.get('vision_ms_per_image_b1', float('nan')):.1f} ms/image at batch 1, "
        f"{results.get('vision_ms_per_image_b8', float('nan')):.1f} ms/image at batch 8"
        + (f"; with each block torch.compiled (as the server runs it): "
           f"{results['vision_compiled_ms_per_image_b1']:.1f} and {results['vision_compiled_ms_per_image_b8']:.1f}."
           if "vision_compiled_ms_per_image_b8" in results else ".")
        + (f" With the vision model's `quantization: fp8` (the blocks' matmuls in e4m3, opt-in): "
           f"{results['vision_fp8_compiled_ms_per_image_b1']:.1f} and {results['vision_fp8_compiled_ms_per_image_b8']:.1f}, "
           f"embeddings {100 * results['vision_fp8_relative_error_b8']:.1f} % from bf16 (relative L2, random weights)."
           if "vision_fp8_compiled_ms_per_image_b8" in results else ""),
        ("Every request sent its own image (nothing cached)." if results.get("images", "distinct") == "distinct" else
         "Every request sent the same image: after the first, the KV prefix cache (and the vision embedding "
         "cache, where the server has one) hit, so TTFT is the warm-cache case."),
        "",
        "| path | streams | output tok/s | TTFT p50 / p95 ms | ITL p50 / p95 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    if seq:
        for r in results.get("baseline_sequential_by_attention", {"": seq}).values():
            attn = f" ({r['attention']} attention)" if r.get("attention") else ""
            lines.append(f"| transformers chat, sequential{attn} | 1 | {r['output_tok_per_s']:.1f} | | "
                         f"{1e3 / r['output_tok_per_s']:.1f} (mean) | 0 |")
    if "baseline_batch_chat" in results:
        b = results["baseline_batch_chat"]
        lines.append(f"| transformers batch_chat | {b['batch']} | {b['output_tok_per_s']:.1f} | | | 0 |")
    for key, label in (("server", "Triton server (gRPC stream)"), ("server_int8", "Triton server, int8 weights"),
                       *((k, LAYOUT_LABELS[k[len('server_'):]]) for k in results
                         if k.startswith("server_") and k[len('server_'):] in LAYOUT_LABELS)):
        for row in results.get(key, []) if isinstance(results.get(key), list) else []:
            lines.append(f"| {label} | {row['concurrency']} | {row['output_tok_per_s']:.1f} | "
                         f"{row['ttft_p50_ms']:.0f} / {row['ttft_p95_ms']:.0f} | "
                         f"{row['itl_p50_ms']:.1f} / {row['itl_p95_ms']:.1f} | {row['errors']} |")
    for key in _engine_alone_keys(results):
        label = "llm engine alone (in-process, no Triton" + (f"; {key[len('engine_alone['):-1]}" if "[" in key else "") + ")"
        if "error" in results[key]:
            lines.append(f"| {label} | | {results[key]['error']} | | | |")
        for row in results[key].get("levels", []):
            lines.append(f"| {label} | {row['concurrency']} | {row['output_tok_per_s']:.1f} | "
                         f"{row['ttft_p50_ms']:.0f} / {row['ttft_p95_ms']:.0f} | "
                         f"{row['itl_p50_ms']:.1f} / {row['itl_p95_ms']:.1f} | {row['errors']} |")
    if results.get("server_warm"):
        lines += ["", "Warm caches (the same server after the rows above; every request sends the same image, so "
                  "the vision embedding cache and the KV prefix cache hit):", "",
                  "| path | streams | output tok/s | TTFT p50 / p95 ms | ITL p50 / p95 ms | errors |",
                  "|---|---|---|---|---|---|"]
        for row in results["server_warm"]:
            lines.append(f"| Triton server, same image | {row['concurrency']} | {row['output_tok_per_s']:.1f} | "
                         f"{row['ttft_p50_ms']:.0f} / {row['ttft_p95_ms']:.0f} | "
                         f"{row['itl_p50_ms']:.1f} / {row['itl_p95_ms']:.1f} | {row['errors']} |")
        for warm in results["server_warm"]:
            cold = _server_row(results, "server", warm["concurrency"])
            if cold and warm["concurrency"] > 1:
                lines += ["", f"At {warm['concurrency']} streams, new images (vision + prefill of the image rows "
                          f"for every request) against the same image (both cached): output tok/s "
                          f"{cold['output_tok_per_s']:.0f} vs {warm['output_tok_per_s']:.0f}, ITL p50 "
                          f"{cold['itl_p50_ms']:.1f} vs {warm['itl_p50_ms']:.1f} ms "
                          f"({100 * (cold['itl_p50_ms'] / warm['itl_p50_ms'] - 1):+.0f} %)."]
    if results.get("open_loop"):
        lines += openloop.markdown_lines(results["open_loop"])
    profiles = [(k, r) for k in _engine_alone_keys(results) for r in results[k].get("profile", [])]
    if profiles:
        lines += ["", "Per decode step, engine alone, steady decode (torch.profiler; GPU busy = union of kernel and "
                  "copy intervals):", "",
                  "| engine | streams | wall ms/step | GPU busy ms/step | GPU idle ms/step |", "|---|---|---|---|---|"]
        for key, r in profiles:
            name = key[len("engine_alone["):-1] if "[" in key else "default"
            lines.append(f"| {name} | {r['concurrency']} | {r['wall_ms_per_step']:.2f} | "
                         f"{r['gpu_busy_ms_per_step']:.2f} | {r['host_gap_ms_per_step']:.2f} |")
    lines += ["", f"Peak GPU memory: baseline {results.get('baseline_peak_gpu_mib', float('nan')):.0f} MiB "
                  f"(torch), server {results.get('server_peak_gpu_mib', float('nan')):.0f} MiB (nvidia-smi, device)"
                  + (f", int8 server {results['server_int8_peak_gpu_mib']:.0f} MiB"
                     if "server_int8_peak_gpu_mib" in results else "") + "."]
    for key, label in (("server", "server"), ("server_int8", "int8 server"),
                       *((f"server_{n}", LAYOUT_LABELS[n]) for n in LAYOUT_LABELS)):
        if key not in results:
            continue
        after = results.get(f"{key}_after")
        if after is None:
            lines.append(f"KV blocks in use after the {label} run: not measured (a run before this check existed).")
            continue
        used = after.get("kv_blocks_used_after")
        total = after.get("kv_blocks_total")
        text = ("not available (the server exports no internvl_kv_cache_blocks_used"
                + (f": {after['metrics_error']}" if after.get("metrics_error") else "") + ")") if used is None \
            else f"{used}" + (f" of {total}" if total is not None else "")
        cache = ""
        if after.get("image_cache_hits") is not None:
            cache = (f"; vision embedding cache: {after['image_cache_hits']} hits, "
                     f"{after.get('image_cache_misses')} misses")
        lines.append(f"KV blocks in use after the {label} run: {text}{cache}.")
    lines += ["", "Against the speed issue's targets:", "",
              "| target | goal | measured | status | gap |", "|---|---|---|---|---|"]
    for t in targets(results):
        lines.append(f"| {t['target']} | {t['goal']} | {t['measured']} | {t['status']} | {t['gap']} |")
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
    parser.add_argument("--int8", action="store_true",
                        help="also run the server with the llm's quantization=int8 at --int8-levels")
    parser.add_argument("--int8-levels", default="1")
    parser.add_argument("--same-image", action="store_true",
                        help="every request the same image (the old default: vision and prefix caches hit)")
    parser.add_argument("--warm-levels", default="",
                        help="after the distinct-image levels, these levels with one image for all (warm caches)")
    openloop.add_arguments(parser)
    parser.add_argument("--skip-engine-alone", action="store_true")
    parser.add_argument("--engine-alone-compare", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="also run the engine alone with these llm parameters (repeatable)")
    parser.add_argument("--profile-levels", default="1,32",
                        help="levels of the engine-alone per-step breakdown (empty: none)")
    parser.add_argument("--kv-free-timeout-s", type=float, default=30.0,
                        help="how long to wait for the KV-blocks-used gauge to read 0 after the last level")
    parser.add_argument("--layout", action="append", default=[], choices=sorted(LAYOUT_LABELS),
                        help="also run the server on several GPUs: tp2 (LLM split over GPUs 0,1), dp2 (one "
                             "vision + llm instance per GPU), tp4, dp4 (repeatable; at --levels)")
    parser.add_argument("--merge", action="store_true",
                        help="start from --out/results.json and add to it (split one run over several commands "
                             "on the same machine, e.g. --skip-server then --skip-baseline --skip-engine-alone)")
    parser.add_argument("--markdown-only", action="store_true",
                        help="rewrite results.md from --out/results.json and exit (no GPU)")
    args = parser.parse_args(argv)
    if args.markdown_only:
        table = markdown(json.loads((args.out / "results.json").read_text()))
        (args.out / "results.md").write_text(table)
        print(table)
        return 0
    open_loop = openloop.options(args, parser)  # bad values refused before any GPU work
    assert torch.cuda.is_available(), "the benchmark needs a CUDA GPU"
    args.out.mkdir(parents=True, exist_ok=True)
    tiny = make_tiny_checkpoint(args.work / "tiny")
    ckpt = make_random_checkpoint(args.work / "v1-1-random", tokenizer_from=tiny)
    commit = os.environ.get("BENCH_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip() or "unknown"
    previous = json.loads((args.out / "results.json").read_text()) if args.merge else {}
    results = {"device": torch.cuda.get_device_name(), "date": dt.date.today().isoformat(), "commit": commit,
               "new_tokens": NEW_TOKENS, "question": QUESTION,
               "images": "same" if args.same_image else "distinct"}
    if previous and (previous.get("device"), previous.get("commit")) != (results["device"], results["commit"]):
        raise SystemExit(f"--merge: {args.out / 'results.json'} is of {previous.get('device')} at "
                         f"{previous.get('commit')}, this run is {results['device']} at {results['commit']}")
    results = {**previous, **results}
    if "copy_bandwidth_gbs" not in results:
        results["copy_bandwidth_gbs"] = copy_bandwidth_gbs()
    if not args.skip_baseline:
        run_baseline(ckpt, results, args.sequential_requests, batch=8)
    elif "llm_weight_bytes_per_step" not in results:
        results["llm_weight_bytes_per_step"] = 2 * (40 * (4 * 5120 * 5120 + 3 * 5120 * 13824) + 41840 * 5120 + 2 * 5120)
    results["hbm_floor_ms"] = results["llm_weight_bytes_per_step"] / (results["copy_bandwidth_gbs"] * 1e9) * 1e3
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    levels = [int(x) for x in args.levels.split(",") if x]
    profile_levels = [int(x) for x in args.profile_levels.split(",") if x]
    if not args.skip_engine_alone and levels:
        run_engine_alone(ckpt, results, levels, args.requests_per_stream, args.out, profile_levels=profile_levels)
        for compare in args.engine_alone_compare:
            run_engine_alone(ckpt, results, levels, args.requests_per_stream, args.out,
                             options=tuple(compare.split(",")), profile_levels=profile_levels)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    if not args.skip_server:
        run_server(ckpt, results, levels, args.requests_per_stream, args.out,
                   distinct_images=not args.same_image, kv_free_timeout_s=args.kv_free_timeout_s,
                   warm_levels=[int(x) for x in args.warm_levels.split(",") if x], open_loop=open_loop)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    if args.int8:
        from internvl_serve.serving.layout import Layout

        run_server(ckpt, results, [int(x) for x in args.int8_levels.split(",")], args.requests_per_stream,
                   args.out, key="server_int8", layout=Layout(llm_parameters={"quantization": "int8"}),
                   distinct_images=not args.same_image, kv_free_timeout_s=args.kv_free_timeout_s)
    for name in args.layout:
        run_server(ckpt, results, levels, args.requests_per_stream, args.out,
                   key=f"server_{name}", layout=layout_named(name), distinct_images=not args.same_image,
                   kv_free_timeout_s=args.kv_free_timeout_s)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    results["targets"] = [{k: v for k, v in t.items() if k not in ("value", "limit")} for t in targets(results)]
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "results.md").write_text(table)
    print(table)
    try:  # the figure: bench/plot.py (matplotlib, which a GPU image may lack)
        import plot
        print(plot.plot(results, args.out / "throughput_latency.png"))
    except Exception as e:  # noqa: BLE001 - the numbers are written already
        print(f"no plot: {type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
