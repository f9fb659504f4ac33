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
    assert (metrics.TTFT_SUM, metrics.TTFT_COUNT) == (served.TTFT_SUM, served.TTFT_COUNT)
    assert (metrics.QUEUE_SUM, metrics.QUEUE_COUNT) == (served.QUEUE_SUM, served.QUEUE_COUNT)
    assert (metrics.PREFILL_SUM, metrics.PREFILL_COUNT) == (served.PREFILL_SUM, served.PREFILL_COUNT)


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


STAGES = """nv_inference_request_success{model="preprocess",version="1"} 10
nv_inference_queue_duration_us{model="preprocess",version="1"} 1000
nv_inference_compute_input_duration_us{model="preprocess",version="1"} 100
nv_inference_compute_infer_duration_us{model="preprocess",version="1"} 8000
nv_inference_compute_output_duration_us{model="preprocess",version="1"} 200
nv_inference_request_success{model="vision",version="1"} 10
nv_inference_queue_duration_us{model="vision",version="1"} 50000
nv_inference_compute_input_duration_us{model="vision",version="1"} 0
nv_inference_compute_infer_duration_us{model="vision",version="1"} 200000
nv_inference_compute_output_duration_us{model="vision",version="1"} 0
nv_inference_request_success{model="llm",version="1"} 10
nv_inference_queue_duration_us{model="llm",version="1"} 30000
nv_inference_compute_input_duration_us{model="llm",version="1"} 400
nv_inference_compute_infer_duration_us{model="llm",version="1"} 40000
nv_inference_compute_output_duration_us{model="llm",version="1"} 50
nv_inference_queue_duration_us{model="internvl_chat",version="1"} 999999
internvl_time_to_first_token_seconds_sum{model="llm",version="1"} 2.5
internvl_time_to_first_token_seconds_count{model="llm",version="1"} 10
internvl_request_queue_time_seconds_sum{model="llm",version="1"} 0.5
internvl_request_queue_time_seconds_count{model="llm",version="1"} 10
internvl_request_prefill_time_seconds_sum{model="llm",version="1"} 2.0
internvl_request_prefill_time_seconds_count{model="llm",version="1"} 10
"""


def test_parse_model_metric_reads_one_models_label_set():
    assert metrics.parse_model_metric(STAGES, metrics.TRITON_QUEUE, "vision") == 50000
    assert metrics.parse_model_metric(STAGES, metrics.TRITON_QUEUE, "internvl_chat") == 999999
    assert metrics.parse_model_metric(STAGES, metrics.TRITON_QUEUE, "llm") == 30000
    assert metrics.parse_model_metric(STAGES, metrics.TRITON_QUEUE, "tokenizer") is None  # a model it lacks
    assert metrics.parse_model_metric(STAGES, metrics.TRITON_QUEUE, "visio") is None  # a prefix is not a name


def test_ttft_stage_figures_are_means_per_request_between_two_scrapes():
    before = metrics.read_ttft_stages("u", read=lambda url: STAGES)
    # 4 more requests: preprocess 4 ms queue + 36 ms compute, vision 100 ms queue + 80 ms compute, the llm
    # stub 80 ms queue + 16 ms execute, the llm's submit to first token 1.5 s
    later = (STAGES.replace("} 10\n", "} 14\n").replace("} 1000\n", "} 5000\n").replace("} 8000\n", "} 44000\n")
             .replace("} 50000\n", "} 150000\n").replace("} 200000\n", "} 280000\n").replace("} 2.5\n", "} 4.0\n")
             .replace("} 30000\n", "} 110000\n").replace("} 40000\n", "} 56000\n")
             .replace("} 0.5\n", "} 0.9\n").replace("} 2.0\n", "} 3.1\n"))  # queue 100 ms, prefill 275 ms
    after = metrics.read_ttft_stages("u", read=lambda url: later)
    figures = metrics.ttft_stage_figures(before, after)
    assert figures == {"preprocess_queue_ms": 1.0, "preprocess_compute_ms": 9.0, "vision_queue_ms": 25.0,
                       "vision_compute_ms": 20.0, "llm_stub_queue_ms": 20.0, "llm_stub_compute_ms": 4.0,
                       "llm_first_token_ms": 375.0, "llm_queue_ms": 100.0, "llm_prefill_ms": 275.0}
    assert metrics.ttft_stage_figures(before, before) == {}  # no request between them

    def refused(url):
        raise ConnectionRefusedError("no metrics port")
    assert metrics.ttft_stage_figures(metrics.read_ttft_stages("u", read=refused), after) == {}  # a blank scrape
