"""FP8 (e4m3) linears: the vision encoder's compute-bound matmuls and the LLM's opt-in `quantization: fp8`.

Why: InternViT-6B's 45 blocks are ~11.3 TFLOP of matmuls per 448 tile (qkv, proj, fc1, fc2 over 1,025
tokens); at batch 8 the compiled bf16 encoder took 21.5 ms per image on an H100, so those matmuls alone
run at >= 525 TFLOP/s, near what bf16 tensor cores reach (at batch 1 the profile gave them 15.5 of 21.7
ms). FP8 tensor cores have twice that peak, so the issue's vision target (<= 17 ms per image at batch 8)
needs them. The LLM's decode is bound by weight bytes: e4m3 weights halve them, and its prefill (compute
bound) gets the FP8 tensor cores too (engine/quantize.py; int8_linear.py is its weight-only option).

Owns: per-output-channel e4m3 quantization of a weight (N, K) (scale = max|w[n]| / 448, once at load);
per-row (token) dynamic e4m3 quantization of the activations (M, K) at each call (one Triton kernel on
CUDA outside torch.compile, which fuses the torch ops itself; the torch ops elsewhere); their product through
torch._scaled_mm with both scales applied in the epilogue, output in the activations' dtype; for a
single row (one sequence's decode) the weight-only product instead (int8_linear.py's GEMV, reading e4m3); `Fp8Linear`,
an nn.Linear stand-in; `quantize_linears_fp8_`, which swaps named linears of a module's blocks in place;
`relative_error`, what a swap costs. On CUDA, torch._scaled_mm needs FP8 tensor cores (compute capability
8.9+: H100) and K and N divisible by 16 (ViT-6B: 3200, 9600, 12800); on the CPU (the tests) the same
product runs in float32 from the e4m3 values, since torch 2.11's CPU _scaled_mm refuses per-row scales
(2.13's takes them).
Does not own: deciding to quantize (the vision model's `quantization` parameter, serving/vision.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install has no triton: the torch path below still works
    triton = None
    tl = None

from internvl_serve.kernels.int8_linear import int8_linear, int8_linear_torch  # noqa: E402
from internvl_serve.kernels.module_paths import modules_at  # noqa: E402

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# rows up to which fp8_linear keeps the activations in their dtype (weight-only): one, the decode of a
# single sequence. On an H100 (bench/kernels_bench.py --only quantized, 2026-12-06) one row took 123 us per
# layer weight-only (int8_linear's GEMV kernel reading e4m3) against 183 quantized; at 32 and 64 rows the
# matrix kernel, which converts each e4m3 tile to bf16, took 234 and 207 us against ~182 and ~170.
WEIGHT_ONLY_MAX_M = 1


def quantize_weight_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (w_fp8 (N, K) e4m3, scale (N,) float32) with w ~= w_fp8 * scale[:, None].
    A row of zeros gets scale 1."""
    assert w.dim() == 2, w.shape
    wf = w.float()
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (wf / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8).contiguous(), scale.contiguous()


def quantize_rows_fp8_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (x_fp8 (M, K) e4m3, scale (M, 1) float32), one scale per row (token). The scale is
    amax times the float32 reciprocal of 448 (what torch's CUDA division by a scalar computes), so that
    the Triton kernel gives the same bits on any device."""
    xf = x.float()
    amax = xf.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax * (1.0 / FP8_MAX), torch.ones_like(amax))
    return (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


if triton is not None:
    @triton.jit
    def quantize_row_e4m3(x, fp8_max, inv_fp8_max):
        """A row's values x (float32; masked columns 0) -> (x / scale clamped to +-448, still float32 for
        the caller's store to round to e4m3; scale = amax * (1 / 448), 1 for a row of zeros):
        quantize_rows_fp8_torch's ops, for every kernel that writes rows for an fp8 linear."""
        amax = tl.max(tl.abs(x), axis=0)
        scale = tl.where(amax > 0, amax * inv_fp8_max, 1.0)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -fp8_max), fp8_max)  # IEEE division, as torch
        return q, scale

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_x, stride_q, fp8_max, inv_fp8_max,
                              BLOCK: tl.constexpr):
        """One program per row: quantize_row_e4m3 in one pass over the row."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < K
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        q, scale = quantize_row_e4m3(x, fp8_max, inv_fp8_max)
        tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row, scale)


def quantize_rows_fp8(x: torch.Tensor, use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows_fp8_torch in one Triton kernel (use_triton None: on CUDA tensors, unless torch.compile
    is tracing, which fuses the torch ops itself). x (M, K)."""
    if use_triton is None:
        use_triton = x.is_cuda and triton is not None and not torch.compiler.is_compiling()
    if not use_triton:
        return quantize_rows_fp8_torch(x)
    x = x if x.stride(1) == 1 else x.contiguous()
    M, K = x.shape
    q = torch.empty((M, K), device=x.device, dtype=FP8)
    scale = torch.empty((M, 1), device=x.device, dtype=torch.float32)
    if M:
        block = triton.next_power_of_2(K)
        _quantize_rows_kernel[(M,)](x, q, scale, K, x.stride(0), q.stride(0), FP8_MAX, 1.0 / FP8_MAX, BLOCK=block,
                                    num_warps=8 if block >= 4096 else 4)
    return q, scale


