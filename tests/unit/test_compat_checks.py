"""The checks scripts/compat/run.py applies to the benchmark tools' exports (docs/tools.md), on exports
shaped as perf_analyzer 2.51, genai-perf 0.0.16 and aiperf 0.13.0 wrote them against this server. The tools themselves
do not run here: they do not install next to the project's pins."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

RUN_PY = Path(__file__).resolve().parents[2] / "scripts" / "compat" / "run.py"
spec = importlib.util.spec_from_file_location("compat_run", RUN_PY)
run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run)


def triton_request(tokens=4, reason="length", texts=("mountain", " street", "x", "人色")):
    outputs = [{"text_output": t, "num_output_tokens": i + 1, "num_input_tokens": 29, "finish_reason": ""}
               for i, t in enumerate(texts)]
    if outputs:
        outputs[-1].update(num_output_tokens=tokens, finish_reason=reason)
    return {"timestamp": 1, "request_inputs": {"text_input": "Hello, who are you?", "max_tokens": 4, "stream": True},
            "response_timestamps": [2] * len(outputs), "response_outputs": outputs}


def export(tmp_path, requests) -> Path:
    path = tmp_path / "profile_export.json"
    path.write_text(json.dumps({"experiments": [{"experiment": {"mode": "concurrency", "value": 1},
                                                 "requests": requests}], "version": "2.51.0"}))
    return path


def test_a_good_triton_export_passes(tmp_path):
    run.check_triton_requests(export(tmp_path, [triton_request()] * run.REQUESTS), 4)


@pytest.mark.parametrize("requests, message", [
    ([triton_request()] * 3, "3 requests, expected 4"),
    ([triton_request()] * 3 + [triton_request(tokens=3)], "request 3 generated 3 tokens, asked 4"),
    ([triton_request()] * 3 + [triton_request(reason="stop")], "request 3 ended with 'stop'"),
    ([triton_request()] * 3 + [triton_request(texts=())], "request 3 got no response outputs"),
    ([triton_request()] * 3 + [triton_request(texts=("", "", "", ""))], "request 3 has no text"),
])
def test_a_short_or_failed_triton_export_fails(tmp_path, requests, message):
    with pytest.raises(run.RunFailed, match=message):
        run.check_triton_requests(export(tmp_path, requests), 4)


def chunk(delta=None, reason=None, usage=None):
    body = {"object": "chat.completion.chunk",
            "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": reason}]}
    if usage is not None:
        body["usage"] = usage
    return json.dumps(body)


def test_openai_stream_reads_the_chunks_perf_analyzer_recorded():
    events = [chunk({"role": "assistant", "content": ""}), chunk({"content": "ere"}), chunk({"content": " 白"}),
              chunk({}, "length")]
    request = {"response_outputs": [{"response": f"data: {e}\n\n"} for e in [*events, "[DONE]"]]}
    assert run.openai_stream(run.perf_analyzer_events(request)) == ("ere 白", ["length"], [])


def test_openai_stream_returns_the_usage_chunk_aiperf_asked_for():
    events = [chunk({"content": "mountain"}), chunk({}, "length"),
              chunk(usage={"prompt_tokens": 291, "completion_tokens": 4, "total_tokens": 295}), "[DONE]"]
    assert run.openai_stream(events) == ("mountain", ["length"], [{"prompt_tokens": 291, "completion_tokens": 4,
                                                                   "total_tokens": 295}])


@pytest.mark.parametrize("events, message", [
    ([chunk({"content": "a"}, "length")], "did not end with \\[DONE\\]"),
    ([], "did not end with \\[DONE\\]"),
    ([json.dumps({"error": {"message": "boom"}}), "[DONE]"], "error event"),
])
def test_a_broken_stream_fails(events, message):
    with pytest.raises(run.RunFailed, match=message):
        run.openai_stream(events)


def test_chat_question_is_the_cards_question_with_the_image():
    payload = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}}]}]}
    assert run.chat_question(payload) == ("<image>\nWhat is this?", [b"\x89PNG\r\n"])
    payload["messages"][0]["content"].pop()
    with pytest.raises(run.RunFailed, match="expected one PNG data URL"):
        run.chat_question(payload)


def test_the_gateway_log_check_sees_only_what_the_run_added(tmp_path):
    log = tmp_path / "gateway.log"
    log.write_text("WARNING: /v1/chat/completions: ignored unknown request field(s): old_field\n")
    args = type("Args", (), {"gateway_log": str(log)})()
    with run.gateway_took_every_field(args):
        pass  # nothing new in the log
    with pytest.raises(run.RunFailed, match="ignored unknown request field\\(s\\): min_tokens"):
        with run.gateway_took_every_field(args):
            with open(log, "a") as f:
                f.write("WARNING: /v1/chat/completions: ignored unknown request field(s): min_tokens\n")


def test_a_relative_out_folder_reaches_the_tools_as_paths_they_can_open(tmp_path, monkeypatch, capsys):
    """The tools run inside their own folder under --out: the paths run.py hands them must still resolve
    there (a stand-in perf_analyzer opens its --input-data and writes an empty export)."""
    fake = tmp_path / "tools" / "perf" / "bin" / "perf_analyzer"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do case $1 in\n'
                    '  --input-data) test -f "$2" || { echo "cannot open $2"; exit 3; };;\n'
                    '  --profile-export-file) echo \'{"experiments": []}\' > "$2" || exit 4;;\n'
                    'esac; shift; done\n')
    fake.chmod(0o755)
    monkeypatch.setattr(run, "TOOLS_VENV", tmp_path / "tools")
    monkeypatch.chdir(tmp_path)
    assert run.main(["perf-analyzer", "--out", "relative", "--tokenizer", "unused"]) == 1
    printed = capsys.readouterr().out
    assert "FAIL perf-analyzer" in printed and "0 requests, expected 4" in printed, printed  # the tool ran fine
