"""bench/benchmark.py's CPU-side helpers, so the GPU run does not find their bugs: the targets table of
results.md. (The Prometheus parse and the KV-blocks-free poll are loadtest/servermetrics.py's, tested in
test_servermetrics.py; the --int8 run's model repository is serving/layout.py's, tested in test_layout.py.)"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("benchmark_under_test", ROOT / "bench" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(streams, tok_s, ttft, itl, errors=0):
    return {"concurrency": streams, "requests": 2 * streams, "errors": errors, "first_error": None,
            "output_tok_per_s": tok_s, "ttft_p50_ms": ttft, "ttft_p95_ms": ttft, "itl_p50_ms": itl,
            "itl_p95_ms": itl}


def test_targets_and_markdown(bench):
    results = {"device": "GPU", "date": "d", "commit": "c", "copy_bandwidth_gbs": 3000.0,
               "llm_weight_bytes_per_step": 25.8e9, "hbm_floor_ms": 8.6, "vision_ms_per_image_b8": 15.0,
               "baseline_sequential": {"output_tok_per_s": 60.0},
               "server": [row(1, 70, 138, 13.4), row(32, 2400, 600, 20), row(64, 900, 650, 60)],
               "server_after": {"kv_blocks_used_after": 0, "kv_blocks_total": 100},
               "server_int8": [row(1, 110, 120, 9.0)], "server_int8_after": {"kv_blocks_used_after": None}}
    t = {r["target"]: r for r in bench.targets(results)}
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
    md = bench.markdown(results)
    assert "| Triton server, int8 weights | 1 | 110.0 |" in md
    assert "KV blocks in use after the server run: 0 of 100." in md
    assert "KV blocks in use after the int8 server run: not available" in md
    assert "| TTFT p50 at 1 stream | <= 80 ms | 138 ms | missed | 1.73x over" in md
    results["server_after"] = {"kv_blocks_used_after": 3}
    assert bench.targets(results)[-1]["status"] == "missed"
    assert bench.targets(results)[-1]["gap"] == "3 blocks still held"
    del results["server_after"]
    assert bench.targets(results)[-1]["status"] == "no errors; KV check not measured"


def test_engine_alone_rows_and_target(bench):
    alone = {"levels": [row(1, 80, 90, 12.0), row(32, 2000, 200, 15.0)],
             "profile": [{"concurrency": 32, "steps": 48, "wall_ms_per_step": 16.0, "gpu_busy_ms_per_step": 15.0,
                          "host_gap_ms_per_step": 1.0}]}
    results = {"device": "GPU", "date": "d", "commit": "c", "copy_bandwidth_gbs": 3000.0,
               "llm_weight_bytes_per_step": 25.8e9, "hbm_floor_ms": 8.6, "server": [row(32, 1600, 250, 19)],
               "engine_alone": alone, "engine_alone[async_scheduling=false]": {"levels": [row(32, 1000, 300, 30)]},
               "server_warm": [row(1, 90, 70, 11.0), row(32, 1800, 100, 16.0)]}
    t = {r["target"]: r for r in bench.targets(results)}
    within = t["the server within 15 % of the engine alone at 32 streams"]
    assert within["status"] == "missed" and within["measured"] == "0.80x"
    md = bench.markdown(results)
    assert "| llm engine alone (in-process, no Triton) | 32 | 2000.0 |" in md
    assert "| llm engine alone (in-process, no Triton; async_scheduling=false) | 32 | 1000.0 |" in md
    assert "| Triton server, same image | 1 | 90.0 |" in md
    assert "| default | 32 | 16.00 | 15.00 | 1.00 |" in md
    assert "output tok/s 1600 vs 1800, ITL p50 19.0 vs 16.0 ms (+19 %)" in md
    assert "Every request sent its own image (nothing cached)." in md


def test_int8_weight_bytes(bench):
    bf16 = 2 * (40 * (4 * 5120 * 5120 + 3 * 5120 * 13824) + 41840 * 5120 + 2 * 5120)
    int8 = bench.int8_weight_bytes_per_step(bf16)
    assert int8 == 40 * (4 * 5120 * 5120 + 3 * 5120 * 13824) + 4 * 40 * (5 * 5120 + 2 * 13824) \
        + 2 * (41840 * 5120 + 2 * 5120)
    assert 13.0e9 < int8 < 13.2e9
