"""What the HTTP guard (internvl_serve/serving/http_guard.py) costs a streamed token: the same
generate_stream requests through the guard's port and straight to tritonserver's own (loopback) port,
alternating, on one server; prints tokens/s and the time between events for each path.

    .venv/bin/python bench/http_guard_overhead.py [--checkpoint checkpoints/tiny] [--streams 4] [--tokens 200] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import requests

from internvl_serve.serving.launcher import TritonServer, ensure_default_checkpoint


def stream(base: str, tokens: int, i: int, gaps: list) -> int:
    body = {"text_input": f"Talk for a long time, {i}.", "max_tokens": tokens, "ignore_eos": True, "stream": True}
    received, last = 0, None
    with requests.post(f"{base}/v2/models/internvl_chat/generate_stream", data=json.dumps(body), stream=True,
                       timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith(b"data: "):
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
                received = json.loads(line[6:]).get("num_output_tokens", received)
    return received


def run(base: str, streams: int, tokens: int) -> tuple[float, list]:
    gaps, counts = [], [0] * streams

    def one(i):
        counts[i] = stream(base, tokens, i, gaps)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - started), gaps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with TritonServer(args.checkpoint or ensure_default_checkpoint(), exit_timeout_s=5) as server:
        run(server.http_url, args.streams, 16)  # warm-up
        results = {"guard": [], "direct": []}
        for _ in range(args.rounds):
            for name, base in (("guard", server.http_url), ("direct", server.triton_http_url)):
                results[name].append(run(base, args.streams, args.tokens))
    for name, rounds in results.items():
        rates = [rate for rate, _ in rounds]
        gaps = [g for _, gs in rounds for g in gs]
        print(f"{name:6s}: {statistics.mean(rates):7.1f} tokens/s (rounds {', '.join(f'{r:.0f}' for r in rates)}); "
              f"between events median {statistics.median(gaps) * 1e3:.2f} ms, p99 "
              f"{sorted(gaps)[int(len(gaps) * 0.99)] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
