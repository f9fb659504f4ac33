"""CUDA graphs of the vision encoder: one captured forward per batch size 1..max_batch, replayed.

Why: at small batches the encoder waits for Python. The fp8 encoder's forward of one image took 43.2 ms
on an H100 while its kernels took 21.8 ms of GPU time: each of the 45 compiled blocks costs ~0.6 ms of
host time (dynamo's guards, the compiled graph's launches, four torch._scaled_mm calls), so a single
image, the usual case at a few requests per second and the 1-stream TTFT, ran at the host's pace
(bench/results/h100-2026-12-06/vision-step-fp8-dab87f5.log). A replay launches the whole forward at once.
From batch 8 on, the kernels' time hides the host's, so larger forwards run as graphed chunks of
max_batch images (the caller's, VisionService._encode) and need no graph of their own.

Owns: the static input (max_batch, 3, S, S) in the encoder's dtype, one graph and output per batch size
(captured largest first, sharing one memory pool, after warm-up runs on a side stream), and replay.
A replay computes with the same kernels as the call it captured, so its embeddings equal the ungraphed
encoder's at that batch size. Does not own: the encoder (model/internvl.VisionEncoder), compiling its
blocks (VisionService._compile_blocks, done before the capture), chunking and the host copies
(VisionService._encode).
"""
from __future__ import annotations

import torch

DEFAULT_MAX_BATCH = 8


class EncoderGraphs:
    def __init__(self, encoder: torch.nn.Module, *, image_size: int, dtype: torch.dtype, device: torch.device,
                 max_batch: int = DEFAULT_MAX_BATCH):
        self.encoder, self.device, self.max_batch = encoder, device, max_batch
        self._input = torch.zeros(max_batch, 3, image_size, image_size, dtype=dtype, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool_bytes = 0

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture batch sizes max_batch..1 into one memory pool (its size: pool_bytes). Every forward
        then runs in that pool: the blocks the warm-up runs leave cached are given back."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        reserved = torch.cuda.memory_reserved(self.device)
        pool = None
        for b in range(self.max_batch, 0, -1):
            x = self._input[:b]
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # lazy initialisation (cuBLAS workspaces, kernels) outside the capture
                    self.encoder(x)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.encoder(x)
            pool = graph.pool()
            self._graphs[b] = (graph, out)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        self.pool_bytes = torch.cuda.memory_reserved(self.device) - reserved

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S) on the device, B <= max_batch, any float dtype -> the encoder's output for
        them: a view of the graph's output buffer, valid until the next call."""
        graph, out = self._graphs[pixels.shape[0]]
        self._input[:pixels.shape[0]].copy_(pixels)
        graph.replay()
        return out
