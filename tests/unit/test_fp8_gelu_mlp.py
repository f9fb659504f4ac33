"""The fused fp8 vision MLP (kernels/fp8_gelu_mlp.py): fc1's bias, the GELU and the per-token e4m3
quantization of fc2's input in one pass.

- CPU: the torch path gives exactly what the unfused Fp8Linears give in float32 (the same ops), for a
  module and for the whole tiny encoder; the swap is checked and can be put back.
- Triton interpreter (a subprocess running this file): the kernel's values before the e4m3 cast (a
  float32 output) and its scales against the torch reference, both GELUs, a width that is not a power of 2
  (the interpreter's own float32 -> e4m3 cast is wrong, so e4m3 bytes are checked on the GPU).
- sm_90 compile check without a GPU; on the GPU (marked): e4m3 bytes against the torch ops, and the
  custom op inside torch.compile.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from kernel_helpers import HAS_TRITON, needs_triton, run_interpreted
from torch import nn

from internvl_serve.kernels.fp8_gelu_mlp import (Fp8GeluMLP, bias_gelu_quantize_rows_fp8,
                                                 bias_gelu_quantize_rows_fp8_torch, fuse_fp8_gelu_mlps_)
from internvl_serve.kernels.fp8_linear import FP8, Fp8Linear, relative_error

CASES = [(7, 100, "none"), (5, 256, "tanh"), (3, 1000, "none")]  # rows, width, GELU


def mlp(d: int, hidden: int, approximate: str = "none") -> nn.Module:
    m = nn.Module()
    m.fc1, m.act, m.fc2 = nn.Linear(d, hidden), nn.GELU(approximate=approximate), nn.Linear(hidden, d)
    return m


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_the_fused_module_gives_the_unfused_fp8_mlp_exactly_in_float32(approximate):
    torch.manual_seed(0)
    plain = mlp(48, 160, approximate)
    fc1, fc2 = Fp8Linear.from_linear(plain.fc1), Fp8Linear.from_linear(plain.fc2)
    x = torch.randn(2, 9, 48)
    unfused = fc2(plain.act(fc1(x)))
    fused = Fp8GeluMLP(fc1, fc2, approximate)(x)
    assert fused.shape == (2, 9, 48) and torch.equal(fused, unfused)
    assert relative_error(plain.fc2(plain.act(plain.fc1(x))), fused) < 0.1  # and near the float MLP


def test_the_swap_over_the_tiny_encoder_gives_its_fp8_embeddings_and_can_be_put_back(tiny_checkpoint):
    from internvl_serve.serving.vision import VisionService

    service = VisionService(tiny_checkpoint, device="cpu", image_cache_mb=0, quantization="fp8")
    pixels = np.random.default_rng(3).standard_normal((2, 3, 448, 448)).astype(np.float32)
    want = service.embed([pixels])[0].copy()
    layers = service.encoder.vision_model.encoder.layers
    originals = fuse_fp8_gelu_mlps_(layers)
    assert len(originals) == len(layers) and all(isinstance(layer.mlp, Fp8GeluMLP) for layer in layers)
    assert np.array_equal(service.embed([pixels])[0], want)
    with pytest.raises(ValueError, match="Fp8Linears"):
        fuse_fp8_gelu_mlps_(layers)  # already fused
    for layer, original in zip(layers, originals):
        layer.mlp = original
    assert np.array_equal(service.embed([pixels])[0], want)
    with pytest.raises(ValueError, match="approximate"):
        bias_gelu_quantize_rows_fp8(torch.zeros(1, 4), torch.zeros(4), "erf")


def check_interpreted() -> None:
    from internvl_serve.kernels.fp8_gelu_mlp import launch_bias_gelu_quantize_rows
    from internvl_serve.kernels.fp8_linear import FP8_MAX

    torch.manual_seed(1)
    for M, K, approximate in CASES:
        x = torch.randn(M, K) * torch.logspace(-2, 2, M)[:, None]
        x[1] = -30.0  # GELU of it is ~0: the row's scale comes from tiny values
        bias = torch.randn(K)
        q, scale = torch.empty(M, K), torch.empty(M, 1)
        launch_bias_gelu_quantize_rows(x, bias, q, scale, approximate)
        g = torch.nn.functional.gelu(x + bias, approximate=approximate)
        amax = g.abs().amax(1, keepdim=True)
        want_scale = torch.where(amax > 0, amax * (1.0 / FP8_MAX), torch.ones_like(amax))
        assert torch.allclose(scale, want_scale, rtol=1e-5, atol=0), (M, K, approximate)
        assert torch.allclose(q, (g / want_scale).clamp(-FP8_MAX, FP8_MAX), rtol=1e-4, atol=1e-3), (M, K)
        nonzero = amax[:, 0] > 0  # GELU(-30 + bias) is 0 in float32: that row's scale is 1
        assert q[nonzero].abs().amax(1).sub(FP8_MAX).abs().max() < 1e-2  # the others reach +-448 at their max
        print(f"{M}x{K} {approximate} ok")


@needs_triton
def test_kernel_interpreted():
    out = run_interpreted(__file__, "kernel", timeout=300)
    assert out.count(" ok") == len(CASES), out


@needs_triton
def test_kernel_compiles_for_the_h100():
    # Triton's real compiler down to an sm_90 cubin, without a GPU: bf16 in, e4m3 out, fc2's width
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from internvl_serve.kernels import fp8_gelu_mlp

    fn = fp8_gelu_mlp._bias_gelu_quantize_rows_kernel
    consts = {"BLOCK": 16384, "TANH": False}
    types = {"x_ptr": "*bf16", "bias_ptr": "*bf16", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32",
             "fp8_max": "fp32", "inv_fp8_max": "fp32"}
    sig = {n: types.get(n, "constexpr" if n in consts else "i32") for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    assert triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=16)).asm["cubin"]


needs_fp8_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_TRITON and torch.cuda.get_device_capability() >= (8, 9)),
    reason="needs FP8 tensor cores (compute capability 8.9+) and triton")


@pytest.mark.gpu
@needs_fp8_gpu
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gpu_kernel_against_the_torch_ops(approximate):
    x = (torch.randn(300, 12800 + 8, device="cuda") * 3).to(torch.bfloat16)[:, 5:12805]  # strided rows
    bias = torch.randn(12800, device="cuda", dtype=torch.bfloat16)
    q, scale = bias_gelu_quantize_rows_fp8(x, bias, approximate)
    q_ref, scale_ref = bias_gelu_quantize_rows_fp8_torch(x, bias, approximate)
    assert q.dtype == FP8 and q.shape == x.shape and scale.shape == (300, 1)
    assert torch.allclose(scale, scale_ref, rtol=1e-6, atol=0)
    same = (q.view(torch.uint8) == q_ref.view(torch.uint8)).float().mean().item()
    assert same > 0.999, same  # erf / tanh of the two libraries may round a value the other way
    assert relative_error(q_ref.float() * scale_ref, q.float() * scale) < 1e-3


@pytest.mark.gpu
@needs_fp8_gpu
def test_gpu_the_compiled_fused_mlp_gives_the_eager_one():
    torch.manual_seed(2)
    plain = mlp(3200, 12800).to("cuda", torch.bfloat16)
    fused = Fp8GeluMLP(Fp8Linear.from_linear(plain.fc1), Fp8Linear.from_linear(plain.fc2))
    x = torch.randn(2, 1025, 3200, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        eager = fused(x)
        compiled = torch.compile(fused)(x)
        # the custom op runs as it is; fc1's input quantization is inductor's fusion of the torch ops there
        assert relative_error(eager, compiled) < 1e-3
        assert relative_error(plain.fc2(plain.act(plain.fc1(x))), eager) < 0.1


if __name__ == "__main__":
    # The interpreted tier's subprocess: `TRITON_INTERPRET=1 python tests/unit/test_fp8_gelu_mlp.py kernel`
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    assert sys.argv[1] == "kernel", sys.argv
    check_interpreted()
