"""bench/benchmark.py's CPU-side helpers, so the GPU run does not find their bugs: the Prometheus parse and
the KV-blocks-free poll after the run, and the targets table of results.md. (The --int8 run's model
repository is serving/layout.py's, tested in test_layout.py.)"""
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


METRICS = """# HELP internvl_kv_cache_blocks_used Paged KV-cache blocks held by requests
# TYPE internvl_kv_cache_blocks_used gauge
internvl_kv_cache_blocks_used{model="llm",version="1"} 7
internvl_kv_cache_blocks_total{model="llm",version="1"} 4096
internvl_image_cache_hits_total{model="vision",version="1"} 126
nv_inference_count{model="llm",version="1"} 130
"""


def test_parse_metric(bench):
    assert bench.parse_metric(METRICS, "internvl_kv_cache_blocks_used") == 7
    assert bench.parse_metric(METRICS, "internvl_kv_cache_blocks_total") == 4096
    assert bench.parse_metric(METRICS + 'internvl_kv_cache_blocks_used{model="llm",version="2"} 3\n',
                              "internvl_kv_cache_blocks_used") == 10          # summed over label sets
    assert bench.parse_metric(METRICS, "internvl_kv_cache_blocks") is None    # a prefix is not a name
    assert bench.parse_metric("nv_x 1\n", "internvl_kv_cache_blocks_used") is None


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def wait(self, s):
        self.now += s


def test_kv_poll_until_free(bench):
    readings = iter([7, 2, 0, 5])
    clock = FakeClock()
    calls = []

    def read(url):
        calls.append(url)
        return METRICS.replace("} 7", f"}} {next(readings)}")

    out = bench.kv_blocks_after_run("http://m/metrics", 30, read=read, clock=clock, wait=clock.wait)
    assert out["kv_blocks_used_after"] == 0 and out["kv_blocks_total"] == 4096 and len(calls) == 3
    assert out["image_cache_hits"] == 126 and out["image_cache_misses"] is None


def test_kv_poll_gives_up_at_the_deadline_and_when_absent(bench):
    clock = FakeClock()
    out = bench.kv_blocks_after_run("u", 5, read=lambda u: METRICS, clock=clock, wait=clock.wait)
    assert out["kv_blocks_used_after"] == 7 and 5 <= clock.now <= 5.5
    clock = FakeClock()
    out = bench.kv_blocks_after_run("u", 5, read=lambda u: "nv_x 1\n", clock=clock, wait=clock.wait)
    assert out["kv_blocks_used_after"] is None and clock.now == 0             # not exported: no waiting

    def refused(url):
        raise ConnectionRefusedError("no metrics port")
    clock = FakeClock()
    out = bench.kv_blocks_after_run("u", 2, read=refused, clock=clock, wait=clock.wait)
    assert out["kv_blocks_used_after"] is None and "ConnectionRefusedError" in out["metrics_error"]


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
    assert t["speed-up at 32 streams over sequential transformers chat"]["gap"].startswith("1.25x short (reaches 80%")
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


def test_int8_weight_bytes(bench):
    bf16 = 2 * (40 * (4 * 5120 * 5120 + 3 * 5120 * 13824) + 41840 * 5120 + 2 * 5120)
    int8 = bench.int8_weight_bytes_per_step(bf16)
    assert int8 == 40 * (4 * 5120 * 5120 + 3 * 5120 * 13824) + 4 * 40 * (5 * 5120 + 2 * 13824) \
        + 2 * (41840 * 5120 + 2 * 5120)
    assert 13.0e9 < int8 < 13.2e9
