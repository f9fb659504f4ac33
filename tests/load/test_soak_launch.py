"""loadtest/soak.py --launch CHECKPOINT: it starts its own tritonserver, soaks it, and stops it."""

from __future__ import annotations

import json

from loadtest_helpers import run_tool
from procstats import tree_rss


def test_soak_launches_and_stops_its_server(tiny_checkpoint, tmp_path):
    out = tmp_path / "soak"
    run = run_tool(["loadtest/soak.py", "--launch", str(tiny_checkpoint), "--streams", "2", "--duration", "4s",
                    "--interval", "2s", "--max-new-tokens", "8", "--weight-video", "0", "--weight-images-combined",
                    "0", "--num-images", "2", "--out", str(out)], timeout_s=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    data = json.loads((out / "soak.json").read_text())
    assert data["summary"]["ok"] and len(data["rows"]) == 2
    assert all(row["server_rss_mib"] > 0 for row in data["rows"])
    # its own metrics port, without --metrics-url: the gauges per row and the KV check at the end
    assert data["settings"]["metrics_url"].endswith("/metrics")
    assert all(row["kv_blocks_used"] is not None for row in data["rows"])
    assert data["summary"]["kv_after"]["kv_blocks_used_after"] == 0
    assert (out / "server.log").stat().st_size > 0
    assert tree_rss(data["settings"]["server_pid"]) is None  # the server it launched is gone
