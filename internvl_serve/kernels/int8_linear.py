"""Weight-only int8 linears for the language model: quantize, multiply, swap into a model, measure.

Owns: symmetric per-output-channel int8 quantization of a weight (N, K); the Triton kernel that
multiplies activations (M, K) by such a weight for small M (decode), loading int8 tiles (half the
bytes of bf16) and applying the scales in the epilogue; the torch fallback for the CPU and for large M
(prefill, where the product is compute-bound anyway); `Int8Linear`, a bias-free nn.Linear stand-in;
`quantize_llama_linears`, which swaps a LLaMA's projections; and `logit_error`, the numbers that say
what the quantization costs. Does not own: loading checkpoints or deciding whether to quantize
(the engine config does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from internvl_serve.kernels.paged_attention import num_sms_of

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install has no triton: the torch path below still works
    triton = None
    tl = None

# Largest M the Triton kernel takes by default; above it the product is compute-bound and cuBLAS on a
# dequantized weight wins. The decode batch sizes served (1..64) stay under it.
TRITON_MAX_M = 64

# the weight types the kernels and the fallback take: int8, and e4m3 (fp8_linear's single-row decode)
WEIGHT_DTYPES = (torch.int8, torch.float8_e4m3fn)

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (w_int8 (N, K) int8, scale (N,) float32) with w ~= w_int8 * scale[:, None].

    Symmetric per output channel: scale = max|w[n]| / 127, values rounded to nearest in [-127, 127].
    A row of zeros gets scale 1 (its int8 values are 0 either way).
    """
    assert w.dim() == 2, w.shape
    wf = w.float()
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    w_int8 = torch.round(wf / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return w_int8.contiguous(), scale.contiguous()


def int8_linear_torch(x: torch.Tensor, w_int8: torch.Tensor, scale: torch.Tensor,
                      x_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fallback: (x @ dequantized w.T) in x's dtype, the scale applied to the product's columns. With
    x_scale (e4m3 x): (x * x_scale) @ (w * scale).T in float32, then out_dtype."""
    if x_scale is not None:
        return ((x.float() * x_scale.float().view(-1, 1)) @ (w_int8.float() * scale.float()[:, None]).t()).to(out_dtype)
    y = x @ w_int8.to(x.dtype).t()
    return (y.float() * scale.float()).to(x.dtype)


if triton is not None:

    @triton.jit
    def _int8_matmul_kernel(
        x_ptr, w_ptr, scale_ptr, out_ptr, x_scale_ptr,
        M, N, K,
        stride_xm, stride_xk,
        stride_wn, stride_wk,
        stride_os, stride_om, stride_on,  # stride_os: between split-K partial outputs
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,  # programs along K; each writes its own partial output (fp32)
        EVEN_K: tl.constexpr,  # K % (BLOCK_K * SPLIT_K) == 0: no mask along K
        FP32_IEEE: tl.constexpr,  # fp32 activations: full-precision dot instead of tf32
        X_SCALED: tl.constexpr,  # x is e4m3 rows with a float32 scale each (x_scale_ptr): an fp8 x fp8 dot
        HAS_SCALE: tl.constexpr,  # False: no per-output-channel scale (bf16 weights, decode_linear.py)
    ):
        # The weight tile is the dot's left operand: acc^T (BLOCK_N, BLOCK_M) = W (BLOCK_N, BLOCK_K)
        # @ x^T (BLOCK_K, BLOCK_M). W rows are contiguous along K, the layout the matrix units want for
        # their left operand, and the large N fills the instruction's M side while the small batch
        # sits on its N side ("swap AB" for small M).
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_n = offs_n < N
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk
        x_ptrs = x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None] * stride_xk  # (BLOCK_K, BLOCK_M)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
            if EVEN_K:
                w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
                x = tl.load(x_ptrs, mask=mask_m[None, :], other=0.0)
            else:
                mask_k = (k0 + tl.arange(0, BLOCK_K)) < K
                w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
                x = tl.load(x_ptrs, mask=mask_m[None, :] & mask_k[:, None], other=0.0)
            if FP32_IEEE:
                acc = tl.dot(w.to(tl.float32), x, acc, input_precision="ieee")
            else:  # int8 values are exact in bf16 and fp16; e4m3 with e4m3 x: the FP8 tensor cores
                acc = tl.dot(w.to(x.dtype), x, acc)
            w_ptrs += BLOCK_K * SPLIT_K * stride_wk
            x_ptrs += BLOCK_K * SPLIT_K * stride_xk
        if HAS_SCALE:
            scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc = acc * scale[:, None]
        if X_SCALED:
            acc = acc * tl.load(x_scale_ptr + offs_m, mask=mask_m, other=0.0)[None, :]
        out_ptrs = out_ptr + pid_k * stride_os + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


    @triton.jit
    def _int8_gemv_kernel(
        x_ptr, w_ptr, scale_ptr, out_ptr,
        M, N, K,
        stride_xm, stride_xk,
        stride_wn, stride_wk,
        stride_os, stride_om, stride_on,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        CVT_VIA_BF16: tl.constexpr,  # int8 -> bf16 -> fp32: bit tricks instead of the slow I2F
    ):
        # One activation row per program (axis 0, the fastest-varying in launch order, so the M
        # programs that share a weight tile run together and all but the first read it from L2);
        # no matrix units: the products accumulate elementwise in a (BLOCK_N, BLOCK_K) fp32 tile
        # reduced once at the end.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_n = offs_n < N
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk
        x_ptrs = x_ptr + pid_m * stride_xm + offs_k * stride_xk
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
            if EVEN_K:
                w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
                x = tl.load(x_ptrs)
            else:
                mask_k = (k0 + tl.arange(0, BLOCK_K)) < K
                w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
                x = tl.load(x_ptrs, mask=mask_k, other=0.0)
            if CVT_VIA_BF16:
                wf = w.to(tl.bfloat16).to(tl.float32)  # exact: |w| <= 127
            else:
                wf = w.to(tl.float32)
            acc += wf * x.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K * SPLIT_K * stride_wk
            x_ptrs += BLOCK_K * SPLIT_K * stride_xk
        scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        res = tl.sum(acc, axis=1) * scale
        tl.store(out_ptr + pid_k * stride_os + pid_m * stride_om + offs_n * stride_on,
                 res.to(out_ptr.dtype.element_ty), mask=mask_n)


@dataclass(frozen=True)
class Int8MatmulConfig:
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    gemv: bool = False  # the elementwise kernel (one program per row, no matrix units; block_m unused)


def default_config(M: int, N: int, K: int, num_sms: int = 132) -> Int8MatmulConfig:
    """Tiles for decode batch sizes, picked from an H100 sweep (bench/kernels_bench.py --sweep) at the
    LLaMA-2-13B shapes (N, K) = (5120, 5120), (13824, 5120), (5120, 13824):
    M = 1 the elementwise kernel (no matrix units) with 8 x 512 tiles; M <= 32 the matrix kernel with
    32-row weight tiles; larger M 64-row tiles. Split-K only while the (M, N) tiles alone leave SMs idle.
    """
    if M == 1:
        return Int8MatmulConfig(block_m=1, block_n=8, block_k=512, split_k=1, num_warps=4, num_stages=1, gemv=True)
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    block_n = 32 if M <= 32 else 64
    want = 3 * num_sms if block_m <= 32 else (3 * num_sms) // 2
    tiles = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
    split_k = 1
    while tiles * split_k < want and split_k < 4 and K // (2 * split_k) >= 1024:
        split_k *= 2
    return Int8MatmulConfig(block_m=block_m, block_n=block_n, block_k=128, split_k=split_k)


def scaled_config(M: int, N: int, K: int) -> Int8MatmulConfig:
    """Tiles for e4m3 rows with scales (W8A8, fp8_linear's Triton path), picked from an H100 sweep
    (bench/kernels_bench.py --only w8a8 --sweep, 2026-12-07) at the engine's shapes (N, K) = (15360, 5120),
    (5120, 5120), (27648, 5120), (5120, 13824) and M = 2 to 64: 64-wide weight tiles (wgmma) and no split-K
    at every M (split-K lost to one pass over K even where the tiles leave SMs idle); K in 256-byte steps,
    except at M > 32 for the wide products (N > 2K: qkv, gate_up), where 128 with 5 stages was faster.
    The matrix kernel for one row too: the elementwise kernel does not take scaled rows.
    """
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    if block_m == 64 and N > 2 * K:
        return Int8MatmulConfig(block_m=64, block_n=64, block_k=128, split_k=1, num_stages=5)
    return Int8MatmulConfig(block_m=block_m, block_n=64, block_k=256, split_k=1, num_stages=4)


def int8_linear(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    scale: torch.Tensor,
    use_triton: bool | None = None,
    config: Int8MatmulConfig | None = None,
    num_sms: int | None = None,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x (M, K) @ (w_int8 (N, K) * scale (N,)[:, None]).T -> (M, N) in out_dtype (None: x's dtype).

    The weight may also be e4m3 (float8_e4m3fn: a single row of the llm's fp8 decode, fp8_linear.py): the kernels convert
    a weight tile to the activations' dtype (exact for both) before the product, whatever its type.
    x_scale (M,) or (M, 1) float32, with x e4m3 rows and an e4m3 weight: the product (x * x_scale) @ (w *
    scale).T in out_dtype, on the FP8 tensor cores in the matrix kernel (fp8_linear.scaled_product's
    Triton path: W8A8 for decode batches, scaled_config's tiles); never the elementwise (gemv) kernel.

    use_triton: None runs the Triton kernel for CUDA tensors with M <= TRITON_MAX_M, the torch
    fallback otherwise. The kernel's launch depends only on shapes (CUDA-graph safe); with
    config.split_k > 1 it also allocates a (split_k, M, N) float32 buffer and sums it.
    """
    M, K = x.shape
    N, K2 = w_int8.shape
    assert K == K2 and scale.shape == (N,) and w_int8.dtype in WEIGHT_DTYPES, (x.shape, w_int8.shape, scale.shape)
    if x_scale is not None:
        assert x.dtype == w_int8.dtype == torch.float8_e4m3fn and x_scale.numel() == M and out_dtype is not None, (
            x.dtype, w_int8.dtype, x_scale.shape, out_dtype)
        x_scale = x_scale.reshape(M).float()
    out_dtype = out_dtype or x.dtype
    if use_triton is None:
        use_triton = triton is not None and x.is_cuda and M <= TRITON_MAX_M
    if not use_triton:
        return int8_linear_torch(x, w_int8, scale, x_scale, out_dtype)
    if config is None:
        if num_sms is None:
            num_sms = num_sms_of(x.device)
        config = default_config(M, N, K, num_sms) if x_scale is None else scaled_config(M, N, K)
    return launch_product(x, w_int8, scale, x_scale, out_dtype, config)


def launch_product(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, x_scale: torch.Tensor | None,
                   out_dtype: torch.dtype, c: Int8MatmulConfig) -> torch.Tensor:
    """x (M, K) @ (w (N, K) * scale[:, None]).T in out_dtype by the kernel `c` names (the matrix kernel, or
    the elementwise one with c.gemv), launched on x's device: int8_linear's Triton path once it has chosen
    the tiles. scale None: no per-output-channel scale (bf16 weights, decode_linear.py; the matrix kernel
    only); x_scale (M,) float32: e4m3 rows with scales. With c.split_k > 1 the partial products go through
    a (split_k, M, N) float32 buffer."""
    M, K = x.shape
    N = w.shape[0]
    assert not (c.gemv and (x_scale is not None or scale is None)), "the gemv kernel takes a weight scale only"
    if c.split_k == 1:
        out = torch.empty(M, N, dtype=out_dtype, device=x.device)
        stride_os = 0
    else:
        out = torch.empty(c.split_k, M, N, dtype=torch.float32, device=x.device)
        stride_os = out.stride(0)
    even_k = K % (c.block_k * c.split_k) == 0
    if c.gemv:
        _int8_gemv_kernel[(M, triton.cdiv(N, c.block_n), c.split_k)](
            x, w, scale, out,
            M, N, K,
            *x.stride(), *w.stride(), stride_os, out.stride(-2), out.stride(-1),
            BLOCK_N=c.block_n, BLOCK_K=c.block_k, SPLIT_K=c.split_k, EVEN_K=even_k,
            # the CPU interpreter turns int8 -> bf16 into NaN; the GPU path is checked on the GPU
            CVT_VIA_BF16=x.is_cuda and w.dtype == torch.int8,
            num_warps=c.num_warps, num_stages=c.num_stages,
        )
    else:
        unused = w  # a pointer for the scales a launch does not read (HAS_SCALE / X_SCALED off)
        _int8_matmul_kernel[(triton.cdiv(M, c.block_m), triton.cdiv(N, c.block_n), c.split_k)](
            x, w, unused if scale is None else scale, out, unused if x_scale is None else x_scale,
            M, N, K,
            *x.stride(), *w.stride(), stride_os, out.stride(-2), out.stride(-1),
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, SPLIT_K=c.split_k,
            EVEN_K=even_k, FP32_IEEE=x.dtype == torch.float32, X_SCALED=x_scale is not None,
            HAS_SCALE=scale is not None, num_warps=c.num_warps, num_stages=c.num_stages,
        )
    if c.split_k > 1:
        out = out.sum(dim=0).to(out_dtype)
    return out


class Int8Linear(nn.Module):
    """Bias-free nn.Linear with an int8 weight (out_features, in_features) and a float32 scale per
    output feature. Inputs of any leading shape (..., in_features)."""

    def __init__(self, in_features: int, out_features: int, device=None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        if linear.bias is not None:
            raise ValueError("Int8Linear has no bias; LLaMA's projections have none either")
        q = cls(linear.in_features, linear.out_features, device=linear.weight.device)
        q.weight, q.scale = quantize_weight(linear.weight.detach())
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = int8_linear(x.reshape(-1, self.in_features), self.weight, self.scale)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def quantize_llama_linears(
    module: nn.Module,
    names: tuple[str, ...] = LLAMA_PROJECTIONS,
    include_lm_head: bool = False,
) -> int:
    """Replace, in place, every bias-free nn.Linear whose attribute name is in `names` (and lm_head if
    asked) by an Int8Linear. Embeddings are never touched. Returns how many were replaced.
    Frees each bf16 weight as it goes, so a 13B model needs no second copy on the GPU."""
    wanted = set(names) | ({"lm_head"} if include_lm_head else set())
    targets = [
        (parent, attr)
        for parent in module.modules()
        for attr, child in parent.named_children()
        if attr in wanted and isinstance(child, nn.Linear) and child.bias is None
    ]
    for parent, attr in targets:
        setattr(parent, attr, Int8Linear.from_linear(getattr(parent, attr)))
    return len(targets)


@dataclass(frozen=True)
class LogitError:
    max_abs: float  # max |test - ref| over all logits
    rel_l2: float  # ||test - ref|| / ||ref||
    max_rel: float  # max |test - ref| / max |ref|
    top1_agreement: float  # fraction of positions whose argmax token matches


def compare_logits(ref: torch.Tensor, test: torch.Tensor) -> LogitError:
    """Error of logits `test` against `ref`, both (..., vocab)."""
    ref, test = ref.float(), test.float()
    diff = (test - ref).abs()
    return LogitError(
        max_abs=diff.max().item(),
        rel_l2=((test - ref).norm() / ref.norm()).item(),
        max_rel=(diff.max() / ref.abs().max()).item(),
        top1_agreement=(test.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    )


@torch.no_grad()
def logit_error(
    model: nn.Module,
    forward: Callable[[nn.Module], torch.Tensor],
    quantize: Callable[[nn.Module], int] = quantize_llama_linears,
) -> LogitError:
    """Run forward(model) -> logits (..., vocab), quantize the model IN PLACE, run it again, compare.

    forward closes over the inputs (token ids, positions, a cache, ...) so any model signature works;
    give it the same inputs both times. The model stays quantized afterwards (no copy of a 13B model).
    """
    ref = forward(model).float().cpu()
    n = quantize(model)
    if n == 0:
        raise ValueError("quantize replaced no linear: check the projection names of this model")
    return compare_logits(ref, forward(model).float().cpu())
