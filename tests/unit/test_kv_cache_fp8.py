"""The llm's opt-in e4m3 KV cache (`kv_cache_dtype: fp8`): the option, the values the cache stores
(saturating, round to nearest even), the KV write on the CPU and the reference attention over it, the runner
on the tiny checkpoint against the model-dtype cache (CPU), and (GPU, marked) a captured decode step over
it against the eager one. The Triton kernels' own checks over an e4m3 cache are in test_kernels.py and
test_prefill_attention.py."""
from __future__ import annotations

import pytest
import torch
from test_quantize import agreement, cuda_runner, decode_step_logits, make_runner, prefill_logits

from internvl_serve.config import InternVLChatConfig
from internvl_serve.engine.attention import build_attention_metadata, sdpa_paged_attention
from internvl_serve.engine.kv_cache import cache_dtype_of, validate_kv_cache_dtype
from internvl_serve.kernels import compare_logits
from internvl_serve.kernels.paged_attention import cache_rows, to_cache_dtype, write_kv

E4M3 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def config(tiny_checkpoint):
    return InternVLChatConfig.from_pretrained(tiny_checkpoint)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def test_option_values():
    from internvl_serve.serving.llm_engine import EngineOptions

    for value in (None, "", "auto", " AUTO ", "model"):
        assert validate_kv_cache_dtype(value) == "" and cache_dtype_of(value, torch.bfloat16) == torch.bfloat16
    assert validate_kv_cache_dtype(" FP8 ") == "fp8" and cache_dtype_of("fp8", torch.bfloat16) == E4M3
    with pytest.raises(ValueError, match="kv_cache_dtype 'int8': expected one of 'auto'.*'fp8'"):
        validate_kv_cache_dtype("int8")
    assert EngineOptions().kv_cache_dtype == ""
    assert EngineOptions.from_parameters({"kv_cache_dtype": "Fp8"}).kv_cache_dtype == "fp8"
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp16'"):
        EngineOptions.from_parameters({"kv_cache_dtype": "fp16"})


def test_values_saturate_and_round_to_nearest_even():
    x = torch.tensor([1000.0, -1000.0, 448.0, 0.3, 17.0, 19.0, 0.0, -2.0 ** -9, float("nan")])
    got = to_cache_dtype(x.bfloat16(), E4M3)
    assert got.dtype == E4M3
    # 17 and 19 are ties between e4m3 neighbours 16/18 and 18/20: the even mantissa wins
    expected = torch.tensor([448.0, -448.0, 448.0, 0.3125, 16.0, 20.0, 0.0, -2.0 ** -9])
    assert torch.equal(got[:-1].float(), expected) and got[-1].float().isnan()
    same = torch.randn(4, dtype=torch.bfloat16)
    assert to_cache_dtype(same, torch.bfloat16) is same  # the model dtype: no copy


def test_write_and_reference_attention_over_an_e4m3_cache():
    """The KV write of every step (kernels.write_kv; its torch path on the CPU, through the cache's bytes)
    stores each new token's to_cache_dtype values at its slot and leaves every other slot alone, and the
    reference attention over the e4m3 cache equals it over a float32 copy of the same values."""
    torch.manual_seed(0)
    blocks, bs, Hkv, D = 9, 4, 2, 8
    k_cache, v_cache = (torch.zeros(blocks, bs, Hkv, D, dtype=E4M3) for _ in range(2))
    q_lens, ctx_lens = [5, 1, 7], [0, 6, 2]
    tables = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]], dtype=torch.int32)
    # the cached context, then the step's keys written by the engine's write
    for b, n in enumerate(ctx_lens):
        t = torch.arange(n)
        for cache in (k_cache, v_cache):
            cache.view(torch.uint8)[tables[b, t // bs].long(), t % bs] = as_bytes(to_cache_dtype(
                torch.randn(n, Hkv, D) * 4, E4M3))
    meta, _ = build_attention_metadata(q_lens, ctx_lens, tables, bs, prefill_kernel=False)
    k, v = torch.randn(2, sum(q_lens), Hkv, D) * 300  # some past 448
    before_k, before_v = as_bytes(k_cache).clone(), as_bytes(v_cache).clone()
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    slots = meta.slot_mapping.long()
    for cache, new, before in ((k_cache, k, before_k), (v_cache, v, before_v)):
        assert torch.equal(as_bytes(cache_rows(cache.view(-1, Hkv, D), slots)), as_bytes(to_cache_dtype(new, E4M3)))
        untouched = torch.ones(blocks * bs, dtype=torch.bool)
        untouched[slots] = False
        assert torch.equal(as_bytes(cache).view(blocks * bs, -1)[untouched], before.view(blocks * bs, -1)[untouched])
    assert k_cache.float().abs().max() == 448
    q = torch.randn(sum(q_lens), 4, D)
    out = sdpa_paged_attention(q, k_cache, v_cache, meta, D ** -0.5)
    assert torch.isfinite(out).all()
    assert torch.equal(out, sdpa_paged_attention(q, k_cache.float(), v_cache.float(), meta, D ** -0.5))


def test_runner_with_an_e4m3_cache_against_the_model_dtype(tiny_checkpoint, config, capsys):
    full = make_runner(tiny_checkpoint, config)
    fp8 = make_runner(tiny_checkpoint, config, kv_cache_dtype="fp8")
    assert fp8.kv_cache.dtype == E4M3 and all(k.dtype == v.dtype == E4M3 for k, v in fp8.kv_caches)
    assert fp8.cache_info()["dtype"] == "float8_e4m3fn" and full.cache_info()["dtype"] == "float32"
    assert fp8.bytes_per_block * 4 == full.bytes_per_block  # float32 on the CPU: a quarter of the bytes
    a = agreement(full, fp8, config, "e4m3 KV cache vs float32", capsys)
    assert 0 < a.err.rel_l2 < 0.03, a.err                  # measured 0.9 %
    assert a.first_tokens_equal and a.same_sequences >= 4  # measured 192/192 tokens, 6/6 sequences


def test_llm_service_passes_the_parameter_to_the_runner(tiny_checkpoint):
    from internvl_serve.serving.llm import LLMService

    service = LLMService(tiny_checkpoint, device="cpu", engine_options={"kv_cache_dtype": "fp8", "num_blocks": "64"})
    try:
        assert service.engine.runner.cache_dtype == E4M3 and service.engine.runner.kv_cache_dtype == "fp8"
    finally:
        service.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_gpu_e4m3_cache_graph_decode_equals_eager_and_is_close_to_bf16(tiny_checkpoint, config):
    """bf16 model, e4m3 cache: a decode step replayed through the captured graph (Triton write and decode
    attention) against the same step run eagerly (torch write, the varlen kernel); prefill logits close to
    those over a bf16 cache."""
    err = compare_logits(prefill_logits(cuda_runner(tiny_checkpoint, config, None, False, torch.bfloat16), config),
                         prefill_logits(cuda_runner(tiny_checkpoint, config, None, False, torch.bfloat16,
                                                    kv_cache_dtype="fp8"), config))
    assert err.rel_l2 < 0.05, err
    decode = {graphs: decode_step_logits(cuda_runner(tiny_checkpoint, config, None, graphs, torch.bfloat16,
                                                     kv_cache_dtype="fp8"), config)
              for graphs in (True, False)}
    err = compare_logits(decode[False], decode[True])
    assert err.rel_l2 < 1e-2 and err.top1_agreement == 1.0, err
