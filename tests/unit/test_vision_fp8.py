"""The vision model's `quantization: fp8` (kernels/fp8_linear.py, serving/vision.py): e4m3 weights with one
scale per output channel, activations quantized per token at each call; what it costs in accuracy on the
tiny checkpoint; the parameter's checks. CPU here (torch._scaled_mm runs there); on the GPU (marked) the
Triton activation quantizer against the torch ops and the compiled encoder."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from internvl_serve.kernels.fp8_linear import (FP8, FP8_MAX, Fp8Linear, fp8_linear, quantize_linears_fp8_,
                                               quantize_rows_fp8, quantize_rows_fp8_torch, quantize_weight_fp8,
                                               relative_error)
from internvl_serve.serving.vision import VISION_BLOCK_LINEARS, VisionOptions, VisionService


def test_weight_scales_are_per_output_channel_and_the_row_max_is_exact():
    w = torch.randn(48, 64) * torch.logspace(-3, 2, 48)[:, None]  # rows five decades apart
    w[7] = 0
    w_fp8, scale = quantize_weight_fp8(w)
    assert w_fp8.dtype == FP8 and w_fp8.shape == w.shape and scale.shape == (48,)
    assert scale[7] == 1 and (w_fp8[7].float() == 0).all()  # a zero row
    back = w_fp8.float() * scale[:, None]
    rows = [r for r in range(48) if r != 7]
    assert torch.allclose(back[rows].abs().amax(1), w[rows].abs().amax(1), rtol=1e-6)  # max -> 448 exactly
    # e4m3 keeps 3 mantissa bits: each value within 2^-4 of itself, relative, in every row alike
    assert ((back - w).abs() <= w.abs() * 2 ** -4 + scale[:, None] * 2 ** -9).all()


def test_activation_rows_are_scaled_one_by_one():
    x = torch.randn(5, 32)
    x[2] *= 1e4
    xq, scale = quantize_rows_fp8(x)
    assert scale.shape == (5, 1)
    assert torch.allclose((xq.float() * scale).abs().amax(1), x.abs().amax(1), rtol=1e-6)
    assert float(xq.float().abs().max()) == FP8_MAX


def test_fp8_linear_is_close_to_the_float_product_with_bias_and_batch_dims():
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    x = torch.randn(2, 7, 64)
    q = Fp8Linear.from_linear(linear)
    with torch.no_grad():
        ref, out = linear(x), q(x)
    assert out.shape == (2, 7, 96) and out.dtype == x.dtype
    assert 0 < relative_error(ref, out) < 0.06
    assert torch.equal(out, fp8_linear(x, q.weight_fp8, q.weight_scale, q.bias))



def test_one_row_is_weight_only_and_more_rows_are_quantized_per_token():
    """A single row (one sequence's decode) is multiplied unquantized by the e4m3 weight; two or more rows
    are rounded to e4m3 first, each with its own scale."""
    torch.manual_seed(0)
    w_fp8, w_scale = quantize_weight_fp8(torch.randn(48, 64))
    dequantized = w_fp8.float() * w_scale[:, None]
    x = torch.randn(3, 64)
    torch.testing.assert_close(fp8_linear(x[:1], w_fp8, w_scale), x[:1] @ dequantized.t(), rtol=1e-5, atol=1e-5)
    xq, x_scale = quantize_rows_fp8(x)
    rounded = xq.float() * x_scale
    assert not torch.equal(rounded, x)
    torch.testing.assert_close(fp8_linear(x, w_fp8, w_scale), rounded @ dequantized.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fp8_linear(x[1:], w_fp8, w_scale), rounded[1:] @ dequantized.t(), rtol=1e-5, atol=1e-5)

def test_swap_replaces_each_named_linear_once():
    blocks = nn.ModuleList(nn.ModuleDict({"attn": nn.ModuleDict({"qkv": nn.Linear(16, 48), "proj": nn.Linear(16, 16)})})
                           for _ in range(3))
    assert quantize_linears_fp8_(blocks, ("attn.qkv", "attn.proj")) == 6
    assert all(isinstance(b["attn"]["qkv"], Fp8Linear) for b in blocks)
    assert quantize_linears_fp8_(blocks, ("attn.qkv",)) == 0  # already swapped


@pytest.fixture(scope="module")
def services(tiny_checkpoint):
    plain = VisionService(tiny_checkpoint, device="cpu", image_cache_mb=0)
    fp8 = VisionService(tiny_checkpoint, device="cpu", image_cache_mb=0, quantization="fp8")
    return plain, fp8


def test_fp8_service_swaps_every_block_matmul_and_stays_close(services):
    plain, fp8 = services
    layers = fp8.encoder.vision_model.encoder.layers
    swapped = [m for m in fp8.encoder.modules() if isinstance(m, Fp8Linear)]
    assert len(swapped) == len(VISION_BLOCK_LINEARS) * len(layers)
    assert all(m.fast_accum for m in swapped)  # VISION_FP8_FAST_ACCUM: measured on an H100 for the ViT's shapes
    assert not any(isinstance(m, Fp8Linear) for m in fp8.encoder.mlp1.modules())  # the projector stays
    pixels = np.random.default_rng(0).standard_normal((2, 3, 448, 448)).astype(np.float32)
    (a,), (b,) = plain.embed([pixels]), fp8.embed([pixels])
    error = relative_error(torch.from_numpy(a), torch.from_numpy(b))
    assert 0 < error < 0.1, error  # measured ~0.03 here; the real checkpoint's effect needs its weights


def test_quantization_parameter_is_checked():
    assert VisionOptions.from_parameters({"quantization": "FP8"}).quantization == "fp8"
    assert VisionOptions.from_parameters({"quantization": " "}).quantization == ""
    with pytest.raises(ValueError, match="'quantization'.*int8.*fp8"):
        VisionOptions.from_parameters({"quantization": "int8"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs FP8 tensor cores (compute capability 8.9+)")
def test_fp8_compiled_on_cuda_stays_close_to_bf16(tiny_checkpoint):
    """On the GPU the blocks are compiled around torch._scaled_mm (bf16 out); the result stays near bf16's."""
    bf16 = VisionService(tiny_checkpoint, device="cuda", image_cache_mb=0)
    fp8 = VisionService(tiny_checkpoint, device="cuda", image_cache_mb=0, quantization="fp8")
    assert fp8.compiled and bf16.compiled
    pixels = np.random.default_rng(1).standard_normal((5, 3, 448, 448)).astype(np.float32)
    (a,), (b,) = bf16.embed([pixels]), fp8.embed([pixels])
    assert 0 < relative_error(torch.from_numpy(a), torch.from_numpy(b)) < 0.1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_row_quantizer_equals_the_torch_ops_bit_for_bit(dtype):
    """One program per row (the LLM's widths: 5,120 and 13,824; an odd one), a zero row, a strided input."""
    for K in (5120, 13824, 200):
        x = (torch.randn(37, K + 8, device="cuda") * torch.logspace(-4, 3, 37, device="cuda")[:, None]).to(dtype)
        x[5] = 0
        x = x[:, 3:K + 3]  # rows not contiguous with each other, nor 16-byte aligned
        q, scale = quantize_rows_fp8(x)
        q_ref, scale_ref = quantize_rows_fp8_torch(x)
        assert q.dtype == FP8 and scale.shape == (37, 1) and scale[5].item() == 1
        assert torch.equal(scale, scale_ref), K
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), K
    empty_q, empty_scale = quantize_rows_fp8(torch.empty(0, 64, device="cuda", dtype=dtype))
    assert empty_q.shape == (0, 64) and empty_scale.shape == (0, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_row_on_cuda_is_the_weight_only_gemv_of_the_e4m3_weight():
    """The single-row path on the GPU: int8_linear's GEMV reading e4m3, against the float64 product."""
    torch.manual_seed(0)
    for n, k in ((5120, 5120), (27648, 5120), (5120, 13824)):
        w_fp8, w_scale = quantize_weight_fp8(torch.randn(n, k, device="cuda") * 0.02)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        want = x.double() @ (w_fp8.double() * w_scale.double()[:, None]).t()
        got = fp8_linear(x, w_fp8, w_scale)
        assert got.dtype == torch.bfloat16 and relative_error(want, got) < 1e-2, (n, k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs FP8 tensor cores (compute capability 8.9+)")
def test_fast_accumulation_reaches_the_tensor_cores_and_keeps_the_error():
    """An Fp8Linear with fast_accum runs torch._scaled_mm(use_fast_accum=True), bit for bit, and stays as
    close to the float64 product as the exact accumulation (fc2's shape: the longest sum, K = 12,800)."""
    torch.manual_seed(0)
    linear = nn.Linear(12800, 3200, device="cuda", dtype=torch.bfloat16)
    exact, fast = Fp8Linear.from_linear(linear), Fp8Linear.from_linear(linear, fast_accum=True)
    x = torch.randn(300, 12800, device="cuda", dtype=torch.bfloat16)
    xq, x_scale = quantize_rows_fp8(x)
    want = torch._scaled_mm(xq, fast.weight_fp8.t(), scale_a=x_scale, scale_b=fast.weight_scale.view(1, -1),
                            out_dtype=torch.bfloat16, use_fast_accum=True) + fast.bias
    assert torch.equal(fast(x), want)
    reference = x.double() @ linear.weight.double().t() + linear.bias.double()
    assert relative_error(reference, fast(x)) < 1.05 * relative_error(reference, exact(x))
