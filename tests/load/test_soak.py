"""loadtest/soak.py against a server started by `python -m internvl_serve.serving.launcher` (the
documented way), found by its pid: a short soak must end without errors and record the server's RSS."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest_helpers import REPO_ROOT, run_tool
from procstats import process_tree

from internvl_serve.serving.launcher import free_port


@pytest.fixture(scope="module")
def launched(tiny_checkpoint, tmp_path_factory):
    """The launcher CLI serving the tiny checkpoint: (gRPC url, metrics url, tritonserver pid). Stopped
    with Ctrl-C."""
    log = tmp_path_factory.mktemp("launcher") / "server.log"
    grpc_port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "internvl_serve.serving.launcher", "--checkpoint", str(tiny_checkpoint),
         "--grpc-port", str(grpc_port), "--http-port", str(free_port()), "--metrics-port", str(metrics_port),
         "--log-file", str(log), "--exit-timeout-secs", "5", "--ready-timeout", "300"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        start_new_session=True)
    try:
        lines = []
        for line in proc.stdout:  # ends at the ready line, or at EOF if the launcher exits
            lines.append(line)
            if line.startswith("launcher: ready"):
                break
        assert proc.poll() is None, "".join(lines)
        servers = [pid for pid in process_tree(proc.pid) if Path(f"/proc/{pid}/comm").read_text().strip() == "tritonserver"]
        assert len(servers) == 1, servers
        yield f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics", servers[0]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_short_soak_against_the_launcher(launched, tmp_path):
    url, metrics_url, server_pid = launched
    out = tmp_path / "soak"
    run = run_tool(["loadtest/soak.py", "--url", url, "--server-pid", str(server_pid), "--metrics-url", metrics_url,
                    "--streams", "4",
                    "--duration", "10s", "--interval", "2s", "--max-new-tokens", "8", "--num-segments", "2",
                    "--num-images", "4", "--video-frames", "4", "--out", str(out)], timeout_s=120)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    with open(out / "soak.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5, rows  # 10 s in rows of 2 s
    assert all(int(r["errors"]) == 0 for r in rows)
    assert sum(int(r["requests"]) for r in rows) > 0 and sum(float(r["output_tokens_per_s"]) for r in rows) > 0
    # tritonserver and its Python backend stubs (preprocess x2, vision, llm)
    assert all(float(r["server_rss_mib"]) > 0 and int(r["server_processes"]) >= 2 for r in rows), rows
    # the llm's gauges, scraped every row: 4 streams at most, never queued beyond them
    assert all(r["kv_blocks_used"] != "" and 0 <= int(r["requests_running"]) <= 4 for r in rows), rows
    data = json.loads((out / "soak.json").read_text())
    summary = data["summary"]
    # a gauge, not a count: whether a 2 s row catches a request holding blocks depends on the machine's
    # speed (on a busy 2-core runner 8-token requests come and go between samples), so only its bounds
    assert all(0 <= int(r["kv_blocks_used"]) <= summary["kv_after"]["kv_blocks_total"] for r in rows), rows
    assert summary["ok"] and summary["errors"] == 0 and summary["server_alive"] is True
    assert summary["kv_after"]["kv_blocks_used_after"] == 0 and summary["kv_after"]["kv_blocks_total"] > 0
    assert summary["requests"] >= sum(int(r["requests"]) for r in rows)
    assert summary["server_rss_mib"]["min"] > 0 and len(data["rows"]) == 5
    assert data["settings"]["server_pid"] == server_pid
    report = (out / "soak.md").read_text()
    assert report.startswith("# Soak: OK") and "server RSS" in report
    assert "KV-cache blocks in use once the streams stopped: **0** of " in report


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_soak_stopped_early_by_a_signal_still_reports(launched, tmp_path, sig):
    """A soak started the way `nohup python loadtest/soak.py ... &` starts it (SIGINT inherited ignored)
    stops at Ctrl-C or SIGTERM with its reports, instead of running on to --duration."""
    url, metrics_url, server_pid = launched
    out = tmp_path / "soak"
    proc = subprocess.Popen(
        [sys.executable, "loadtest/soak.py", "--url", url, "--server-pid", str(server_pid), "--metrics-url",
         metrics_url, "--streams", "2", "--duration", "10m", "--interval", "1s", "--max-new-tokens", "8",
         "--weight-video", "0", "--num-images", "2", "--out", str(out)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        lines = []
        for line in proc.stdout:  # until the first row is out
            lines.append(line)
            if line.startswith("soak: t="):
                break
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines) + rest
    assert "interrupted" in rest
    data = json.loads((out / "soak.json").read_text())
    assert data["summary"]["ok"] and data["summary"]["elapsed_s"] < 120 and len(data["rows"]) >= 1
    assert data["summary"]["kv_after"]["kv_blocks_used_after"] == 0
    assert (out / "errors.txt").read_text() == ""
    assert json.loads((out / "settings.json").read_text())["streams"] == 2
