"""The llm service alone, in-process and without Triton: the number the serving path is compared with.

Runs `LLMService` (the same class the `llm` Triton model wraps: engine thread, response shaping) in this
process and drives it with the benchmark's request shape: the card's prompt for one 448 image (256
`<IMG_CONTEXT>` rows) and the benchmark question, 256 new tokens with EOS ignored. Every request brings
its own random image embeddings (as if each sent a distinct image: no prefix-cache hit). At each
concurrency level `level` requests are kept in flight (closed loop, as the gRPC load generator does).
Each level's row also has the engine's step counters and the llm's TTFT with its two parts, engine queue
and prefill, as the server's metrics give them (`ttft_stages`; the benchmark's TTFT table).

Also, with --profile-levels, a per-step breakdown at those levels: over a window of steady decode, wall
time per engine step against the time the GPU was busy (the union of every kernel and copy interval in
a torch.profiler trace), so the host's share of a step is a number.

    python bench/engine_alone.py --checkpoint DIR --levels 1,32 --out engine.json \
        [--engine-option async_scheduling=false] [--profile-levels 1,32] [--profile-first-token] [--tiles 12]

--tiles N gives every request an image of N tiles (N x 256 rows, a prompt of ~N x 256 + 30 tokens), the
long prompt whose prefill the token budget per step (max_num_batched_tokens) splits into more steps.

The engine runs on a thread of this process (the llm model's engine_process=false), also on CUDA where
the server's default puts it in a process of its own, so that the profiles see it. With --engine-option
engine_process=true it runs in its own process (serving/engine_process.py): the run then measures what the
process boundary costs; its counters arrive every 0.25 s (a level's figures can miss its last quarter
second) and the profiles cannot see that process (--profile-levels "").

Owns: the in-process driver and the breakdown. Does not own: the server runs (benchmark.py, loadgen.py).
benchmark.py runs this as a subprocess so that all its GPU memory is returned before the server starts.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "loadtest"))

from internvl_serve.prompt import build_prompt  # noqa: E402
from internvl_serve.tokenizer import IMG_CONTEXT_TOKEN  # noqa: E402
from internvl_serve.serving.contract import GenerationRequest, LLMRequest  # noqa: E402
from internvl_serve.engine.sampling import SamplingParams  # noqa: E402
from internvl_serve.serving.metrics import GenerationMetrics, MeteredEngineThread, llm_values  # noqa: E402

import loadgen  # noqa: E402
from servermetrics import engine_step_figures, ttft_stage_figures  # noqa: E402


class TimedSink:
    """A ResponseSink that records when each response arrived and how many tokens it carried."""

    def __init__(self, on_final, on_first_token=None):
        self.timing = loadgen.RequestTiming(start=time.perf_counter())
        self._on_final = on_final
        self._on_first_token = on_first_token
        # more than 1: the first token's text was held back (empty, an incomplete character, trailing
        # whitespace or a possible stop string) and went out with a later token's
        self.tokens_in_first_response = 0

    def send(self, response: dict, final: bool) -> None:
        now = time.perf_counter()
        had_tokens = self.tokens > 0
        self.timing.record(now, int(np.asarray(response["num_output_tokens"]).reshape(-1)[0]))
        if not had_tokens and self.tokens > 0:
            self.tokens_in_first_response = self.tokens
            if self._on_first_token is not None:
                self._on_first_token()
        if final:
            self._finish(now)

    def fail(self, message: str) -> None:
        self.timing.error = message
        self._finish(time.perf_counter())

    def _finish(self, now: float) -> None:
        self.timing.end = now
        self._on_final()

    @property
    def tokens(self) -> int:
        return self.timing.output_tokens


def prompt_ids(service, question: str, tiles: int = 1) -> np.ndarray:
    """The card's prompt for one image of `tiles` 448 tiles (num_image_token `<IMG_CONTEXT>` each)."""
    cfg = service.config
    prompt = build_prompt("<image>\n" + question, None, [tiles], cfg.num_image_token, cfg.template,
                          system_message=cfg.system_message)
    return np.asarray(service.tokenizer.encode(prompt), dtype=np.int32)


def image_rows(service, ids: np.ndarray) -> int:
    """How many image rows a request with prompt `ids` brings: one per `<IMG_CONTEXT>` position."""
    return int(np.count_nonzero(ids == service.tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)))


