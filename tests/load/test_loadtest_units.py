"""The load tools' pieces without a server: options, media, answer checks, timing, /proc readings."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

import procstats
import soak
import workload
from internvl_client import ChatResponse


def test_urls():
    assert workload.parse_url("grpc://127.0.0.1:8001") == ("127.0.0.1:8001", False)
    assert workload.parse_url("grpcs://gpu.example:443/") == ("gpu.example:443", True)
    assert workload.parse_url("10.0.0.2:8001") == ("10.0.0.2:8001", False)
    for bad in ("http://127.0.0.1:8000", "127.0.0.1", ""):
        with pytest.raises(ValueError):
            workload.parse_url(bad)


def test_weights_and_generation_config():
    options = workload.options_namespace(weight_video=0, temperature=0.7, max_new_tokens=5)
    assert workload.weights_from_options(options)["video"] == 0
    assert workload.generation_config(options) == dict(max_new_tokens=5, do_sample=True, temperature=0.7, top_p=1.0)
    with pytest.raises(ValueError, match="every --weight"):
        workload.weights_from_options(workload.options_namespace(**{f"weight_{k}": 0 for k in workload.KINDS}))
    with pytest.raises(ValueError, match=">= 0"):
        workload.weights_from_options(workload.options_namespace(weight_text=-1))
    only_text = workload.options_namespace(**{f"weight_{k}": 0 for k in workload.KINDS if k != "text"})
    picker = workload.Workload(only_text, workload.Media(images=[b"x"], video=b"v"))
    assert {picker.pick() for _ in range(50)} == {"text"}


def test_generated_media_are_deterministic_and_decodable():
    from PIL import Image
    import decord

    options = workload.options_namespace(num_images=3, image_size=64, video_frames=5)
    media = workload.load_media(options)
    assert media == workload.load_media(options) and len(set(media.images)) == 3
    assert Image.open(io.BytesIO(media.images[0])).size == (64, 64)
    assert len(decord.VideoReader(io.BytesIO(media.video))) == 5


def test_image_dir(tmp_path):
    (tmp_path / "b.png").write_bytes(b"B")
    (tmp_path / "a.JPG").write_bytes(b"A")
    (tmp_path / "notes.txt").write_bytes(b"T")
    assert workload.load_media(workload.options_namespace(image_dir=str(tmp_path))).images == [b"A", b"B"]
    with pytest.raises(ValueError, match="no .jpg"):
        workload.load_media(workload.options_namespace(image_dir=str(tmp_path / "none")))


GOOD = ChatResponse(text="a cat", finish_reason="length", num_input_tokens=300, num_output_tokens=4)


@pytest.mark.parametrize("change, message", [
    (dict(text=""), "empty answer"),
    (dict(text="  \n"), "empty answer"),
    (dict(finish_reason=None), "finish_reason None"),
    (dict(finish_reason="cancelled"), "finish_reason 'cancelled'"),
    (dict(num_output_tokens=None), "num_output_tokens None"),
    (dict(num_output_tokens=5), "num_output_tokens 5"),
    (dict(num_output_tokens=3), "after 3 of 4"),
    (dict(num_input_tokens=0), "num_input_tokens 0"),
])
def test_malformed_answers_are_failures(change, message):
    config = dict(max_new_tokens=4)
    workload.check_answer(GOOD, GOOD.text, config)
    bad = ChatResponse(**{**GOOD.__dict__, **change})
    with pytest.raises(workload.BadAnswerError, match=message):
        workload.check_answer(bad, bad.text, config)
    with pytest.raises(workload.BadAnswerError, match="do not add up"):
        workload.check_answer(GOOD, "a ca", config)
    with pytest.raises(workload.BadAnswerError, match="without a final"):
        workload.check_answer(None, "", config)


def test_timed_stream_measures_and_fails():
    config = dict(max_new_tokens=4)
    deltas = ["", "a", " cat"]  # a first response without text: TTFT counts to the first text
    ok = workload.timed_stream("text", lambda: iter(deltas), lambda _: GOOD, config)
    assert ok.error is None and ok.output_tokens == 4
    assert 0 < ok.ttft_s <= ok.total_s and ok.itl_s == pytest.approx((ok.total_s - ok.ttft_s) / 3)
    assert ok.tokens_per_s == pytest.approx(4 / ok.total_s)

    def broken():
        yield "a"
        raise ConnectionError("server went away")

    failed = workload.timed_stream("text", broken, lambda _: GOOD, config)
    assert isinstance(failed.error, ConnectionError) and failed.ttft_s is None and failed.output_tokens == 0
    empty = workload.timed_stream("text", lambda: iter([]), lambda _: GOOD, config)
    assert isinstance(empty.error, workload.BadAnswerError)


def test_process_tree_rss_and_name():
    child = subprocess.Popen([sys.executable, "-c", "import sys; print('up', flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "up\n"  # started: now idle, reading stdin
        tree = procstats.tree_rss(os.getpid())
        assert child.pid in tree.pids and os.getpid() in tree.pids and tree.processes >= 2
        assert tree.bytes > procstats.rss_bytes(child.pid) > 0
    finally:
        child.stdin.close()
        child.wait()
    assert procstats.tree_rss(child.pid) is None
    with open(f"/proc/{os.getpid()}/comm") as f:
        assert os.getpid() in procstats.find_pids_by_name(f.read().strip())


def test_durations_and_percentiles():
    assert [soak.parse_duration(t) for t in ("90", "45s", "30m", "1h30m", "2.5")] == [90, 45, 1800, 5400, 2.5]
    for bad in ("", "ten", "5d"):
        with pytest.raises(Exception):
            soak.parse_duration(bad)
    assert soak.percentile([3, 1, 2, 4], 50) == 2 and soak.percentile([3, 1, 2, 4], 95) == 4
    assert soak.percentile([], 50) is None


def test_soak_fails_on_kv_blocks_held_after_the_run():
    """The soak's verdict: KV blocks still held once every stream stopped are a leak; an unreadable
    gauge (or no metrics URL) is reported, not failed."""
    from collections import Counter

    row = {"t_s": 30.0, "output_tokens_per_s": 10.0, "server_rss_mib": 100.0, "gpu_mem_used_mib": None,
           "gpu_mem_server_mib": None}
    settings = {"streams": 2, "url": "u", "interval_s": 1, "started": "s", "max_new_tokens": 8, "mix": "text=1"}
    for after, ok, text in [({"kv_blocks_used_after": 0, "kv_blocks_total": 64}, True, "**0** of 64"),
                            ({"kv_blocks_used_after": 3, "kv_blocks_total": 64}, False, "**3** of 64"),
                            ({"kv_blocks_used_after": None, "kv_blocks_total": None, "metrics_error": "refused"},
                             True, "not available (refused)"),
                            (None, True, "not checked")]:
        summary = soak.summarize([row], Counter(), 5, 50, 1.0, True, after)
        assert summary["ok"] is ok, after
        assert text in soak.markdown(summary, settings)


def test_soak_report_rebuilt_from_a_cut_off_run(tmp_path):
    """`soak.py --report DIR`: a run killed before its summary still gets soak.json / soak.md from the rows,
    settings and error lines it wrote as it went."""
    import csv
    import json

    rows = [dict.fromkeys(soak.FIELDS) for _ in range(3)]
    for i, row in enumerate(rows):
        row.update(t_s=30.0 * (i + 1), interval_s=30.0, requests=10, errors=int(i == 1), output_tokens=600,
                   output_tokens_per_s=20.0 + i, server_rss_mib=100.0 + i, server_processes=7, kv_blocks_used=5)
    with open(tmp_path / "soak.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=soak.FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    settings = {"streams": 4, "url": "u", "interval_s": 30.0, "started": "s", "max_new_tokens": 8, "mix": "text=1"}
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    assert soak.main(["--report", str(tmp_path)]) == 1          # one failed request: not OK
    data = json.loads((tmp_path / "soak.json").read_text())
    summary = data["summary"]
    assert summary["requests"] == 30 and summary["errors"] == 1 and summary["output_tokens"] == 1800
    assert summary["error_samples"] == [{"error": "(text not recorded)", "count": 1}]
    assert summary["elapsed_s"] == 90.0 and summary["server_rss_mib"]["drift"] == 2.0
    assert data["rows"][0]["server_processes"] == 7 and data["rows"][0]["gpu_mem_used_mib"] is None
    assert "Rebuilt from the rows" in (tmp_path / "soak.md").read_text()
    assert (tmp_path / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # plot_soak.py's figure
    (tmp_path / "errors.txt").write_text("41.5\timage: ServerError: boom\n")
    soak.main(["--report", str(tmp_path)])
    assert json.loads((tmp_path / "soak.json").read_text())["summary"]["error_samples"] == [
        {"error": "image: ServerError: boom", "count": 1}]
    assert soak.main(["--report", str(tmp_path / "missing")]) == 2


def test_gpu_memory_from_nvidia_smi(tmp_path, monkeypatch):
    """procstats reads nvidia-smi's CSV (a stand-in script here: this machine has no GPU)."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\ncase "$1" in\n'
                   '  --query-gpu=*) printf "1000\\n2000\\n" ;;\n'
                   '  --query-compute-apps=*) printf "41, 500\\n42, [N/A]\\n77, 300\\n" ;;\n'
                   'esac\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert procstats.gpu_memory((41, 42)) == procstats.GpuMemory(used_mib=3000.0, server_mib=500.0)
    assert procstats.gpu_memory((5,)) == procstats.GpuMemory(used_mib=3000.0, server_mib=None)
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert procstats.gpu_memory((41,)) is None
