"""bf16 decode products in Triton instead of cuBLAS: an experiment, off by default.

Why: in bf16 the llm's decode step at 32 sequences is ~14 ms against an HBM floor of ~12.2, and most of
what is above the floor is the four projections, which cuBLAS runs at ~88 % of the copy bandwidth at 32
rows (241 µs per layer, bench/results/h100-2026-12-06). The swap-AB matrix kernel of the int8 and fp8
products (int8_linear._int8_matmul_kernel: the weight tile is the dot's left operand, the few rows its
right) read e4m3 weights at 83-93 % of it where torch._scaled_mm reached 55-82 %. Whether it beats cuBLAS
on bf16 weights too is what `bench/kernels_bench.py --only bf16` and `bench/decode_step_bench.py
--linear-variants cublas,triton` measure; neither has run on a GPU yet.

Owns: `bf16_config` (the tiles, a guess from the e4m3 sweep: the same 256-byte K steps), `decode_linear`
(x @ weight.T by that kernel), `TritonDecodeLinear` (an nn.Linear whose products of at most `max_rows`
CUDA rows take it, every other call F.linear), `use_triton_decode_linears_` (swap a model's projections,
or change their `max_rows`) and the environment switch the engine reads at load
(`INTERNVL_SERVE_BF16_TRITON_ROWS`, unset or 0: off). Does not own: the kernel (int8_linear.py) or which
projections a model has (engine/quantize.py ENGINE_PROJECTION_PATHS).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from internvl_serve.kernels.int8_linear import TRITON_MAX_M, Int8MatmulConfig, launch_product, triton
from internvl_serve.kernels.module_paths import modules_at

BF16_TRITON_ROWS_ENV = "INTERNVL_SERVE_BF16_TRITON_ROWS"


def triton_rows_from_environment() -> int:
    """INTERNVL_SERVE_BF16_TRITON_ROWS: products of at most this many rows in Triton (0-64; unset: 0, off)."""
    raw = os.environ.get(BF16_TRITON_ROWS_ENV, "").strip() or "0"
    try:
        rows = int(raw)
    except ValueError:
        rows = -1
    if not 0 <= rows <= TRITON_MAX_M:
        raise ValueError(f"{BF16_TRITON_ROWS_ENV} must be an integer from 0 to {TRITON_MAX_M}, got {raw!r}")
    return rows


def bf16_config(M: int, N: int, K: int) -> Int8MatmulConfig:
    """The matrix kernel's tiles for M bf16 rows: int8_linear.scaled_config's shapes (64-wide weight tiles,
    no split-K) with K in 128-element (256-byte) steps. Not swept on bf16 yet."""
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    return Int8MatmulConfig(block_m=block_m, block_n=64, block_k=128, split_k=1, num_warps=4, num_stages=4)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, config: Int8MatmulConfig | None = None) -> torch.Tensor:
    """x (M, K) @ weight (N, K).T in x's dtype by the swap-AB matrix kernel, accumulated in float32 (a
    float32 x: the full-precision dot). CUDA tensors, or CPU ones under TRITON_INTERPRET=1. Its launch
    depends only on shapes (CUDA-graph safe); config.split_k > 1 also allocates a float32 buffer."""
    M, K = x.shape
    N, K2 = weight.shape
    assert K == K2 and x.dtype == weight.dtype, (x.shape, x.dtype, weight.shape, weight.dtype)
    return launch_product(x, weight, None, None, x.dtype, config or bf16_config(M, N, K))


class TritonDecodeLinear(nn.Linear):
    """A bias-free nn.Linear whose products of 1 to `max_rows` rows on CUDA take `decode_linear` (the
    decode steps); F.linear otherwise (prefill chunks, the CPU, max_rows 0)."""

    max_rows: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if self.bias is None and x.is_cuda and 0 < rows <= self.max_rows and triton is not None:
            return decode_linear(x.reshape(rows, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)


def use_triton_decode_linears_(layers: nn.ModuleList, paths: tuple[str, ...], max_rows: int) -> int:
    """In every layer, the bias-free nn.Linear at each dotted path becomes a TritonDecodeLinear with the
    same weight (no copy) and `max_rows`; one that is one already only gets `max_rows` (0: F.linear
    again). Returns how many were swapped or set."""
    changed = 0
    for path, parent, name, linear in modules_at(layers, paths):
        if not isinstance(linear, TritonDecodeLinear):
            if type(linear) is not nn.Linear or linear.bias is not None:
                raise TypeError(f"{path}: {type(linear).__name__} is not a bias-free nn.Linear")
            swapped = TritonDecodeLinear(linear.in_features, linear.out_features, bias=False, device="meta")
            swapped.weight = linear.weight
            setattr(parent, name, swapped)
            linear = swapped
        linear.max_rows = max_rows
        changed += 1
    return changed
