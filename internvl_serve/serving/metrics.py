"""The model's own Prometheus metrics: what to measure, from the engine and the vision service.

Owns: the metric names (exported by Triton's metrics endpoint next to its own nv_* metrics), the
per-request timing of generation (time to first token, inter-token latency, generated tokens), the
engine gauges (waiting and running requests, KV-cache blocks held by requests), the image-cache
counters, and pushing all of them to Triton through the Python backend's custom-metric API
(`pb_utils.MetricFamily`, passed in as an argument: this module never imports
triton_python_backend_utils, so it is tested without a server).

Does not own: the engine, the vision service or the Triton adapters (model_repository/*/1/model.py
create the exporters in initialize() and close them in finalize()).

Why counters of sums and counts instead of histograms: Triton 2.51's Python backend has
`MetricFamily.HISTOGRAM`, but every metric operation is a round trip from the stub process to the
server; one observe() per token would cost more than the token. Here timings accumulate in Python and
a background thread pushes the increases (and the gauges) every `interval_s`. Mean TTFT over a window
is `rate(..._sum[1m]) / rate(..._count[1m])` in PromQL.

Definitions (docs/metrics.md):
- time to first token: from the llm step's submit to the engine output carrying the first token (engine
  queue + prefill; preprocess and vision time are in Triton's per-model nv_inference_* metrics);
- inter-token latency: between consecutive token-bearing outputs of one request;
- KV blocks used: blocks with a reference (held by running requests). Cached blocks that no request
  holds are free (the allocator hands them out again, evicting their prefix entry), so after a load
  `internvl_kv_cache_blocks_used` returns to 0 whatever the prefix cache keeps.
"""
from __future__ import annotations

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


TTFT_SUM = "internvl_time_to_first_token_seconds_sum"
TTFT_COUNT = "internvl_time_to_first_token_seconds_count"
ITL_SUM = "internvl_inter_token_latency_seconds_sum"
ITL_COUNT = "internvl_inter_token_latency_seconds_count"
GENERATED_TOKENS = "internvl_generated_tokens_total"
REQUESTS_WAITING = "internvl_requests_waiting"
REQUESTS_RUNNING = "internvl_requests_running"
KV_BLOCKS_USED = "internvl_kv_cache_blocks_used"
KV_BLOCKS_TOTAL = "internvl_kv_cache_blocks_total"
IMAGE_CACHE_HITS = "internvl_image_cache_hits_total"
IMAGE_CACHE_MISSES = "internvl_image_cache_misses_total"

LLM_METRICS = (
    MetricSpec(TTFT_SUM, COUNTER, "Sum of times to first token (llm submit to first generated token), seconds"),
    MetricSpec(TTFT_COUNT, COUNTER, "Requests that produced a first token"),
    MetricSpec(ITL_SUM, COUNTER, "Sum of times between consecutive generated tokens of a request, seconds"),
    MetricSpec(ITL_COUNT, COUNTER, "Gaps between consecutive generated tokens"),
    MetricSpec(GENERATED_TOKENS, COUNTER, "Tokens generated (the final </s> included)"),
    MetricSpec(REQUESTS_WAITING, GAUGE, "Requests in the engine's queue, not yet admitted (or preempted)"),
    MetricSpec(REQUESTS_RUNNING, GAUGE, "Requests the engine is generating for (in-flight batch)"),
    MetricSpec(KV_BLOCKS_USED, GAUGE, "Paged KV-cache blocks held by requests"),
    MetricSpec(KV_BLOCKS_TOTAL, GAUGE, "Paged KV-cache blocks in the pool"),
)
VISION_METRICS = (
    MetricSpec(IMAGE_CACHE_HITS, COUNTER, "Image tiles whose embedding came from the vision model's cache"),
    MetricSpec(IMAGE_CACHE_MISSES, COUNTER, "Image tiles the vision model encoded"),
)
METRIC_NAMES = tuple(s.name for s in LLM_METRICS + VISION_METRICS)


