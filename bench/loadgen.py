"""Concurrent streaming load against the `internvl_chat` ensemble over gRPC, with per-token timing.

Owns: sending N streaming chat requests at a fixed concurrency (the closed loop) through tritonclient's
asyncio gRPC client, and turning response arrival times into one row: time-to-first-token (also split
into the opening burst and the later rounds), inter-token latency, end-to-end latency, output tokens/s,
requests in flight (`summarize`, the one place for percentiles and token accounting; engine_alone.py and
openloop.py use it too). Does not own: starting the server (the launcher does), the open loop's Poisson
arrivals (openloop.py) or printing tables (benchmark.py).

Token accounting: a streamed response carries a text delta and the cumulative `num_output_tokens`, so
a delta that holds k tokens contributes k inter-token gaps of (its gap / k).
"""
from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc.aio as grpcclient
from internvl_client.request import ChatRequest, to_infer_inputs


@dataclass
class RequestTiming:
    start: float
    first_token: float | None = None
    end: float | None = None
    output_tokens: int = 0
    gaps: list[float] = field(default_factory=list)  # seconds between tokens, one per token after the first
    error: str | None = None
    # open loop: when the request was due (before any wait for a slot): TTFT and latency count from it
    arrival: float | None = None
    last_token: float | None = None  # when the last response that carried tokens arrived
    # closed loop: one of the level's opening burst (each stream's first request, all sent at once);
    # summarize splits TTFT into that burst and the later rounds, whose sends follow the answers
    opening: bool = False

    def record(self, now: float, count: int) -> None:
        """A response at `now` whose cumulative token count is `count`: a delta of k new tokens gives k
        gaps of (its gap / k); the first response's first token is the TTFT, not a gap."""
        new = count - self.output_tokens
        if new <= 0:
            return
        if self.first_token is None:
            self.first_token, gaps, since = now, new - 1, now
        else:
            gaps, since = new, self.last_token
        if gaps > 0:
            self.gaps.extend([(now - since) / gaps] * gaps)
        self.last_token, self.output_tokens = now, count

    @property
    def origin(self) -> float:
        return self.start if self.arrival is None else self.arrival


def build_inputs(question: str, image: bytes | None, max_tokens: int, ignore_eos: bool) -> list:
    """One streamed request's input tensors, built by the client SDK (internvl_client.request)."""
    generation = {"max_tokens": max_tokens, **({"ignore_eos": True} if ignore_eos else {})}
    return to_infer_inputs(ChatRequest(question, images=[] if image is None else [image], generation=generation))


async def one_request(client, model: str, inputs: list, request_id: str,
                      arrival: float | None = None, opening: bool = False) -> RequestTiming:
    timing = RequestTiming(start=time.perf_counter(), arrival=arrival, opening=opening)

    async def requests():
        yield {"model_name": model, "inputs": inputs, "request_id": request_id}

    try:
        async for result, error in client.stream_infer(requests()):
            now = time.perf_counter()
            if error is not None:
                timing.error = str(error)
                break
            timing.record(now, int(result.as_numpy("num_output_tokens")[0]))
            if result.as_numpy("finish_reason")[0]:
                break
    except Exception as exc:  # noqa: BLE001 - a benchmark records every failure
        timing.error = repr(exc)
    timing.end = time.perf_counter()
    return timing


async def run_level(url: str, concurrency: int, num_requests: int, question: str,
                    image: bytes | list[bytes] | None, max_tokens: int, ignore_eos: bool = True,
                    model: str = "internvl_chat") -> dict:
    """image: one image for every request, or a list: request i sends image[i % len(image)]."""
    client = grpcclient.InferenceServerClient(url)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(num_requests):
        queue.put_nowait(i)
    timings: list[RequestTiming] = []

    async def worker():
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            inputs = build_inputs(question, image[i % len(image)] if isinstance(image, list) else image,
                                  max_tokens, ignore_eos)
            # the first `concurrency` indices are the workers' first requests: taken before any await
            timings.append(await one_request(client, model, inputs, f"c{concurrency}-{i}", opening=i < concurrency))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    return summarize(concurrency, timings, wall)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), p))


def in_flight(timings: list[RequestTiming], wall: float) -> tuple[int, float]:
    """(peak, time-averaged) number of requests between their send and their end, over `wall` seconds
    (the mean is Little's law: the sum of the requests' times in flight / wall)."""
    spans = [(t.start, t.end) for t in timings if t.end is not None]
    # at equal times an end comes before a start: a request sent as another ends does not overlap it
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak, (sum(e - s for s, e in spans) / wall if wall > 0 else float("nan"))


def ttft_rounds(ok: list[RequestTiming]) -> dict:
    """A closed loop's TTFT split into its opening burst (every stream's first request, sent at once)
    and the later rounds (each sent as its stream's last answer ended): the burst's first tokens wait
    for all of its images at once, so with few requests per stream it sets the level's p50. Empty when
    no request is marked as the opening (the open loop) or none came after it."""
    split = {name: [1e3 * (t.first_token - t.origin) for t in ok if t.first_token is not None and t.opening == opening]
             for name, opening in (("opening", True), ("later", False))}
    if not split["opening"] or not split["later"]:
        return {}
    return {f"ttft_{name}_{key}": value for name, values in split.items() for key, value in
            (("requests", len(values)), ("p50_ms", pct(values, 50)), ("p95_ms", pct(values, 95)))}


def summarize(concurrency: int, timings: list[RequestTiming], wall: float) -> dict:
    ok = [t for t in timings if t.error is None]
    ttft = [t.first_token - t.origin for t in ok if t.first_token is not None]
    latency = [t.end - t.origin for t in ok if t.end is not None]
    gaps = [g for t in ok for g in t.gaps]
    tokens = sum(t.output_tokens for t in ok)
    peak, mean_in_flight = in_flight(timings, wall)
    return {
        "concurrency": concurrency,
        "requests": len(timings),
        "errors": len(timings) - len(ok),
        "first_error": next((t.error for t in timings if t.error), None),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_per_s": tokens / wall if wall > 0 else float("nan"),
        "ttft_mean_ms": 1e3 * statistics.mean(ttft) if ttft else float("nan"),
        "ttft_p50_ms": 1e3 * pct(ttft, 50),
        "ttft_p95_ms": 1e3 * pct(ttft, 95),
        "ttft_p99_ms": 1e3 * pct(ttft, 99),
        "itl_p50_ms": 1e3 * pct(gaps, 50),
        "itl_p95_ms": 1e3 * pct(gaps, 95),
        "latency_p50_ms": 1e3 * pct(latency, 50),
        "latency_p95_ms": 1e3 * pct(latency, 95),
        "peak_in_flight": peak,
        "mean_in_flight": mean_in_flight,
        "mean_tokens_per_request": statistics.mean([t.output_tokens for t in ok]) if ok else 0,
        **ttft_rounds(ok),
    }