def make_request(ids: np.ndarray, rows: int, hidden: int, seed: int, new_tokens: int) -> LLMRequest:
    rng = np.random.default_rng(seed)
    embeds = (rng.standard_normal((rows, hidden), dtype=np.float32) * 0.02).astype(np.float32)
    sampling = SamplingParams(max_tokens=new_tokens, ignore_eos=True).validate()
    return LLMRequest(input_ids=ids, image_embeds=embeds, text_input="",
                      generation=GenerationRequest(sampling=sampling, stream=True))


def run_level(service, ids: np.ndarray, level: int, num_requests: int, new_tokens: int, seed0: int) -> dict:
    """num_requests requests, `level` in flight at a time; loadgen.summarize's row."""
    rows, hidden = image_rows(service, ids), service.config.llm_config.hidden_size
    requests = [make_request(ids, rows, hidden, seed0 + i, new_tokens) for i in range(num_requests)]
    slots = threading.Semaphore(level)  # each request's final response gives its slot back
    sinks: list[TimedSink] = []
    before = llm_counters(service)
    t0 = time.perf_counter()
    for i, request in enumerate(requests):
        slots.acquire()
        sink = TimedSink(slots.release)
        sink.timing.opening = i < level  # submitted at once, before any answer (loadgen.ttft_rounds)
        sinks.append(sink)
        service.submit(request, sink, client_id=f"alone-{level}-{i}")
    for _ in range(level):  # every slot back: every request answered
        slots.acquire()
    wall = time.perf_counter() - t0
    row = loadgen.summarize(level, [s.timing for s in sinks], wall)
    after = llm_counters(service)
    row["engine_steps"] = engine_step_figures(before, after)
    # the llm's TTFT and its parts (engine queue, prefill) as the server's metrics give them
    row["ttft_stages"] = ttft_stage_figures(before, after)
    return row


def llm_counters(service) -> dict:
    """Every value the llm's Triton model exports (llm_values: its step counters, its TTFT and the TTFT's
    parts from the metered thread), read in-process."""
    return llm_values(service.engine, service.thread.metrics, service.thread)


def gpu_busy_us(prof) -> float:
    """Microseconds in which at least one kernel or copy ran on the GPU (the union of intervals)."""
    intervals = []
    for e in prof.profiler.kineto_results.events():
        if e.device_type() == torch.autograd.DeviceType.CUDA and e.duration_ns() > 0:
            intervals.append((e.start_ns(), e.start_ns() + e.duration_ns()))
    intervals.sort()
    busy, end = 0, None
    for a, b in intervals:
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    return busy / 1e3


def profile_level(service, ids: np.ndarray, level: int, new_tokens: int, seed0: int,
                  warm_tokens: int = 24, window_tokens: int = 48) -> dict:
    """`level` requests in steady decode; over a window of `window_tokens` steps: wall and GPU busy
    per step (ms). A decode step gives every running sequence one token, so the steps in the window are
    the tokens one request received during it."""
    from torch.profiler import ProfilerActivity, profile

    if warm_tokens + window_tokens >= new_tokens:
        raise ValueError(f"the profile window needs more than {warm_tokens + window_tokens} new tokens")
    rows, hidden = image_rows(service, ids), service.config.llm_config.hidden_size
    finished = threading.Semaphore(0)
    sinks = [TimedSink(finished.release) for _ in range(level)]
    for i, sink in enumerate(sinks):
        service.submit(make_request(ids, rows, hidden, seed0 + i, new_tokens), sink, client_id=f"prof-{level}-{i}")

    def wait_tokens(n):
        while min(s.tokens for s in sinks) < n and not any(s.timing.end for s in sinks):
            time.sleep(0.002)  # polling a benchmark's progress, not synchronising a test

    wait_tokens(warm_tokens)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start_tokens = sinks[0].tokens
        t0 = time.perf_counter()
        wait_tokens(start_tokens + window_tokens)
        wall = time.perf_counter() - t0
        steps = sinks[0].tokens - start_tokens
    for _ in sinks:
        finished.acquire()
    busy_ms = gpu_busy_us(prof) / 1e3
    return {"concurrency": level, "steps": steps, "wall_ms_per_step": 1e3 * wall / steps,
            "gpu_busy_ms_per_step": busy_ms / steps, "host_gap_ms_per_step": (1e3 * wall - busy_ms) / steps}


