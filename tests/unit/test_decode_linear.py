"""Tests of kernels/decode_linear.py, the bf16 decode products in Triton (an experiment, off by default):
- torch only: TritonDecodeLinear is F.linear wherever it does not take the kernel (the CPU, more rows than
  max_rows, max_rows 0), the swap shares the weights and can be undone, and the environment switch;
- the kernel under the CPU interpreter (test_kernels.py's "int8" subprocess runs DECODE_LINEAR_CASES:
  float32 and float16, as the interpreter mishandles bfloat16);
- @pytest.mark.gpu: bf16 at the engine's shapes against float64 and cuBLAS, in a CUDA graph, and the
  engine with the switch on against it off."""
from __future__ import annotations

import pytest
import torch
from kernel_helpers import HAS_TRITON, gpu, rel_err
from torch import nn

from internvl_serve.engine.quantize import ENGINE_PROJECTION_PATHS
from internvl_serve.kernels.decode_linear import (BF16_TRITON_ROWS_ENV, TritonDecodeLinear, bf16_config,
                                                   triton_rows_from_environment, use_triton_decode_linears_)

if HAS_TRITON:
    from internvl_serve.kernels.decode_linear import decode_linear


class Layer(nn.Module):
    """The projections of our Llama's decoder layer, at the dotted paths ENGINE_PROJECTION_PATHS name."""

    def __init__(self, hidden=32, inter=48):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.qkv_proj = nn.Linear(hidden, 3 * hidden, bias=False)
        self.self_attn.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.mlp = nn.Module()
        self.mlp.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=False)
        self.mlp.down_proj = nn.Linear(inter, hidden, bias=False)


def test_the_swap_keeps_the_weights_and_the_cpu_products():
    layers = nn.ModuleList([Layer(), Layer()])
    weights = [layer.self_attn.qkv_proj.weight for layer in layers]
    x = torch.randn(5, 32)
    before = [layer.self_attn.qkv_proj(x) for layer in layers]
    assert use_triton_decode_linears_(layers, ENGINE_PROJECTION_PATHS, 64) == 8
    for layer, weight, ref in zip(layers, weights, before):
        qkv = layer.self_attn.qkv_proj
        assert isinstance(qkv, TritonDecodeLinear) and qkv.max_rows == 64 and qkv.weight is weight
        assert torch.equal(qkv(x), ref)  # the CPU: F.linear, bit for bit
        assert torch.equal(qkv(x[None]), ref[None])  # any leading shape
        assert layer.mlp.down_proj.max_rows == 64
    assert sum(p.numel() for p in layers.parameters()) == 2 * (96 * 32 + 32 * 32 + 96 * 32 + 48 * 32)
    assert use_triton_decode_linears_(layers, ENGINE_PROJECTION_PATHS, 0) == 8  # set, not swapped again
    assert all(isinstance(layer.mlp.gate_up_proj, TritonDecodeLinear) and layer.mlp.gate_up_proj.max_rows == 0
               for layer in layers)


def test_the_swap_refuses_what_is_not_a_bias_free_linear():
    layer = Layer()
    layer.self_attn.o_proj = nn.Linear(32, 32, bias=True)
    with pytest.raises(TypeError, match="self_attn.o_proj: Linear is not a bias-free nn.Linear"):
        use_triton_decode_linears_(nn.ModuleList([layer]), ENGINE_PROJECTION_PATHS, 64)


@pytest.mark.parametrize("raw,rows", [(None, 0), ("", 0), ("0", 0), ("32", 32), (" 64 ", 64)])
def test_the_switch_reads_rows_from_the_environment(monkeypatch, raw, rows):
    if raw is None:
        monkeypatch.delenv(BF16_TRITON_ROWS_ENV, raising=False)
    else:
        monkeypatch.setenv(BF16_TRITON_ROWS_ENV, raw)
    assert triton_rows_from_environment() == rows


