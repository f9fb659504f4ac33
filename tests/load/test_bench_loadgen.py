"""The benchmark's load generators against the real tritonserver on the tiny checkpoint: the closed loop
(bench/loadgen.py, N streams) and the open loop (bench/openloop.py, Poisson arrivals with a new image per
request, with and without a cap on requests in flight). Asserts on the work done (every request answered,
its tokens, requests in flight), never on times. The schedule, options and table: tests/unit/
test_bench_helpers.py."""
from __future__ import annotations

import asyncio
import math
import os
import sys

import pytest

from loadtest_helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))
import benchmark  # noqa: E402  (bench/: its question and its distinct images)
import loadgen  # noqa: E402
import openloop  # noqa: E402
import proc_cpu  # noqa: E402

MAX_TOKENS = 8  # with ignore_eos: every answer exactly this long


def check_answered(row: dict, n: int) -> None:
    assert row["errors"] == 0, row["first_error"]
    assert row["requests"] == n
    assert row["output_tokens"] == n * MAX_TOKENS and row["mean_tokens_per_request"] == MAX_TOKENS
    assert all(math.isfinite(row[k]) for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "latency_p95_ms",
                                                "output_tok_per_s", "mean_in_flight"))
    assert 0 < row["ttft_p50_ms"] <= row["latency_p50_ms"]  # the first token comes before the end


def test_closed_loop_row(server):
    images = benchmark.level_images(2, 4)
    row = asyncio.run(loadgen.run_level(server.grpc_url, 2, 4, benchmark.QUESTION, images, MAX_TOKENS))
    check_answered(row, 4)
    assert row["concurrency"] == 2 and row["peak_in_flight"] == 2  # both streams start at once
    assert 0 < row["mean_in_flight"] <= 2
    # each stream's first request is the opening burst; the two after them are the later round
    assert row["ttft_opening_requests"] == 2 and row["ttft_later_requests"] == 2
    assert 0 < row["ttft_later_p50_ms"] <= row["ttft_later_p95_ms"]


def test_open_loop_answers_every_arrival_at_each_rate(server):
    rates, n, seed = [4.0, 16.0], 6, 3
    logged = []
    section = openloop.run_rates(server.grpc_url, rates, benchmark.QUESTION, benchmark.open_loop_images,
                                 MAX_TOKENS, seed=seed, num_requests=n, log=logged.append)
    assert [r["offered_req_per_s"] for r in section["rows"]] == rates and len(logged) == 2
    assert section["seed"] == seed and section["requests_per_rate"] == n and section["max_in_flight"] is None
    for k, row in enumerate(section["rows"]):
        check_answered(row, n)
        assert row["answered"] == row["requests"] == n  # achieved count == sent count
        assert row["peak_in_flight"] >= 1 and row["waited_for_slot"] == 0
        arrivals = openloop.poisson_arrivals(rates[k], seed=seed + k, num_requests=n)  # rate k's schedule
        assert row["scheduled_req_per_s"] == pytest.approx((n - 1) / arrivals[-1])
        assert row["achieved_req_per_s"] > 0


def test_open_loop_with_a_cap_waits_for_a_slot(server):
    n = 5
    arrivals = openloop.poisson_arrivals(1e6, seed=0, num_requests=n)  # all due at once (microseconds apart)
    row = asyncio.run(openloop.run_rate(server.grpc_url, 1e6, arrivals, benchmark.QUESTION,
                                        benchmark.open_loop_images(9, n), MAX_TOKENS, max_in_flight=1))
    check_answered(row, n)
    assert row["peak_in_flight"] == 1 and row["max_in_flight"] == 1
    assert row["waited_for_slot"] >= 1  # the first is still being answered when the others arrive
    # a wait for the slot is part of the latency: the last request's TTFT includes the others' time
    assert row["ttft_p99_ms"] > row["send_delay_p95_ms"] > 0


def test_open_loop_refuses_a_bad_call(server):
    with pytest.raises(ValueError, match="one image per request: 1 images for 2 arrivals"):
        asyncio.run(openloop.run_rate(server.grpc_url, 1.0, [0.0, 0.5], "q", [b"x"], MAX_TOKENS))
    with pytest.raises(ValueError, match="max_in_flight must be >= 1 or None"):
        asyncio.run(openloop.run_rate(server.grpc_url, 1.0, [0.0], "q", [b"x"], MAX_TOKENS, max_in_flight=0))


def test_cpu_meter_names_every_process_and_counts_the_level_past_the_guard_too(server):
    """bench/proc_cpu.py over one closed-loop level through the gRPC guard and one at tritonserver's own
    port (benchmark.py --direct-levels): every process of the server named by role, each with the CPU
    it spent; the llm stub works in both levels, the guard only in the first."""
    groups = proc_cpu.server_groups(server)
    assert groups["load generator"] == [os.getpid()] and groups["tritonserver"] == [server.pid]
    assert groups["gRPC guard"] == [server.guard_pid("grpc")] and server.guard_pid("grpc") not in (None, server.pid)
    stubs = server.stub_processes()
    for model in ("preprocess", "vision", "llm"):  # every stub in its model's group, none twice
        assert sorted(groups[model]) == sorted(p for p, name in stubs.items() if name.startswith(model + "_"))
    every = [pid for pids in groups.values() for pid in pids]
    assert len(every) == len(set(every))

    rows = {}
    for path, url in (("guard", server.grpc_url), ("direct", server.triton_grpc_url)):
        meter = proc_cpu.CpuMeter(groups)
        meter.start()
        row = asyncio.run(loadgen.run_level(url, 4, 16, benchmark.QUESTION, benchmark.level_images(4, 16), 32))
        rows[path] = cores = meter.stop(row["wall_s"])
        assert row["errors"] == 0, row["first_error"]
        assert set(cores) == set(groups) and all(c >= 0 for c in cores.values())
        assert cores["llm"] > 0 and cores["load generator"] > 0  # 16 requests of 32 tokens each
    assert rows["guard"]["gRPC guard"] > 0  # 16 x 32 responses through it
    assert rows["direct"]["gRPC guard"] < rows["guard"]["gRPC guard"]
