"""The benchmark's CPU-side helpers, so the GPU run does not find their bugs: the targets table of
results.md (bench/report.py) and --markdown-only (bench/benchmark.py), loadgen.summarize's row, the open
loop's arrival schedule, options and table (bench/openloop.py; its run against the real server is
tests/load/test_bench_loadgen.py). (The Prometheus parse and the KV-blocks-free poll are
loadtest/servermetrics.py's, tested in test_servermetrics.py; the --int8 run's model repository is
serving/layout.py's, tested in test_layout.py.)"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_bench_module(name: str):
    """bench/<name>.py, with bench/ on sys.path (where its siblings are imported from)."""
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_bench_module("benchmark")


@pytest.fixture(scope="module")
def report():
    return load_bench_module("report")


def row(streams, tok_s, ttft, itl, errors=0):
    return {"concurrency": streams, "requests": 2 * streams, "errors": errors, "first_error": None,
            "output_tok_per_s": tok_s, "ttft_p50_ms": ttft, "ttft_p95_ms": ttft, "itl_p50_ms": itl,
            "itl_p95_ms": itl}


def test_targets_and_markdown(report):
    results = {"device": "GPU", "date": "d", "commit": "c", "copy_bandwidth_gbs": 3000.0,
               "llm_weight_bytes_per_step": 25.8e9, "hbm_floor_ms": 8.6, "vision_ms_per_image_b8": 15.0,
               "baseline_sequential": {"output_tok_per_s": 60.0},
               "server": [row(1, 70, 138, 13.4), row(32, 2400, 600, 20), row(64, 900, 650, 60)],
               "server_after": {"kv_blocks_used_after": 0, "kv_blocks_total": 100},
               "server_int8": [row(1, 110, 120, 9.0)], "server_int8_after": {"kv_blocks_used_after": None}}
    t = {r["target"]: r for r in report.targets(results)}
    itl = t["ITL p50 at 1 stream"]
    assert itl["status"] == "missed" and itl["gap"].startswith("1.30x over")
    assert t["ITL p50 at 1 stream (int8 weights)"]["status"] == "met"
    assert t["output tok/s at 32 streams"]["status"] == "met"
    assert t["speed-up at 32 streams over sequential transformers chat"]["gap"].startswith("1.50x short (reaches 67%")
    assert t["ITL p50 at 32 streams"]["status"] == "met"
    assert t["TTFT p50 at 32 streams"]["gap"].startswith("2.00x over")
    assert t["output tok/s at 64 streams"]["status"] == "missed"
    assert t["the server within 15 % of the engine alone at 32 streams"]["status"] == "n/a"
    assert t["vision ms/image at batch 8 (eager)"]["status"] == "met"
    assert t["64 streams"]["status"] == "met"
    md = report.markdown(results)
    assert "| Triton server, int8 weights | 1 | 110.0 |" in md
    assert "KV blocks in use after the server run: 0 of 100." in md
    assert "KV blocks in use after the int8 server run: not available" in md
    assert "| TTFT p50 at 1 stream | <= 80 ms | 138 ms | missed | 1.73x over" in md
    results["server_after"] = {"kv_blocks_used_after": 3}
    assert report.targets(results)[-1]["status"] == "missed"
    assert report.targets(results)[-1]["gap"] == "3 blocks still held"
    del results["server_after"]
    assert report.targets(results)[-1]["status"] == "no errors; KV check not measured"


def test_engine_alone_rows_and_target(report):
    alone = {"levels": [row(1, 80, 90, 12.0), row(32, 2000, 200, 15.0)],
             "profile": [{"concurrency": 32, "steps": 48, "wall_ms_per_step": 16.0, "gpu_busy_ms_per_step": 15.0,
                          "host_gap_ms_per_step": 1.0}]}
    results = {"device": "GPU", "date": "d", "commit": "c", "copy_bandwidth_gbs": 3000.0,
               "llm_weight_bytes_per_step": 25.8e9, "hbm_floor_ms": 8.6, "server": [row(32, 1600, 250, 19)],
               "engine_alone": alone, "engine_alone[async_scheduling=false]": {"levels": [row(32, 1000, 300, 30)]},
               "server_warm": [row(1, 90, 70, 11.0), row(32, 1800, 100, 16.0)]}
    t = {r["target"]: r for r in report.targets(results)}
    within = t["the server within 15 % of the engine alone at 32 streams"]
    assert within["status"] == "missed" and within["measured"] == "0.80x"
    md = report.markdown(results)
    assert "| llm engine alone (in-process, no Triton) | 32 | 2000.0 |" in md
    assert "| llm engine alone (in-process, no Triton; async_scheduling=false) | 32 | 1000.0 |" in md
    assert "| Triton server, same image | 1 | 90.0 |" in md
    assert "| default | 32 | 16.00 | 15.00 | 1.00 |" in md
    assert "output tok/s 1600 vs 1800, ITL p50 19.0 vs 16.0 ms (+19 %)" in md
    assert "Every request sent its own image (nothing cached)." in md
    assert "ms of work per step" not in md  # no level carries the engine's step counters


def test_the_engine_steps_table_has_a_row_per_level_that_carries_them(report):
    server = row(64, 2000, 900, 22.0)
    server["engine_steps"] = {"steps": 1000, "ms_per_step": 21.9, "device_wait_share": 0.62}
    alone = row(64, 3200, 300, 15.9)
    alone["engine_steps"] = {"steps": 800, "ms_per_step": 15.4, "device_wait_share": 0.97}
    results = {"device": "GPU", "date": "d", "commit": "c", "copy_bandwidth_gbs": 3000.0,
               "llm_weight_bytes_per_step": 25.8e9, "hbm_floor_ms": 8.6,
               "server": [row(32, 1600, 250, 19), server], "engine_alone": {"levels": [alone]}}
    md = report.markdown(results)
    assert "| Triton server (gRPC stream) | 64 | 1000 | 21.90 | 62 % |" in md
    assert "| llm engine alone (in-process, no Triton) | 64 | 800 | 15.40 | 97 % |" in md
    assert "| Triton server (gRPC stream) | 32 |" not in md.split("ms of work per step")[1]


def test_the_ttft_stages_table_splits_each_server_levels_mean(report):
    server = row(32, 1800, 600, 16.0)
    server.update(ttft_mean_ms=650.0, ttft_stages={
        "preprocess_queue_ms": 2.0, "preprocess_compute_ms": 9.0, "vision_queue_ms": 250.0,
        "vision_compute_ms": 140.0, "llm_stub_queue_ms": 12.0, "llm_stub_compute_ms": 4.0,
        "llm_first_token_ms": 220.0, "llm_queue_ms": 20.0, "llm_prefill_ms": 200.0})
    older = row(64, 2500, 700, 20.0)  # a results.json from before the llm stub's figures
    older.update(ttft_mean_ms=700.0, ttft_stages={
        "preprocess_queue_ms": 2.0, "preprocess_compute_ms": 9.0, "vision_queue_ms": 250.0,
        "vision_compute_ms": 140.0, "llm_first_token_ms": 220.0})
    partial = row(1, 150, 80, 6.0)
    partial.update(ttft_mean_ms=80.0, ttft_stages={"llm_first_token_ms": 30.0})  # no Triton counters read
    results = {"device": "GPU", "date": "d", "commit": "c", "copy_bandwidth_gbs": 3000.0,
               "llm_weight_bytes_per_step": 25.8e9, "hbm_floor_ms": 8.6, "server": [partial, server, older]}
    md = report.markdown(results)
    assert ("| Triton server (gRPC stream) | 32 | 650.0 | 2.0 / 9.0 | 250.0 / 140.0 | 12.0 / 4.0 | 220.0 (20.0 + 200.0) "
            "| 13.0 |") in md
    assert "| Triton server (gRPC stream) | 1 | 80.0 |  /  |  /  |  /  | 30.0 |  |" in md
    assert "| Triton server (gRPC stream) | 64 | 700.0 | 2.0 / 9.0 | 250.0 / 140.0 |  /  | 220.0 | 79.0 |" in md
    assert "TTFT mean" not in report.markdown(dict(results, server=[row(32, 1800, 600, 16.0)]))


def test_rows_past_the_guard_and_the_cores_table(report):
    spec = "llm.host_threads=1"
    guarded = row(64, 2700, 700, 21.0)
    guarded["cpu_cores"] = {"load generator": 0.82, "gRPC guard": 0.61, "tritonserver": 0.4, "llm": 1.1,
                            "llm children": 1.9}
    direct = row(64, 2800, 650, 20.5)
    direct["cpu_cores"] = {"load generator": 0.8, "gRPC guard": 0.0, "tritonserver": 0.45, "llm": 1.2,
                           "llm children": 2.0, "vision": 0.3}  # a group the first row lacks
    results = {"device": "GPU", "date": "d", "commit": "c", "copy_bandwidth_gbs": 3000.0,
               "llm_weight_bytes_per_step": 25.8e9, "hbm_floor_ms": 8.6,
               f"server[{spec}]": [guarded], f"server[{spec}]_direct": [direct]}
    md = report.markdown(results)
    label = f"Triton server (gRPC stream; {spec})"
    assert f"| {label} | 64 | 2700.0 | 700 / 700 |" in md
    assert f"| {label}, past the gRPC guard | 64 | 2800.0 | 650 / 650 |" in md
    assert "| path | streams | load generator | gRPC guard | tritonserver | llm | llm children | vision |" in md
    assert f"| {label} | 64 | 0.82 | 0.61 | 0.40 | 1.10 | 1.90 |  |" in md
    assert f"| {label}, past the gRPC guard | 64 | 0.80 | 0.00 | 0.45 | 1.20 | 2.00 | 0.30 |" in md
    assert "CPU cores" not in report.markdown(dict(results, **{f"server[{spec}]": [row(64, 2700, 700, 21.0)],
                                                           f"server[{spec}]_direct": []}))


def test_server_compare_runs_get_their_rows_and_after_line(bench, report):
    layout = bench.compare_layout("llm.encoder_priority_ms=50, vision.quantization=fp8")
    assert layout.llm_parameters == {"encoder_priority_ms": "50"}
    assert layout.vision_parameters == {"quantization": "fp8"} and layout.vision_max_batch_size is None
    layout = bench.compare_layout("vision.max_batch_size=2,vision.quantization=fp8")
    assert (layout.vision_max_batch_size, layout.vision_parameters) == (2, {"quantization": "fp8"})
    with pytest.raises(ValueError, match="vision_max_batch_size must be >= 1"):
        bench.compare_layout("vision.max_batch_size=0")
    for bad in ("encoder_priority_ms=50", "preprocess.x=1", "llm.quantization"):
        with pytest.raises(ValueError, match="MODEL.KEY=VALUE"):
            bench.compare_layout(bad)
    spec = "llm.encoder_priority_ms=50"
    results = {"device": "GPU", "date": "d", "commit": "c", "copy_bandwidth_gbs": 3000.0,
               "llm_weight_bytes_per_step": 25.8e9, "hbm_floor_ms": 8.6, "server": [row(32, 1400, 900, 16)],
               f"server[{spec}]": [row(32, 1350, 800, 17)],
               f"server[{spec}]_after": {"kv_blocks_used_after": 0, "kv_blocks_total": 2153, "encoder_wait_s": 0.91}}
    md = report.markdown(results)
    assert f"| Triton server (gRPC stream; {spec}) | 32 | 1350.0 | 800 / 800 |" in md
    assert (f"KV blocks in use after the server with {spec} run: 0 of 2153; decode steps held for the vision "
            "encoder: 0.9 s in all.") in md
    assert {r["target"]: r for r in report.targets(results)}["output tok/s at 32 streams"]["measured"] == "1400.0 tok/s"


def test_int8_weight_bytes(report):
    bf16 = 2 * (40 * (4 * 5120 * 5120 + 3 * 5120 * 13824) + 41840 * 5120 + 2 * 5120)
    int8 = report.int8_weight_bytes_per_step(bf16)
    assert int8 == 40 * (4 * 5120 * 5120 + 3 * 5120 * 13824) + 4 * 40 * (5 * 5120 + 2 * 13824) \
        + 2 * (41840 * 5120 + 2 * 5120)
    assert 13.0e9 < int8 < 13.2e9


# ---- the open loop (bench/openloop.py) and loadgen.summarize's rows ---------------------------------------
@pytest.fixture(scope="module")
def openloop(bench):
    import openloop  # bench/ is on sys.path (the bench fixture)

    return openloop


def test_the_arrival_schedule_is_seeded(openloop):
    a = openloop.poisson_arrivals(2.0, seed=7, num_requests=50)
    assert a == openloop.poisson_arrivals(2.0, seed=7, num_requests=50)
    assert a != openloop.poisson_arrivals(2.0, seed=8, num_requests=50)
    assert len(a) == 50 and a[0] == 0.0 and all(x < y for x, y in zip(a, a[1:]))
    # by duration: the same draws, cut at the end
    d = openloop.poisson_arrivals(2.0, seed=7, duration_s=5.0)
    assert d == a[:len(d)] and d[-1] < 5.0 <= a[len(d)]


def test_the_mean_gap_is_one_over_the_rate(openloop):
    for rate in (0.5, 4.0, 100.0):
        gaps = np.diff(openloop.poisson_arrivals(rate, seed=0, num_requests=20_001))
        assert abs(gaps.mean() - 1 / rate) < 0.03 / rate  # 20,000 gaps: the mean's sd is 0.7 % of it
        assert abs(gaps.std() - 1 / rate) < 0.05 / rate   # exponential: sd = mean
    n = [len(openloop.poisson_arrivals(4.0, seed=s, duration_s=50.0)) for s in range(20)]
    assert abs(np.mean(n) - 200) < 10  # ~ rate x duration arrivals


@pytest.mark.parametrize("rate", [0, 0.0, -1.0, float("nan"), float("inf"), "2", None, True])
def test_a_rate_that_is_not_positive_is_refused(openloop, rate):
    with pytest.raises(ValueError, match=r"arrival rate must be a finite number of requests per second > 0, got "):
        openloop.poisson_arrivals(rate, seed=0, num_requests=3)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "give exactly one of num_requests and duration_s"),
    ({"num_requests": 3, "duration_s": 1.0}, "give exactly one of num_requests and duration_s"),
    ({"num_requests": 0}, "num_requests must be an integer >= 1, got 0"),
    ({"duration_s": -1.0}, "duration_s must be a finite number of seconds > 0, got -1.0"),
])
def test_a_schedule_needs_one_count_or_duration(openloop, kwargs, message):
    with pytest.raises(ValueError, match=message):
        openloop.poisson_arrivals(1.0, seed=0, **kwargs)


@pytest.mark.parametrize("argv, message", [
    (["--arrival-rates", "1,0"], "--arrival-rates '1,0' / --arrival-requests / --arrival-duration-s: arrival rate "
                                 "must be a finite number of requests per second > 0, got 0.0"),
    (["--arrival-rates", "1,-2"], "got -2.0"),
    (["--arrival-rates", "x"], "could not convert string to float: 'x'"),
    (["--arrival-rates", "1", "--arrival-requests", "0"], "num_requests must be an integer >= 1, got 0"),
    (["--arrival-rates", "1", "--arrival-requests", "3", "--arrival-duration-s", "2"],
     "give --arrival-requests or --arrival-duration-s, not both"),
    (["--arrival-rates", "1", "--arrival-max-in-flight", "0"], "--arrival-max-in-flight must be >= 1, got 0"),
    (["--server-compare", "llm.quantization"], "expected MODEL.KEY=VALUE[,...] with MODEL llm or vision"),
    (["--arrival-rates", "2", "--skip-server"], "--skip-server without --server-compare starts none"),
])
def test_the_benchmark_refuses_bad_arrival_options_before_any_gpu_work(bench, argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--out", str(tmp_path), *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_arrival_options(bench, openloop):
    import argparse

    parser = argparse.ArgumentParser()
    openloop.add_arguments(parser)
    assert openloop.options(parser.parse_args([]), parser) is None  # default: no open loop
    assert openloop.options(parser.parse_args(["--arrival-rates", "0.5,2"]), parser) == {
        "rates": [0.5, 2.0], "seed": 0, "num_requests": openloop.DEFAULT_REQUESTS, "duration_s": None,
        "max_in_flight": None}
    assert openloop.options(parser.parse_args(["--arrival-rates", "3", "--arrival-duration-s", "10",
                                               "--arrival-max-in-flight", "4", "--arrival-seed", "5"]), parser) == {
        "rates": [3.0], "seed": 5, "num_requests": None, "duration_s": 10.0, "max_in_flight": 4}


def test_a_timing_records_its_ttft_and_one_gap_per_token_after_the_first(bench):
    import loadgen

    t = loadgen.RequestTiming(start=0.0)
    for now, count in [(0.1, 0), (0.2, 3), (0.2, 3), (0.5, 5), (0.8, 6)]:  # cumulative token counts
        t.record(now, count)
    assert t.first_token == 0.2 and t.output_tokens == 6
    assert t.gaps == pytest.approx([0.0, 0.0, 0.15, 0.15, 0.3])  # a delta of k tokens: k gaps of its gap / k


def test_summarize_counts_from_the_arrival_and_tracks_requests_in_flight(bench):
    import loadgen

    T = loadgen.RequestTiming
    timings = [T(start=0.0, first_token=0.1, end=1.0, output_tokens=4, gaps=[0.3, 0.3, 0.3]),
               T(start=0.5, first_token=0.8, end=1.5, output_tokens=4, gaps=[0.2] * 3, arrival=0.2),
               T(start=1.0, first_token=1.2, end=2.0, output_tokens=4, gaps=[0.25] * 3),  # sent as the first ends
               T(start=1.1, end=1.3, error="boom")]
    row = loadgen.summarize(2, timings, wall=2.0)
    assert row["peak_in_flight"] == 3  # 0.5-1.5, 1.0-2.0 and the failed 1.1-1.3; the first ended at 1.0
    assert row["mean_in_flight"] == pytest.approx((1.0 + 1.0 + 1.0 + 0.2) / 2.0)
    assert row["requests"] == 4 and row["errors"] == 1 and row["first_error"] == "boom"
    assert row["output_tokens"] == 12 and row["output_tok_per_s"] == 6.0
    # TTFT 0.1, 0.6 (from the arrival at 0.2, not the send at 0.5), 0.2; latency 1.0, 1.3, 1.0
    assert row["ttft_p50_ms"] == pytest.approx(200.0) and row["ttft_p99_ms"] == pytest.approx(592.0)
    assert row["ttft_mean_ms"] == pytest.approx(300.0)
    assert row["latency_p50_ms"] == pytest.approx(1000.0) and row["latency_p95_ms"] == pytest.approx(1270.0)
    assert row["itl_p50_ms"] == pytest.approx(250.0)


def test_summarize_splits_ttft_into_the_opening_burst_and_the_later_rounds(bench):
    import loadgen

    T = loadgen.RequestTiming
    opening = [T(start=0.0, first_token=f, end=2.0, output_tokens=2, gaps=[0.1], opening=True)
               for f in (0.2, 0.4, 0.6, 0.8)]  # four streams' first requests, sent at once
    later = [T(start=s, first_token=s + 0.1, end=s + 1.0, output_tokens=2, gaps=[0.1]) for s in (2.0, 2.1, 2.2)]
    failed = T(start=2.3, first_token=2.35, end=2.4, error="boom", opening=False)
    row = loadgen.summarize(4, opening + later + [failed], wall=3.5)
    assert row["ttft_opening_requests"] == 4 and row["ttft_later_requests"] == 3  # the failed one not counted
    assert row["ttft_opening_p50_ms"] == pytest.approx(500.0) and row["ttft_opening_p95_ms"] == pytest.approx(770.0)
    assert row["ttft_later_p50_ms"] == pytest.approx(100.0) and row["ttft_later_p95_ms"] == pytest.approx(100.0)
    assert row["ttft_p50_ms"] == pytest.approx(200.0)  # the level's own figures are unchanged: all seven
    # no request marked (the open loop), or only the burst (one request per stream): no split
    unmarked = [T(start=0.0, first_token=0.1, end=1.0, output_tokens=2, gaps=[0.1]) for _ in range(3)]
    assert "ttft_opening_p50_ms" not in loadgen.summarize(3, unmarked, wall=1.0)
    assert "ttft_later_p50_ms" not in loadgen.summarize(4, opening, wall=2.0)


def test_the_rounds_table_shows_each_level_that_has_both(report):
    split = row(32, 1500, 700, 15.7)
    split.update(ttft_opening_requests=32, ttft_opening_p50_ms=900.4, ttft_opening_p95_ms=1800.0,
                 ttft_later_requests=96, ttft_later_p50_ms=350.6, ttft_later_p95_ms=1200.0)
    results = {"device": "GPU", "date": "d", "commit": "c", "copy_bandwidth_gbs": 3000.0,
               "llm_weight_bytes_per_step": 25.8e9, "hbm_floor_ms": 8.6, "server": [row(1, 90, 70, 10.3), split]}
    md = report.markdown(results)
    assert "| Triton server (gRPC stream) | 32 | 32: 900 / 1800 | 96: 351 / 1200 |" in md
    assert "| Triton server (gRPC stream) | 1 |" not in md.split("opening burst")[1]
    assert "opening burst" not in report.markdown(dict(results, server=[row(32, 1500, 700, 15.7)]))


def open_loop_row(rate, requests, errors=0):
    return {"offered_req_per_s": rate, "scheduled_req_per_s": rate * 1.1, "achieved_req_per_s": rate * 0.9,
            "answered": requests - errors, "requests": requests, "errors": errors, "first_error": None,
            "output_tokens": 256 * requests, "wall_s": 10.0, "output_tok_per_s": 512.0, "ttft_p50_ms": 120.0,
            "ttft_p95_ms": 240.0, "ttft_p99_ms": 300.0, "itl_p50_ms": 11.0, "itl_p95_ms": 14.0,
            "latency_p50_ms": 2900.0, "latency_p95_ms": 3400.0, "peak_in_flight": 7, "mean_in_flight": 3.25,
            "mean_tokens_per_request": 256, "max_in_flight": None, "waited_for_slot": 0, "send_delay_p95_ms": 0.2}


def test_the_open_loop_table_and_markdown_only(bench, report, tmp_path):
    import json

    results = {"device": "GPU", "date": "d", "commit": "c", "copy_bandwidth_gbs": 3000.0,
               "llm_weight_bytes_per_step": 25.8e9, "hbm_floor_ms": 8.6, "server": [row(32, 1600, 250, 19)],
               "open_loop": {"seed": 0, "requests_per_rate": 64, "duration_s": None, "max_in_flight": None,
                             "max_tokens": 256, "rows": [open_loop_row(2, 64), open_loop_row(8, 64, errors=1)]}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert bench.main(["--markdown-only", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "results.md").read_text()
    assert ("Open loop (Poisson arrivals, new image per request): 64 requests per rate, seed 0, no cap on requests "
            "in flight; TTFT and latency from each request's arrival time.") in md
    assert "| 2 | 2.20 / 1.80 | 64 (0) | 120 / 240 / 300 | 11.0 / 14.0 | 2900 / 3400 | 512.0 | 7 / 3.2 | 0 |" in md
    assert "| 8 | 8.80 / 7.20 | 64 (1) |" in md
    # the closed loop's table and targets are unchanged by the section
    assert "| Triton server (gRPC stream) | 32 | 1600.0 |" in md
    assert "| TTFT p50 at 32 streams | <= 300 ms | 250 ms | met |" in md
    # a --server-compare server's open loop: its own table, named by its parameters
    results["open_loop[llm.encoder_priority_ms=50]"] = {**results["open_loop"], "rows": [open_loop_row(4, 32)]}
    md = report.markdown(results)
    assert "Open loop (Poisson arrivals" in md and md.count("| 2 | 2.20 / 1.80 | 64 (0) |") == 1
    assert ("Open loop, the server with llm.encoder_priority_ms=50 (Poisson arrivals, new image per request): 64 "
            "requests per rate") in md
    assert "| 4 | 4.40 / 3.60 | 32 (0) |" in md
    del results["open_loop[llm.encoder_priority_ms=50]"]
    results["open_loop"].update(requests_per_rate=None, duration_s=30.0, max_in_flight=16)
    assert "arrivals for 30.0 s per rate, seed 0, at most 16 in flight (TTFT and latency include the wait for a " \
           "slot)" in report.markdown(results)
    del results["open_loop"]
    assert "Open loop" not in report.markdown(results)


def test_the_timeline_reads_every_part_of_a_trace(tmp_path):
    """ttft_timeline.py has Triton write each trace as it completes (<file>.0, .1, ...), so a server whose
    exit hangs keeps them; read_traces merges the parts (and a whole file written at exit)."""
    timeline = load_bench_module("ttft_timeline")
    path = tmp_path / "trace.json"
    (tmp_path / "trace.json.0").write_text('[{"id":1,"model_name":"internvl_chat","request_id":"r0"},'
                                           '{"id":1,"timestamps":[{"name":"REQUEST_START","ns":5}]}]')
    (tmp_path / "trace.json.1").write_text(
        '[{"id":2,"model_name":"llm","parent_id":1},{"id":2,"timestamps":[{"name":"QUEUE_START","ns":7}]}]')
    traces = timeline.read_traces(path)
    assert traces[1] == {"model": "internvl_chat", "parent": None, "request_id": "r0", "ts": {"REQUEST_START": 5}}
    assert traces[2]["parent"] == 1 and traces[2]["ts"] == {"QUEUE_START": 7}
    path.write_text('{"id":3,"model_name":"vision","parent_id":1}\n')
    assert timeline.read_traces(path)[3]["model"] == "vision"
    assert timeline.read_traces(tmp_path / "none.json") == {}


# ---- bench/stub_sampler.py (benchmark.py --py-spy-levels) ------------------------------------------------

RAW_PY_SPY = """\
thread (11): llm-engine;Thread.run (threading.py:1010);LLMEngine.step (e.py:1);StepFuture.result (e.py:2);Event.synchronize (x.py:3) 151
thread (11): llm-engine;Thread.run (threading.py:1010);LLMEngine.step (e.py:1);ModelRunner.launch (r.py:4) 20
thread (12): llm-sender-0;Thread.run (threading.py:1010);LLMService._respond (l.py:5);TritonSink.send (m.py:6) 48
thread (13): llm-sender-1;Thread.run (threading.py:1010);LLMService._respond (l.py:5);TritonSink.send (m.py:6) 30
thread (13): llm-sender-1;Thread.run (threading.py:1010);IncrementalDetokenizer.update (d.py:7) 31
not a stack line
"""


def test_py_spy_raw_output_is_summarized_per_thread():
    summary = load_bench_module("stub_sampler").summarize(RAW_PY_SPY, rate_hz=50, top=1)
    assert summary["rate_hz"] == 50
    assert list(summary["threads"]) == ["llm-engine", "llm-sender-1", "llm-sender-0"]  # most samples first
    assert summary["threads"]["llm-engine"] == {
        "samples": 171, "top": [["LLMEngine.step;StepFuture.result;Event.synchronize", 151]]}
    assert summary["threads"]["llm-sender-1"]["samples"] == 61


def test_idle_frames_are_the_all_mode_samples_beyond_the_active_ones():
    """py-spy --idle counts every thread at every sample; the excess over the plain sampler, by frame, is
    where a thread slept (here: the engine thread 40 samples on a lock, none at its synchronize)."""
    all_mode = RAW_PY_SPY + (
        "thread (11): llm-engine;Thread.run (threading.py:1010);LLMEngine.step (e.py:1);"
        "ResponsePath.post (p.py:9);Condition.__enter__ (threading.py:1) 40\n"
        "thread (12): llm-sender-0;Thread.run (threading.py:1010);ResponsePath._run (p.py:3);Condition.wait (t.py:2) 9\n")
    sampler = load_bench_module("stub_sampler")
    idle = sampler.idle_where(all_mode, RAW_PY_SPY, top=2)
    assert list(idle) == ["llm-engine", "llm-sender-0", "llm-sender-1"]  # most idle samples first
    assert idle["llm-engine"] == {"samples": 40, "top": [["LLMEngine.step;ResponsePath.post;Condition.__enter__", 40]]}
    assert idle["llm-sender-0"]["samples"] == 9 and idle["llm-sender-1"]["samples"] == 0
    with pytest.raises(ValueError, match="mode 'idle'"):
        sampler.StubSampler(1, "x.txt", mode="idle")


def test_without_py_spy_a_level_says_why_it_has_no_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nowhere to find py-spy
    sampler = load_bench_module("stub_sampler").StubSampler(12345, tmp_path / "raw.txt")
    sampler.start()
    assert sampler.stop() is None and "py-spy is not on PATH" in sampler.error


def test_each_kind_of_level_sends_images_no_other_sent(bench):
    """A level past the guard after the guarded one, or an open-loop rate, must not find its images in
    the vision embedding cache (the 2026-12-07 H100 run's first --direct-levels rows did: 257 hits)."""
    sent = [bench.level_images(64, 2), bench.level_images(32, 2), bench.direct_level_images(64, 2),
            bench.open_loop_images(0, 2), [bench.png_bytes(bench.test_image(0))]]  # the last: the warm-up's
    every = [image for images in sent for image in images]
    assert len(set(every)) == len(every)
