"""How this project captures a CUDA graph: two warm-up runs on a side stream (Triton kernels compile,
cuBLAS and inductor warm up outside the capture), then the capture, into a memory pool that graphs
replayed one at a time may share.

Owns: `capture_graph`. Does not own: what is captured, its static buffers or when it replays (the
engine's decode steps, engine/decode_graphs.py).
"""
from __future__ import annotations

from typing import Any, Callable

import torch


def capture_graph(run: Callable[[], Any], device, pool=None) -> tuple[torch.cuda.CUDAGraph, Any]:
    """run() warmed up twice, then captured -> (the graph, run()'s output in the graph's memory); the
    graph's memory comes from `pool` (another graph's `.pool()`, or None for a new one)."""
    current = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        for _ in range(2):
            run()
    current.wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = run()
    return graph, out
