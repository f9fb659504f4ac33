"""The llm stub's hand-off of one request's image rows to the engine process, host side only (no model, no
GPU): what EngineProcess.submit does with them (serving/engine_process.rows_to_send: the engine's dtype
where narrower, into a reused staging buffer) and what the engine process does on receipt (receive_rows,
into a fresh buffer, not page-locked unless --pin; then the prefix cache's content key, engine.image_content_key),
over a real socket pair to a child process, as the server runs it. Rows of one V1-1 image (256 x 5120 float32, 5.2 MB) or --images of them,
sent as float32 (a float32 engine's way, and every engine's before this hand-off took its dtype) and as
bfloat16 (a GPU engine's). Median of --iters. The stub's end of the socket pair gets the send buffer the
server gives it (engine_process.widen_send_buffer; --socket-buffer 0: the kernel's default); --hogs N
keeps N more processes spinning on the CPU meanwhile (a loaded host).

    python bench/rows_handoff.py [--images 1] [--iters 50] [--socket-buffer 0] [--hogs 2] [--pin] [--out rows_handoff.json]

--pin (on a GPU host): the engine side receives into page-locked memory, as the engine process on CUDA does;
against a run without it, what that allocation costs per request.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from internvl_serve.engine.engine import image_content_key  # noqa: E402
from internvl_serve.hostbuf import HostBuffers  # noqa: E402
from internvl_serve.serving.engine_process import (SEND_BUFFER_BYTES, as_bytes, receive_rows, rows_header,  # noqa: E402
                                                   rows_to_send, widen_send_buffer)

ROWS_PER_IMAGE, HIDDEN = 256, 5120  # V1-1: 256 image tokens, LLaMA2-13B's hidden size


def engine_side(conn, pin: bool) -> None:
    """The engine process's part: receive (shape, dtype) and the bytes (into page-locked memory with
    `pin`, as an engine on CUDA does), key them, answer the times."""
    while True:
        head = conn.recv()
        if head is None:
            return
        t0 = time.perf_counter()
        rows = receive_rows(conn, head, pin=pin)
        t1 = time.perf_counter()
        image_content_key(rows)
        t2 = time.perf_counter()
        conn.send((t1 - t0, t2 - t1))


def spin(stop) -> None:
    """A process that keeps a core busy until `stop` is set (--hogs)."""
    x = 0
    while not stop.is_set():
        for _ in range(10_000):
            x += 1


def measure(conn, rows: torch.Tensor, engine_dtype: torch.dtype, iters: int) -> dict:
    staging = HostBuffers()
    parts: dict[str, list[float]] = {"convert_ms": [], "send_ms": [], "receive_ms": [], "key_ms": [], "total_ms": []}
    for _ in range(iters + 2):  # the first two warm the buffers and the pipe
        t0 = time.perf_counter()
        sent = rows_to_send(rows, engine_dtype, staging)
        t1 = time.perf_counter()
        conn.send(rows_header(sent))
        conn.send_bytes(as_bytes(sent))
        t2 = time.perf_counter()
        receive_s, key_s = conn.recv()
        t3 = time.perf_counter()
        for name, seconds in (("convert_ms", t1 - t0), ("send_ms", t2 - t1), ("receive_ms", receive_s),
                              ("key_ms", key_s), ("total_ms", t3 - t0)):
            parts[name].append(1e3 * seconds)
    return {name: round(statistics.median(values[2:]), 3) for name, values in parts.items()} | {
        "bytes": int(sent.numel() * sent.element_size())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--socket-buffer", type=int, default=SEND_BUFFER_BYTES,
                        help="the stub's send buffer in bytes, as the server asks for it (0: the kernel's default)")
    parser.add_argument("--hogs", type=int, default=0, help="processes spinning on the CPU meanwhile")
    parser.add_argument("--pin", action="store_true",
                        help="receive into page-locked memory, as the engine process on a GPU does (needs CUDA)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rows = torch.randn(args.images * ROWS_PER_IMAGE, HIDDEN)
    stub_end, engine_end = socket.socketpair()
    send_buffer = widen_send_buffer(stub_end, args.socket_buffer) if args.socket_buffer else \
        stub_end.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    ours, theirs = Connection(stub_end.detach()), Connection(engine_end.detach())
    spawn = mp.get_context("spawn")
    stop = spawn.Event()
    hogs = [spawn.Process(target=spin, args=(stop,), daemon=True) for _ in range(args.hogs)]
    child = spawn.Process(target=engine_side, args=(theirs, args.pin), daemon=True)
    for p in [child, *hogs]:
        p.start()
    try:
        results = {name: measure(ours, rows, dtype, args.iters)
                   for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    finally:
        ours.send(None)
        child.join()
        stop.set()
        for p in hogs:
            p.join()
    report = {"images": args.images, "iters": args.iters, "torch_threads": torch.get_num_threads(),
              "send_buffer_bytes": send_buffer, "hogs": args.hogs, "pin": args.pin, **results}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
