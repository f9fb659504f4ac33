"""Open-loop load: requests arrive by a Poisson process at a given rate, whatever the server is doing.

Owns: the arrival schedule (seeded exponential gaps: the same seed gives the same arrival times),
sending each request at its arrival time (no cap by default; optionally at most `max_in_flight` at a
time, counting the arrivals that had to wait for a slot), the open-loop row (offered against achieved
request rate) and its results.md table. Does not own: one request's timing, the percentiles, token
accounting and requests in flight (loadgen.py: `one_request`, `summarize`), the images (the caller's,
one per request) or the server (benchmark.py starts it; `main` below can start the tiny one).

Why: benchmark.py's closed loop starts N streams at once and sends a stream's next request when its
last ends, so its TTFT at 32 streams is that of a burst (32 new images reach vision at t = 0), and the
load waits for the server. Here the load does not wait: past the server's capacity the queue grows.

Measured per rate: TTFT and end-to-end latency count from the request's arrival time, so a wait for a
slot under `max_in_flight` counts (the client's queue is part of the latency); `send_delay_p95_ms` is
how late requests left after their arrival (the client keeping up, or the slot wait). Rates:
`offered_req_per_s` is the rate asked for, `scheduled_req_per_s` the rate of the drawn arrivals
((n - 1) / (last - first arrival)), `achieved_req_per_s` the same over the answered requests' end
times: near the scheduled rate while the server keeps up, its capacity when it does not.

    python bench/openloop.py --tiny --arrival-rates 0.5,1 --arrival-requests 8 --max-tokens 16  # tiny CPU server
    python bench/openloop.py --url HOST:8001 --arrival-rates 1,2,4 --arrival-requests 100       # a running server
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable

import numpy as np
import tritonclient.grpc.aio as grpcclient

import loadgen

DEFAULT_REQUESTS = 64  # per rate, when neither a count nor a duration is given

def poisson_arrivals(rate: float, *, seed: int, num_requests: int | None = None,
                     duration_s: float | None = None) -> list[float]:
    """Arrival times in seconds from the first (which is at 0): gaps drawn exponential with mean 1 / rate
    from numpy's generator seeded `seed`. Exactly one of num_requests (that many arrivals) or duration_s
    (every arrival before it)."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"arrival rate must be a finite number of requests per second > 0, got {rate!r}")
    if (num_requests is None) == (duration_s is None):
        raise ValueError("give exactly one of num_requests and duration_s for the arrival schedule")
    if num_requests is not None and (isinstance(num_requests, bool) or not isinstance(num_requests, int)
                                     or num_requests < 1):
        raise ValueError(f"num_requests must be an integer >= 1, got {num_requests!r}")
    if duration_s is not None and not (isinstance(duration_s, (int, float)) and math.isfinite(duration_s)
                                       and duration_s > 0):
        raise ValueError(f"duration_s must be a finite number of seconds > 0, got {duration_s!r}")
    rng = np.random.default_rng(seed)
    if num_requests is not None:
        gaps = rng.exponential(1.0 / rate, num_requests - 1)
        return [0.0, *np.cumsum(gaps).tolist()]
    times = [0.0]
    while True:  # draw in chunks until one arrival falls at or past the end
        for gap in rng.exponential(1.0 / rate, max(16, int(rate * duration_s))):
            if times[-1] + gap >= duration_s:
                return times
            times.append(times[-1] + float(gap))


def _rate(times: list[float]) -> float:
    return (len(times) - 1) / (max(times) - min(times)) if len(times) > 1 and max(times) > min(times) else float("nan")


async def run_rate(url: str, rate: float, arrivals: list[float], question: str, images: list[bytes],
                   max_tokens: int, *, max_in_flight: int | None = None, ignore_eos: bool = True,
                   model: str = "internvl_chat") -> dict:
    """Send request i (with images[i]) at arrivals[i] seconds after the start, each on its own task;
    the row when every request has ended."""
    if len(images) != len(arrivals):
        raise ValueError(f"one image per request: {len(images)} images for {len(arrivals)} arrivals")
    if max_in_flight is not None and max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1 or None (no cap), got {max_in_flight!r}")
    client = grpcclient.InferenceServerClient(url)
    slots = asyncio.Semaphore(max_in_flight) if max_in_flight else None
    timings: list[loadgen.RequestTiming] = []
    waited = 0

    async def send(i: int, due: float) -> None:
        nonlocal waited
        inputs = loadgen.build_inputs(question, images[i], max_tokens, ignore_eos)
        waited += bool(slots and slots.locked())
        async with slots or contextlib.nullcontext():
            timings.append(await loadgen.one_request(client, model, inputs, f"r{rate:g}-{i}", arrival=due))

    t0 = time.perf_counter()
    tasks = []
    for i, at in enumerate(arrivals):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # the arrival process itself, not a synchronization
        tasks.append(asyncio.create_task(send(i, t0 + at)))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    await client.close()
    row = {k: v for k, v in loadgen.summarize(0, timings, wall).items() if k != "concurrency"}
    ends = [t.end for t in timings if t.error is None and t.end is not None]
    return {"offered_req_per_s": rate, "scheduled_req_per_s": _rate(arrivals), "achieved_req_per_s": _rate(ends),
            "answered": len(ends), **row, "max_in_flight": max_in_flight, "waited_for_slot": waited,
            "send_delay_p95_ms": 1e3 * loadgen.pct([t.start - t.origin for t in timings], 95)}


