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
  * at each level, server and engine alone, the llm engine's own counters over the level (the
    `internvl_engine_*` metrics; in-process for the engine alone): ms of engine-thread work per step and
    the share of it spent waiting for the GPU;
  * at each server level, where the time to first token went, as means per request from the server's
    metrics (servermetrics.ttft_stage_figures): preprocess, vision and llm stub queue / compute (Triton's
    counters; the stub's compute is its execute, up to the submit), the llm's submit to first token (its engine queue + prefill), and the rest of the
    client's mean TTFT (gRPC, the ensemble's hand-offs);
  * with --py-spy-levels (e.g. 64), py-spy on the llm stub during those server levels
    (stub_sampler.py): samples per thread and their heaviest frames in the level's row, raw stacks in --out;
  * at each server level, the cores each process kept busy (proc_cpu.py, /proc): this load generator,
    the gRPC guard, tritonserver, each model's stubs and the llm's engine process; --direct-levels runs
    those levels again on the same server at tritonserver's own port, past the gRPC guard (its cost);
  * peak GPU memory (nvidia-smi, whole device) and the server's KV-cache report;
  * after the last level, the llm's `internvl_kv_cache_blocks_used` gauge (Prometheus, the server's
    metrics port), polled until it reads 0 or --kv-free-timeout-s passes: every KV block must be free
    again after the run ("not available" when the server does not export it);
  * with --int8, the server again with the llm's `quantization` parameter "int8" (a copy of the model
    repository with that one value changed) at --int8-levels (default 1 stream);
  * with --server-compare MODEL.KEY=VALUE[,...] (repeatable), the server again at --levels with those
    model parameters changed (MODEL: llm or vision), right after the default one on the same machine:
    an A/B in one run, e.g. llm.encoder_priority_ms=50, or llm.quantization=int8,vision.quantization=fp8;
    vision.max_batch_size=N sets the vision model's max_batch_size (the launcher's --vision-max-batch-size).
