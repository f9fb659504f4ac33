"""The internvl_* metrics on a real tritonserver's /metrics (server.metrics_url), under a short load:
the tokens counter grows by exactly the tokens the clients received, one TTFT per finished request,
the TTFT / inter-token / request-latency histograms count every observation (buckets monotone, +Inf =
_count), the prompt-token counter grows by the prompt tokens the clients saw, finished requests are
counted by reason (a cancelled stream under "cancelled"), KV blocks and running requests go up during
the load and back to 0 after it, the image cache counts a resent image as a hit. Also, the deployment files against this server: every metric they use (HPA,
prometheus-adapter rules, Grafana dashboard) is exported (GPU-only nv_gpu_* aside), and the Docker
image runs this server's Triton (the same nvidia-pytriton wheel)."""
from __future__ import annotations

import importlib.metadata
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from internvl_client import Client
from internvl_serve.serving import metrics as m

REPO_ROOT = Path(__file__).resolve().parents[2]
# Triton exports these only with a GPU (this server runs on CPU); names from Triton 2.51's metrics docs.
GPU_ONLY = re.compile(r"^nv_(gpu_|energy_consumption)")

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def scrape(server) -> tuple[dict[str, float], dict[str, str]]:
    """(value per metric name, summed over its label sets; TYPE per name)."""
    text = requests.get(server.metrics_url, timeout=10).text
    values: dict[str, float] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()[:4]
            types[name] = kind
            continue
        match = _LINE.match(line)
        if match:
            values[match.group(1)] = values.get(match.group(1), 0.0) + float(match.group(3))
    return values, types


def scrape_series(server) -> list[tuple[str, dict[str, str], float]]:
    """Every sample: (name, labels, value)."""
    text = requests.get(server.metrics_url, timeout=10).text
    out = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            out.append((match.group(1), labels, float(match.group(3))))
    return out


def histogram(server, base: str) -> tuple[dict[str, float], float]:
    """The llm's histogram `base`: ({le: cumulative count}, _count), one model instance."""
    samples = scrape_series(server)
    buckets = {labels["le"]: v for name, labels, v in samples if name == f"{base}_bucket"}
    buckets = dict(sorted(buckets.items(), key=lambda item: float(item[0])))  # Triton's order is its own
    counts = [v for name, _, v in samples if name == f"{base}_count"]
    assert len(counts) == 1, f"{base}_count: {counts} (one llm instance expected)"
    return buckets, counts[0]


def finished(server) -> dict[str, float]:
    return {labels["reason"]: v for name, labels, v in scrape_series(server) if name == m.REQUESTS_FINISHED}


