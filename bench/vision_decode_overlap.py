"""Do the vision encoder and the decode take turns on the GPU, or can they overlap?

Why: at 32 streams with a new image per request, the benchmark's server spends ~34 ms of GPU per request
on its image (vision 21.6 ms, prefill ~12) beside the decode's 15 ms steps. If the two only take turns,
2,000 output tok/s at 32 streams needs a decode step below the HBM floor (bench/results/h100-2026-12-06).
The decode step is bound by memory bandwidth and the encoder by tensor-core FLOPs, so running them at the
same time could hide much of one behind the other. The server runs them in two processes (the vision and
llm stubs), which a GPU without MPS time-slices; one process with two CUDA streams can overlap kernels.

What it measures, for `--seconds` each, with random full-size weights (or the tiny checkpoint on the CPU,
a check of the script):
  decode alone      the llm service in-process (as engine_alone.py), `--streams` answers in steady decode
  vision alone      a thread encoding batches of `--vision-batch` new tiles in a loop (no cache)
  same process      both at once, the vision forwards on a CUDA stream of their own
  two processes     both at once, the vision loop in a child process (as the server runs them)
For each: decode tok/s and ms per step, vision images/s, and the overlap sum (tok/s / alone + images/s /
alone): 1.0 when they only take turns, up to 2.0 when each runs as if alone.

    python bench/vision_decode_overlap.py --checkpoint DIR [--streams 32] [--seconds 5] [--out overlap.json]
    python bench/vision_decode_overlap.py --tiny --device cpu --seconds 1      # a check on the CPU

Owns: this probe. Does not own: the services (serving/llm.py, serving/vision.py) or the request shape
(engine_alone.py's).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from engine_alone import TimedSink, make_request, prompt_ids  # noqa: E402

QUESTION = "Please describe this image in detail."


class VisionLoop:
    """Encodes batches of new tiles back to back on a thread (its own CUDA stream on a GPU) until stopped;
    counts the images encoded inside the measured window."""

    def __init__(self, service, batch: int, seed: int = 0):
        self.service = service
        size = service.config.vision_config.image_size
        rng = np.random.default_rng(seed)
        self.batches = [rng.standard_normal((batch, 3, size, size), dtype=np.float32) for _ in range(4)]
        self.stream = torch.cuda.Stream(device=service.device) if service.device.type == "cuda" else None
        self.images = 0
        self.counting = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vision-loop", daemon=True)

    def _run(self) -> None:
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            i = 0
            while not self._stop.is_set():
                batch = self.batches[i % len(self.batches)]
                self.service.embed([batch])  # returns once the forward is done (it copies to the host)
                if self.counting:
                    self.images += len(batch)
                i += 1

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def vision_child(checkpoint: str, device: str, batch: int, ready, go, done, result) -> None:
    """The two-process case: a vision service and its loop in this (spawned) process; counts the images
    encoded between `go` and `done`."""
    from internvl_serve.serving.vision import VisionService

    service = VisionService(checkpoint, device=device, image_cache_mb=0)
    loop = VisionLoop(service, batch)
    service.embed([loop.batches[0]])  # warm
    ready.set()
    go.wait()
    loop.start()
    loop.counting = True
    t0 = time.perf_counter()
    done.wait()
    loop.counting = False
    elapsed = time.perf_counter() - t0
    loop.stop()
    result.put({"images": loop.images, "seconds": elapsed})


class Decode:
    """`streams` answers in flight on the llm service, long enough to stay in decode through a window."""

    def __init__(self, service, streams: int, new_tokens: int, seed0: int):
        rows, hidden = service.config.num_image_token, service.config.llm_config.hidden_size
        ids = prompt_ids(service, QUESTION)
        self.finished = threading.Semaphore(0)
        self.sinks = [TimedSink(self.finished.release) for _ in range(streams)]
        self.service = service
        self._ids = [service.submit(make_request(ids, rows, hidden, seed0 + i, new_tokens), sink,
                                    client_id=f"overlap-{seed0}-{i}")
                     for i, sink in enumerate(self.sinks)]

    def tokens(self) -> int:
        return sum(s.tokens for s in self.sinks)

    def wait_started(self, min_tokens: int = 4) -> None:
        while min(s.tokens for s in self.sinks) < min_tokens:
            time.sleep(0.005)  # polling a benchmark's progress, not synchronising a test
            if any(s.timing.error for s in self.sinks):
                raise RuntimeError(next(s.timing.error for s in self.sinks if s.timing.error))

    def finish(self) -> None:
        """Abort what still runs and wait for every final response."""
        for request_id in self._ids:
            self.service.thread.abort(request_id)
        for _ in self.sinks:
            self.finished.acquire()


def measure(seconds: float, decode: Decode | None, vision: VisionLoop | None, child=None) -> dict:
    """Tokens and images over one window of `seconds` (child: (go, done, result) of a vision child)."""
    if decode is not None:
        decode.wait_started()
    if child is not None:
        child[0].set()
    if vision is not None:
        vision.images, vision.counting = 0, True
    tokens0 = decode.tokens() if decode is not None else 0
    t0 = time.perf_counter()
    time.sleep(seconds)  # the measured window
    elapsed = time.perf_counter() - t0
    tokens = (decode.tokens() - tokens0) if decode is not None else 0
    row: dict = {"seconds": elapsed}
    if vision is not None:
        vision.counting = False
        row["images_per_s"] = vision.images / elapsed
    if child is not None:
        child[1].set()
        got = child[2].get()
        row["images_per_s"] = got["images"] / got["seconds"]
    if decode is not None:
        streams = len(decode.sinks)
        row["tok_per_s"] = tokens / elapsed
        row["ms_per_step"] = 1e3 * elapsed / (tokens / streams) if tokens else float("nan")
    return row


def overlap_sum(row: dict, decode_alone: dict, vision_alone: dict) -> float:
    return row["tok_per_s"] / decode_alone["tok_per_s"] + row["images_per_s"] / vision_alone["images_per_s"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--tiny", action="store_true", help="the tiny generated checkpoint (a CPU check)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--vision-batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--new-tokens", type=int, default=512,
                        help="per answer: enough to stay in decode through the window of one case")
    parser.add_argument("--num-blocks", type=int, default=0,
                        help="KV blocks (0: what the streams' answers need, which leaves room for a vision "
                             "child process beside the llm)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.tiny:
        from internvl_serve.tiny import make_tiny_checkpoint
        args.checkpoint = make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="overlap-")) / "tiny")
    if args.checkpoint is None:
        parser.error("--checkpoint or --tiny")

    from internvl_serve.serving.llm import LLMService
    from internvl_serve.serving.vision import VisionService

    vision_service = VisionService(args.checkpoint, device=args.device, image_cache_mb=0)  # before the KV sizing
    config = vision_service.config
    tokens_per_answer = config.num_image_token + 64 + args.new_tokens
    num_blocks = args.num_blocks or args.streams * -(-tokens_per_answer // 16)
    llm = LLMService(args.checkpoint, device=args.device, engine_options={"num_blocks": str(num_blocks)})
    result: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
                    "streams": args.streams, "vision_batch": args.vision_batch, "seconds": args.seconds,
                    "num_blocks": num_blocks}
    try:
        vision = VisionLoop(vision_service, args.vision_batch)
        vision_service.embed([vision.batches[0]])  # warm
        decode = Decode(llm, args.streams, args.new_tokens, seed0=1000)
        result["decode_alone"] = measure(args.seconds, decode, None)
        vision.start()
        result["same_process"] = measure(args.seconds, decode, vision)
        decode.finish()
        result["vision_alone"] = measure(args.seconds, None, vision)
        vision.stop()
        del vision, vision_service
        if args.device == "cuda":
            torch.cuda.empty_cache()

        ctx = mp.get_context("spawn")
        ready, go, done, queue = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Queue()
        child = ctx.Process(target=vision_child, args=(str(args.checkpoint), args.device, args.vision_batch,
                                                        ready, go, done, queue))
        child.start()
        ready.wait()
        decode = Decode(llm, args.streams, args.new_tokens, seed0=2000)
        result["two_processes"] = measure(args.seconds, decode, None, child=(go, done, queue))
        decode.finish()
        child.join()
    finally:
        llm.shutdown()
    for case in ("same_process", "two_processes"):
        result[case]["overlap_sum"] = overlap_sum(result[case], result["decode_alone"], result["vision_alone"])
    for case in ("decode_alone", "vision_alone", "same_process", "two_processes"):
        print(case, json.dumps({k: round(v, 3) for k, v in result[case].items()}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
