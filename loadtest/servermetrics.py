"""Reading the server's Prometheus metrics (the `internvl_*` families of serving/metrics.py) from its
metrics port: a value, a few gauges at once, and the KV-cache check after a run. Standard library only,
so the soak, the benchmark and the tests share it without torch."""

from __future__ import annotations

import re
import time
import urllib.request

KV_BLOCKS_USED = "internvl_kv_cache_blocks_used"
KV_BLOCKS_TOTAL = "internvl_kv_cache_blocks_total"
REQUESTS_RUNNING = "internvl_requests_running"
REQUESTS_WAITING = "internvl_requests_waiting"
IMAGE_CACHE_HITS = "internvl_image_cache_hits_total"
IMAGE_CACHE_MISSES = "internvl_image_cache_misses_total"
PREEMPTIONS = "internvl_preemptions_total"
ENCODER_WAIT = "internvl_encoder_priority_wait_seconds_total"
ENGINE_STEPS = "internvl_engine_steps_total"
ENGINE_BUSY = "internvl_engine_busy_seconds_total"
ENGINE_DEVICE_WAIT = "internvl_engine_device_wait_seconds_total"
ENGINE_COUNTERS = (ENGINE_STEPS, ENGINE_BUSY, ENGINE_DEVICE_WAIT)
TTFT_SUM = "internvl_time_to_first_token_seconds_sum"  # the llm's: its submit to the first generated token
TTFT_COUNT = "internvl_time_to_first_token_seconds_count"
QUEUE_SUM = "internvl_request_queue_time_seconds_sum"  # the llm's TTFT split: its submit to the engine's
QUEUE_COUNT = "internvl_request_queue_time_seconds_count"  # first step with the request,
PREFILL_SUM = "internvl_request_prefill_time_seconds_sum"  # and from there to the first token
PREFILL_COUNT = "internvl_request_prefill_time_seconds_count"
LLM_TTFT_PARTS = {"llm_first_token_ms": (TTFT_SUM, TTFT_COUNT), "llm_queue_ms": (QUEUE_SUM, QUEUE_COUNT),
                  "llm_prefill_ms": (PREFILL_SUM, PREFILL_COUNT)}
# Triton's per-model counters (cumulative microseconds over its successful requests; a batched execution's
# compute counts in full for each request in the batch, which is what each request waited)
TRITON_SUCCESS = "nv_inference_request_success"
TRITON_QUEUE = "nv_inference_queue_duration_us"
TRITON_COMPUTE = ("nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
                  "nv_inference_compute_output_duration_us")
# The ensemble's models in the order a request meets them, each with the prefix of its figures: the llm's are
# its stub's (Triton's queue in front of the one llm instance, and its execute(): reading the inputs, the image
# rows' conversion and hand-off to the engine, the submit), named apart from the engine's own llm_queue_ms
STAGE_MODELS = {"preprocess": "preprocess", "vision": "vision", "llm": "llm_stub"}


def parse_metric(text: str, name: str) -> float | None:
    """The sum over label sets of metric `name` in Prometheus text exposition, or None if absent."""
    values = [float(m.group(1)) for m in re.finditer(r"^" + re.escape(name) + r"(?:\{[^}]*\})?\s+(\S+)", text, re.M)]
    return sum(values) if values else None


