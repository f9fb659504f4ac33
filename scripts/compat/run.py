"""Tiny runs of the benchmark tools users already have, against a running server, with their answers
checked: genai-perf over gRPC (TensorRT-LLM backend, streaming, --output-tokens-mean-deterministic) and
over the gateway's OpenAI chat endpoint with images, aiperf against the gateway (chat, images,
min_tokens), and perf_analyzer with an input file.

Owns: each run's command line (a handful of requests of a few tokens) and the checks of what the tool
exported: the number of requests, no errors, and the server's own token counts. Does not own: the
tools' installation (scripts/compat/setup.sh: they do not install next to the project's pins, see
docs/tools.md) or the server.

    python scripts/compat/run.py all --grpc 127.0.0.1:8001 --http 127.0.0.1:8000 --gateway http://127.0.0.1:9000 \\
        --tokenizer CHECKPOINT_DIR
    python scripts/compat/run.py all --start     # the tiny checkpoint's server and a gateway, then every run

Exit status 0 when every run passed its checks. Runs: genai-perf-grpc, genai-perf-chat,
genai-perf-generate (HTTP generate_stream), aiperf-chat, perf-analyzer (or `all`).
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOLS_VENV = Path(os.environ.get("INTERNVL_TOOLS_VENV") or REPO_ROOT / ".venv-tools")  # scripts/compat/setup.sh
MODEL = "internvl_chat"
GATEWAY_MODEL = "InternVL-Chat-V1-1"
REQUESTS = 4  # per run: enough to see every request answered, few enough for 2 CPU cores
OUTPUT_TOKENS = 4
INPUT_TOKENS = 16
IMAGE_SIDE = 64  # small synthetic images: the server resizes every image to 448x448 anyway


class RunFailed(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise RunFailed(message)


# ---- the tools ------------------------------------------------------------------------------------------


def tool(venv: str, name: str) -> Path:
    path = TOOLS_VENV / venv / "bin" / name
    check(path.exists(), f"{path} is missing: run scripts/compat/setup.sh first (docs/tools.md)")
    return path


def perf_env() -> dict[str, str]:
    """perf_analyzer (tritonclient 2.51.0's wheel) on PATH, with the CUDA runtime it links (a pip wheel)."""
    venv = TOOLS_VENV / "perf"
    cudart = next(iter((venv / "lib").glob("python3*/site-packages/nvidia/cuda_runtime/lib")), None)
    env = dict(os.environ)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    if cudart is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(cudart), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def execute(command: list[str], out: Path, env: dict[str, str] | None = None) -> None:
    """Run a tool with its output in out/tool.log; a non-zero exit fails the run with the log's tail."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "tool.log"
    print("$", " ".join(str(c) for c in command), flush=True)
    with open(log, "wb") as f:
        code = subprocess.call([str(c) for c in command], stdout=f, stderr=subprocess.STDOUT, cwd=out, env=env,
                               stdin=subprocess.DEVNULL)
    check(code == 0, f"{Path(command[0]).name} exited {code}; {log}:\n{log.read_text(errors='replace')[-3000:]}")


def find(out: Path, pattern: str) -> Path:
    found = sorted(out.rglob(pattern))
    check(bool(found), f"no {pattern} under {out}")
    return found[0]


# ---- checks of the exports -------------------------------------------------------------------------------


def triton_requests(export: Path) -> list[dict]:
    """The requests of perf_analyzer's profile export (genai-perf writes the same file)."""
    experiments = json.loads(export.read_text())["experiments"]
    return [r for e in experiments for r in e["requests"]]


def check_triton_requests(export: Path, want_tokens: int) -> None:
    """Every request was answered: responses with text, the last one's finish_reason and num_output_tokens
    (the server's own count) as asked."""
    requests = triton_requests(export)
    check(len(requests) == REQUESTS, f"{export}: {len(requests)} requests, expected {REQUESTS}")
    for i, request in enumerate(requests):
        outputs = [o for o in request.get("response_outputs", []) if o]
        check(bool(outputs), f"{export}: request {i} got no response outputs: {request}")
        final = [o for o in outputs if o.get("finish_reason")]
        check(bool(final), f"{export}: request {i} has no response with a finish_reason: {outputs}")
        check(int(final[-1]["num_output_tokens"]) == want_tokens,
              f"{export}: request {i} generated {final[-1]['num_output_tokens']} tokens, asked {want_tokens}")
        check(final[-1]["finish_reason"] == "length", f"{export}: request {i} ended with {final[-1]['finish_reason']!r}")
        check("".join(str(o.get("text_output", "")) for o in outputs) != "", f"{export}: request {i} has no text")


@contextlib.contextmanager
def gateway_took_every_field(args):
    """With --gateway-log: the gateway ignored none of the fields the tool sent (it logs the ones it
    ignores, as vLLM does), so `min_tokens` and `ignore_eos` really reached the server."""
    log = Path(args.gateway_log) if getattr(args, "gateway_log", None) else None
    start = log.stat().st_size if log is not None and log.exists() else 0
    yield
    if log is not None:
        with open(log, "rb") as f:
            f.seek(start)
            ignored = [line for line in f.read().decode(errors="replace").splitlines() if "ignored unknown" in line]
        check(not ignored, f"the gateway ignored fields the tool sent: {ignored[:2]}")


IGNORE_EOS = dict(max_new_tokens=OUTPUT_TOKENS, ignore_eos=True)  # the SDK's words for what the tools sent
MIN_TOKENS = dict(max_new_tokens=OUTPUT_TOKENS, min_new_tokens=OUTPUT_TOKENS)


def check_answers(args, answers: list[tuple[str, list[bytes], dict, str]]) -> None:
    """Each (question, images, SDK generation_config, text the tool received) is the SDK's answer to the
    same request over gRPC, of OUTPUT_TOKENS tokens ended by `length` (the server is deterministic:
    greedy decoding)."""
    from internvl_client import Client

    with Client(args.grpc) as client:
        for question, images, generation, text in answers:
            want = client.generate(question, images=images or None, generation_config=generation)
            check(want.finish_reason == "length" and want.num_output_tokens == OUTPUT_TOKENS,
                  f"the SDK's answer to {question!r} ended {want.finish_reason!r} after {want.num_output_tokens} tokens")
            check(text == want.text, f"the answer to {question!r} was {text!r}; the SDK gets {want.text!r}")


def chat_question(payload: dict) -> tuple[str, list[bytes]]:
    """The SDK's question and images for a one-message chat request with text and one data-URL image: the
    card's `<image>\\n` placeholder in front of the text (docs/gateway.md)."""
    (message,) = payload["messages"]
    text = "".join(p["text"] for p in message["content"] if p.get("type") == "text")
    urls = [p["image_url"]["url"] for p in message["content"] if p.get("type") == "image_url"]
    check(len(urls) == 1 and urls[0].startswith("data:image/png;base64,"), f"expected one PNG data URL, got {urls}")
    return "<image>\n" + text, [base64.b64decode(urls[0].split(",", 1)[1])]


def check_genai_perf_summary(out: Path) -> dict:
    summary = json.loads(find(out, "*genai_perf.json").read_text())
    count = summary.get("request_count", {}).get("avg")
    check(count is not None and int(count) == REQUESTS, f"genai-perf counted {count} requests, expected {REQUESTS}")
    return summary


def openai_stream(events: list[str]) -> tuple[str, list[str], list[dict]]:
    """The content, the finish reasons and the usage objects of one streamed chat answer (its SSE `data`
    values, `[DONE]` last)."""
    check(bool(events) and events[-1] == "[DONE]", f"the stream did not end with [DONE]: {events[-1:]}")
    text, reasons, usages = "", [], []
    for event in events[:-1]:
        chunk = json.loads(event)
        check("error" not in chunk, f"error event: {chunk}")
        if chunk.get("usage"):
            usages.append(chunk["usage"])
        for choice in chunk.get("choices", []):
            text += (choice.get("delta") or {}).get("content") or ""
            if choice.get("finish_reason"):
                reasons.append(choice["finish_reason"])
    return text, reasons, usages


def perf_analyzer_events(request: dict) -> list[str]:
    """The SSE `data` values of one streamed request in perf_analyzer's (genai-perf's) export."""
    return [line[len("data: "):] for output in request.get("response_outputs", [])
            for line in str(output.get("response", "")).splitlines() if line.startswith("data: ")]


# ---- the runs --------------------------------------------------------------------------------------------


def genai_perf(args, out: Path, *endpoint) -> None:
    """`genai-perf profile` with the runs' shared load (REQUESTS requests one at a time, INPUT_TOKENS in,
    OUTPUT_TOKENS out, exports under `out`) and `endpoint`: the model, endpoint type, URL and extras."""
    execute([tool("perf", "genai-perf"), "profile", *endpoint,
             "--synthetic-input-tokens-mean", INPUT_TOKENS, "--synthetic-input-tokens-stddev", 0,
             "--output-tokens-mean", OUTPUT_TOKENS, "--output-tokens-stddev", 0,
             "--num-dataset-entries", REQUESTS, "--request-count", REQUESTS, "--warmup-request-count", 0,
             "--concurrency", 1, "--tokenizer", args.tokenizer, "--artifact-dir", out / "artifacts",
             "--profile-export-file", "profile_export.json"], out, perf_env())


def genai_perf_grpc(args, out: Path) -> None:
    """genai-perf as for a TensorRT-LLM ensemble: gRPC streaming, `min_length` = `max_tokens` (what
    --output-tokens-mean-deterministic sends), so every answer has exactly OUTPUT_TOKENS tokens."""
    genai_perf(args, out, "-m", MODEL, "--endpoint-type", "kserve", "--backend", "tensorrtllm", "--streaming",
               "-u", args.grpc, "--output-tokens-mean-deterministic")
    sent = triton_requests(find(out, "profile_export.json"))[0]["request_inputs"]
    check(sent.get("min_length") == OUTPUT_TOKENS and sent.get("max_tokens") == OUTPUT_TOKENS,
          f"genai-perf sent {sent}, expected min_length = max_tokens = {OUTPUT_TOKENS}")
    check_triton_requests(find(out, "profile_export.json"), OUTPUT_TOKENS)
    check_answers(args, [(r["request_inputs"]["text_input"], [], MIN_TOKENS,
                          "".join(o.get("text_output", "") for o in r["response_outputs"]))
                         for r in triton_requests(find(out, "profile_export.json"))])
    check_genai_perf_summary(out)


def genai_perf_chat(args, out: Path) -> None:
    """genai-perf against the gateway's /v1/chat/completions, each request with one synthetic image."""
    with gateway_took_every_field(args):
        genai_perf(args, out, "-m", GATEWAY_MODEL, "--endpoint-type", "multimodal", "--streaming",
                   "-u", args.gateway.removeprefix("http://"),
                   "--extra-inputs", "ignore_eos:true",  # the gateway's vLLM-style extension: exactly max_tokens
                   "--image-width-mean", IMAGE_SIDE, "--image-height-mean", IMAGE_SIDE, "--image-format", "png")
    requests = triton_requests(find(out, "profile_export.json"))
    check(len(requests) == REQUESTS, f"{len(requests)} chat requests, expected {REQUESTS}")
    for i, request in enumerate(requests):
        payload = json.loads(request["request_inputs"]["payload"])
        parts = payload["messages"][-1]["content"]
        check(any(p.get("type") == "image_url" for p in parts), f"request {i} sent no image: {parts}")
        check(payload.get("max_tokens") == OUTPUT_TOKENS, f"request {i} asked max_tokens {payload.get('max_tokens')}")
        check(payload.get("ignore_eos") is True, f"request {i} sent ignore_eos {payload.get('ignore_eos')!r}")
        text, reasons, _ = openai_stream(perf_analyzer_events(request))
        check(text != "" and reasons == ["length"], f"request {i}: text {text!r}, finish reasons {reasons}")
        check_answers(args, [(*chat_question(payload), IGNORE_EOS, text)])
    check_genai_perf_summary(out)


def genai_perf_generate(args, out: Path) -> None:
    """genai-perf over HTTP `generate_stream` (docs/http.md: its `generate` endpoint type needs --endpoint)."""
    genai_perf(args, out, "-m", MODEL, "--endpoint-type", "generate", "--streaming",
               "--endpoint", f"v2/models/{MODEL}/generate_stream", "-u", args.http, "--extra-inputs", "ignore_eos:true")
    requests = triton_requests(find(out, "profile_export.json"))
    check(len(requests) == REQUESTS, f"{len(requests)} generate_stream requests, expected {REQUESTS}")
    for i, request in enumerate(requests):
        events = [json.loads(line[len("data: "):]) for o in request.get("response_outputs", [])
                  for line in str(o.get("response", "")).splitlines() if line.startswith("data: ")]
        check(bool(events) and not any("error" in e for e in events), f"request {i}: events {events}")
        check(events[-1]["finish_reason"] == "length" and events[-1]["num_output_tokens"] == OUTPUT_TOKENS,
              f"request {i} ended with {events[-1]}")
        question = json.loads(request["request_inputs"]["payload"])["text_input"][0]
        check_answers(args, [(question, [], IGNORE_EOS, "".join(e["text_output"] for e in events))])
    check_genai_perf_summary(out)


def aiperf_chat(args, out: Path) -> None:
    """aiperf against the gateway: streamed chat with an image per request, `min_tokens` = max_tokens, the
    server's usage counts taken as the output lengths."""
    with gateway_took_every_field(args):
        execute([tool("aiperf", "aiperf"), "profile", "--model", GATEWAY_MODEL, "--url", args.gateway,
                 "--endpoint-type", "chat", "--streaming",
                 "--synthetic-input-tokens-mean", INPUT_TOKENS, "--synthetic-input-tokens-stddev", 0,
                 "--output-tokens-mean", OUTPUT_TOKENS, "--output-tokens-stddev", 0,
                 "--extra-inputs", f"min_tokens:{OUTPUT_TOKENS}", "--use-server-token-count",
                 "--image-width-mean", IMAGE_SIDE, "--image-height-mean", IMAGE_SIDE, "--image-format", "png",
                 "--request-count", REQUESTS, "--concurrency", 1, "--tokenizer", args.tokenizer,
                 "--artifact-dir", out / "artifacts", "--ui-type", "none",
                 "--export-level", "raw"], out)  # raw: each request's payload and streamed answer
    records = [json.loads(line) for line in find(out, "profile_export_raw.jsonl").read_text().splitlines() if line]
    check(len(records) == REQUESTS, f"aiperf recorded {len(records)} requests, expected {REQUESTS}")
    for i, record in enumerate(records):
        payload = record["payload"]
        check(payload.get("min_tokens") == OUTPUT_TOKENS and payload.get("max_completion_tokens") == OUTPUT_TOKENS,
              f"aiperf request {i} sent min_tokens {payload.get('min_tokens')}, "
              f"max_completion_tokens {payload.get('max_completion_tokens')}")
        check(record.get("status") == 200, f"aiperf request {i}: HTTP {record.get('status')}")
        events = [p["value"] for r in record["responses"] for p in r.get("packets", []) if p.get("name") == "data"]
        text, reasons, usages = openai_stream(events)
        check(reasons == ["length"], f"aiperf request {i}: finish reasons {reasons}")
        # stream_options.include_usage (aiperf sends it): one usage chunk, the server's count
        check([u.get("completion_tokens") for u in usages] == [OUTPUT_TOKENS], f"aiperf request {i}: usage {usages}")
        check_answers(args, [(*chat_question(payload), MIN_TOKENS, text)])
    summary = json.loads(find(out, "profile_export_aiperf.json").read_text())
    count = summary.get("request_count", {}).get("avg")
    check(count is not None and int(count) == REQUESTS, f"aiperf counted {count} requests, expected {REQUESTS}")
    errors = summary.get("error_request_count", {}).get("avg") or 0
    check(int(errors) == 0 and not summary.get("error_summary"), f"aiperf saw errors: {summary.get('error_summary')}")
    lengths = summary.get("output_sequence_length", {})
    check(lengths.get("count") == REQUESTS and lengths.get("min") == OUTPUT_TOKENS and lengths.get("max") == OUTPUT_TOKENS,
          f"output lengths (the server's usage) {lengths}, expected exactly {OUTPUT_TOKENS} each")


def perf_analyzer(args, out: Path) -> None:
    """perf_analyzer with an input file (docs/tools.md): the contract's tensors as JSON lists."""
    out.mkdir(parents=True, exist_ok=True)
    data = out / "inputs.json"
    data.write_text(json.dumps({"data": [
        {"text_input": ["Hello, who are you?"], "max_tokens": [OUTPUT_TOKENS], "ignore_eos": [True], "stream": [True]},
        {"text_input": ["Tell me a story."], "max_tokens": [OUTPUT_TOKENS], "ignore_eos": [True], "stream": [True]},
    ]}, indent=1))
    execute([tool("perf", "perf_analyzer"), "-m", MODEL, "-i", "grpc", "-u", args.grpc, "--streaming",
             "--input-data", data, "--concurrency-range", "1", "--request-count", REQUESTS,
             "--profile-export-file", out / "profile_export.json"], out, perf_env())
    check_triton_requests(out / "profile_export.json", OUTPUT_TOKENS)
    check_answers(args, [(r["request_inputs"]["text_input"], [], IGNORE_EOS,
                          "".join(o.get("text_output", "") for o in r["response_outputs"]))
                         for r in triton_requests(out / "profile_export.json")])


RUNS = {"genai-perf-grpc": genai_perf_grpc, "genai-perf-chat": genai_perf_chat,
        "genai-perf-generate": genai_perf_generate, "aiperf-chat": aiperf_chat, "perf-analyzer": perf_analyzer}


# ---- a server for --start --------------------------------------------------------------------------------


@contextlib.contextmanager
def started(folder: Path):
    """The tiny checkpoint served by the launcher's TritonServer, and a gateway in front of it."""
    import time
    import urllib.request

    from internvl_serve.serving.launcher import TritonServer
    from internvl_serve.serving.processes import free_port
    from internvl_serve.tiny import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(folder / "tiny", fmt="bin", seed=0)
    # The tools load the tokenizer with transformers' AutoTokenizer: give them its files alone (the
    # checkpoint's config.json names remote code, which AutoTokenizer would ask before running).
    tokenizer = folder / "tokenizer"
    tokenizer.mkdir(exist_ok=True)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        shutil.copy(checkpoint / name, tokenizer / name)
    with TritonServer(checkpoint, log_file=folder / "server.log", exit_timeout_s=5, ready_timeout_s=600) as server:
        port = free_port()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "gateway"), os.environ.get("PYTHONPATH", "")]))
        with open(folder / "gateway.log", "wb") as log:
            gateway = subprocess.Popen([sys.executable, "-m", "internvl_gateway", "--triton", server.grpc_url,
                                        "--port", str(port), "--log-level", "warning"],
                                       stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                check(gateway.poll() is None, f"the gateway exited: {(folder / 'gateway.log').read_text()[-2000:]}")
                with contextlib.suppress(OSError):
                    urllib.request.urlopen(f"{url}/v1/models", timeout=2)
                    break
                time.sleep(0.1)  # waiting for a process to listen, not synchronising requests
            yield argparse.Namespace(grpc=server.grpc_url, http=server.http_url.removeprefix("http://"),
                                     gateway=url, tokenizer=str(tokenizer), gateway_log=str(folder / "gateway.log"))
        finally:
            gateway.terminate()
            gateway.wait(timeout=30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", choices=[*RUNS, "all"])
    p.add_argument("--grpc", default="127.0.0.1:8001", help="the server's public gRPC address")
    p.add_argument("--http", default="127.0.0.1:8000", help="the server's public HTTP address")
    p.add_argument("--gateway", default="http://127.0.0.1:9000", help="the OpenAI gateway's URL")
    p.add_argument("--gateway-log", default=None,
                   help="the gateway's log: the runs check it ignored none of the fields the tools sent")
    p.add_argument("--tokenizer", default=None,
                   help="the model's tokenizer for the tools: a folder holding its files, or a hub id")
    p.add_argument("--out", type=Path, default=None, help="where the tools write (default: a temporary folder)")
    p.add_argument("--start", action="store_true", help="serve the tiny checkpoint (and a gateway) for the runs")
    args = p.parse_args(argv)
    names = list(RUNS) if "all" in args.runs else args.runs
    # absolute: each tool runs with its own folder as working directory, and gets paths under `out`
    out = (args.out or Path(tempfile.mkdtemp(prefix="compat-"))).resolve()
    with (started(out / "server") if args.start else contextlib.nullcontext(args)) as target:
        check(target.tokenizer is not None, "--tokenizer is needed (a folder with the tokenizer's files)")
        failed = []
        for name in names:
            try:
                RUNS[name](target, out / name)
                print(f"PASS {name}", flush=True)
            except RunFailed as e:
                failed.append(name)
                print(f"FAIL {name}: {e}", flush=True)
    print(f"{len(names) - len(failed)} passed, {len(failed)} failed ({out})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
