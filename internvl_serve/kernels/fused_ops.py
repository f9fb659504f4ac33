"""Fused elementwise kernels of the LLaMA layer: residual add + RMSNorm, rotary embedding, SiLU-and-mul.

Owns: three Triton kernels (two of them also in an fp8 form) and their plain-torch versions (the CPU
path and the test references):
- `add_rmsnorm(x, residual, weight, eps)`: residual + x and the RMSNorm of that sum in one pass over the
  row; returns (normed, new_residual). residual None: the norm of x alone, (normed, x).
  `add_rmsnorm_fp8` is the same kernel writing the normed rows as the fp8 linears' input instead:
  e4m3 with one scale per row, the bits fp8_linear.quantize_rows_fp8 gives for `normed` (one launch and
  one bf16 write and read fewer per fp8 projection that follows a norm).
- `rotary_(qk, positions, cos, sin)`: rotate_half RoPE in place on the first heads of a (T, heads, D)
  view (the q and k heads of a merged qkv output), cos/sin gathered in-kernel from the per-position tables.
  `rotary_write_kv_` is the same kernel also writing the rotated k and the v heads into the paged KV
  cache (paged_attention.write_kv's bits; one launch fewer per layer).
- `silu_and_mul(gate_up)`: silu(gate) * up of a merged (T, 2 * I) gate/up output -> (T, I).
  `silu_and_mul_fp8` writes it as down_proj's fp8 input instead (as add_rmsnorm_fp8 does).

Numerics follow transformers' LLaMA in the model dtype, rounding where the eager torch ops round:
RMSNorm as LlamaRMSNorm (sum of squares and rsqrt in fp32, `weight * normed.to(input_dtype)`); the
residual sum rounded to the dtype before the norm reads it; RoPE as `x * cos + rotate_half(x) * sin`
with each product rounded to the dtype before the sum; silu rounded before the multiply. Only the
reduction order, rsqrt/exp and fp contraction can differ from the eager ops.

One program per row (norm), per (token, head) (rotary) or per (row, 1024 columns) (silu): block sizes
are powers of two >= the dims, masked. Grids depend on shapes only, so the launches can be captured in
a CUDA graph. Every public function takes `use_triton=None` (Triton on CUDA tensors, torch elsewhere).

Does not own: where the model calls them (engine/llama.py), the rope tables (Llama.init_rope).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from internvl_serve.kernels.fp8_linear import FP8, FP8_MAX, quantize_rows_fp8_torch
from internvl_serve.kernels.paged_attention import FP8_CACHE_DTYPES, FP8_E4M3_MAX, write_kv_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install has no triton: the torch paths below still work
    triton = None
    tl = None


def _use_triton(x: torch.Tensor, use_triton: bool | None) -> bool:
    return (x.is_cuda and triton is not None) if use_triton is None else use_triton


# --------------------------------------------------------------------------------------------------
# torch versions: the CPU path and the references (the same ops as the eager model, in the same order)
# --------------------------------------------------------------------------------------------------


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalize in fp32, cast back, then * weight."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rmsnorm_torch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = residual + x
    return rms_norm_torch(x, weight, eps), x


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, heads, D); cos, sin (T, 1, D)."""
    return x * cos + rotate_half(x) * sin


def rotary_torch_(qk: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  num_heads: int | None = None) -> torch.Tensor:
    n = qk.shape[1] if num_heads is None else num_heads
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    qk[:, :n] = apply_rope(qk[:, :n], c, s)
    return qk


def silu_and_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