@pytest.mark.parametrize("raw", ["65", "-1", "all"])
def test_the_switch_refuses_rows_outside_0_to_64(monkeypatch, raw):
    monkeypatch.setenv(BF16_TRITON_ROWS_ENV, raw)
    with pytest.raises(ValueError, match=f"{BF16_TRITON_ROWS_ENV} must be an integer from 0 to 64, got '{raw}'"):
        triton_rows_from_environment()


def test_the_default_tiles_step_k_by_256_bytes_and_grow_the_row_tile_with_m():
    assert [bf16_config(m, 5120, 5120).block_m for m in (1, 16, 17, 32, 33, 64)] == [16, 16, 32, 32, 64, 64]
    assert {(c.block_n, c.block_k, c.split_k) for c in (bf16_config(m, 15360, 5120) for m in (1, 32, 64))} == {(64, 128, 1)}


def check_decode_linear(M, N, K, dtype, device, config=None, tol=1e-5):
    """decode_linear of fresh inputs against float64; returns the relative error."""
    x = torch.randn(M, K, device=device, dtype=dtype)
    w = (torch.randn(N, K, device=device) * 0.05).to(dtype)
    out = decode_linear(x, w, config)
    assert out.shape == (M, N) and out.dtype == dtype
    err = rel_err(out, x.double() @ w.double().t())
    assert err < tol, (M, N, K, dtype, config, err)
    return err


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("M", [1, 17, 32, 64])
@pytest.mark.parametrize("N,K", [(15360, 5120), (5120, 5120), (27648, 5120), (5120, 13824)])
def test_gpu_bf16_decode_linear_at_the_engines_shapes(M, N, K):
    err = check_decode_linear(M, N, K, torch.bfloat16, "cuda", tol=1e-2)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    cublas = torch.nn.functional.linear(x, w)
    assert rel_err(decode_linear(x, w), cublas) < 1e-2, err
    g = torch.cuda.CUDAGraph()  # compiled above, outside the capture
    with torch.cuda.graph(g):
        y = decode_linear(x, w)
    x.copy_(torch.randn(M, K, device="cuda", dtype=torch.bfloat16))
    g.replay()
    assert rel_err(y, torch.nn.functional.linear(x, w)) < 1e-2


@pytest.mark.gpu
@gpu
@torch.no_grad()
def test_gpu_the_engine_with_the_switch_decodes_as_without(monkeypatch):
    """The tiny model of test_engine_gpu in bf16 with CUDA graphs: with the switch the decode steps' products
    run in Triton; the prefill logits are the same computation (more rows than max_rows: cuBLAS), and the
    first decode step's logits are close to those without the switch."""
    from test_engine_gpu import EOS, IMG, requests, tiny

    from internvl_serve.engine import LLMEngine, ModelRunner, SchedulerConfig

    hf = tiny(torch.bfloat16)

    def first_tokens(rows: str):
        monkeypatch.setenv(BF16_TRITON_ROWS_ENV, rows)
        runner = ModelRunner(hf.config, hf.state_dict(), device="cuda", dtype=torch.bfloat16, block_size=4,
                             num_blocks=64, cuda_graphs=True)
        assert runner.bf16_triton_rows == int(rows)
        swapped = [m for m in runner.model.modules() if isinstance(m, TritonDecodeLinear)]
        assert len(swapped) == (4 * hf.config.num_hidden_layers if int(rows) else 0)
        engine = LLMEngine(runner, None, eos_token_id=EOS, image_context_token_id=IMG,
                           scheduler_config=SchedulerConfig(max_num_batched_tokens=64, watermark=0.0))
        out = engine.generate(requests(4, max_tokens=2))
        return {k: [t for o in v for t in o.new_token_ids] for k, v in out.items()}

    cublas, triton_rows = first_tokens("0"), first_tokens("64")
    assert {k: v[0] for k, v in cublas.items()} == {k: v[0] for k, v in triton_rows.items()}  # the prefill's
    assert sum(cublas[k][1] == triton_rows[k][1] for k in cublas) >= 3  # the first decode's: near-ties may part