def scaled_product(xq: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                   out_dtype: torch.dtype, fast_accum: bool = False, triton_max_rows: int = 0) -> torch.Tensor:
    """(xq * x_scale) @ (w_fp8 * w_scale[:, None]).T in out_dtype: xq (M, K) e4m3 with (M, 1) row scales,
    w_fp8 (N, K) with (N,) channel scales. On CUDA the FP8 tensor cores with both scales in the epilogue:
    up to triton_max_rows rows in the Triton W8A8 kernel (scaled_product_triton), more in torch._scaled_mm,
    with fast_accum Hopper's FP8 accumulation without periodic promotion; elsewhere the same product in
    float32 (int8_linear_torch's; torch's CPU _scaled_mm takes per-row scales only in some versions)."""
    if xq.is_cuda and 0 < xq.shape[0] <= triton_max_rows:
        return scaled_product_triton(xq, x_scale, w_fp8, w_scale, out_dtype)
    if xq.is_cuda:
        return torch._scaled_mm(xq, w_fp8.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1), out_dtype=out_dtype,
                                use_fast_accum=fast_accum)
    return int8_linear_torch(xq, w_fp8, w_scale, x_scale, out_dtype)


def scaled_product_triton(xq: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                          out_dtype: torch.dtype, config=None) -> torch.Tensor:
    """scaled_product's product in int8_linear's Triton matrix kernel instead of torch._scaled_mm: the e4m3
    weight tile and the e4m3 rows meet on the FP8 tensor cores (the weight as the dot's left operand, the
    few rows on its right: swap-AB), both scales in the epilogue, up to int8_linear.TRITON_MAX_M rows. The
    llm's decode batches with fp8 (fp8_triton_max_rows): on an H100 one layer's four projections 1.16-1.24x
    as fast as _scaled_mm at 2-64 rows (bench/kernels_bench.py --only w8a8). config: an
    int8_linear.Int8MatmulConfig (None: int8_linear.scaled_config for the shape)."""
    return int8_linear(xq, w_fp8, w_scale, use_triton=True, config=config, x_scale=x_scale, out_dtype=out_dtype)


def fp8_linear(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None = None, fast_accum: bool = False, triton_max_rows: int = 0) -> torch.Tensor:
    """x (..., K) @ (w_fp8 * w_scale).T (+ bias) -> (..., N) in x's dtype.

    A single row (WEIGHT_ONLY_MAX_M: one sequence's decode, bound by the weight bytes) stays in its dtype:
    int8_linear's weight-only GEMV reads the e4m3 weight (half of bf16's bytes) and converts it in
    registers. More rows (decode batches, prefill, mixed steps, the vision encoder's tiles) are quantized
    per token and multiplied on the FP8 tensor cores (scaled_product; fast_accum there). The same rule on
    every device."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if 0 < x2.shape[0] <= WEIGHT_ONLY_MAX_M:
        y = int8_linear(x2, w_fp8, w_scale)
    else:
        y = scaled_product(*quantize_rows_fp8(x2), w_fp8, w_scale, x.dtype, fast_accum, triton_max_rows)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], w_fp8.shape[0])


class Fp8Rows(NamedTuple):
    """Activation rows already quantized by the kernel that made them (fused_ops.add_rmsnorm_fp8,
    silu_and_mul_fp8): what quantize_rows_fp8 would return for them, and the dtype the product comes out
    in. An Fp8Linear takes it in place of the rows."""

    q: torch.Tensor      # (M, K) e4m3
    scale: torch.Tensor  # (M, 1) float32
    dtype: torch.dtype


class Fp8Linear(nn.Module):
    """An nn.Linear whose weight is e4m3 with one float32 scale per output channel; the bias stays in
    the model dtype. fast_accum: its products on the FP8 tensor cores accumulate without periodic
    promotion; triton_max_rows: products of up to that many rows in the Triton W8A8 kernel (both:
    scaled_product's)."""

    def __init__(self, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 fast_accum: bool = False, triton_max_rows: int = 0):
        super().__init__()
        self.in_features, self.out_features = w_fp8.shape[1], w_fp8.shape[0]
        self.fast_accum = fast_accum
        self.triton_max_rows = triton_max_rows
        self.register_buffer("weight_fp8", w_fp8)
        self.register_buffer("weight_scale", w_scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fast_accum: bool = False, triton_max_rows: int = 0) -> "Fp8Linear":
        w_fp8, w_scale = quantize_weight_fp8(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(w_fp8, w_scale, bias, fast_accum, triton_max_rows)

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        """x (..., K) rows, or Fp8Rows (M, K) quantized already (then always the FP8 tensor cores)."""
        if isinstance(x, Fp8Rows):
            y = scaled_product(x.q, x.scale, self.weight_fp8, self.weight_scale, x.dtype, self.fast_accum,
                               self.triton_max_rows)
            return y if self.bias is None else y + self.bias
        return fp8_linear(x, self.weight_fp8, self.weight_scale, self.bias, self.fast_accum, self.triton_max_rows)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"e4m3{', fast accumulation' if self.fast_accum else ''}"
                f"{f', Triton W8A8 up to {self.triton_max_rows} rows' if self.triton_max_rows else ''}")


def quantize_linears_fp8_(blocks: nn.ModuleList, names: tuple[str, ...], fast_accum: bool = False,
                          triton_max_rows: int = 0) -> int:
    """In every block, replace the nn.Linear at each dotted name (e.g. "attn.qkv") with an Fp8Linear
    (fast_accum, triton_max_rows: see Fp8Linear), in place, freeing the float weight. Returns how many were
    replaced (a name that is not an nn.Linear, e.g. already replaced, is skipped)."""
    replaced = 0
    for _, parent, child, linear in modules_at(blocks, names):
        if type(linear) is nn.Linear:
            setattr(parent, child, Fp8Linear.from_linear(linear, fast_accum, triton_max_rows))
            replaced += 1
    return replaced


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """||other - reference|| / ||reference||, in float32."""
    reference, other = reference.detach().float(), other.detach().float()
    return float((other - reference).norm() / reference.norm().clamp_min(1e-30))