def read_metrics(url: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read().decode()


def read_values(url: str, names: tuple[str, ...], read=read_metrics) -> dict[str, float | None]:
    """{name: value or None} for each name, from one scrape; all None when the endpoint does not answer."""
    try:
        text = read(url)
    except Exception:  # noqa: BLE001 - a scrape that fails is a blank, the caller goes on
        return dict.fromkeys(names)
    return {name: parse_metric(text, name) for name in names}


def parse_model_metric(text: str, name: str, model: str) -> float | None:
    """The sum over label sets with model="<model>" of metric `name`, or None if absent."""
    pattern = r"^" + re.escape(name) + r"\{[^}]*\bmodel=\"" + re.escape(model) + r"\"[^}]*\}\s+(\S+)"
    values = [float(m.group(1)) for m in re.finditer(pattern, text, re.M)]
    return sum(values) if values else None


def read_ttft_stages(url: str, read=read_metrics) -> dict:
    """One scrape of the counters ttft_stage_figures subtracts: {(model, name): value or None} for the
    STAGE_MODELS' Triton counters, and the llm's TTFT sum and count by name; {} when the endpoint does not
    answer."""
    try:
        text = read(url)
    except Exception:  # noqa: BLE001 - a scrape that fails is a blank, the caller goes on
        return {}
    out = {(model, name): parse_model_metric(text, name, model)
           for model in STAGE_MODELS for name in (TRITON_SUCCESS, TRITON_QUEUE, *TRITON_COMPUTE)}
    return {**out, **{name: parse_metric(text, name) for pair in LLM_TTFT_PARTS.values() for name in pair}}


def ttft_stage_figures(before: dict, after: dict) -> dict:
    """Where the requests between two read_ttft_stages readings spent their time before the first token,
    as means per request in ms: "<prefix>_queue_ms" and "<prefix>_compute_ms" for each of STAGE_MODELS
    (Triton's queue, and its compute: input + execute + output; the llm stub's execute returns just
    after its submit), "llm_first_token_ms" (the llm's submit to its first token) and its two parts,
    "llm_queue_ms" (to the engine's first step with the request) and "llm_prefill_ms" (from there). A
    figure whose counters are missing or saw no request is left out; {} when nothing is left."""
    out = {}

    def delta(key):
        a, b = before.get(key), after.get(key)
        return None if a is None or b is None else b - a
    for model, prefix in STAGE_MODELS.items():
        n = delta((model, TRITON_SUCCESS))
        if not n or n <= 0:
            continue
        queue = delta((model, TRITON_QUEUE))
        compute = [delta((model, name)) for name in TRITON_COMPUTE]
        if queue is not None:
            out[f"{prefix}_queue_ms"] = queue / n / 1e3
        if None not in compute:
            out[f"{prefix}_compute_ms"] = sum(compute) / n / 1e3
    for figure, (sum_name, count_name) in LLM_TTFT_PARTS.items():
        n, total = delta(count_name), delta(sum_name)
        if n and n > 0 and total is not None:
            out[figure] = 1e3 * total / n
    return out


def engine_step_figures(before: dict, after: dict) -> dict:
    """From two readings of ENGINE_COUNTERS ({name: value or None}): the engine steps launched between
    them, the engine thread's ms of work per step, and the share of that work spent waiting for the
    device. {} when a reading is missing or no step ran between them."""
    if any(d.get(name) is None for d in (before, after) for name in ENGINE_COUNTERS):
        return {}
    steps = after[ENGINE_STEPS] - before[ENGINE_STEPS]
    busy = after[ENGINE_BUSY] - before[ENGINE_BUSY]
    wait = after[ENGINE_DEVICE_WAIT] - before[ENGINE_DEVICE_WAIT]
    if steps <= 0 or busy <= 0:
        return {}
    return {"steps": int(steps), "ms_per_step": 1e3 * busy / steps, "device_wait_share": wait / busy}


def kv_blocks_after_run(metrics_url: str, timeout_s: float = 30.0, period_s: float = 0.5,
                        read=read_metrics, clock=time.monotonic, wait=time.sleep) -> dict:
    """Poll the llm's KV gauge until it reads 0 or timeout_s passes (the model pushes its gauges every
    0.5 s). {"kv_blocks_used_after": N | None, "kv_blocks_total": M | None, ...}; None: not available."""
    deadline = clock() + timeout_s
    used = total = hits = misses = preemptions = encoder_wait = None
    error = None
    while True:
        try:
            text = read(metrics_url)
            used, total = parse_metric(text, KV_BLOCKS_USED), parse_metric(text, KV_BLOCKS_TOTAL)
            hits, misses = parse_metric(text, IMAGE_CACHE_HITS), parse_metric(text, IMAGE_CACHE_MISSES)
            preemptions = parse_metric(text, PREEMPTIONS)
            encoder_wait = parse_metric(text, ENCODER_WAIT)
            error = None
        except Exception as e:  # noqa: BLE001 - a missing endpoint is recorded, not fatal
            error = f"{type(e).__name__}: {e}"
        if used == 0 or used is None and error is None or clock() >= deadline:
            break
        wait(period_s)
    out = {"kv_blocks_used_after": None if used is None else int(used),
           "kv_blocks_total": None if total is None else int(total),
           "image_cache_hits": None if hits is None else int(hits),
           "image_cache_misses": None if misses is None else int(misses),
           "preemptions": None if preemptions is None else int(preemptions),
           "encoder_wait_s": encoder_wait}
    if error:
        out["metrics_error"] = error
    return out
