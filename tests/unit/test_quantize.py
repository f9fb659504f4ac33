"""The engine's int8 and fp8 weight modes (engine/quantize.py): which modules they swap, that an int8 model
equals the same model with dequantized weights, the logit error and greedy agreement against fp32 on the
tiny checkpoint (CPU), the option's parsing, and (GPU, marked) CUDA-graph decode with the quantized kernels."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from internvl_serve.checkpoint import load_state_dict
from internvl_serve.config import InternVLChatConfig
from internvl_serve.engine import LLMEngine, ModelRunner, Request, SamplingParams, SchedulerConfig
from internvl_serve.engine.llama import load_llama
from internvl_serve.engine.quantize import (ENGINE_PROJECTIONS, is_quantized, quantize_llama_fp8_,
                                            quantize_llama_int8_, quantize_model_, validate_quantization)
from internvl_serve.kernels import Int8Linear, LogitError, compare_logits, quantize_weight
from internvl_serve.kernels.fp8_linear import FP8, Fp8Linear
from internvl_serve.kernels.int8_linear import LLAMA_PROJECTIONS


@pytest.fixture(scope="module")
def config(tiny_checkpoint):
    return InternVLChatConfig.from_pretrained(tiny_checkpoint)


def llm_weights(checkpoint) -> dict:
    return load_state_dict(checkpoint, prefixes=("language_model.",), dtype=torch.float32, progress=False)


def make_runner(checkpoint, config, quantization=None, state_dict=None, **kw):
    return ModelRunner(config, state_dict if state_dict is not None else llm_weights(checkpoint), device="cpu",
                       dtype=torch.float32, block_size=16, num_blocks=64, quantization=quantization, **kw)


def requests(config, n=6, max_tokens=32):
    vocab = config.llm_config.vocab_size
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        ids = [1] + torch.randint(3, vocab - 10, (10 + 7 * i,), generator=g).tolist()
        out.append(Request(f"r{i}", ids, None, SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
    return out


def engine_of(runner, config, async_scheduling=None):
    return LLMEngine(runner, None, eos_token_id=2, image_context_token_id=config.llm_config.vocab_size - 1,
                     scheduler_config=SchedulerConfig(max_num_batched_tokens=512, watermark=0.0,
                                                      async_scheduling=async_scheduling))


def prefill_logits(runner, config, reqs=None) -> torch.Tensor:
    """(n, vocab) logits of the last prompt token of each request, all prefilled in one step."""
    engine = engine_of(runner, config)
    for r in reqs or requests(config):
        engine.add_request(r)
    return runner.compute_logits(engine.scheduler.schedule())


def greedy_tokens(runner, config) -> dict[str, list[int]]:
    return {k: [t for o in v for t in o.new_token_ids]
            for k, v in engine_of(runner, config).generate(requests(config)).items()}


@dataclass
class Agreement:
    """A runner against a reference on the tiny checkpoint: prefill logits (n, vocab) of both, their error,
    and the greedy tokens of both (6 prompts x 32 tokens)."""
    ref: torch.Tensor
    got: torch.Tensor
    err: LogitError
    ref_tokens: dict[str, list[int]]
    got_tokens: dict[str, list[int]]

    @property
    def same_sequences(self) -> int:
        return sum(self.ref_tokens[k] == self.got_tokens[k] for k in self.ref_tokens)

    @property
    def first_tokens_equal(self) -> bool:
        return all(self.ref_tokens[k][0] == self.got_tokens[k][0] for k in self.ref_tokens)

    def argmax_kept_where_clear(self) -> int:
        """Positions whose reference top-2 margin exceeds twice the largest error keep their argmax (asserted);
        returns how many such positions there are."""
        top2 = self.ref.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * self.err.max_abs
        assert torch.equal(self.ref.argmax(-1)[clear], self.got.argmax(-1)[clear])
        return int(clear.sum())


def agreement(reference, candidate, config, label: str, capsys) -> Agreement:
    """Compare two runners' prefill logits and greedy tokens; print the figures (the tests' measured values)."""
    ref, got = prefill_logits(reference, config), prefill_logits(candidate, config)
    a = Agreement(ref, got, compare_logits(ref, got), greedy_tokens(reference, config), greedy_tokens(candidate, config))
    positions = sum(len(v) for v in a.ref_tokens.values())
    matched = sum(x == y for k in a.ref_tokens for x, y in zip(a.ref_tokens[k], a.got_tokens[k]))
    with capsys.disabled():
        print(f"\n{label} (tiny checkpoint, greedy, 6 prompts x 32 tokens): {matched}/{positions} tokens equal, "
              f"{a.same_sequences}/6 sequences identical; prefill logits rel L2 {a.err.rel_l2:.4f}, "
              f"max abs {a.err.max_abs:.3f}, top-1 {a.err.top1_agreement:.2f}")
    return a


# ---- the module swap ------------------------------------------------------------------------------------

def test_int8_linear_equals_the_dequantized_matmul():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=False)
    q = Int8Linear.from_linear(linear)
    w_int8, scale = quantize_weight(linear.weight.detach())
    assert torch.equal(q.weight, w_int8) and torch.equal(q.scale, scale)
    x = torch.randn(2, 5, 96)
    want = x @ (w_int8.float() * scale[:, None]).t()
    torch.testing.assert_close(q(x), want, rtol=1e-5, atol=1e-5)
    assert q(x).shape == (2, 5, 40)
    # and close to the float linear: only the rounding of the weights differs
    assert ((q(x) - linear(x)).norm() / linear(x).norm()).item() < 1e-2


SWAPS = {"int8": (quantize_llama_int8_, Int8Linear, lambda m: m.weight.dtype == torch.int8),
         "fp8": (quantize_llama_fp8_, Fp8Linear, lambda m: m.weight_fp8.dtype == FP8)}


@pytest.mark.parametrize("quantization", sorted(SWAPS))
def test_quantize_swaps_the_four_projections_and_keeps_the_rest(tiny_checkpoint, config, quantization):
    quantize, cls, stored_quantized = SWAPS[quantization]
    model = load_llama(config, llm_weights(tiny_checkpoint), device="cpu", dtype=torch.float32)
    embed, lm_head, norm = model.model.embed_tokens.weight, model.lm_head.weight, model.model.norm.weight
    assert not is_quantized(model)
    assert quantize(model) is model and is_quantized(model)
    for layer in model.model.layers:
        for name in ENGINE_PROJECTIONS:
            parent = layer.self_attn if name in ("qkv_proj", "o_proj") else layer.mlp
            module = getattr(parent, name)
            assert isinstance(module, cls) and stored_quantized(module), name
            assert not getattr(module, "fast_accum", False), name  # the library's default; the server's: on
    swapped = sum(isinstance(m, cls) for m in model.modules())
    assert swapped == 4 * config.llm_config.num_hidden_layers
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is lm_head
    assert model.model.embed_tokens.weight is embed and model.model.norm.weight is norm
    with pytest.raises(ValueError, match=f"{quantization}: replaced 0 linears"):
        quantize(model)


def test_quantization_option_values():
    assert validate_quantization(None) is None and validate_quantization("") is None
    assert validate_quantization(" INT8 ") == "int8" and validate_quantization("FP8") == "fp8"
    with pytest.raises(ValueError, match="quantization must be one of int8, fp8"):
        validate_quantization("int4")
    model = nn.Linear(2, 2)
    assert quantize_model_(model, None) is model and quantize_model_(model, "") is model


def test_engine_options_quantization_parameter():
    from internvl_serve.serving.llm_engine import EngineOptions

    assert EngineOptions().quantization == ""
    assert EngineOptions.from_parameters({"quantization": "int8"}).quantization == "int8"
    assert EngineOptions.from_parameters({"quantization": " Int8 "}).quantization == "int8"
    assert EngineOptions.from_parameters({"quantization": " FP8"}).quantization == "fp8"
    assert EngineOptions.from_parameters({"quantization": ""}).quantization == ""
    with pytest.raises(ValueError, match="quantization must be one of int8, fp8"):
        EngineOptions.from_parameters({"quantization": "int4"})


def test_fp8_fast_accumulation_parameter_reaches_every_projection(tiny_checkpoint, config):
    """fp8_fast_accum: every Fp8Linear the runner made accumulates fast (on the CPU the product is the same
    float32 one, so the logits equal the exact fp8's); on by default with quantization fp8, "false" turns
    it off; refused without quantization fp8."""
    from internvl_serve.serving.llm_engine import EngineOptions

    assert EngineOptions().fp8_fast_accum is False
    assert EngineOptions.from_parameters({"quantization": "int8"}).fp8_fast_accum is False
    assert EngineOptions.from_parameters({"quantization": "fp8"}).fp8_fast_accum is True
    assert EngineOptions.from_parameters({"quantization": "fp8", "fp8_fast_accum": "true"}).fp8_fast_accum
    assert EngineOptions.from_parameters({"quantization": "fp8", "fp8_fast_accum": "false"}).fp8_fast_accum is False
    for quantization in ("", "int8"):
        with pytest.raises(ValueError, match="'fp8_fast_accum': true needs quantization fp8"):
            EngineOptions.from_parameters({"quantization": quantization, "fp8_fast_accum": "true"})
    fast = make_runner(tiny_checkpoint, config, "fp8", fp8_fast_accum=True)
    exact = make_runner(tiny_checkpoint, config, "fp8")
    flags = [[m.fast_accum for m in r.model.modules() if isinstance(m, Fp8Linear)] for r in (fast, exact)]
    assert len(flags[0]) == 4 * config.llm_config.num_hidden_layers and all(flags[0]) and not any(flags[1])
    torch.testing.assert_close(prefill_logits(fast, config), prefill_logits(exact, config), rtol=0, atol=0)


def test_fp8_triton_max_rows_parameter_reaches_every_projection(tiny_checkpoint, config):
    """fp8_triton_max_rows: every Fp8Linear the runner made sends products of up to that many rows to the
    Triton W8A8 kernel on CUDA (on the CPU the product is the same float32 one: the logits do not move);
    by default 64 with quantization fp8 and 0 without, at most 64, refused without quantization fp8."""
    from internvl_serve.serving.llm_engine import EngineOptions

    assert EngineOptions().fp8_triton_max_rows == 0 and EngineOptions(quantization="int8").fp8_triton_max_rows == 0
    assert EngineOptions(quantization="fp8").fp8_triton_max_rows == 64  # the default with fp8
    assert EngineOptions.from_parameters({"quantization": "fp8", "fp8_triton_max_rows": "0"}).fp8_triton_max_rows == 0
    assert EngineOptions.from_parameters({"quantization": "fp8", "fp8_triton_max_rows": "64"}).fp8_triton_max_rows == 64
    for bad in ("65", "-1", "x"):
        with pytest.raises(ValueError, match=f"parameter 'fp8_triton_max_rows': '{bad}' is not a valid int"):
            EngineOptions.from_parameters({"quantization": "fp8", "fp8_triton_max_rows": bad})
    with pytest.raises(ValueError, match="'fp8_triton_max_rows' needs quantization fp8"):
        EngineOptions.from_parameters({"quantization": "int8", "fp8_triton_max_rows": "32"})
    triton_rows = make_runner(tiny_checkpoint, config, "fp8", fp8_triton_max_rows=64)
    cublas = make_runner(tiny_checkpoint, config, "fp8")
    rows = [[m.triton_max_rows for m in r.model.modules() if isinstance(m, Fp8Linear)] for r in (triton_rows, cublas)]
    assert rows[0] == [64] * 4 * config.llm_config.num_hidden_layers and set(rows[1]) == {0}
    assert "Triton W8A8 up to 64 rows" in repr(triton_rows.model.model.layers[0].mlp.down_proj)
    torch.testing.assert_close(prefill_logits(triton_rows, config), prefill_logits(cublas, config), rtol=0, atol=0)


@pytest.mark.parametrize("quantization", sorted(SWAPS))
def test_llm_service_passes_the_parameter_to_the_runner(tiny_checkpoint, quantization):
    from internvl_serve.serving.llm import LLMService

    service = LLMService(tiny_checkpoint, device="cpu",
                         engine_options={"quantization": quantization, "num_blocks": "64"})
    try:
        runner = service.engine.runner
        assert runner.quantization == quantization and is_quantized(runner.model)
        assert isinstance(runner.model.model.layers[0].mlp.down_proj, SWAPS[quantization][1])
    finally:
        service.shutdown()


# ---- the runner, on the tiny checkpoint ----------------------------------------------------------------

def test_runner_int8_equals_the_model_with_dequantized_weights(tiny_checkpoint, config):
    """The whole int8 path (module swap inside the runner, Int8Linear's CPU matmul) against an fp32 runner
    whose projection weights are replaced by w_int8 * scale: the same numbers up to fp32 rounding."""
    weights = llm_weights(tiny_checkpoint)
    dequantized = dict(weights)
    for key, w in weights.items():
        if any(f".{name}.weight" in key for name in LLAMA_PROJECTIONS):
            w_int8, scale = quantize_weight(w)
            dequantized[key] = w_int8.float() * scale[:, None]
    given = dict(weights)
    int8 = make_runner(tiny_checkpoint, config, "int8", state_dict=given)
    assert int8.quantization == "int8" and is_quantized(int8.model)
    assert given == {}  # emptied so the float weights it shares with the model could be freed
    reference = make_runner(tiny_checkpoint, config, state_dict=dequantized)
    torch.testing.assert_close(prefill_logits(int8, config), prefill_logits(reference, config), rtol=1e-4, atol=1e-4)
    assert greedy_tokens(int8, config) == greedy_tokens(reference, config)


def test_runner_int8_logits_close_to_fp32_and_greedy_agreement(tiny_checkpoint, config, capsys):
    fp32 = make_runner(tiny_checkpoint, config)
    int8 = make_runner(tiny_checkpoint, config, "int8")
    assert fp32.quantization is None and not is_quantized(fp32.model)
    a = agreement(fp32, int8, config, "int8 vs fp32", capsys)
    assert a.err.rel_l2 < 0.02 and a.err.max_rel < 0.02, a.err          # measured: 0.53% and 0.52%
    assert a.argmax_kept_where_clear() >= 4
    assert a.same_sequences >= 4      # measured 5/6: one prompt's first two candidates are 0.06 apart


def test_runner_fp8_logits_close_to_fp32(tiny_checkpoint, config, capsys):
    """fp8 rounds the activations too (per token) and e4m3 keeps 3 mantissa bits: a few per cent of logit
    error on the tiny checkpoint (int8's is ~0.5 %), argmax kept wherever the top-2 margin is clear."""
    fp32 = make_runner(tiny_checkpoint, config)
    fp8 = make_runner(tiny_checkpoint, config, "fp8")
    assert fp8.quantization == "fp8" and is_quantized(fp8.model)
    a = agreement(fp32, fp8, config, "fp8 vs fp32", capsys)
    assert 0 < a.err.rel_l2 < 0.06 and a.err.max_rel < 0.06, a.err          # measured: 2.9% and 3.1%
    a.argmax_kept_where_clear()
    assert a.first_tokens_equal  # measured: 129/192 tokens, every first token equal


def test_fp8_linear_takes_rows_quantized_already():
    """Fp8Rows (what a fused norm hands over) give what the rows themselves give, above one row; one row
    quantized already still takes the FP8 product (the weight-only GEMV needs the rows unquantized)."""
    from internvl_serve.kernels.fp8_linear import Fp8Rows, quantize_rows_fp8_torch, scaled_product

    torch.manual_seed(0)
    linear = Fp8Linear.from_linear(nn.Linear(64, 48))
    for rows in (2, 5):
        x = torch.randn(rows, 64)
        assert torch.equal(linear(Fp8Rows(*quantize_rows_fp8_torch(x), x.dtype)), linear(x))
    x = torch.randn(1, 64)
    q, scale = quantize_rows_fp8_torch(x)
    want = scaled_product(q, scale, linear.weight_fp8, linear.weight_scale, x.dtype) + linear.bias
    assert torch.equal(linear(Fp8Rows(q, scale, x.dtype)), want)


def test_merged_fp8_projection_computed_by_parts_equals_the_whole():
    """The CPU path computes a merged projection part by part (llama.split_linear): with per-channel weight
    scales and one scale per activation row, the parts are the whole's columns."""
    from internvl_serve.engine.llama import split_linear

    torch.manual_seed(0)
    merged = Fp8Linear.from_linear(nn.Linear(64, 3 * 32, bias=False))
    x = torch.randn(7, 64)
    parts = split_linear(merged, x, [32, 32, 32])
    torch.testing.assert_close(torch.cat(parts, dim=-1), merged(x), rtol=1e-6, atol=1e-6)


# ---- GPU ---------------------------------------------------------------------------------------------------

def cuda_runner(checkpoint, config, quantization, graphs: bool, dtype, **kw) -> ModelRunner:
    weights = load_state_dict(checkpoint, prefixes=("language_model.",), dtype=dtype, device="cuda", progress=False)
    r = ModelRunner(config, weights, device="cuda", dtype=dtype, block_size=16, num_blocks=64,
                    quantization=quantization, cuda_graphs=graphs, **kw)
    assert (r.decode_graphs is not None) == graphs and is_quantized(r.model) == (quantization is not None)
    return r


def decode_step_logits(runner, config) -> torch.Tensor:
    """The logits of a pure-decode step of 6 sequences (replayed through a graph when the runner has them),
    after their prefills. Synchronous steps: with overlap (the default on CUDA) the first tokens would
    still be pending, placeholders that only the running step's tokens resolve."""
    engine = engine_of(runner, config, async_scheduling=False)
    for req in requests(config, max_tokens=4):
        engine.add_request(req)
    engine.step()                                   # the prefills (eager) and the first tokens
    batch = engine.scheduler.schedule()
    assert len(batch.seqs) == 6 and all(s.num_tokens == 1 for s in batch.seqs)
    return runner.compute_logits(batch).float().clone()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_gpu_int8_cuda_graph_decode_equals_eager_and_is_close_to_bf16(tiny_checkpoint, config):
    """Decode replays captured graphs of the int8 Triton kernels: in fp32 (the kernels' fp32 paths) greedy
    tokens equal the eager int8 path; in bf16 the int8 logits stay close to bf16 cuBLAS's, and a decode
    step replayed through the graph close to the same step run eagerly (reference attention)."""
    assert greedy_tokens(cuda_runner(tiny_checkpoint, config, "int8", True, torch.float32), config) == \
        greedy_tokens(cuda_runner(tiny_checkpoint, config, "int8", False, torch.float32), config)
    # bf16: one prompt of 11 tokens (M = 11: the Triton matrix kernel) against bf16 cuBLAS; then one
    # pure-decode step replayed through the int8 graph against the same step run eagerly
    short = requests(config, n=1)
    bf16, int8 = (cuda_runner(tiny_checkpoint, config, q, False, torch.bfloat16) for q in (None, "int8"))
    err = compare_logits(prefill_logits(bf16, config, short), prefill_logits(int8, config, short))
    assert err.rel_l2 < 0.05, err
    decode = {graphs: decode_step_logits(cuda_runner(tiny_checkpoint, config, "int8", graphs, torch.bfloat16), config)
              for graphs in (True, False)}
    err = compare_logits(decode[False], decode[True])
    assert err.rel_l2 < 0.05, err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs FP8 tensor cores (compute capability 8.9+)")
@torch.no_grad()
@pytest.mark.parametrize("fast_accum", [False, True], ids=["exact accumulation", "fast accumulation"])
def test_gpu_fp8_cuda_graph_decode_equals_eager_and_is_close_to_bf16(tiny_checkpoint, config, fast_accum):
    """fp8 on FP8 tensor cores: a decode step replayed through the captured graph (the Triton activation
    quantizer and _scaled_mm in it) gives the logits of the same step run eagerly, up to the summation
    order of a padded batch's GEMM; its prefill logits stay close to bf16's. With fp8_fast_accum too."""
    fp8 = functools.partial(cuda_runner, tiny_checkpoint, config, "fp8", fp8_fast_accum=fast_accum)
    err = compare_logits(prefill_logits(cuda_runner(tiny_checkpoint, config, None, False, torch.bfloat16), config),
                         prefill_logits(fp8(False, torch.bfloat16), config))
    assert err.rel_l2 < 0.06, err
    decode = {graphs: decode_step_logits(fp8(graphs, torch.float32), config) for graphs in (True, False)}
    err = compare_logits(decode[False], decode[True])
    assert err.rel_l2 < 1e-3 and err.top1_agreement == 1.0, err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs FP8 tensor cores (compute capability 8.9+)")
@torch.no_grad()
def test_gpu_fp8_triton_w8a8_decode_equals_scaled_mm(tiny_checkpoint, config):
    """fp8_triton_max_rows=64: a decode step replayed through the captured graph with the Triton W8A8
    kernel gives the logits of the same step with torch._scaled_mm up to the summation order of the same
    e4m3 products: close, and the same top token for every sequence. Not bit-close: each layer quantizes
    its input rows to e4m3 again, so an order difference that moves a value across a rounding boundary
    becomes a whole e4m3 step (1/16) in that element of the next product (measured on the H100: 0.84 % of
    the logits' norm; the products alone are within 0.16-0.23 % of float64 in bf16, bench/kernels_bench.py
    --only w8a8). Whole greedy generations are not compared: the tiny random model's near-ties let such
    differences pick another token some steps in (seen on the H100), and the texts part from there."""
    fp8 = functools.partial(cuda_runner, tiny_checkpoint, config, "fp8", True, torch.float32)
    decode = {rows: decode_step_logits(fp8(fp8_triton_max_rows=rows), config) for rows in (0, 64)}
    err = compare_logits(decode[0], decode[64])
    assert err.rel_l2 < 0.02 and err.top1_agreement == 1.0, err
