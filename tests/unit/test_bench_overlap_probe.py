"""bench/vision_decode_overlap.py and bench/engine_alone.py's first-token profile run end to end on the
CPU with the tiny checkpoint, so that their GPU runs do not find their bugs: every case of the overlap
probe did work (tokens, images) and its overlap sums come from those numbers; the first-token profile
reports each repeat with its first response's tokens."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_overlap_probe_measures_every_case_on_the_cpu(tmp_path):
    out = tmp_path / "overlap.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench/vision_decode_overlap.py"), "--tiny", "--device", "cpu",
                          "--seconds", "2", "--streams", "2", "--vision-batch", "1", "--new-tokens", "600",
                          "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    decode, vision = result["decode_alone"], result["vision_alone"]
    assert decode["tok_per_s"] > 0 and vision["images_per_s"] > 0
    for case in ("same_process", "two_processes"):
        row = result[case]
        assert row["tok_per_s"] > 0 and row["images_per_s"] > 0, (case, row)
        want = row["tok_per_s"] / decode["tok_per_s"] + row["images_per_s"] / vision["images_per_s"]
        assert abs(row["overlap_sum"] - want) < 1e-9
    assert result["num_blocks"] == 2 * -(-(256 + 64 + 600) // 16)


def test_the_first_token_profile_runs_on_the_cpu(tmp_path, tiny_checkpoint):
    out = tmp_path / "engine.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench/engine_alone.py"), "--checkpoint", str(tiny_checkpoint),
                          "--device", "cpu", "--levels", "", "--profile-first-token", "--out", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    repeats = json.loads(out.read_text())["first_token"]["repeats"]
    assert len(repeats) == 3
    assert all(r["ttft_ms"] > 0 and r["tokens_in_first_response"] >= 1 for r in repeats)


def test_the_fp8_rows_a_b_switch_runs_and_refuses_the_engine_process(tmp_path, tiny_checkpoint):
    out = tmp_path / "engine.json"
    base = [sys.executable, str(ROOT / "bench/engine_alone.py"), "--checkpoint", str(tiny_checkpoint), "--device",
            "cpu", "--levels", "2", "--requests-per-stream", "1", "--new-tokens", "4", "--out", str(out),
            "--engine-option", "quantization=fp8", "--fp8-linears-quantize-their-rows"]
    run = subprocess.run(base, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["fp8_linears_quantize_their_rows"] and result["levels"][0]["output_tokens"] == 2 * 4
    stages = result["levels"][0]["ttft_stages"]  # the llm's TTFT in the server's metrics' two parts
    assert set(stages) == {"llm_first_token_ms", "llm_queue_ms", "llm_prefill_ms"}
    assert stages["llm_queue_ms"] + stages["llm_prefill_ms"] == pytest.approx(stages["llm_first_token_ms"])
    run = subprocess.run([*base, "--engine-option", "engine_process=true"], capture_output=True, text=True)
    assert run.returncode == 2 and "not with engine_process" in run.stderr
