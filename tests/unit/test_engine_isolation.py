"""KV isolation: values left in the paged KV cache by earlier requests (NaN included: a request whose
image rows were NaN, before the engine refused those) never reach another request's tokens.

A batch gathers as many keys for each sequence as its longest one has, so a shorter sequence reads
slots of free blocks or of other requests; masking those by multiplication or an additive -inf leaks
NaN (0 * NaN = NaN). Here every slot of the cache starts as NaN; the requests' tokens must still equal
the clean run's. The CPU test runs the reference SDPA path; the GPU variant also runs the CUDA-graph
decode with the paged kernel (run it on the lent GPU)."""
from __future__ import annotations

import pytest
import torch

from internvl_serve.engine import InvalidRequest, LLMEngine, ModelRunner, Request, SamplingParams, SchedulerConfig

from test_engine_generate import IMG, EOS, hf, make_request, run_staggered, tokens_of  # noqa: F401  (fixture)


def engine(hf, device="cpu", dtype=torch.float32):
    runner = ModelRunner(hf.config, hf.state_dict(), device=device, dtype=dtype, block_size=4,
                         num_blocks=64)
    return LLMEngine(runner, None, eos_token_id=EOS, image_context_token_id=IMG,
                     scheduler_config=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16,
                                                      enable_prefix_caching=False, watermark=0.0))


def batch():
    """Sequences of different lengths (short ones read past their end), images and text, joining late."""
    return [make_request("long", 30, n_img=8, data=1, max_tokens=10),
            make_request("short", 3, data=2, max_tokens=10),
            make_request("mid", 11, n_img=4, data=3, max_tokens=10),
            make_request("late", 5, data=4, max_tokens=10)]


def run(hf, device, poison: bool) -> dict[str, list[int]]:
    e = engine(hf, device)
    if poison:
        e.runner.kv_cache.fill_(float("nan"))  # every block is free: what a NaN request would leave behind
    results = run_staggered(e, batch(), join_at=[0, 0, 1, 4])
    return {rid: tokens_of(outs) for rid, outs in results.items()}


def test_nan_in_free_kv_blocks_does_not_reach_other_requests(hf):
    clean = run(hf, "cpu", poison=False)
    assert run(hf, "cpu", poison=True) == clean


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nan_in_free_kv_blocks_does_not_reach_other_requests_on_cuda(hf):
    hf_cuda = hf.to("cuda")
    try:
        clean = run(hf_cuda, "cuda", poison=False)
        assert run(hf_cuda, "cuda", poison=True) == clean
    finally:
        hf.to("cpu")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_image_rows_are_refused(hf, value):
    r = make_request("bad", 6, n_img=4, data=5)
    r.image_embeds[2, 7] = value
    with pytest.raises(InvalidRequest, match="image_embeds must be finite"):
        engine(hf).add_request(r)



def test_float32_image_rows_beyond_a_bfloat16_engine_s_range_are_refused(hf):
    """3.4e38 is a float32 value but infinite in bfloat16: the engine would make it infinity and NaN."""
    r = make_request("big", 6, n_img=4, data=5)
    r.image_embeds[2, 7] = 3.4e38
    engine(hf).validate_request(r)                            # a float32 engine takes it
    with pytest.raises(InvalidRequest, match=r"image_embeds must be finite: .* beyond ±3\.39e\+38"):
        engine(hf, dtype=torch.bfloat16).add_request(r)
