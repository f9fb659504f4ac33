"""Locust over gRPC streaming against the real tritonserver on the tiny checkpoint: a bounded headless
run (every chat kind and every metric in Locust's CSV and HTML report, users really concurrent), a run
whose requests fail, a refused mix, and the web UI."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from loadtest_helpers import LOADTEST, REPO_ROOT, run_tool
from workload import KINDS

from internvl_serve.serving.launcher import free_port

TYPES = ("STREAM", "TTFT", "ITL", "TOK/S")  # the locustfile's request types
MAX_NEW_TOKENS = 12
# --ignore-eos: every answer has exactly MAX_NEW_TOKENS tokens; small media keep the CPU server quick
WORKLOAD = ["--max-new-tokens", str(MAX_NEW_TOKENS), "--ignore-eos", "--num-segments", "2", "--num-images", "4",
            "--images-per-request", "2", "--video-frames", "4", "--rounds", "2"]
ONLY_IMAGES = ["--weight-text", "0", "--weight-image", "1", "--weight-images-combined", "0",
               "--weight-images-separate", "0", "--weight-video", "0", "--weight-multi-round", "0"]


def locust(server, *args: str) -> list[str]:
    return ["-m", "locust", "-f", str(LOADTEST / "locustfile.py"), "--host", f"grpc://{server.grpc_url}",
            *WORKLOAD, *args]


def read_stats(prefix: Path) -> dict[tuple[str, str], dict[str, float]]:
    """Locust's PREFIX_stats.csv as {(type, name): {column: number}}."""
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {(row["Type"], row["Name"]): {k: float(v) for k, v in row.items() if k not in ("Type", "Name")
                                             and v not in ("", "N/A")}
                for row in csv.DictReader(f)}


def test_headless_run_reports_every_metric_of_every_chat_kind(server, tmp_path):
    prefix, html = tmp_path / "run", tmp_path / "run.html"
    run = run_tool(locust(server, "--headless", "-u", "4", "-r", "4", "-t", "20s", "--csv", str(prefix),
                          "--html", str(html), "--only-summary"), timeout_s=150)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]
    stats = read_stats(prefix)
    for kind in KINDS:
        stream = stats[("STREAM", kind)]
        n = stream["Request Count"]
        assert n > 0 and stream["Failure Count"] == 0, (kind, stream)
        assert stream["Average Content Size"] == MAX_NEW_TOKENS  # content size = output tokens
        for metric in ("TTFT", "ITL", "TOK/S"):
            row = stats[(metric, kind)]
            assert row["Request Count"] == n and row["Failure Count"] == 0, (kind, metric, row)
            assert row["Min Response Time"] > 0, (kind, metric, row)
        ttft, itl, tps = stats[("TTFT", kind)], stats[("ITL", kind)], stats[("TOK/S", kind)]
        # per request: TTFT <= total, ITL = (total - TTFT) / (tokens - 1), tok/s = tokens / total
        assert ttft["Average Response Time"] <= stream["Average Response Time"]
        assert ttft["Max Response Time"] <= stream["Max Response Time"]
        assert itl["Max Response Time"] <= stream["Max Response Time"] / (MAX_NEW_TOKENS - 1)
        assert math.isclose(tps["Max Response Time"], MAX_NEW_TOKENS / (stream["Min Response Time"] / 1000),
                            rel_tol=1e-6)
        assert math.isclose(tps["Min Response Time"], MAX_NEW_TOKENS / (stream["Max Response Time"] / 1000),
                            rel_tol=1e-6)
    assert ("", "Aggregated") in stats
    with open(f"{prefix}_failures.csv", newline="") as f:
        assert list(csv.DictReader(f)) == []
    report = html.read_text()
    assert all(t in report for t in TYPES) and "images_separate" in report
    # gevent + gRPC: the users' streams were in flight at the same time, not one after another
    peak = re.search(r"peak concurrent streams: (\d+)", log)
    assert peak and int(peak.group(1)) >= 2, log[-3000:]


def test_a_failed_request_fails_the_run(server, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.png").write_bytes(b"this is not an image")
    prefix = tmp_path / "bad"
    run = run_tool(locust(server, "--headless", "-u", "2", "-r", "2", "-t", "3s", "--csv", str(prefix),
                          "--image-dir", str(images), *ONLY_IMAGES, "--think-time", "0.05", "--only-summary"),
                   timeout_s=90)
    assert run.returncode == 1, (run.stdout + run.stderr)[-4000:]  # Locust's exit code on failures
    stats = read_stats(prefix)
    stream = stats[("STREAM", "image")]
    assert stream["Request Count"] > 0 and stream["Failure Count"] == stream["Request Count"]
    assert not [key for key in stats if key[0] in ("TTFT", "ITL", "TOK/S")]  # metrics of successes only
    with open(f"{prefix}_failures.csv", newline="") as f:
        failures = list(csv.DictReader(f))
    assert failures and all("InvalidInputError" in row["Error"] and "images[0]" in row["Error"] for row in failures)


def test_users_killed_mid_request_leave_no_client_to_the_garbage_collector_and_the_run_exits(server):
    # Locust kills its users wherever they wait at the run-time limit; a CI run once hung at exit in
    # the garbage collector closing a gRPC channel (tests/load/killed_gevent_users.py says why)
    run = run_tool([str(Path(__file__).with_name("killed_gevent_users.py")), server.grpc_url], timeout_s=120)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = re.search(r"requests failed: (\d+); clients left to the garbage collector: (\d+)", run.stdout)
    assert summary, run.stdout + run.stderr[-3000:]
    assert int(summary.group(1)) > 0 and int(summary.group(2)) == 0, run.stdout


def test_a_mix_without_chats_is_refused(server, tmp_path):
    zero = [a if a.startswith("--") else "0" for a in ONLY_IMAGES]
    run = run_tool(locust(server, "--headless", "-u", "1", "-t", "5s", *zero), timeout_s=60)
    assert run.returncode == 2 and "every --weight-* is 0" in run.stderr, run.stderr[-2000:]


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def test_web_ui_shows_the_metrics_while_running(server, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "locust.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, *locust(server, "--web-host", "127.0.0.1", "--web-port", str(port),
                                                         "--autostart", "-u", "2", "-r", "2")],
                                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        counts: dict[str, float] = {}
        while not (counts and all(counts.get(t, 0) > 0 for t in TYPES)):
            assert proc.poll() is None, f"locust exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"metrics never all appeared: {counts}\n{log_path.read_text()[-3000:]}"
            try:
                report = _get_json(f"{base}/stats/requests")
            except OSError:  # the UI is not listening yet
                report = {"stats": []}
            counts = {t: sum(s["num_requests"] for s in report["stats"] if s["method"] == t) for t in TYPES}
            try:  # poll again in half a second, or at once if locust died
                proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        assert all(s["num_failures"] == 0 for s in report["stats"]), report["stats"]
        assert report["state"] == "running" and report["user_count"] == 2
        with urllib.request.urlopen(f"{base}/", timeout=5) as r:
            page = r.read()
        assert r.status == 200 and b"<html" in page.lower()
        assert b"weight_multi_round" in page and b"max_new_tokens" in page  # the workload's options, editable
        stop = urllib.request.Request(f"{base}/stop", data=b"", method="POST")
        with urllib.request.urlopen(stop, timeout=30) as r:
            assert json.load(r)["success"] is True
        proc.send_signal(signal.SIGTERM)  # Locust's graceful shutdown
        assert proc.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
