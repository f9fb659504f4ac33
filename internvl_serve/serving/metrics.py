"""The model's own Prometheus metrics: what to measure, from the engine and the vision service.

Owns: the metric names (exported by Triton's metrics endpoint next to its own nv_* metrics), the
per-request timing of generation (time to first token, inter-token latency, generated tokens), the
engine gauges (waiting and running requests, KV-cache blocks held by requests), the image-cache
counters, and pushing all of them to Triton through the Python backend's custom-metric API
(`pb_utils.MetricFamily`, passed in as an argument: this module never imports
triton_python_backend_utils, so it is tested without a server).

Does not own: the engine, the vision service or the Triton adapters (model_repository/*/1/model.py
create the exporters in initialize() and close them in finalize()).

Why histograms made of counters: Triton 2.51's Python backend has `MetricFamily.HISTOGRAM`, but every
metric operation is a round trip from the stub process to the server; one observe() per token would
cost more than the token. Here timings accumulate in Python (`Histogram`) and a background thread
pushes the increases (and the gauges) every `interval_s`. A histogram is exported as Prometheus lays
one out: counter families `<name>_bucket{le="..."}` (cumulative, the last `le="+Inf"`), `<name>_sum`
and `<name>_count`, so `histogram_quantile(0.95, sum by (le) (rate(<name>_bucket[5m])))` reads a p95
and `rate(_sum) / rate(_count)` a mean.

Definitions (docs/metrics.md):
- time to first token: from the llm step's submit to the engine output carrying the first token (engine
  queue + prefill; preprocess and vision time are in Triton's per-model nv_inference_* metrics);
- inter-token latency: between consecutive token-bearing outputs of one request;
- request latency (e2e): from the llm step's submit to the request's final engine output;
- finished requests by reason: stop, length, cancelled (the engine aborted it: the client cancelled
  or went away), error (the engine failed it); prompt tokens (image tokens included) per finished request;
- KV blocks used: blocks with a reference (held by running requests). Cached blocks that no request
  holds are free (the allocator hands them out again, evicting their prefix entry), so after a load
  `internvl_kv_cache_blocks_used` returns to 0 whatever the prefix cache keeps.
"""
from __future__ import annotations

import bisect
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

COUNTER = "counter"
GAUGE = "gauge"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # COUNTER or GAUGE
    help: str
    label: str = ""  # a label whose values the series carry ("le", "reason"): no series without it


