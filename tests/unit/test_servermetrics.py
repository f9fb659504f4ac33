"""loadtest/servermetrics.py: the Prometheus parse, one scrape of several gauges, and the KV-blocks-free poll
that the benchmark and the soak run after their load (fake scrapes and a fake clock; the real metrics
port is read in tests/load/test_soak.py and tests/metrics)."""
from __future__ import annotations

import servermetrics as metrics  # loadtest/ is on sys.path (tests/conftest.py)


METRICS = """# HELP internvl_kv_cache_blocks_used Paged KV-cache blocks held by requests
# TYPE internvl_kv_cache_blocks_used gauge
internvl_kv_cache_blocks_used{model="llm",version="1"} 7
internvl_kv_cache_blocks_total{model="llm",version="1"} 4096
internvl_image_cache_hits_total{model="vision",version="1"} 126
internvl_preemptions_total{model="llm",version="1"} 3
internvl_encoder_priority_wait_seconds_total{model="llm",version="1"} 1.5
nv_inference_count{model="llm",version="1"} 130
"""


def test_the_names_are_the_servers():
    from internvl_serve.serving import metrics as served

    for name in ("KV_BLOCKS_USED", "KV_BLOCKS_TOTAL", "REQUESTS_RUNNING", "REQUESTS_WAITING", "IMAGE_CACHE_HITS",
                 "IMAGE_CACHE_MISSES", "PREEMPTIONS", "ENCODER_WAIT", "ENGINE_STEPS", "ENGINE_BUSY",
                 "ENGINE_DEVICE_WAIT"):
        assert getattr(metrics, name) == getattr(served, name) in served.METRIC_NAMES, name


def test_parse_metric():
    assert metrics.parse_metric(METRICS, "internvl_kv_cache_blocks_used") == 7
    assert metrics.parse_metric(METRICS, "internvl_kv_cache_blocks_total") == 4096
    assert metrics.parse_metric(METRICS + 'internvl_kv_cache_blocks_used{model="llm",version="2"} 3\n',
                              "internvl_kv_cache_blocks_used") == 10          # summed over label sets
    assert metrics.parse_metric(METRICS, "internvl_kv_cache_blocks") is None    # a prefix is not a name
    assert metrics.parse_metric("nv_x 1\n", "internvl_kv_cache_blocks_used") is None


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def wait(self, s):
        self.now += s


def test_read_values_one_scrape():
    calls = []

    def read(url):
        calls.append(url)
        return METRICS
    names = (metrics.KV_BLOCKS_USED, metrics.REQUESTS_RUNNING, metrics.IMAGE_CACHE_HITS)
    assert metrics.read_values("http://m/metrics", names, read=read) == {
        metrics.KV_BLOCKS_USED: 7, metrics.REQUESTS_RUNNING: None, metrics.IMAGE_CACHE_HITS: 126}
    assert calls == ["http://m/metrics"]

    def refused(url):
        raise ConnectionRefusedError("no metrics port")
    assert metrics.read_values("u", names, read=refused) == dict.fromkeys(names)


def test_kv_poll_until_free():
    readings = iter([7, 2, 0, 5])
    clock = FakeClock()
    calls = []

    def read(url):
        calls.append(url)
        return METRICS.replace("} 7", f"}} {next(readings)}")

    out = metrics.kv_blocks_after_run("http://m/metrics", 30, read=read, clock=clock, wait=clock.wait)
    assert out["kv_blocks_used_after"] == 0 and out["kv_blocks_total"] == 4096 and len(calls) == 3
    assert out["image_cache_hits"] == 126 and out["image_cache_misses"] is None and out["preemptions"] == 3
    assert out["encoder_wait_s"] == 1.5


def test_kv_poll_gives_up_at_the_deadline_and_when_absent():
    clock = FakeClock()
    out = metrics.kv_blocks_after_run("u", 5, read=lambda u: METRICS, clock=clock, wait=clock.wait)
    assert out["kv_blocks_used_after"] == 7 and 5 <= clock.now <= 5.5
    clock = FakeClock()
    out = metrics.kv_blocks_after_run("u", 5, read=lambda u: "nv_x 1\n", clock=clock, wait=clock.wait)
    assert out["kv_blocks_used_after"] is None and clock.now == 0             # not exported: no waiting

    def refused(url):
        raise ConnectionRefusedError("no metrics port")
    clock = FakeClock()
    out = metrics.kv_blocks_after_run("u", 2, read=refused, clock=clock, wait=clock.wait)
    assert out["kv_blocks_used_after"] is None and "ConnectionRefusedError" in out["metrics_error"]


def test_engine_step_figures_between_two_readings():
    before = {metrics.ENGINE_STEPS: 100, metrics.ENGINE_BUSY: 2.0, metrics.ENGINE_DEVICE_WAIT: 1.5}
    after = {metrics.ENGINE_STEPS: 600, metrics.ENGINE_BUSY: 12.0, metrics.ENGINE_DEVICE_WAIT: 7.5}
    figures = metrics.engine_step_figures(before, after)
    assert figures["steps"] == 500 and abs(figures["ms_per_step"] - 20.0) < 1e-9
    assert abs(figures["device_wait_share"] - 0.6) < 1e-9
    assert metrics.engine_step_figures(before, before) == {}  # no step between them
    assert metrics.engine_step_figures(before, dict(after, **{metrics.ENGINE_BUSY: None})) == {}  # a blank scrape
