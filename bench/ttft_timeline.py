"""Where the time to first token goes: a timeline of single requests through the whole server.

Starts the server (launcher) with tritonserver's request tracing on (every request, TIMESTAMPS level),
sends requests one at a time through the public gRPC port (the guard), each with its own image, and
lines up, per request, on the one monotonic clock of the machine (tritonserver's steady_clock and
Python's time.monotonic_ns are both CLOCK_MONOTONIC):

    client send -> ensemble request start (guard + gRPC) -> preprocess queue / compute
    -> vision queue / compute -> llm queue / execute (the request is handed to the engine)
    -> first token at the client

The trace file is read after the server stops (tritonserver writes it on exit). Prints a table of the
median of each segment and writes the rows as JSON (--out).

    python bench/ttft_timeline.py --checkpoint DIR --requests 8 --out timeline.json      # a GPU machine
    python bench/ttft_timeline.py --tiny --requests 3 --out /tmp/timeline.json          # the CPU, a check
    python bench/ttft_timeline.py --checkpoint DIR --params llm.quantization=fp8,vision.quantization=fp8 \
        --out timeline-fp8.json                     # the server with model parameters changed, as --server-compare

Owns: the trace configuration, the join of trace and client times, the table. Does not own: the server.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import loadgen  # noqa: E402

STEPS = ("preprocess", "vision", "llm")
SEGMENTS = ("client -> ensemble start", "preprocess queue", "preprocess compute", "vision queue",
            "vision compute", "llm queue", "llm execute (hand-off to the engine)",
            "llm execute end -> first token at the client", "client send -> first token (TTFT)")


def trace_args(path: Path) -> tuple[str, ...]:
    """Every request traced with its timestamps, each trace written as it completes (log-frequency 1:
    files <path>.0, .1, ...), so traces survive a server whose exit hangs (Triton writes the rest only
    at exit)."""
    return ("--trace-config", f"triton,file={path}", "--trace-config", "triton,log-frequency=1",
            "--trace-config", "level=TIMESTAMPS", "--trace-config", "rate=1", "--trace-config", "count=-1")


def read_traces(path: Path) -> dict[int, dict]:
    """trace id -> {"model": name, "parent": id or None, "request_id": str, "ts": {NAME: ns}}, from `path`
    and its numbered parts (<path>.0, .1, ...), each a JSON array (or JSON lines)."""
    records = []
    for part in [path, *sorted(path.parent.glob(path.name + ".*"))]:
        text = part.read_text().strip() if part.is_file() else ""
        if text:
            records += json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines()]
    traces: dict[int, dict] = {}
    for r in records:
        t = traces.setdefault(r["id"], {"model": None, "parent": None, "request_id": "", "ts": {}})
        if "model_name" in r:
            t["model"], t["parent"] = r["model_name"], r.get("parent_id")
            t["request_id"] = r.get("request_id", "")
        for stamp in r.get("timestamps", []):
            t["ts"].setdefault(stamp["name"], stamp["ns"])
    return traces


def timeline(traces: dict[int, dict], request_id: str, send_ns: int, first_ns: int) -> dict | None:
    """The segments (ms) of one request, or None if its traces are incomplete."""
    root = next((i for i, t in traces.items() if t["model"] == "internvl_chat" and t["request_id"] == request_id), None)
    if root is None:
        return None
    steps = {t["model"]: t["ts"] for t in traces.values() if t["parent"] == root}
    if not all(s in steps for s in STEPS):
        return None
    ms = lambda a, b: (b - a) / 1e6  # noqa: E731
    pre, vis, llm = steps["preprocess"], steps["vision"], steps["llm"]
    start = traces[root]["ts"]["REQUEST_START"]
    return {
        SEGMENTS[0]: ms(send_ns, start),
        SEGMENTS[1]: ms(pre["QUEUE_START"], pre["COMPUTE_START"]),
        SEGMENTS[2]: ms(pre["COMPUTE_START"], pre["COMPUTE_END"]),
        SEGMENTS[3]: ms(vis["QUEUE_START"], vis["COMPUTE_START"]),
        SEGMENTS[4]: ms(vis["COMPUTE_START"], vis["COMPUTE_END"]),
        SEGMENTS[5]: ms(llm["QUEUE_START"], llm["COMPUTE_START"]),
        SEGMENTS[6]: ms(llm["COMPUTE_START"], llm["COMPUTE_END"]),
        SEGMENTS[7]: ms(llm["COMPUTE_END"], first_ns),
        SEGMENTS[8]: ms(send_ns, first_ns),
    }


async def one(url: str, question: str, image: bytes, request_id: str, max_tokens: int) -> tuple[int, int]:
    """(client send, first token) in time.monotonic_ns."""
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(url)
    inputs = loadgen.build_inputs(question, image, max_tokens, ignore_eos=True)

    async def requests():
        yield {"model_name": "internvl_chat", "inputs": inputs, "request_id": request_id}

    send = time.monotonic_ns()
    first = None
    async for result, error in client.stream_infer(requests()):
        if error is not None:
            raise RuntimeError(str(error))
        if first is None and int(result.as_numpy("num_output_tokens")[0]) > 0:
            first = time.monotonic_ns()
        if result.as_numpy("finish_reason")[0]:
            break
    await client.close()
    return send, first


def main(argv=None) -> int:
    import asyncio

    from benchmark import QUESTION, compare_layout, level_images  # the benchmark's request, images, layouts

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint folder (random full-size weights on a GPU)")
    parser.add_argument("--tiny", action="store_true", help="the tiny generated checkpoint (a CPU check)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--params", default="", metavar="MODEL.KEY=VALUE[,MODEL.KEY=VALUE]",
                        help="model parameters to change, as benchmark.py --server-compare (MODEL: llm or vision)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    layout = compare_layout(args.params) if args.params else None
    from internvl_serve.serving.launcher import TritonServer

    work = Path(tempfile.mkdtemp(prefix="ttft-timeline-"))
    ckpt = args.checkpoint
    if args.tiny:
        from internvl_serve.tiny import make_tiny_checkpoint
        ckpt = make_tiny_checkpoint(work / "tiny")
    trace_file = work / "trace.json"
    images = level_images(99, args.requests + 1)
    sent: list[tuple[str, int, int]] = []
    with TritonServer(ckpt, extra_args=trace_args(trace_file), log_file=work / "server.log", layout=layout,
                      tritonserver=os.environ.get("TRITONSERVER"),
                      backend_directory=os.environ.get("TRITON_BACKENDS")) as server:
        asyncio.run(one(server.grpc_url, QUESTION, images[-1], "warmup", args.max_tokens))
        for i in range(args.requests):
            request_id = f"timeline-{i}"
            send, first = asyncio.run(one(server.grpc_url, QUESTION, images[i], request_id, args.max_tokens))
            sent.append((request_id, send, first))
    traces = read_traces(trace_file)
    rows = [row for rid, s, f in sent if (row := timeline(traces, rid, s, f)) is not None]
    result = {"parameters": args.params, "requests": len(sent), "complete_traces": len(rows), "rows": rows,
              "median_ms": {k: statistics.median(r[k] for r in rows) for k in SEGMENTS} if rows else {}}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{len(rows)} of {len(sent)} requests with complete traces; median ms per segment:")
    for k, v in result["median_ms"].items():
        print(f"  {k:48s} {v:8.1f}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