def wait_for(server, check, what: str, timeout_s: float = 15.0) -> dict[str, float]:
    """Scrape until check(values) holds (the llm pushes its metrics every 0.5 s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        values, _ = scrape(server)
        if check(values):
            return values
        if not server.is_running():
            pytest.fail(f"tritonserver died; log:\n{server.log_tail(60)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not seen within {timeout_s:.0f}s; last values: "
                        f"{ {k: v for k, v in values.items() if k.startswith('internvl_')} }")
        threading.Event().wait(0.1)


def idle(values) -> bool:
    return values[m.REQUESTS_RUNNING] == 0 and values[m.REQUESTS_WAITING] == 0 and values[m.KV_BLOCKS_USED] == 0


def png(seed: int) -> bytes:
    import io

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(server):
    return Client(server.grpc_url, timeout=120)


def test_every_metric_is_exported_with_its_type(server):
    values, types = scrape(server)
    for spec in m.LLM_METRICS + m.VISION_METRICS:
        assert spec.name in values, f"{spec.name} missing from {server.metrics_url}"
        assert types[spec.name] == spec.kind
    assert values[m.KV_BLOCKS_TOTAL] > 0
    for name in ("nv_inference_request_success", "nv_inference_queue_duration_us",
                 "nv_inference_pending_request_count"):
        assert name in values


def test_metrics_follow_a_short_load(server, client):
    before = wait_for(server, idle, "an idle engine")
    finished_before = finished(server)
    n, max_tokens = 6, 200
    seen_busy: list[dict] = []
    results = []

    def one(i):
        return client.generate(f"Load question {i}", generation_config=dict(max_new_tokens=max_tokens, ignore_eos=True))

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        while not all(f.done() for f in futures):  # sample the gauges while the load runs
            values, _ = scrape(server)
            if values[m.REQUESTS_RUNNING] > 0 and values[m.KV_BLOCKS_USED] > 0:
                seen_busy.append(values)
            threading.Event().wait(0.05)
        results = [f.result() for f in futures]
    assert all(r.num_output_tokens == max_tokens for r in results)
    tokens = sum(r.num_output_tokens for r in results)

    def settled(values):  # the finish reasons are the last series of the llm's push: the rest is in too
        return (values[m.GENERATED_TOKENS] - before[m.GENERATED_TOKENS] == tokens
                and values[m.TTFT_COUNT] - before[m.TTFT_COUNT] == n
                and values[m.E2E_COUNT] - before[m.E2E_COUNT] == n
                and values[m.REQUESTS_FINISHED] - before[m.REQUESTS_FINISHED] == n and idle(values))

    after = wait_for(server, settled, f"{tokens} more tokens, {n} more first tokens, an idle engine")
    assert seen_busy, "never saw running requests holding KV blocks during the load"
    busiest = max(seen_busy, key=lambda v: v[m.KV_BLOCKS_USED])
    assert 1 <= busiest[m.REQUESTS_RUNNING] <= n
    assert busiest[m.KV_BLOCKS_USED] <= busiest[m.KV_BLOCKS_TOTAL]
    assert busiest[m.KV_BLOCKS_USED] >= busiest[m.REQUESTS_RUNNING]  # at least one block each
    assert after[m.ITL_COUNT] - before[m.ITL_COUNT] == tokens - n  # tokens - 1 gaps per request
    ttft = (after[m.TTFT_SUM] - before[m.TTFT_SUM]) / n
    itl = (after[m.ITL_SUM] - before[m.ITL_SUM]) / (tokens - n)
    assert 0 < ttft < 60 and 0 < itl < 10
    assert after[m.KV_BLOCKS_TOTAL] == before[m.KV_BLOCKS_TOTAL]
    assert after["nv_inference_request_success"] - before["nv_inference_request_success"] >= n
    assert after[m.PROMPT_TOKENS] - before[m.PROMPT_TOKENS] == sum(r.num_input_tokens for r in results)
    reasons = finished(server)
    assert reasons["length"] - finished_before["length"] == n  # ignore_eos: every request ran to max_tokens
    assert all(reasons[r] == finished_before[r] for r in ("stop", "cancelled", "error"))
    for base, bounds in ((m.TTFT, m.TTFT_BUCKETS), (m.ITL, m.ITL_BUCKETS), (m.E2E, m.E2E_BUCKETS)):
        buckets, count = histogram(server, base)
        assert list(buckets) == [repr(b) for b in bounds] + ["+Inf"], base  # every bucket
        assert list(buckets.values()) == sorted(buckets.values()), f"{base} buckets not monotone: {buckets}"
        assert buckets["+Inf"] == count == after[f"{base}_count"], base
    assert histogram(server, m.E2E)[1] - before[m.E2E_COUNT] == n
    # every request needs max_tokens steps of its own; no step goes without a token or a prompt's chunk
    steps = after[m.ENGINE_STEPS] - before[m.ENGINE_STEPS]
    assert max_tokens <= steps <= tokens + n, steps
    wait, busy = (after[k] - before[k] for k in (m.ENGINE_DEVICE_WAIT, m.ENGINE_BUSY))
    assert 0 < wait <= busy, (wait, busy)


def test_a_cancelled_stream_counts_as_cancelled(server, client):
    before = wait_for(server, idle, "an idle engine")
    finished_before = finished(server)
    stream = client.stream("Talk for a long time.", generation_config=dict(max_new_tokens=2000, ignore_eos=True))
    assert next(stream)  # generating
    stream.close()  # the SDK cancels the request on the server (docs/contract.md#cancellation)
    wait_for(server, lambda v: idle(v) and v[m.E2E_COUNT] == before[m.E2E_COUNT] + 1
             and v[m.REQUESTS_FINISHED] == before[m.REQUESTS_FINISHED] + 1, "the cancelled request's end")
    reasons = finished(server)
    assert reasons["cancelled"] - finished_before["cancelled"] == 1
    assert all(reasons[r] == finished_before[r] for r in ("stop", "length", "error"))


def test_image_cache_counts_a_resent_image_as_a_hit(server, client):
    image = png(11)
    before, _ = scrape(server)
    first = client.generate("What is it?", images=[image], generation_config=dict(max_new_tokens=4))
    after_first = wait_for(server, lambda v: v[m.IMAGE_CACHE_MISSES] > before[m.IMAGE_CACHE_MISSES], "a miss")
    assert after_first[m.IMAGE_CACHE_MISSES] - before[m.IMAGE_CACHE_MISSES] == 1  # V1-1: one 448 tile
    assert after_first[m.IMAGE_CACHE_HITS] == before[m.IMAGE_CACHE_HITS]
    second = client.generate("What is it?", images=[image], generation_config=dict(max_new_tokens=4))
    assert second.text == first.text
    after = wait_for(server, lambda v: v[m.IMAGE_CACHE_HITS] > before[m.IMAGE_CACHE_HITS], "a hit")
    assert after[m.IMAGE_CACHE_HITS] - before[m.IMAGE_CACHE_HITS] == 1
    assert after[m.IMAGE_CACHE_MISSES] == after_first[m.IMAGE_CACHE_MISSES]


def test_ttft_stage_figures_split_new_image_requests(server, client):
    """The benchmark's TTFT breakdown (servermetrics.ttft_stage_figures) over two requests with new images:
    Triton's counters see each stage once per request (the llm's decoupled stub too: its execute returns
    after the submit), and every figure is there."""
    import servermetrics

    before = servermetrics.read_ttft_stages(server.metrics_url)
    counts = scrape(server)[0]
    for seed in (21, 22):
        client.generate("What is it?", images=[png(seed)], generation_config=dict(max_new_tokens=2))
    # the llm pushes its counters every 0.5 s (an earlier test's last request may land in the same push),
    # one metric after another: the prefill part's count comes after the TTFT's, its queue part's and its sum
    wait_for(server, lambda v: v[m.TTFT_COUNT] >= counts[m.TTFT_COUNT] + 2
             and v[m.PREFILL_COUNT] >= counts[m.PREFILL_COUNT] + 2, "two more first tokens, split")
    after = servermetrics.read_ttft_stages(server.metrics_url)
    for model in servermetrics.STAGE_MODELS:
        key = (model, servermetrics.TRITON_SUCCESS)
        assert after[key] - before[key] == 2, model
    figures = servermetrics.ttft_stage_figures(before, after)
    assert set(figures) == {"preprocess_queue_ms", "preprocess_compute_ms", "vision_queue_ms", "vision_compute_ms",
                            "llm_stub_queue_ms", "llm_stub_compute_ms", "llm_first_token_ms", "llm_queue_ms",
                            "llm_prefill_ms"}
    assert figures["preprocess_compute_ms"] > 0 and figures["vision_compute_ms"] > 0
    assert figures["llm_stub_compute_ms"] > 0  # the stub's execute: the rows' hand-off and the submit
    assert figures["llm_first_token_ms"] > 0 and min(figures.values()) >= 0
    # the engine's timestamp splits the llm's TTFT in two (means over the same requests, one push)
    assert figures["llm_queue_ms"] + figures["llm_prefill_ms"] == pytest.approx(figures["llm_first_token_ms"])


def deployment_metric_names() -> set[str]:
    """Metric names the prometheus-adapter rules' queries and the Grafana dashboard read (the HPA's own
    names are the rules' outputs: tests/deploy/test_k8s.py maps each to its rule)."""
    token = re.compile(r"\b((?:internvl|nv)_[a-z0-9_]+)\b")

    def names_in(query: str) -> set[str]:
        return set(token.findall(re.sub(r'"[^"]*"', "", query)))  # not label values (model="internvl_chat")

    names: set[str] = set()
    adapter = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus-adapter" / "values.yaml").read_text())
    for rule in adapter["rules"]["custom"]:
        names |= names_in(rule["seriesQuery"]) | names_in(rule["metricsQuery"])
    dashboard = json.loads((REPO_ROOT / "deploy" / "grafana" / "internvl.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            names |= names_in(target["expr"])
    return names


def test_deployment_files_use_exported_metrics(server):
    values, _ = scrape(server)
    names = deployment_metric_names()
    assert {m.REQUESTS_WAITING, m.TTFT_SUM, m.KV_BLOCKS_USED} <= names  # the files were read
    exported = set(values)
    missing = sorted(n for n in names if n not in exported and not GPU_ONLY.match(n))
    assert not missing, f"used by deploy/ but not exported by the server: {missing}"


def test_docker_image_runs_the_server_the_tests_run(server):
    """docker/Dockerfile installs requirements-serve.txt, whose nvidia-pytriton pin is the wheel whose
    tritonserver these tests run, and its launcher uses that server (no --tritonserver)."""
    version = requests.get(f"{server.http_url}/v2", timeout=10).json()["version"]
    assert version == "2.51.0"
    pin = re.search(r"^nvidia-pytriton==(\S+)", (REPO_ROOT / "requirements-serve.txt").read_text(), re.MULTILINE)
    assert pin and importlib.metadata.version("nvidia-pytriton") == pin.group(1)
    dockerfile = (REPO_ROOT / "docker" / "Dockerfile").read_text()
    entrypoint = re.search(r"^ENTRYPOINT \[[^\]]*\]", dockerfile, re.MULTILINE).group(0)
    assert "pip install -r requirements-serve.txt" in dockerfile and "--tritonserver" not in entrypoint
