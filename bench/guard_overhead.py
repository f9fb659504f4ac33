"""What the gRPC guard (internvl_serve/serving/grpc_guard.py) costs: the same streams direct to tritonserver
and through the guard (run as its own process, as in production), alternating rounds.

    python bench/guard_overhead.py [--checkpoint DIR] [--streams 1,8] [--max-tokens 64] [--rounds 3]

Starts the launcher's TritonServer (default: the tiny checkpoint) and `python -m
internvl_serve.serving.grpc_guard` in front of it, then for each stream count runs `--rounds` rounds of
N concurrent text streams (ignore_eos, so every stream makes exactly max_tokens tokens) over the SDK's
AsyncClient, direct and through the guard in turn. Prints output tokens/s, time to first response and
the gap between responses (p50/p95) for each path, and the guard process's CPU time per response. Both servers and the guard are stopped at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from internvl_client.aio import AsyncClient
from internvl_serve.serving.launcher import TritonServer, ensure_default_checkpoint, free_port


async def one_round(url: str, streams: int, max_tokens: int) -> dict:
    client = AsyncClient(url)
    ttft, gaps, tokens = [], [], 0

    async def one(i: int):
        nonlocal tokens
        start = last = time.perf_counter()
        first, count = True, 0
        async for chunk in client.stream_chunks(f"Talk about the number {i}.", generation_config=dict(
                max_new_tokens=max_tokens, ignore_eos=True)):
            now = time.perf_counter()
            (ttft if first else gaps).append(now - last if not first else now - start)
            first, last = False, now
            count = chunk.num_output_tokens if chunk.num_output_tokens is not None else count
        tokens += count  # the last response's count: tokens generated in all

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(streams)))
    elapsed = time.perf_counter() - start
    await client.close()
    return dict(tokens=tokens, elapsed=elapsed, ttft=ttft, gaps=gaps, responses=len(ttft) + len(gaps))


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


def summarize(rounds) -> str:
    tokens = sum(r["tokens"] for r in rounds)
    elapsed = sum(r["elapsed"] for r in rounds)
    ttft = [t for r in rounds for t in r["ttft"]]
    gaps = [g for r in rounds for g in r["gaps"]]
    return (f"{tokens / elapsed:8.1f} tok/s  TTFT p50 {pct(ttft, .5):6.1f} ms  gap p50 {pct(gaps, .5):6.2f} ms "
            f"p95 {pct(gaps, .95):6.2f} ms  mean {statistics.fmean(gaps) * 1000 if gaps else float('nan'):6.2f} ms")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_guard(upstream: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "internvl_serve.serving.grpc_guard", "--listen",
                             f"127.0.0.1:{port}", "--upstream", upstream], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("grpc guard:"):
        proc.kill()
        raise RuntimeError(f"the guard did not start: {line!r}")
    return proc, f"127.0.0.1:{port}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--streams", default="1,8")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    checkpoint = args.checkpoint or ensure_default_checkpoint()
    with TritonServer(checkpoint, exit_timeout_s=5, ready_timeout_s=300) as server:
        guard, guard_url = start_guard(server.grpc_url)
        try:
            asyncio.run(one_round(guard_url, 1, 4))  # warm-up, both paths
            for n in (int(s) for s in args.streams.split(",")):
                results = {"direct": [], "guard": []}
                guard_cpu = 0.0
                for _ in range(args.rounds):
                    results["direct"].append(asyncio.run(one_round(server.grpc_url, n, args.max_tokens)))
                    cpu = cpu_seconds(guard.pid)
                    results["guard"].append(asyncio.run(one_round(guard_url, n, args.max_tokens)))
                    guard_cpu += cpu_seconds(guard.pid) - cpu
                for path, rounds in results.items():
                    print(f"{n:3d} streams  {path:6s}  {summarize(rounds)}", flush=True)
                responses = sum(r["responses"] for r in results["guard"])
                print(f"{n:3d} streams  guard CPU {guard_cpu / responses * 1e6:.0f} us per streamed response "
                      f"({responses} responses)", flush=True)
        finally:
            guard.terminate()
            guard.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