def run_rates(url: str, rates: list[float], question: str, images_for: Callable[[int, int], list[bytes]],
              max_tokens: int, *, seed: int = 0, num_requests: int | None = None, duration_s: float | None = None,
              max_in_flight: int | None = None, log: Callable[[str], None] = print) -> dict:
    """Each rate in turn (the server idle between them): results.json's `open_loop` section.
    images_for(k, n): n distinct images for the k-th rate."""
    schedules = [poisson_arrivals(r, seed=seed + k, num_requests=num_requests, duration_s=duration_s)
                 for k, r in enumerate(rates)]   # every rate checked before any request is sent
    section = {"seed": seed, "requests_per_rate": num_requests, "duration_s": duration_s,
               "max_in_flight": max_in_flight, "max_tokens": max_tokens, "rows": []}
    for k, (rate, arrivals) in enumerate(zip(rates, schedules)):
        row = asyncio.run(run_rate(url, rate, arrivals, question, images_for(k, len(arrivals)), max_tokens,
                                   max_in_flight=max_in_flight))
        log(json.dumps({"open_loop": True, **row}))
        section["rows"].append(row)
    return section


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The open loop's options (benchmark.py's and this file's command line)."""
    parser.add_argument("--arrival-rates", default="",
                        help="open loop: Poisson arrivals at each of these req/s, comma-separated (default: none)")
    parser.add_argument("--arrival-requests", type=int, default=None,
                        help=f"open loop: requests per rate (default {DEFAULT_REQUESTS} unless --arrival-duration-s)")
    parser.add_argument("--arrival-duration-s", type=float, default=None,
                        help="open loop: every arrival within this many seconds per rate, instead of a count")
    parser.add_argument("--arrival-max-in-flight", type=int, default=None,
                        help="open loop: at most this many requests in flight (default: no cap)")
    parser.add_argument("--arrival-seed", type=int, default=0,
                        help="open loop: the schedule's seed (rate k uses seed + k)")


def options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict | None:
    """--arrival-* as run_rates' keyword arguments, every value checked (parser.error names the flag);
    None without --arrival-rates."""
    if not args.arrival_rates:
        return None
    if args.arrival_requests is not None and args.arrival_duration_s is not None:
        parser.error("give --arrival-requests or --arrival-duration-s, not both")
    if args.arrival_max_in_flight is not None and args.arrival_max_in_flight < 1:
        parser.error(f"--arrival-max-in-flight must be >= 1, got {args.arrival_max_in_flight}")
    num = None if args.arrival_duration_s is not None else (
        DEFAULT_REQUESTS if args.arrival_requests is None else args.arrival_requests)
    try:
        rates = [float(x) for x in args.arrival_rates.split(",") if x.strip()]
        for rate in rates:
            poisson_arrivals(rate, seed=0, num_requests=num, duration_s=args.arrival_duration_s)
    except ValueError as e:
        parser.error(f"--arrival-rates {args.arrival_rates!r} / --arrival-requests / --arrival-duration-s: {e}")
    return {"rates": rates, "seed": args.arrival_seed, "num_requests": num,
            "duration_s": args.arrival_duration_s, "max_in_flight": args.arrival_max_in_flight}


def markdown_lines(section: dict, parameters: str = "") -> list[str]:
    """The results.md table of an `open_loop` section (parameters: the server's, for a --server-compare run)."""
    per = (f"{section['requests_per_rate']} requests per rate" if section.get("requests_per_rate")
           else f"arrivals for {section.get('duration_s')} s per rate")
    cap = (f"at most {section['max_in_flight']} in flight (TTFT and latency include the wait for a slot)"
           if section.get("max_in_flight") else "no cap on requests in flight")
    server = f", the server with {parameters}" if parameters else ""
    lines = ["", f"Open loop{server} (Poisson arrivals, new image per request): " + per + f", seed {section.get('seed')}, "
             + cap + "; TTFT and latency from each request's arrival time.", "",
             "| offered req/s | scheduled / achieved req/s | requests (errors) | TTFT p50 / p95 / p99 ms | "
             "ITL p50 / p95 ms | latency p50 / p95 ms | output tok/s | in flight peak / mean | waited for a slot |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in section.get("rows", []):
        lines.append(f"| {r['offered_req_per_s']:g} | {r['scheduled_req_per_s']:.2f} / {r['achieved_req_per_s']:.2f} | "
                     f"{r['requests']} ({r['errors']}) | {r['ttft_p50_ms']:.0f} / {r['ttft_p95_ms']:.0f} / "
                     f"{r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} / {r['itl_p95_ms']:.1f} | "
                     f"{r['latency_p50_ms']:.0f} / {r['latency_p95_ms']:.0f} | {r['output_tok_per_s']:.1f} | "
                     f"{r['peak_in_flight']} / {r['mean_in_flight']:.1f} | {r['waited_for_slot']} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="gRPC HOST:PORT of a running server")
    where.add_argument("--tiny", action="store_true", help="start the tiny checkpoint's server (CPU) for the run")
    add_arguments(parser)
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (EOS ignored)")
    args = parser.parse_args(argv)
    kwargs = options(args, parser)
    if kwargs is None:
        parser.error("--arrival-rates is required")
    from benchmark import QUESTION, open_loop_images  # the benchmark's question and images

    def go(url: str) -> dict:
        return run_rates(url, question=QUESTION, images_for=open_loop_images, max_tokens=args.max_tokens, **kwargs)

    if args.tiny:
        import tempfile
        from pathlib import Path

        from internvl_serve.serving.launcher import TritonServer
        from internvl_serve.tiny import make_tiny_checkpoint

        with tempfile.TemporaryDirectory() as work:
            ckpt = make_tiny_checkpoint(Path(work) / "tiny")
            with TritonServer(ckpt, log_file=Path(work) / "server.log", ready_timeout_s=300) as server:
                section = go(server.grpc_url)
    else:
        section = go(args.url)
    print("\n".join(markdown_lines(section)))
    return 0 if all(r["errors"] == 0 for r in section["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