class GenerationMetrics:
    """Per-request timing from engine outputs, accumulated into counters. Thread-safe: start() runs on
    the submitting thread, observe() on the engine thread, counters() on the exporter's thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._started: dict[str, float] = {}   # request_id -> submit time (until its first token)
        self._last_token: dict[str, float] = {}  # request_id -> time of its latest token
        self._values = {TTFT_SUM: 0.0, TTFT_COUNT: 0, ITL_SUM: 0.0, ITL_COUNT: 0, GENERATED_TOKENS: 0}

    def start(self, request_id: str) -> None:
        with self._lock:
            self._started[request_id] = self._clock()

    def forget(self, request_id: str) -> None:
        """The request was refused (or is over): drop its timers."""
        with self._lock:
            self._started.pop(request_id, None)
            self._last_token.pop(request_id, None)

    def observe(self, output: Any) -> None:
        """One engine RequestOutput (request_id, new_token_ids, finished)."""
        now = self._clock()
        rid = output.request_id
        with self._lock:
            if output.new_token_ids:
                v = self._values
                v[GENERATED_TOKENS] += len(output.new_token_ids)
                if rid in self._started:
                    v[TTFT_SUM] += now - self._started.pop(rid)
                    v[TTFT_COUNT] += 1
                elif rid in self._last_token:
                    v[ITL_SUM] += now - self._last_token[rid]
                    v[ITL_COUNT] += 1
                self._last_token[rid] = now
            if output.finished:
                self._started.pop(rid, None)
                self._last_token.pop(rid, None)

    @property
    def num_tracked(self) -> int:
        with self._lock:
            return len(self._started.keys() | self._last_token.keys())

    def counters(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)


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
    """The engine's queue and KV-cache state. Read from another thread without a lock: each value is
    one len() (atomic in CPython); together they may be one step apart, which a gauge tolerates."""
    allocator = engine.allocator
    total = allocator.num_blocks
    return {REQUESTS_WAITING: engine.scheduler.num_waiting, REQUESTS_RUNNING: engine.scheduler.num_running,
            KV_BLOCKS_USED: total - allocator.num_free, KV_BLOCKS_TOTAL: total}


def image_cache_counters(service: Any) -> dict[str, float]:
    """The vision service's cache counters (0 when it has no cache)."""
    return {IMAGE_CACHE_HITS: int(getattr(service, "cache_hits", 0) or 0),
            IMAGE_CACHE_MISSES: int(getattr(service, "cache_misses", 0) or 0)}


def llm_values(engine: Any, generation: GenerationMetrics) -> dict[str, float]:
    return {**generation.counters(), **engine_gauges(engine)}


class TritonMetrics:
    """Push metric values to Triton through the Python backend's custom metrics: gauges are set,
    counters incremented by their increase since the previous push (values are cumulative totals).

    pb_utils: the triton_python_backend_utils module (or a stand-in with MetricFamily)."""

    def __init__(self, pb_utils: Any, specs: tuple[MetricSpec, ...], labels: Mapping[str, str]):
        family = pb_utils.MetricFamily
        kinds = {COUNTER: family.COUNTER, GAUGE: family.GAUGE}
        self.specs = {s.name: s for s in specs}
        self._families = {s.name: family(name=s.name, description=s.help, kind=kinds[s.kind]) for s in specs}
        self._metrics = {name: f.Metric(labels=dict(labels)) for name, f in self._families.items()}
        self._pushed = {s.name: 0.0 for s in specs if s.kind == COUNTER}
        self._lock = threading.Lock()

    def push(self, values: Mapping[str, float]) -> None:
        with self._lock:
            if not self._metrics:
                return
            for name, value in values.items():
                spec = self.specs.get(name)
                if spec is None:
                    continue
                if spec.kind == GAUGE:
                    self._metrics[name].set(float(value))
                else:
                    increase = float(value) - self._pushed[name]
                    if increase > 0:
                        self._metrics[name].increment(increase)
                        self._pushed[name] = float(value)

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
        service.thread = MeteredEngineThread(service.thread, self.generation)
        self.triton = TritonMetrics(pb_utils, LLM_METRICS, model_labels(args))
        engine = service.engine
        self._pusher = PeriodicPush(lambda: llm_values(engine, self.generation), self.triton.push,
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