if triton is not None:
    from internvl_serve.kernels.fp8_linear import quantize_row_e4m3
    from internvl_serve.kernels.paged_attention import store_cache_row

    @triton.jit
    def _add_rmsnorm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, q_ptr, scale_ptr,
        N, eps, fp8_max, inv_fp8_max,
        stride_x, stride_r, stride_o, stride_ro, stride_q,
        HAS_RESIDUAL: tl.constexpr, QUANTIZE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """QUANTIZE: the normed row goes out as e4m3 (q_ptr) with its scale (scale_ptr), by
        quantize_row_e4m3 of the rounded row, instead of to out_ptr."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        dtype = res_out_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
            s = (r + x).to(dtype)  # rounded as the eager add rounds, then normalized
            tl.store(res_out_ptr + row * stride_ro + offs, s, mask=mask)
            x = s.to(tl.float32)
        # The squares summed in float64 (each one exact, the sum's rounding far below float32's), so
        # var does not depend on the summation order, which the compiler picks per variant: the fp8
        # variant's byte stores give it 16 elements per thread, the bf16 one's 8 (the float32 sum gave
        # rows one bf16 ulp apart in a few elements, then other e4m3 values: H100, 2026-12-06).
        xd = x.to(tl.float64)
        var = (tl.sum(xd * xd, axis=0) / N).to(tl.float32)
        normed = (x * (1.0 / tl.sqrt(var + eps))).to(dtype)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = (w * normed.to(tl.float32)).to(dtype)
        if QUANTIZE:  # masked columns are 0: they do not move the amax
            q, scale = quantize_row_e4m3(y.to(tl.float32), fp8_max, inv_fp8_max)
            tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
            tl.store(scale_ptr + row, scale)
        else:
            tl.store(out_ptr + row * stride_o + offs, y, mask=mask)

    @triton.jit
    def _rope_row(base, pos_ptr, cos_ptr, sin_ptr, t, stride_c, stride_s, offs, mask, HALF: tl.constexpr):
        """In place: RoPE of the head row at `base` of token t; returns its two rotated halves (in the
        row's dtype, as stored)."""
        dtype = base.dtype.element_ty
        pos = tl.load(pos_ptr + t).to(tl.int64)
        x1 = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        c1 = tl.load(cos_ptr + pos * stride_c + offs, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + pos * stride_c + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + pos * stride_s + offs, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + pos * stride_s + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1); each product rounded to the dtype
        o1 = (x1 * c1).to(dtype).to(tl.float32) + (-x2 * s1).to(dtype).to(tl.float32)
        o2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
        o1, o2 = o1.to(dtype), o2.to(dtype)
        tl.store(base + offs, o1, mask=mask)
        tl.store(base + HALF + offs, o2, mask=mask)
        return o1, o2

    @triton.jit
    def _rotary_kernel(
        qk_ptr, pos_ptr, cos_ptr, sin_ptr,
        stride_t, stride_h, stride_c, stride_s,
        HALF: tl.constexpr, BLOCK: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        _rope_row(qk_ptr + t * stride_t + h * stride_h, pos_ptr, cos_ptr, sin_ptr, t, stride_c, stride_s,
                  offs, offs < HALF, HALF)

    @triton.jit
    def _rotary_write_kv_kernel(
        qkv_ptr, pos_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, slot_ptr,
        stride_t, stride_h, stride_c, stride_s,
        stride_kn, stride_kt, stride_kh, stride_kd,
        stride_vn, stride_vt, stride_vh, stride_vd,
        block_size,
        NUM_HEADS: tl.constexpr, NUM_KV: tl.constexpr,  # q heads, then k heads, then v heads
        HALF: tl.constexpr, BLOCK: tl.constexpr,
        SATURATE: tl.constexpr, FP8_MAX: tl.constexpr,  # the cache's dtype, as in paged_attention.write_kv
    ):
        """One program per (token, head of q, k and v): q and k heads rotated in place, k and v heads then
        written into the cache at the token's slot (< 0: a padded row, not written)."""
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        offs = tl.arange(0, BLOCK)
        mask = offs < HALF
        base = qkv_ptr + t * stride_t + h.to(tl.int64) * stride_h
        slot = tl.load(slot_ptr + t)
        if h < NUM_HEADS + NUM_KV:
            o1, o2 = _rope_row(base, pos_ptr, cos_ptr, sin_ptr, t, stride_c, stride_s, offs, mask, HALF)
            if h >= NUM_HEADS and slot >= 0:
                kvh = h - NUM_HEADS
                store_cache_row(k_ptr, o1, slot, kvh, stride_kn, stride_kt, stride_kh, stride_kd, block_size,
                                offs, mask, SATURATE, FP8_MAX)
                store_cache_row(k_ptr, o2, slot, kvh, stride_kn, stride_kt, stride_kh, stride_kd, block_size,
                                HALF + offs, mask, SATURATE, FP8_MAX)
        elif slot >= 0:
            kvh = h - NUM_HEADS - NUM_KV
            for half in tl.static_range(2):
                x = tl.load(base + half * HALF + offs, mask=mask)
                store_cache_row(v_ptr, x, slot, kvh, stride_vn, stride_vt, stride_vh, stride_vd, block_size,
                                half * HALF + offs, mask, SATURATE, FP8_MAX)

    @triton.jit
    def _silu_times_up(gu_ptr, row, stride_g, N, offs, mask):
        """Columns offs of one row of a merged gate/up output: silu(gate) * up in float32, silu rounded to
        the input's dtype before the multiply and the product rounded to it (silu_and_mul_torch's bits);
        for both SiLU kernels."""
        dtype = gu_ptr.dtype.element_ty
        g = tl.load(gu_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * stride_g + N + offs, mask=mask, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        return (s * u).to(dtype)

    @triton.jit
    def _silu_and_mul_kernel(
        gu_ptr, out_ptr, N, stride_g, stride_o,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        tl.store(out_ptr + row * stride_o + offs, _silu_times_up(gu_ptr, row, stride_g, N, offs, mask), mask=mask)

    @triton.jit
    def _silu_and_mul_fp8_kernel(
        gu_ptr, q_ptr, scale_ptr, N, stride_g, stride_q, fp8_max, inv_fp8_max,
        BLOCK: tl.constexpr,
    ):
        """One program per whole row (the row's amax): _silu_and_mul_kernel's rounding, then
        quantize_row_e4m3 of the rounded product."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        product = _silu_times_up(gu_ptr, row, stride_g, N, offs, mask).to(tl.float32)
        q, scale = quantize_row_e4m3(product, fp8_max, inv_fp8_max)
        tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row, scale)


# --------------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------------


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual (T, N) in one dtype, weight (N,) -> (rmsnorm(residual + x) * weight, residual + x),
    both new (T, N) tensors in x's dtype. residual None -> (rmsnorm(x) * weight, x)."""
    if not _use_triton(x, use_triton):
        return add_rmsnorm_torch(x, residual, weight, eps)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return out, _launch_add_rmsnorm(x, residual, weight, eps, out, None, None)


def add_rmsnorm_fp8(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                    use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """add_rmsnorm with its normed rows quantized for an fp8 linear: (q (T, N) e4m3, scale (T, 1) float32,
    residual + x), q and scale the bits of fp8_linear.quantize_rows_fp8(add_rmsnorm(...)[0])."""
    if not _use_triton(x, use_triton):
        normed, res = add_rmsnorm_torch(x, residual, weight, eps)
        return (*quantize_rows_fp8_torch(normed), res)
    q = torch.empty(x.shape, dtype=FP8, device=x.device)
    scale = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    return q, scale, _launch_add_rmsnorm(x, residual, weight, eps, None, q, scale)


def _launch_add_rmsnorm(x, residual, weight, eps, out, q, scale) -> torch.Tensor:
    """The kernel into out (the normed rows) or, given q and scale, into them; returns residual + x (x
    itself when residual is None)."""
    T, N = x.shape
    assert x.stride(1) == 1 and weight.shape == (N,) and weight.is_contiguous(), (x.stride(), weight.shape)
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(1) == 1
        res_out = torch.empty((T, N), dtype=x.dtype, device=x.device)
    else:
        residual, res_out = x, x  # read by neither: HAS_RESIDUAL is off (res_out gives the dtype)
    out_or_q = out if out is not None else q  # the pointer the other mode does not write
    q_or_out = q if q is not None else out
    if T:
        block = triton.next_power_of_2(N)
        _add_rmsnorm_kernel[(T,)](
            x, residual, weight, out_or_q, res_out, q_or_out, scale if scale is not None else x,
            N, float(eps), FP8_MAX, 1.0 / FP8_MAX,
            x.stride(0), residual.stride(0), out_or_q.stride(0), res_out.stride(0), q_or_out.stride(0),
            HAS_RESIDUAL=res_out is not x, QUANTIZE=q is not None, BLOCK=block,
            num_warps=8 if block >= 4096 else (4 if block >= 1024 else 1),
        )
    return res_out


def rotary_(qk: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            num_heads: int | None = None, use_triton: bool | None = None) -> torch.Tensor:
    """In place: rotate_half RoPE of heads [0, num_heads) (all by default) of qk (T, heads, D), a view
    with any strides whose last dim is contiguous; positions (T,) int; cos, sin (max_positions, D) in
    qk's dtype (rows: positions). Returns qk."""
    if not _use_triton(qk, use_triton):
        return rotary_torch_(qk, positions, cos, sin, num_heads)
    T, H, D = qk.shape
    n = H if num_heads is None else num_heads
    assert D % 2 == 0 and qk.stride(2) == 1 and cos.stride(1) == 1 and sin.stride(1) == 1
    assert positions.shape == (T,) and cos.shape[1] == D and sin.shape[1] == D
    if T and n:
        _rotary_kernel[(T, n)](
            qk, positions, cos, sin,
            qk.stride(0), qk.stride(1), cos.stride(0), sin.stride(0),
            HALF=D // 2, BLOCK=triton.next_power_of_2(D // 2),
            num_warps=1,
        )
    return qk


def rotary_write_kv_(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     num_heads: int, num_kv_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor, use_triton: bool | None = None) -> torch.Tensor:
    """rotary_ of the q and k heads of qkv (T, num_heads + 2 * num_kv_heads, D), then the rotated k and
    the v heads written into the caches at slot_mapping as paged_attention.write_kv writes them (slots < 0
    skipped; caches of any strides, the model's dtype or e4m3): the same bits in one launch instead of
    two. Returns qkv."""
    if not _use_triton(qkv, use_triton):
        rotary_torch_(qkv, positions, cos, sin, num_heads + num_kv_heads)
        k, v = qkv[:, num_heads:num_heads + num_kv_heads], qkv[:, num_heads + num_kv_heads:]
        write_kv_ref(k, v, k_cache, v_cache, slot_mapping)
        return qkv
    T, H, D = qkv.shape
    assert H == num_heads + 2 * num_kv_heads and k_cache.shape[2:] == (num_kv_heads, D) == v_cache.shape[2:]
    assert D % 2 == 0 and qkv.stride(2) == 1 and cos.stride(1) == 1 and sin.stride(1) == 1
    assert positions.shape == (T,) and slot_mapping.shape == (T,) and cos.shape[1] == D and sin.shape[1] == D
    if T:
        _rotary_write_kv_kernel[(T, H)](
            qkv, positions, cos, sin, k_cache, v_cache, slot_mapping,
            qkv.stride(0), qkv.stride(1), cos.stride(0), sin.stride(0),
            *k_cache.stride(), *v_cache.stride(), k_cache.shape[1],
            NUM_HEADS=num_heads, NUM_KV=num_kv_heads, HALF=D // 2, BLOCK=triton.next_power_of_2(D // 2),
            SATURATE=k_cache.dtype in FP8_CACHE_DTYPES, FP8_MAX=FP8_E4M3_MAX,
            num_warps=1,
        )
    return qkv


_SILU_BLOCK = 1024


def silu_and_mul(gate_up: torch.Tensor, use_triton: bool | None = None) -> torch.Tensor:
    """gate_up (T, 2 * I), gate in the first I columns -> silu(gate) * up, a new (T, I) tensor."""
    if not _use_triton(gate_up, use_triton):
        return silu_and_mul_torch(gate_up)
    T, N2 = gate_up.shape
    assert N2 % 2 == 0 and gate_up.stride(1) == 1
    N = N2 // 2
    out = torch.empty((T, N), dtype=gate_up.dtype, device=gate_up.device)
    if T:
        block = min(_SILU_BLOCK, triton.next_power_of_2(N))
        _silu_and_mul_kernel[(T, triton.cdiv(N, block))](
            gate_up, out, N, gate_up.stride(0), out.stride(0),
            BLOCK=block, num_warps=4,
        )
    return out


def silu_and_mul_fp8(gate_up: torch.Tensor, use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """silu_and_mul quantized for down_proj's fp8 linear: (q (T, I) e4m3, scale (T, 1) float32), the bits
    of fp8_linear.quantize_rows_fp8(silu_and_mul(gate_up))."""
    if not _use_triton(gate_up, use_triton):
        return quantize_rows_fp8_torch(silu_and_mul_torch(gate_up))
    T, N2 = gate_up.shape
    assert N2 % 2 == 0 and gate_up.stride(1) == 1
    N = N2 // 2
    q = torch.empty((T, N), dtype=FP8, device=gate_up.device)
    scale = torch.empty((T, 1), dtype=torch.float32, device=gate_up.device)
    if T:
        block = triton.next_power_of_2(N)
        _silu_and_mul_fp8_kernel[(T,)](
            gate_up, q, scale, N, gate_up.stride(0), q.stride(0), FP8_MAX, 1.0 / FP8_MAX,
            BLOCK=block, num_warps=16 if block >= 8192 else (8 if block >= 4096 else 4),
        )
    return q, scale