def series(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The key of one labelled series in a values mapping (plain names are keys of their own)."""
    return name, tuple(sorted(labels.items()))


def _le(bound: float) -> str:
    return "+Inf" if bound == math.inf else repr(float(bound))


class Histogram:
    """A Prometheus histogram in plain Python (not thread-safe: GenerationMetrics holds the lock)."""

    def __init__(self, name: str, bounds: tuple[float, ...]):
        assert list(bounds) == sorted(set(bounds)), "bucket bounds must increase"
        self.name, self.bounds = name, tuple(float(b) for b in bounds) + (math.inf,)
        self._counts = [0] * len(self.bounds)  # per bucket, not cumulative
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, value)] += 1  # the first bound >= value (le)
        self.sum += value
        self.count += 1

    def values(self) -> dict:
        out: dict = {f"{self.name}_sum": self.sum, f"{self.name}_count": self.count}
        cumulative = 0
        for bound, n in zip(self.bounds, self._counts):
            cumulative += n
            out[series(f"{self.name}_bucket", le=_le(bound))] = cumulative
        return out


def histogram_specs(name: str, help: str, unit: str = "seconds") -> tuple[MetricSpec, ...]:
    return (MetricSpec(f"{name}_bucket", COUNTER, f"{help}: observations <= le {unit} (cumulative)", label="le"),
            MetricSpec(f"{name}_sum", COUNTER, f"{help}: sum, {unit}"),
            MetricSpec(f"{name}_count", COUNTER, f"{help}: observations"))


TTFT = "internvl_time_to_first_token_seconds"
ITL = "internvl_inter_token_latency_seconds"
E2E = "internvl_e2e_request_latency_seconds"
QUEUE = "internvl_request_queue_time_seconds"
PREFILL = "internvl_request_prefill_time_seconds"
TTFT_SUM, TTFT_COUNT, TTFT_BUCKET = f"{TTFT}_sum", f"{TTFT}_count", f"{TTFT}_bucket"
ITL_SUM, ITL_COUNT, ITL_BUCKET = f"{ITL}_sum", f"{ITL}_count", f"{ITL}_bucket"
E2E_SUM, E2E_COUNT, E2E_BUCKET = f"{E2E}_sum", f"{E2E}_count", f"{E2E}_bucket"
QUEUE_SUM, QUEUE_COUNT = f"{QUEUE}_sum", f"{QUEUE}_count"
PREFILL_SUM, PREFILL_COUNT = f"{PREFILL}_sum", f"{PREFILL}_count"
GENERATED_TOKENS = "internvl_generated_tokens_total"
PROMPT_TOKENS = "internvl_prompt_tokens_total"
REQUESTS_FINISHED = "internvl_requests_finished_total"
REQUESTS_WAITING = "internvl_requests_waiting"
REQUESTS_RUNNING = "internvl_requests_running"
KV_BLOCKS_USED = "internvl_kv_cache_blocks_used"
KV_BLOCKS_TOTAL = "internvl_kv_cache_blocks_total"
PREEMPTIONS = "internvl_preemptions_total"
ENCODER_WAIT = "internvl_encoder_priority_wait_seconds_total"
ENGINE_STEPS = "internvl_engine_steps_total"
ENGINE_BUSY = "internvl_engine_busy_seconds_total"
ENGINE_DEVICE_WAIT = "internvl_engine_device_wait_seconds_total"
IMAGE_CACHE_HITS = "internvl_image_cache_hits_total"
IMAGE_CACHE_MISSES = "internvl_image_cache_misses_total"

# Bucket upper bounds, seconds. TTFT: a cached short prompt on a GPU (ms) to a long queue (tens of s);
# ITL: one decode step of a big batch (ms) to a step stalled behind prefills (~1 s); e2e: whole answers.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0, 600.0)
# Finish reasons of the llm step: the contract's (stop, length, cancelled = an engine abort) and error.
FINISH_REASON_LABELS = {"stop": "stop", "length": "length", "abort": "cancelled"}
ERROR_REASON = "error"

LLM_METRICS = (
    *histogram_specs(TTFT, "Time to first token (llm submit to first generated token)"),
    *histogram_specs(ITL, "Time between consecutive generated tokens of a request"),
    *histogram_specs(E2E, "Request latency (llm submit to the final output)"),
    *histogram_specs(QUEUE, "Time from the llm submit to the engine's first step with the request (the "
                     "hand-off to the engine and its queue); the first token's other part is the prefill time"),
    *histogram_specs(PREFILL, "Time from the engine's first step with the request to its first token (the "
                     "prefill's steps and the token's way back)"),
    MetricSpec(GENERATED_TOKENS, COUNTER, "Tokens generated (the final </s> included)"),
    MetricSpec(PROMPT_TOKENS, COUNTER, "Prompt tokens (image tokens included) of finished requests"),
    MetricSpec(REQUESTS_FINISHED, COUNTER, "Requests the llm step finished, by reason (stop, length, "
               "cancelled, error)", label="reason"),
    MetricSpec(REQUESTS_WAITING, GAUGE, "Requests in the engine's queue, not yet admitted (or preempted)"),
    MetricSpec(REQUESTS_RUNNING, GAUGE, "Requests the engine is generating for (in-flight batch)"),
    MetricSpec(KV_BLOCKS_USED, GAUGE, "Paged KV-cache blocks held by requests"),
    MetricSpec(KV_BLOCKS_TOTAL, GAUGE, "Paged KV-cache blocks in the pool"),
    MetricSpec(PREEMPTIONS, COUNTER, "Requests preempted for KV-cache blocks (their KV freed, recomputed "
               "when admitted again)"),
    MetricSpec(ENCODER_WAIT, COUNTER, "Seconds the engine held its decode steps back while the vision encoder "
               "ran on its GPU (encoder_priority_ms)"),
    MetricSpec(ENGINE_STEPS, COUNTER, "Engine steps launched (one forward of the in-flight batch each)"),
    MetricSpec(ENGINE_BUSY, COUNTER, "Seconds the engine thread worked (admitting, stepping, delivering tokens)"),
    MetricSpec(ENGINE_DEVICE_WAIT, COUNTER, "Seconds of the engine thread's work spent waiting for the device to "
               "finish a step (near the busy seconds: the GPU sets the pace; far below: the host does)"),
)
VISION_METRICS = (
    MetricSpec(IMAGE_CACHE_HITS, COUNTER, "Image tiles whose embedding came from the vision model's cache"),
    MetricSpec(IMAGE_CACHE_MISSES, COUNTER, "Image tiles the vision model encoded"),
)
METRIC_NAMES = tuple(s.name for s in LLM_METRICS + VISION_METRICS)


def finish_label(output: Any) -> str:
    """The `reason` label of a finished engine output."""
    if getattr(output, "error", None) is not None:
        return ERROR_REASON
    return FINISH_REASON_LABELS.get(str(getattr(output, "finish_reason", None) or ""), ERROR_REASON)


@dataclass
class _Timing:
    submitted: float
    last_token: float | None = None  # None until the first token


class GenerationMetrics:
    """Per-request timing from engine outputs, accumulated into histograms and counters. Thread-safe:
    start() runs on the submitting thread, observe() on the engine thread, counters() on the exporter's.
    clock: the engine's outputs' first_scheduled must be on it (the default, time.monotonic, is the
    engine's in any process of the machine)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._requests: dict[str, _Timing] = {}
        self.ttft, self.itl, self.e2e = Histogram(TTFT, TTFT_BUCKETS), Histogram(ITL, ITL_BUCKETS), Histogram(E2E, E2E_BUCKETS)
        self.queue, self.prefill = Histogram(QUEUE, TTFT_BUCKETS), Histogram(PREFILL, TTFT_BUCKETS)
        self._tokens = {GENERATED_TOKENS: 0, PROMPT_TOKENS: 0}
        self._finished = dict.fromkeys([*FINISH_REASON_LABELS.values(), ERROR_REASON], 0)

    def start(self, request_id: str) -> None:
        with self._lock:
            self._requests[request_id] = _Timing(self._clock())

    def forget(self, request_id: str) -> None:
        """The request was refused (or is over): drop its timers."""
        with self._lock:
            self._requests.pop(request_id, None)

    def observe(self, output: Any) -> None:
        """One engine RequestOutput (request_id, new_token_ids, finished, finish_reason, error,
        num_prompt_tokens)."""
        now = self._clock()
        with self._lock:
            timing = self._requests.get(output.request_id)
            if output.new_token_ids:
                self._tokens[GENERATED_TOKENS] += len(output.new_token_ids)
                if timing is not None:
                    if timing.last_token is None:
                        self.ttft.observe(now - timing.submitted)
                        # the TTFT split in two where the engine first scheduled the request (its
                        # time.monotonic(): this clock, by default, in any process of the machine)
                        scheduled = getattr(output, "first_scheduled", None)
                        if scheduled is not None:
                            scheduled = min(max(scheduled, timing.submitted), now)
                            self.queue.observe(scheduled - timing.submitted)
                            self.prefill.observe(now - scheduled)
                    else:
                        self.itl.observe(now - timing.last_token)
                    timing.last_token = now
            if output.finished and timing is not None:
                del self._requests[output.request_id]
                self.e2e.observe(now - timing.submitted)
                self._finished[finish_label(output)] += 1
                self._tokens[PROMPT_TOKENS] += int(getattr(output, "num_prompt_tokens", 0) or 0)

    @property
    def num_tracked(self) -> int:
        with self._lock:
            return len(self._requests)

    def counters(self) -> dict:
        with self._lock:
            return {**self.ttft.values(), **self.itl.values(), **self.e2e.values(), **self.queue.values(),
                    **self.prefill.values(), **self._tokens,
                    **{series(REQUESTS_FINISHED, reason=r): n for r, n in self._finished.items()}}


class MeteredEngineThread:
    """An EngineThread whose submit() times the request: wraps each request's output callback with
    GenerationMetrics.observe. Everything else is the wrapped thread's (abort, shutdown, ...)."""

    def __init__(self, thread: Any, metrics: GenerationMetrics):
        self._thread = thread
        self.metrics = metrics

    def submit(self, request: Any, callback: Callable[[Any], None]) -> None:
        metrics = self.metrics

        def metered(output: Any) -> None:
            try:
                metrics.observe(output)
            finally:
                callback(output)

        metrics.start(request.request_id)
        try:
            self._thread.submit(request, metered)
        except Exception:
            metrics.forget(request.request_id)
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._thread, name)


def engine_gauges(engine: Any) -> dict[str, float]:
    """The engine's queue and KV-cache state, and its preemptions so far. Read from another thread
    without a lock: each value is one len() or int (atomic in CPython); together they may be one step
    apart, which a gauge tolerates."""
    allocator = engine.allocator
    total = allocator.num_blocks
    return {REQUESTS_WAITING: engine.scheduler.num_waiting, REQUESTS_RUNNING: engine.scheduler.num_running,
            KV_BLOCKS_USED: total - allocator.num_free, KV_BLOCKS_TOTAL: total,
            PREEMPTIONS: engine.scheduler.num_preemptions}


def image_cache_counters(service: Any) -> dict[str, float]:
    """The vision service's cache counters (0 when it has no cache)."""
    return {IMAGE_CACHE_HITS: int(getattr(service, "cache_hits", 0) or 0),
            IMAGE_CACHE_MISSES: int(getattr(service, "cache_misses", 0) or 0)}


def llm_values(engine: Any, generation: GenerationMetrics, thread: Any = None) -> dict[str, float]:
    """Every LLM_METRICS value: the generation counters, the engine's gauges, its steps and the time it
    waited for the device, and the engine thread's busy time and time held for the vision encoder
    (EngineThread.busy_s, encoder_wait_s)."""
    return {**generation.counters(), **engine_gauges(engine),
            ENCODER_WAIT: float(getattr(thread, "encoder_wait_s", 0.0)),
            ENGINE_STEPS: int(getattr(engine, "num_steps", 0)),
            ENGINE_BUSY: float(getattr(thread, "busy_s", 0.0)),
            ENGINE_DEVICE_WAIT: float(getattr(engine, "device_wait_s", 0.0))}


class TritonMetrics:
    """Push metric values to Triton through the Python backend's custom metrics: gauges are set,
    counters incremented by their increase since the previous push (values are cumulative totals).

    pb_utils: the triton_python_backend_utils module (or a stand-in with MetricFamily)."""

    def __init__(self, pb_utils: Any, specs: tuple[MetricSpec, ...], labels: Mapping[str, str]):
        family = pb_utils.MetricFamily
        kinds = {COUNTER: family.COUNTER, GAUGE: family.GAUGE}
        self.specs = {s.name: s for s in specs}
        self._labels = dict(labels)
        self._families = {s.name: family(name=s.name, description=s.help, kind=kinds[s.kind]) for s in specs}
        # one Metric per series: unlabelled families now, labelled ones (le, reason) at their first value
        self._metrics = {s.name: self._families[s.name].Metric(labels=dict(labels)) for s in specs if not s.label}
        self._pushed: dict = {}
        self._lock = threading.Lock()

    def push(self, values: Mapping) -> None:
        """values: {name or series(name, label=value): value}."""
        with self._lock:
            if not self._families:
                return
            for key, value in values.items():
                name, extra = (key, ()) if isinstance(key, str) else key
                spec = self.specs.get(name)
                if spec is None or bool(spec.label) != bool(extra):
                    continue
                metric = self._metrics.get(key)
                if metric is None:
                    metric = self._metrics[key] = self._families[name].Metric(labels={**self._labels, **dict(extra)})
                if spec.kind == GAUGE:
                    metric.set(float(value))
                else:
                    increase = float(value) - self._pushed.get(key, 0.0)
                    if increase > 0:
                        metric.increment(increase)
                        self._pushed[key] = float(value)

    def close(self) -> None:
        """Drop the metrics, then their families (the backend wants that order)."""
        with self._lock:
            self._metrics.clear()
            self._families.clear()


class PeriodicPush:
    """push(read()) now (so the values are there when the model is ready), then from a daemon thread
    every interval_s, and once more on stop(). A failing read or push is reported through `log` (once
    per distinct message) and retried at the next tick."""

    def __init__(self, read: Callable[[], Mapping[str, float]], push: Callable[[Mapping[str, float]], None],
                 *, interval_s: float = 0.5, log: Callable[[str], None] | None = None, name: str = "metrics-push"):
        self._read, self._push, self.interval_s = read, push, interval_s
        self._log = log or (lambda message: None)
        self._last_error: str | None = None
        self._stop = threading.Event()
        self.tick()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def tick(self) -> None:
        try:
            self._push(self._read())
            self._last_error = None
        except Exception as e:
            message = f"metrics: {type(e).__name__}: {e}"
            if message != self._last_error:
                self._log(message)
            self._last_error = message

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tick()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self.tick()


def model_labels(args: Mapping[str, str]) -> dict[str, str]:
    """Labels of a model instance's metrics, from the Python backend's initialize() args. Named like
    Triton's (model, version); model_instance keeps the gauges of several instances apart ("instance"
    would clash with the label Prometheus adds to every scraped series)."""
    return {"model": str(args.get("model_name", "")), "version": str(args.get("model_version", "")),
            "model_instance": str(args.get("model_instance_name", ""))}


class LLMExporter:
    """What the llm adapter runs: meters the service's engine thread and pushes LLM_METRICS."""

    def __init__(self, service: Any, pb_utils: Any, args: Mapping[str, str], *, interval_s: float = 0.5,
                 log: Callable[[str], None] | None = None):
        self.generation = GenerationMetrics()
        thread = service.thread
        service.thread = MeteredEngineThread(thread, self.generation)
        self.triton = TritonMetrics(pb_utils, LLM_METRICS, model_labels(args))
        engine = service.engine
        self._pusher = PeriodicPush(lambda: llm_values(engine, self.generation, thread), self.triton.push,
                                    interval_s=interval_s, log=log, name="llm-metrics")

    def close(self) -> None:
        self._pusher.stop()
        self.triton.close()


class VisionExporter:
    """What the vision adapter runs: push the image-cache counters after each batch (a metric call
    only when a counter moved, and they move only in execute())."""

    def __init__(self, service: Any, pb_utils: Any, args: Mapping[str, str], *,
                 log: Callable[[str], None] | None = None):
        self.service = service
        self.triton = TritonMetrics(pb_utils, VISION_METRICS, model_labels(args))
        self._log = log or (lambda message: None)
        self._failed = False
        self.update()  # (a service made before this exporter may have counted already)

    def update(self) -> None:
        """Never raises (a metrics failure must not fail a batch); the first failure is logged."""
        try:
            self.triton.push(image_cache_counters(self.service))
        except Exception as e:
            if not self._failed:
                self._log(f"metrics: {type(e).__name__}: {e}")
            self._failed = True

    def close(self) -> None:
        self.triton.close()
