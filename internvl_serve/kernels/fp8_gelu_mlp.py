"""The fp8 vision encoder's MLP with fc1's bias, the GELU and the per-token e4m3 quantization of fc2's input
in one pass over each row: a candidate for the opt-in fp8 encoder, timed by bench/vision_variants.py
(`fused_mlp`); the service does not use it until that measurement says it is faster.

Why: under torch.compile, inductor quantizes fc2's 12,800-wide input with a looped reduction that reads
each row twice: 58.6 us per block at one tile, 2.6 of the 21.8 ms of kernels of a one-tile fp8 forward
(bench/results/h100-2026-12-06/vision-step-fp8-dab87f5.json). Here one program holds a row in registers:
it reads fc1's product once and writes the e4m3 row and its scale. Numbers: the GELU of the bias-added
product in float32, not rounded to the model dtype in between (as inductor does too), then the per-row
rule of fp8_linear.quantize_rows_fp8_torch.

Owns: the Triton kernel, its torch reference (`bias_gelu_quantize_rows_fp8_torch`, also the CPU path),
the custom op torch.compile calls as it is (`internvl::bias_gelu_quantize_rows_fp8`), `Fp8GeluMLP` and
`fuse_fp8_gelu_mlps_`. Does not own: the fp8 matmul or the per-row quantization rule (fp8_linear.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from internvl_serve.kernels.fp8_linear import (FP8, FP8_MAX, Fp8Linear, fp8_linear, quantize_rows_fp8_torch,
                                               scaled_product, tl, triton)

if triton is not None:
    from internvl_serve.kernels.fp8_linear import quantize_row

GELU_APPROXIMATIONS = ("none", "tanh")  # nn.GELU's `approximate`


def bias_gelu_quantize_rows_fp8_torch(x: torch.Tensor, bias: torch.Tensor,
                                      approximate: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) + bias (K,) -> GELU in float32 -> (e4m3 (M, K), scale (M, 1) float32), per row."""
    return quantize_rows_fp8_torch(F.gelu(x.float() + bias.float(), approximate=approximate))


if triton is not None:
    @triton.jit
    def _bias_gelu_quantize_rows_kernel(x_ptr, bias_ptr, q_ptr, scale_ptr, K, stride_x, stride_q, fp8_max,
                                        inv_fp8_max, BLOCK: tl.constexpr, TANH: tl.constexpr):
        """One program per row: h = x + bias, GELU in float32, then fp8_linear's per-row rule."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < K
        h = (tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
             + tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32))
        if TANH:
            inner = 0.7978845608028654 * (h + 0.044715 * h * h * h)
            g = 0.5 * h * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))
        else:
            g = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
        q, scale = quantize_row(tl.where(mask, g, 0.0), fp8_max, inv_fp8_max)
        tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row, scale)


def launch_bias_gelu_quantize_rows(x: torch.Tensor, bias: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                                   approximate: str = "none") -> None:
    """The kernel into q (M, K) (e4m3; float32 shows the values before the cast, for the interpreter's
    tests) and scale (M, 1) float32. x's rows contiguous."""
    M, K = x.shape
    if M:
        block = triton.next_power_of_2(K)
        _bias_gelu_quantize_rows_kernel[(M,)](x, bias, q, scale, K, x.stride(0), q.stride(0), FP8_MAX,
                                              1.0 / FP8_MAX, BLOCK=block, TANH=approximate == "tanh",
                                              num_warps=16 if block >= 8192 else 8 if block >= 4096 else 4)


@torch.library.custom_op("internvl::bias_gelu_quantize_rows_fp8", mutates_args=())
def _bias_gelu_quantize_rows_op(x: torch.Tensor, bias: torch.Tensor,
                                approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = x if x.stride(1) == 1 else x.contiguous()
    q = torch.empty(x.shape, device=x.device, dtype=FP8)
    scale = torch.empty((x.shape[0], 1), device=x.device, dtype=torch.float32)
    launch_bias_gelu_quantize_rows(x, bias, q, scale, approximate)
    return q, scale


@_bias_gelu_quantize_rows_op.register_fake
def _(x: torch.Tensor, bias: torch.Tensor, approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape, dtype=FP8), x.new_empty((x.shape[0], 1), dtype=torch.float32)


def bias_gelu_quantize_rows_fp8(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none",
                                use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """bias_gelu_quantize_rows_fp8_torch in one Triton kernel on CUDA (a custom op: torch.compile calls it
    as it is), the torch ops elsewhere. x (M, K)."""
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate: {approximate!r} is not one of {GELU_APPROXIMATIONS}")
    if use_triton is None:
        use_triton = x.is_cuda and triton is not None
    if not use_triton:
        return bias_gelu_quantize_rows_fp8_torch(x, bias, approximate)
    return torch.ops.internvl.bias_gelu_quantize_rows_fp8(x, bias, approximate)


class Fp8GeluMLP(nn.Module):
    """fc2(GELU(fc1(x))) with fc1 and fc2 Fp8Linears: fc1's product without its bias, then the fused
    bias + GELU + quantization, then fc2's product from the quantized rows."""

    def __init__(self, fc1: Fp8Linear, fc2: Fp8Linear, approximate: str = "none"):
        super().__init__()
        if fc1.bias is None or approximate not in GELU_APPROXIMATIONS:
            raise ValueError("Fp8GeluMLP needs fc1 with a bias and an nn.GELU")
        self.fc1, self.fc2, self.approximate = fc1, fc2, approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = fp8_linear(x.reshape(-1, shape[-1]), self.fc1.weight_fp8, self.fc1.weight_scale)
        hq, h_scale = bias_gelu_quantize_rows_fp8(h, self.fc1.bias, self.approximate)
        y = scaled_product(hq, h_scale, self.fc2.weight_fp8, self.fc2.weight_scale, x.dtype)
        if self.fc2.bias is not None:
            y = y + self.fc2.bias
        return y.reshape(*shape[:-1], y.shape[-1])


def fuse_fp8_gelu_mlps_(blocks: nn.ModuleList) -> list[nn.Module]:
    """Replace every block's `mlp` (fc1, an nn.GELU, fc2; both Fp8Linears) with an Fp8GeluMLP over the
    same weights, in place; returns the replaced modules in block order (to put back)."""
    replaced = []
    for block in blocks:
        mlp = block.mlp
        parts = [getattr(mlp, name, None) for name in ("fc1", "fc2", "act")]
        if not (isinstance(parts[0], Fp8Linear) and isinstance(parts[1], Fp8Linear) and isinstance(parts[2], nn.GELU)):
            raise ValueError(f"{type(mlp).__name__}: fc1 and fc2 must be Fp8Linears and act an nn.GELU")
        block.mlp = Fp8GeluMLP(mlp.fc1, mlp.fc2, mlp.act.approximate)
        replaced.append(mlp)
    return replaced
