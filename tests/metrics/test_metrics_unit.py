"""internvl_serve.serving.metrics without a server: timing from engine outputs (fake clock), the
metered EngineThread on a real engine over the FakeRunner, the engine gauges (KV blocks used return
to 0 while the prefix cache keeps blocks), and the push to a stand-in of pb_utils' custom metrics."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from internvl_serve.engine import EngineThread, FakeRunner, LLMEngine, Request, SamplingParams
from internvl_serve.serving import metrics as m


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def out(rid, tokens=1, finished=False, reason=None, prompt=5, error=None, first_scheduled=None):
    return SimpleNamespace(request_id=rid, new_token_ids=[7] * tokens, finished=finished, error=error,
                           finish_reason=reason or ("stop" if finished else None), num_prompt_tokens=prompt,
                           first_scheduled=first_scheduled)


def test_ttft_itl_and_tokens_from_outputs():
    clock = Clock()
    g = m.GenerationMetrics(clock)
    g.start("a")
    g.start("b")
    clock.now += 0.5
    g.observe(out("a"))                      # a: first token after 0.5 s
    clock.now += 0.1
    g.observe(out("a"))                      # a: gap 0.1
    g.observe(out("b"))                      # b: first token after 0.6 s
    clock.now += 0.3
    g.observe(out("a", finished=True))       # a: gap 0.3, done
    g.observe(out("b", tokens=0, finished=True, reason="abort", prompt=7))  # b ends without a new token
    c = g.counters()
    assert c[m.TTFT_COUNT] == 2 and c[m.TTFT_SUM] == pytest.approx(1.1)
    assert c[m.ITL_COUNT] == 2 and c[m.ITL_SUM] == pytest.approx(0.4)
    assert c[m.E2E_COUNT] == 2 and c[m.E2E_SUM] == pytest.approx(0.9 + 0.9)  # both submitted at 100.0
    assert c[m.GENERATED_TOKENS] == 4
    assert c[m.PROMPT_TOKENS] == 5 + 7
    assert finished(c) == {"stop": 1, "length": 0, "cancelled": 1, "error": 0}  # the abort is a cancellation
    assert g.num_tracked == 0                # nothing left behind


def test_the_first_token_splits_into_queue_and_prefill_time_where_the_engine_first_scheduled_it():
    clock = Clock()
    g = m.GenerationMetrics(clock)
    for rid in ("a", "b", "c"):
        g.start(rid)
    clock.now += 0.5
    g.observe(out("a", first_scheduled=100.2))   # queued 0.2 s, prefill 0.3 s
    g.observe(out("a", first_scheduled=100.2))   # later tokens add nothing
    g.observe(out("b"))                          # no engine timestamp: the TTFT only
    g.observe(out("c", first_scheduled=99.0))    # a timestamp before the submit counts as no queue
    c = g.counters()
    assert c[m.TTFT_COUNT] == 3 and c[m.QUEUE_COUNT] == c[m.PREFILL_COUNT] == 2
    assert c[m.QUEUE_SUM] == pytest.approx(0.2) and c[m.PREFILL_SUM] == pytest.approx(0.3 + 0.5)


def finished(values) -> dict:
    return {dict(labels)["reason"]: n for key, n in values.items() if isinstance(key, tuple)
            and key[0] == m.REQUESTS_FINISHED for labels in [key[1]]}


def buckets(values, name) -> dict[str, float]:
    return {dict(key[1])["le"]: n for key, n in values.items() if isinstance(key, tuple) and key[0] == name}


def test_histograms_are_cumulative_buckets_ending_in_inf():
    clock = Clock()
    g = m.GenerationMetrics(clock)
    for i, ttft in enumerate([0.004, 0.005, 0.3, 100.0]):  # 0.005 is on a bound: counted in le="0.005"
        g.start(f"r{i}")
        clock.now += ttft
        g.observe(out(f"r{i}", finished=True))
    c = g.counters()
    b = buckets(c, m.TTFT_BUCKET)
    assert list(b) == [repr(x) for x in m.TTFT_BUCKETS] + ["+Inf"]
    assert b["0.005"] == 2 and b["0.2"] == 2 and b["0.3"] == 3 and b["80.0"] == 3 and b["+Inf"] == 4
    assert list(b.values()) == sorted(b.values())  # monotone
    assert b["+Inf"] == c[m.TTFT_COUNT] == 4
    assert len(buckets(c, m.ITL_BUCKET)) == len(m.ITL_BUCKETS) + 1 and len(buckets(c, m.E2E_BUCKET)) == len(m.E2E_BUCKETS) + 1


def test_finish_reasons():
    g = m.GenerationMetrics(Clock())
    for i, kwargs in enumerate([dict(reason="length"), dict(reason="abort"), dict(reason="abort", error="boom"),
                                dict(reason="stop")]):
        g.start(f"r{i}")
        g.observe(out(f"r{i}", finished=True, **kwargs))
    g.observe(out("never-started", finished=True))  # not submitted through start(): not counted
    assert finished(g.counters()) == {"stop": 1, "length": 1, "cancelled": 1, "error": 1}


def test_request_without_tokens_has_no_ttft():
    g = m.GenerationMetrics(Clock())
    g.start("x")
    g.observe(out("x", tokens=0, finished=True))
    assert g.counters()[m.TTFT_COUNT] == 0 and g.num_tracked == 0
    g.start("refused")
    g.forget("refused")
    assert g.num_tracked == 0


def make_engine(num_blocks=64, block_size=4):
    return LLMEngine(FakeRunner(num_blocks=num_blocks, block_size=block_size), eos_token_id=2)


def test_metered_thread_counts_every_token_and_request():
    engine = make_engine()
    thread = EngineThread(engine)
    metered = m.MeteredEngineThread(thread, m.GenerationMetrics())
    finals, done = [], threading.Event()
    lock = threading.Lock()

    def callback(output):
        if output.finished:
            with lock:
                finals.append(output)
                if len(finals) == 5:
                    done.set()

    try:
        for i in range(5):
            metered.submit(Request(f"r{i}", [1, 5 + i, 9, 11, 13], sampling=SamplingParams(max_tokens=3 + i)),
                           callback)
        assert done.wait(10), "the engine did not finish the requests"
        c = metered.metrics.counters()
        assert c[m.GENERATED_TOKENS] == sum(f.num_output_tokens for f in finals) == sum(3 + i for i in range(5))
        assert c[m.TTFT_COUNT] == c[m.QUEUE_COUNT] == c[m.PREFILL_COUNT] == 5  # the engine's timestamps
        assert c[m.QUEUE_SUM] + c[m.PREFILL_SUM] == pytest.approx(c[m.TTFT_SUM])
        assert c[m.ITL_COUNT] == sum(2 + i for i in range(5))  # tokens - 1 gaps per request
        assert metered.metrics.num_tracked == 0
        with pytest.raises(Exception):  # refused by the engine: not tracked
            metered.submit(Request("bad", [], sampling=SamplingParams()), callback)
        assert metered.metrics.num_tracked == 0
        assert metered.num_unfinished == 0  # everything else is the wrapped thread's
    finally:
        metered.shutdown()


def test_engine_gauges_count_blocks_held_by_requests_only():
    engine = make_engine(num_blocks=32, block_size=4)
    prompt = list(range(3, 3 + 13))  # 3 full blocks + 1 token
    engine.add_request(Request("a", prompt, sampling=SamplingParams(max_tokens=4)))
    engine.add_request(Request("b", prompt + [99], sampling=SamplingParams(max_tokens=4)))
    g = m.engine_gauges(engine)
    assert (g[m.REQUESTS_WAITING], g[m.REQUESTS_RUNNING], g[m.KV_BLOCKS_USED]) == (2, 0, 0)
    assert g[m.KV_BLOCKS_TOTAL] == 32
    engine.step()
    g = m.engine_gauges(engine)
    assert g[m.REQUESTS_RUNNING] == 2 and g[m.REQUESTS_WAITING] == 0
    assert g[m.KV_BLOCKS_USED] == sum(len(s.block_table) for s in engine.scheduler.running) > 0
    while engine.has_unfinished():
        engine.step()
    g = m.engine_gauges(engine)
    assert engine.allocator.num_cached > 0          # the prefix cache keeps blocks...
    assert g[m.KV_BLOCKS_USED] == 0                 # ...but no request holds them
    assert (g[m.REQUESTS_WAITING], g[m.REQUESTS_RUNNING]) == (0, 0)


def test_preemptions_are_counted():
    # 8 blocks of 4: two 10-token prompts growing by 12 tokens each need 12 blocks, so one is preempted
    engine = make_engine(num_blocks=8, block_size=4)
    for i in range(2):
        engine.add_request(Request(f"r{i}", list(range(3 + i, 13 + i)),
                                   sampling=SamplingParams(max_tokens=12, ignore_eos=True)))
    assert m.engine_gauges(engine)[m.PREEMPTIONS] == 0
    while engine.has_unfinished():
        engine.step()
    assert m.engine_gauges(engine)[m.PREEMPTIONS] == engine.scheduler.num_preemptions >= 1


def test_image_cache_counters():
    assert m.image_cache_counters(SimpleNamespace(cache_hits=3, cache_misses=5)) == {
        m.IMAGE_CACHE_HITS: 3, m.IMAGE_CACHE_MISSES: 5}
    assert m.image_cache_counters(object()) == {m.IMAGE_CACHE_HITS: 0, m.IMAGE_CACHE_MISSES: 0}


# ---- a stand-in for pb_utils.MetricFamily (the Python backend's custom metrics) -----------------------


class FakeMetric:
    def __init__(self, family, labels):
        self.family, self.labels, self.value, self.calls = family, labels, 0.0, 0

    def increment(self, value):
        assert self.family.kind == FakeFamily.COUNTER and value >= 0
        self.value += value
        self.calls += 1

    def set(self, value):
        assert self.family.kind == FakeFamily.GAUGE
        self.value = value
        self.calls += 1


class FakeFamily:
    COUNTER, GAUGE = "COUNTER", "GAUGE"
    created: dict = {}

    def __init__(self, name, description, kind):
        assert name not in FakeFamily.created, f"family {name} created twice"
        self.name, self.description, self.kind, self.metrics = name, description, kind, []
        FakeFamily.created[name] = self

    def Metric(self, labels=None):  # noqa: N802  (pb_utils' spelling)
        assert all(dict(labels) != x.labels for x in self.metrics), f"{self.name} {labels} created twice"
        metric = FakeMetric(self, labels)
        self.metrics.append(metric)
        return metric


@pytest.fixture
def pb_utils():
    FakeFamily.created = {}
    return SimpleNamespace(MetricFamily=FakeFamily)


def test_triton_metrics_push_increases_and_gauges(pb_utils):
    labels = m.model_labels({"model_name": "llm", "model_version": "1", "model_instance_name": "llm_0_0"})
    t = m.TritonMetrics(pb_utils, m.LLM_METRICS, labels)
    families = FakeFamily.created
    assert set(families) == {s.name for s in m.LLM_METRICS}
    assert not families[m.TTFT_BUCKET].metrics  # labelled series appear with their first value
    assert families[m.TTFT_SUM].kind == "COUNTER" and families[m.KV_BLOCKS_USED].kind == "GAUGE"
    assert families[m.TTFT_SUM].metrics[0].labels == {"model": "llm", "version": "1", "model_instance": "llm_0_0"}
    t.push({m.GENERATED_TOKENS: 10, m.KV_BLOCKS_USED: 4, "unknown": 1})
    t.push({m.GENERATED_TOKENS: 10, m.KV_BLOCKS_USED: 0})  # no increase: no call
    t.push({m.GENERATED_TOKENS: 25, m.KV_BLOCKS_USED: 2})
    tokens = families[m.GENERATED_TOKENS].metrics[0]
    assert (tokens.value, tokens.calls) == (25, 2)
    assert families[m.KV_BLOCKS_USED].metrics[0].value == 2
    inf, half = m.series(m.TTFT_BUCKET, le="+Inf"), m.series(m.TTFT_BUCKET, le="0.5")
    t.push({inf: 0, half: 0, m.series(m.REQUESTS_FINISHED, reason="cancelled"): 2, m.TTFT_BUCKET: 9})
    t.push({inf: 3, half: 1})
    series = {tuple(sorted(x.labels.items())): x.value for x in families[m.TTFT_BUCKET].metrics}
    assert series == {tuple(sorted({**labels, "le": "+Inf"}.items())): 3, tuple(sorted({**labels, "le": "0.5"}.items())): 1}
    assert [(x.labels["reason"], x.value) for x in families[m.REQUESTS_FINISHED].metrics] == [("cancelled", 2)]
    t.close()
    t.push({m.GENERATED_TOKENS: 30, inf: 9})  # closed: nothing happens
    assert tokens.value == 25


def test_llm_exporter_meters_the_service_and_pushes(pb_utils):
    labelled = {s.name for s in m.LLM_METRICS if s.label}
    engine = make_engine()
    service = SimpleNamespace(engine=engine, thread=EngineThread(engine))
    exporter = m.LLMExporter(service, pb_utils, {"model_name": "llm"}, interval_s=60)
    done = threading.Event()
    try:
        assert isinstance(service.thread, m.MeteredEngineThread)
        service.thread.submit(Request("a", [1, 2, 3, 4, 5], sampling=SamplingParams(max_tokens=6)),
                              lambda o: o.finished and done.set())
        assert done.wait(10)
    finally:
        exporter.close()  # pushes once more
        service.thread.shutdown()
    value = {name: f.metrics[0].value for name, f in FakeFamily.created.items() if name not in labelled}
    assert value[m.GENERATED_TOKENS] == 6 and value[m.TTFT_COUNT] == 1 and value[m.ITL_COUNT] == 5
    assert value[m.PROMPT_TOKENS] == 5 and value[m.E2E_COUNT] == 1
    assert value[m.KV_BLOCKS_TOTAL] == 64 and value[m.KV_BLOCKS_USED] == 0
    assert value[m.ENCODER_WAIT] == 0  # no encoder-priority check on this thread: never held
    # the CPU engine steps synchronously: one prefill step and five decode steps for six tokens
    assert value[m.ENGINE_STEPS] == 6
    assert 0 < value[m.ENGINE_DEVICE_WAIT] <= value[m.ENGINE_BUSY]
    held = SimpleNamespace(encoder_wait_s=1.25)  # the engine thread's own counter, as it is exported
    assert m.llm_values(engine, m.GenerationMetrics(), held)[m.ENCODER_WAIT] == 1.25
    itl = {x.labels["le"]: x.value for x in FakeFamily.created[m.ITL_BUCKET].metrics}
    assert len(itl) == len(m.ITL_BUCKETS) + 1 and itl["+Inf"] == 5  # every bucket exported, even at 0
    reasons = {x.labels["reason"]: x.value for x in FakeFamily.created[m.REQUESTS_FINISHED].metrics}
    assert reasons == {"stop": 0, "length": 1, "cancelled": 0, "error": 0}


def test_an_aborted_request_counts_as_cancelled(pb_utils):
    engine = make_engine()
    service = SimpleNamespace(engine=engine, thread=EngineThread(engine))
    exporter = m.LLMExporter(service, pb_utils, {"model_name": "llm"}, interval_s=60)
    started, done = threading.Event(), threading.Event()
    try:
        service.thread.submit(Request("long", [1, 2, 3], sampling=SamplingParams(max_tokens=10_000, ignore_eos=True)),
                              lambda o: (started.set(), o.finished and done.set()))
        assert started.wait(10)
        service.thread.abort("long")
        assert done.wait(10)
    finally:
        exporter.close()
        service.thread.shutdown()
    reasons = {x.labels["reason"]: x.value for x in FakeFamily.created[m.REQUESTS_FINISHED].metrics}
    assert reasons["cancelled"] == 1 and reasons["length"] == reasons["stop"] == 0
    assert FakeFamily.created[m.PROMPT_TOKENS].metrics[0].value == 3


def test_vision_exporter_never_raises(pb_utils):
    service = SimpleNamespace(cache_hits=0, cache_misses=2)
    logged = []
    exporter = m.VisionExporter(service, pb_utils, {"model_name": "vision"}, log=logged.append)
    service.cache_hits = 1
    exporter.update()
    assert FakeFamily.created[m.IMAGE_CACHE_HITS].metrics[0].value == 1
    assert FakeFamily.created[m.IMAGE_CACHE_MISSES].metrics[0].value == 2
    service.cache_hits = "not a number"
    exporter.update()
    exporter.update()
    assert len(logged) == 1 and "ValueError" in logged[0]


def test_periodic_push_reports_a_failure_once_and_pushes_on_stop():
    pushed, logged = [], []
    state = {"fail": True}

    def read():
        if state["fail"]:
            raise RuntimeError("boom")
        return {"x": 1}

    p = m.PeriodicPush(read, pushed.append, interval_s=60, log=logged.append)  # ticks once at the start
    p.tick()
    assert logged == ["metrics: RuntimeError: boom"] and pushed == []
    state["fail"] = False
    p.stop()
    assert pushed == [{"x": 1}]


def test_names_are_the_documented_ones():
    assert set(m.METRIC_NAMES) == {
        "internvl_time_to_first_token_seconds_sum", "internvl_time_to_first_token_seconds_count",
        "internvl_time_to_first_token_seconds_bucket", "internvl_inter_token_latency_seconds_bucket",
        "internvl_e2e_request_latency_seconds_sum", "internvl_e2e_request_latency_seconds_count",
        "internvl_e2e_request_latency_seconds_bucket", "internvl_prompt_tokens_total",
        "internvl_requests_finished_total",
        "internvl_inter_token_latency_seconds_sum", "internvl_inter_token_latency_seconds_count",
        "internvl_requests_waiting", "internvl_requests_running", "internvl_kv_cache_blocks_used",
        "internvl_kv_cache_blocks_total", "internvl_image_cache_hits_total", "internvl_image_cache_misses_total",
        "internvl_generated_tokens_total", "internvl_preemptions_total",
        "internvl_encoder_priority_wait_seconds_total", "internvl_engine_steps_total",
        "internvl_engine_busy_seconds_total", "internvl_engine_device_wait_seconds_total",
        *(f"internvl_request_{part}_time_seconds_{suffix}" for part in ("queue", "prefill")
          for suffix in ("bucket", "sum", "count"))}