Every request sends its own image (nothing cached, as real traffic); --warm-levels adds rows, on the
same server after those, where every request sends the same image (the vision embedding cache and the
KV prefix cache hit: the warm-cache case), as a second table. --arrival-rates adds the open loop on the
same server after the closed-loop levels, and on each --server-compare server (openloop.py): requests
arrive by a seeded Poisson process at each rate, each with its own new image, whatever the server is
doing (--arrival-requests per rate, or --arrival-duration-s; no cap on requests in flight unless
--arrival-max-in-flight), in results.json's `open_loop` (`open_loop[...]`) section and its own table.
The speed issue's TTFT targets stay those of the closed loop.
With --merge and --levels "" (and --skip-baseline --skip-engine-alone) a run adds only the open loop.
Writes results.json and results.md (the table, then the speed issue's targets beside the measured values)
under --out and prints the tables last.

Owns: the command line and the runs (baseline, engine alone, server, open loop hookup), the request
(QUESTION, NEW_TOKENS) and its images. Does not own: the tables and the targets (report.py), the load
generators (loadgen.py, openloop.py), the in-process engine run (engine_alone.py), the figure (plot.py).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import io
import json
import os
import re
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
import report  # noqa: E402
from proc_cpu import CpuMeter, server_groups  # noqa: E402
from servermetrics import (  # noqa: E402
    ENGINE_COUNTERS, engine_step_figures, kv_blocks_after_run, read_ttft_stages, read_values, ttft_stage_figures)
from stub_sampler import StubSampler, idle_where  # noqa: E402


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
    # The card's path at its best: the official code picks flash_attention_2 when flash-attn is installed
    # and 'eager' otherwise; our reference builds transformers' LLaMA with 'sdpa'. Both are timed (the
    # attention implementation is read from the config at every forward) and the faster is the baseline.
    import transformers

    results["transformers_version"] = transformers.__version__
    by_attn = {}
    llm_config = model.language_model.config
    for attn in ("sdpa", "eager"):
        llm_config._attn_implementation = attn
        reference.chat(model, tokenizer, pix1, QUESTION, dict(config, max_new_tokens=8, min_new_tokens=8))  # warm-up
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


def direct_level_images(level: int, n: int) -> list[bytes]:
    """n distinct PNGs for a --direct-levels level, apart from level_images' (the same images would hit
    the vision embedding cache and the KV prefix cache that the guarded level filled)."""
    return [png_bytes(test_image(3_000_000 + 10_000 * level + i)) for i in range(n)]


def open_loop_images(k: int, n: int) -> list[bytes]:
    """n distinct PNGs for the k-th open-loop rate (seeds apart from level_images' and each other's)."""
    return [png_bytes(test_image(5_000_000 + 100_000 * k + i)) for i in range(n)]


def run_server(ckpt: Path, results: dict, levels: list[int], requests_per_stream: int, log_dir: Path,
               *, key: str = "server", distinct_images: bool = True, warm_levels: list[int] = (),
               kv_free_timeout_s: float = 30.0, layout=None, open_loop: dict | None = None,
               py_spy_levels: tuple[int, ...] = (), direct_levels: list[int] = ()) -> None:
    """direct_levels: closed-loop levels run again after the others at tritonserver's own gRPC port, past
    the gRPC guard, with images of their own, into results[f"{key}_direct"]: the guard's cost on the same
    server. open_loop: openloop.run_rates' keyword arguments (rates, num_requests or duration_s, seed,
    max_in_flight), run after the closed-loop levels into results["open_loop"] (key "server") or
    results["open_loop[...]"] (key "server[...]"). py_spy_levels: the
    closed-loop levels during which the llm stub is sampled (stub_sampler.py)."""
    from internvl_serve.serving.launcher import TritonServer

    image = png_bytes(test_image(0))
    file_tag = re.sub(r"[^A-Za-z0-9_-]+", "-", key).strip("-")
    log_file = log_dir / ("tritonserver.log" if key == "server" else f"tritonserver-{file_tag}.log")
    if levels or key not in results:  # --levels "" with --merge keeps the closed-loop rows of before
        results[key] = []
    with GpuMemoryPoller() as mem:
        t0 = time.perf_counter()
        with TritonServer(ckpt, ready_timeout_s=900, log_file=log_file, layout=layout,
                          tritonserver=os.environ.get("TRITONSERVER"),
                          backend_directory=os.environ.get("TRITON_BACKENDS")) as server:
            results[f"{key}_start_s"] = time.perf_counter() - t0
            url = server.grpc_url

            def closed_loop(levels_: list[int], rows: list, images_for, tag: dict, url: str = url) -> None:
                asyncio.run(loadgen.run_level(url, 1, 1, QUESTION, image, 16))  # warm-up
                for level in levels_:
                    n = max(level * requests_per_stream, 2)
                    samplers = {}
                    if level in py_spy_levels and not tag:
                        llm = next(pid for pid, name in server.stub_processes().items() if name.startswith("llm"))
                        samplers = {f"py_spy{suffix}": StubSampler(
                                        llm, log_dir / f"pyspy{suffix.replace('_', '-')}-{file_tag}-{level}.txt", mode=mode)
                                    for suffix, mode in (("", "active"), ("_gil", "gil"), ("_all", "all"))}
                        for sampler in samplers.values():
                            sampler.start()
                    before = read_values(server.metrics_url, ENGINE_COUNTERS)
                    stages_before = read_ttft_stages(server.metrics_url)
                    cpu = CpuMeter(server_groups(server))
                    cpu.start()
                    row = asyncio.run(loadgen.run_level(url, level, n, QUESTION, images_for(level, n), NEW_TOKENS))
                    row["cpu_cores"] = cpu.stop(row["wall_s"])  # cores each process kept busy over the level
                    # the llm pushes its counters every 0.5 s: the level's last half second may be left out
                    row["engine_steps"] = engine_step_figures(before, read_values(server.metrics_url, ENGINE_COUNTERS))
                    row["ttft_stages"] = ttft_stage_figures(stages_before, read_ttft_stages(server.metrics_url))
                    for name, sampler in samplers.items():
                        row[name] = sampler.stop() or {"error": sampler.error}
                    if samplers and all(s.out.exists() for s in samplers.values()):
                        row["py_spy_idle"] = idle_where(samplers["py_spy_all"].out.read_text(),
                                                        samplers["py_spy"].out.read_text())
                        samplers["py_spy_all"].out.unlink()  # the largest; the idle summary is kept in the row
                    print(json.dumps({**tag, **row}), flush=True)
                    rows.append(row)

            closed_loop(levels, results[key], level_images if distinct_images else lambda level, n: image, {})
            if direct_levels:
                results[f"{key}_direct"] = []
                closed_loop(direct_levels, results[f"{key}_direct"], direct_level_images if distinct_images else
                            lambda level, n: image, {"direct": True}, url=server.triton_grpc_url)
            if open_loop:
                results["open_loop" + key.removeprefix("server")] = openloop.run_rates(
                    url, question=QUESTION, images_for=open_loop_images, max_tokens=NEW_TOKENS, **open_loop)
            if warm_levels:  # the same image for every request: vision cache and KV prefix cache hit
                results[f"{key}_warm"] = []
                closed_loop(warm_levels, results[f"{key}_warm"], lambda level, n: image, {"warm": True})
            # every request has finished: each KV block must be free again
            results[f"{key}_after"] = kv_blocks_after_run(server.metrics_url, kv_free_timeout_s)
            print(json.dumps(results[f"{key}_after"]), flush=True)
        results[f"{key}_peak_gpu_mib"] = max(mem.peak_mib, results.get(f"{key}_peak_gpu_mib") or 0)


def compare_layout(spec: str):
    """--server-compare's 'llm.encoder_priority_ms=50,vision.quantization=fp8' -> a Layout with those
    model parameters; 'vision.max_batch_size=N' sets the vision model's max_batch_size (the Layout's
    vision_max_batch_size), not a parameter."""
    from internvl_serve.serving.layout import Layout

    parameters: dict[str, dict[str, str]] = {"llm": {}, "vision": {}}
    for item in spec.split(","):
        name, equals, value = item.partition("=")
        model, dot, key = name.strip().partition(".")
        if not (equals and dot and key) or model not in parameters:
            raise ValueError(f"--server-compare {spec!r}: expected MODEL.KEY=VALUE[,...] with MODEL llm or vision")
        parameters[model][key] = value.strip()
    vision_batch = parameters["vision"].pop("max_batch_size", None)
    return Layout(llm_parameters=parameters["llm"], vision_parameters=parameters["vision"],
                  vision_max_batch_size=None if vision_batch is None else int(vision_batch)).validate()


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


def layout_named(name: str):
    """tp2 / tp4: one LLM split over GPUs 0..N-1; dp2 / dp4: one vision + llm instance per GPU."""
    from internvl_serve.serving.layout import Layout

    n = int(name[2:])
    return Layout(gpus=tuple(range(n)), tensor_parallel_size=n if name.startswith("tp") else 1)


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
    parser.add_argument("--server-compare", action="append", default=[], metavar="MODEL.KEY=VALUE[,MODEL.KEY=VALUE]",
                        help="also run the server at --levels with these model parameters (MODEL: llm or vision; "
                             "repeatable), e.g. llm.encoder_priority_ms=50")
    parser.add_argument("--same-image", action="store_true",
                        help="every request the same image (the old default: vision and prefix caches hit)")
    parser.add_argument("--warm-levels", default="",
                        help="after the distinct-image levels, these levels with one image for all (warm caches)")
    openloop.add_arguments(parser)
    parser.add_argument("--skip-engine-alone", action="store_true",
                        help="no engine-alone run with the default llm parameters (--engine-alone-compare runs still)")
    parser.add_argument("--engine-alone-compare", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="also run the engine alone with these llm parameters (repeatable)")
    parser.add_argument("--profile-levels", default="1,32",
                        help="levels of the engine-alone per-step breakdown (empty: none)")
    parser.add_argument("--py-spy-levels", default="",
                        help="closed-loop levels during which py-spy samples the llm stub's threads (needs py-spy "
                             "on PATH; stub_sampler.py): time spent, the GIL held, and where each thread slept, a summary "
                             "per thread in the level's row (py_spy, py_spy_gil, py_spy_idle), raw stacks in --out")
    parser.add_argument("--direct-levels", default="",
                        help="closed-loop levels each server runs again after --levels at tritonserver's own "
                             "gRPC port, past the gRPC guard (rows 'past the guard'): the guard's cost")
    parser.add_argument("--kv-free-timeout-s", type=float, default=30.0,
                        help="how long to wait for the KV-blocks-used gauge to read 0 after the last level")
    parser.add_argument("--layout", action="append", default=[], choices=sorted(report.LAYOUT_LABELS),
                        help="also run the server on several GPUs: tp2 (LLM split over GPUs 0,1), dp2 (one "
                             "vision + llm instance per GPU), tp4, dp4 (repeatable; at --levels)")
    parser.add_argument("--merge", action="store_true",
                        help="start from --out/results.json and add to it (split one run over several commands "
                             "on the same machine, e.g. --skip-server then --skip-baseline --skip-engine-alone)")
    parser.add_argument("--markdown-only", action="store_true",
                        help="rewrite results.md from --out/results.json and exit (no GPU)")
    args = parser.parse_args(argv)
    if args.markdown_only:
        print(report.write_markdown(json.loads((args.out / "results.json").read_text()), args.out))
        return 0
    open_loop = openloop.options(args, parser)  # bad values refused before any GPU work
    if open_loop and args.skip_server and not args.server_compare:
        parser.error("--arrival-rates runs the open loop on each server: --skip-server without --server-compare "
                     "starts none")
    try:  # likewise
        compare_layouts = {spec: compare_layout(spec) for spec in args.server_compare}
    except ValueError as e:
        parser.error(str(e))
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
    py_spy_levels = tuple(int(x) for x in args.py_spy_levels.split(",") if x)
    direct_levels = [int(x) for x in args.direct_levels.split(",") if x]
    if levels:  # --skip-engine-alone skips the default llm parameters' run, not the compares (as --skip-server)
        if not args.skip_engine_alone:
            run_engine_alone(ckpt, results, levels, args.requests_per_stream, args.out, profile_levels=profile_levels)
        for compare in args.engine_alone_compare:
            run_engine_alone(ckpt, results, levels, args.requests_per_stream, args.out,
                             options=tuple(compare.split(",")), profile_levels=profile_levels)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    if not args.skip_server:
        run_server(ckpt, results, levels, args.requests_per_stream, args.out,
                   distinct_images=not args.same_image, kv_free_timeout_s=args.kv_free_timeout_s,
                   warm_levels=[int(x) for x in args.warm_levels.split(",") if x], open_loop=open_loop,
                   py_spy_levels=py_spy_levels, direct_levels=direct_levels)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    for spec, layout in compare_layouts.items():
        run_server(ckpt, results, levels, args.requests_per_stream, args.out, key=f"server[{spec}]",
                   layout=layout, distinct_images=not args.same_image,
                   kv_free_timeout_s=args.kv_free_timeout_s, py_spy_levels=py_spy_levels, open_loop=open_loop,
                   direct_levels=direct_levels)
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
    results["targets"] = report.targets_for_json(results)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(report.write_markdown(results, args.out))
    try:  # the figure: bench/plot.py (matplotlib, which a GPU image may lack)
        import plot
        print(plot.plot(results, args.out / "throughput_latency.png"))
    except Exception as e:  # noqa: BLE001 - the numbers are written already
        print(f"no plot: {type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