def profile_first_token(service, ids: np.ndarray, seed0: int, repeats: int = 3) -> dict:
    """One new request at a time on an idle engine, profiled from submit to its first token: the TTFT,
    the GPU busy in it (ms), and (of the last repeat) the ops with the most CUDA time, as a torch.profiler
    table (the engine thread's CPU ops are not recorded: the profiler follows this thread). Where the
    engine's own ~29 ms of TTFT at 1 stream go."""
    from torch.profiler import ProfilerActivity, profile

    rows, hidden = image_rows(service, ids), service.config.llm_config.hidden_size
    out = {"repeats": []}
    for r in range(repeats):
        first, finished = threading.Event(), threading.Semaphore(0)
        sink = TimedSink(finished.release, on_first_token=first.set)
        request = make_request(ids, rows, hidden, seed0 + r, 8)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            service.submit(request, sink, client_id=f"ttft-{r}")
            first.wait()
            ttft_ms = 1e3 * (time.perf_counter() - t0)
        finished.acquire()
        out["repeats"].append({"ttft_ms": ttft_ms, "gpu_busy_ms": gpu_busy_us(prof) / 1e3,
                               "tokens_in_first_response": sink.tokens_in_first_response})
    averages = prof.key_averages()
    out["top_cuda"] = averages.table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--levels", default="1,8,32,64")
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--question", default="Please describe this image in detail.")
    parser.add_argument("--tiles", type=int, default=1,
                        help="448 tiles in each request's image (256 rows each for V1-1): a long prompt, e.g. 12")
    parser.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an llm model parameter (config.pbtxt `parameters`), e.g. quantization=int8")
    parser.add_argument("--profile-levels", default="",
                        help="levels at which to add the per-step wall vs GPU-busy breakdown")
    parser.add_argument("--profile-first-token", action="store_true",
                        help="also profile single requests from submit to their first token")
    parser.add_argument("--fp8-linears-quantize-their-rows", action="store_true",
                        help="with quantization=fp8: each fp8 linear quantizes its own input, as before the norms "
                             "and SiLU-and-mul wrote them quantized (an A/B of that; the engine on this process's "
                             "thread only)")
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a check of this script)")
    args = parser.parse_args(argv)

    from internvl_serve.serving.llm import LLMService

    options = {"engine_process": "false", **dict(kv.split("=", 1) for kv in args.engine_option)}
    if args.fp8_linears_quantize_their_rows:
        from internvl_serve.engine.llama import DecoderLayer

        if options["engine_process"] != "false":
            parser.error("--fp8-linears-quantize-their-rows changes this process's model: not with engine_process")
        DecoderLayer.takes_fp8_rows = property(lambda self: False)
    service = LLMService(args.checkpoint, device=args.device, engine_options=options)
    service.thread = MeteredEngineThread(service.thread, GenerationMetrics())  # as the llm model's exporter does
    result = {"engine_options": options, "levels": [], "profile": [],
              "fp8_linears_quantize_their_rows": args.fp8_linears_quantize_their_rows}
    try:
        ids = prompt_ids(service, args.question, args.tiles)
        result["prompt_tokens"] = int(len(ids))
        result["tiles"] = args.tiles
        run_level(service, ids, 1, 1, 16, seed0=999_999)  # warm-up
        for level in [int(x) for x in args.levels.split(",") if x]:
            row = run_level(service, ids, level, max(2, level * args.requests_per_stream), args.new_tokens,
                            seed0=10_000 * level)
            print(json.dumps(row), flush=True)
            result["levels"].append(row)
        for level in [int(x) for x in args.profile_levels.split(",") if x]:
            row = profile_level(service, ids, level, args.new_tokens, seed0=7_000_000 + 1000 * level)
            print(json.dumps(row), flush=True)
            result["profile"].append(row)
        if args.profile_first_token:
            result["first_token"] = profile_first_token(service, ids, seed0=8_000_000)
            print(json.dumps(result["first_token"]["repeats"]), flush=True)
            print(result["first_token"]["top_cuda"], flush=True)
        result["stats_after"] = service.engine.stats()
    finally:
        service.shutdown()
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
