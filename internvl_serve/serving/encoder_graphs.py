"""CUDA graphs of the vision encoder's forward, one per batch size (1 to 8 tiles by default).

Why: the encoder's forward launches some 1,000 kernels from Python (45 blocks, compiled or not), and at
a few tiles that launching is longer than the GPU work: with the opt-in fp8 matmuls one new tile took
43.2 ms on the wall for 21.8 ms of kernels (32.8 ms of CPU; bench/results/h100-2026-12-06,
vision-step-fp8-dab87f5.json), and a single image's request waits for all of it. A replay is one launch.

A tile's embeddings depend on that tile alone (the ViT attends within an image), so any forward of n
tiles is the replay of the graph of n, and the service splits larger forwards into graphs' sizes. Each
graph is captured as every graph here is (cuda_graph.capture_graph: two warm-up forwards of its size
first) and replays exactly the kernels of the forward it captured: the same numbers as that forward with
those shapes. All graphs share one memory pool: the service runs one forward at a time (its lock),
and every graph's output stays alive, so no capture reuses another's output.

Owns: capture and replay, the static input and output buffers. Does not own: the encoder, whether it is
compiled or quantized, or when graphs are used (serving/vision.py's `cuda_graphs` parameter, off by
default until measured on a GPU).
"""
from __future__ import annotations

from typing import Callable

import torch

from internvl_serve.cuda_graph import capture_graph

DEFAULT_MAX_BATCH = 8  # the vision model's max_batch_size: one tile per request, the usual case


class EncoderGraphs:
    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], input_shape: tuple[int, ...],
                 dtype: torch.dtype, device: torch.device, max_batch: int = DEFAULT_MAX_BATCH):
        """forward: (n, *input_shape) in dtype on device -> (n, ...); a graph for every n in 1..max_batch."""
        assert max_batch >= 1, max_batch
        self.forward, self.input_shape, self.dtype, self.device = forward, tuple(input_shape), dtype, device
        self.max_batch = max_batch
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    @property
    def batch_sizes(self) -> list[int]:
        """The captured batch sizes."""
        return sorted(self._graphs)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every batch size, largest first, into one pool."""
        pool = None
        for n in range(self.max_batch, 0, -1):
            static_in = torch.zeros((n, *self.input_shape), dtype=self.dtype, device=self.device)
            graph, static_out = capture_graph(lambda x=static_in: self.forward(x), self.device, pool)
            pool = graph.pool()
            self._graphs[n] = (graph, static_in, static_out)
        torch.cuda.synchronize(self.device)

    def run(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (n, *input_shape) on the device, in any dtype (converted on the device into the static
        input), 1 <= n <= max_batch -> the forward's output: the graph's output buffer, valid until the next
        run (copy it out first)."""
        graph, static_in, static_out = self._graphs[pixels.shape[0]]
        static_in.copy_(pixels)
        graph.replay()
        return static_out
