"""Tensor parallelism on the CPU: two real processes (rank 0 here, rank 1 a `tp_worker` child) joined by
gloo, the tiny checkpoint in fp32. The engine over the 2-rank runner gives the same tokens as over one
process: greedy and seeded sampling, images, chunked prefill, requests joining mid-flight."""
from __future__ import annotations

import pytest
import torch

from internvl_serve.checkpoint import load_state_dict
from internvl_serve.config import InternVLChatConfig
from internvl_serve.engine import LLMEngine, ModelRunner, Request, SamplingParams, SchedulerConfig
from internvl_serve.engine.llama import LlamaArgs
from internvl_serve.engine.parallel import check_divisible, local_args, shard_state_dict
from internvl_serve.engine.tp_worker import start_workers
from internvl_serve.tiny import make_tiny_checkpoint

OPTIONS = dict(block_size=4, num_blocks=96, max_num_batched_tokens=24, max_num_seqs=8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tp") / "tiny", fmt="bin", seed=3)


def requests(config) -> list[Request]:
    g = torch.Generator().manual_seed(11)
    hidden = config.llm_config.hidden_size
    out = []
    for i in range(6):
        n_img = 8 if i % 2 else 0
        text = torch.randint(5, 90, (10 + 3 * i,), generator=g).tolist()
        ids = [1] + text[:5] + [92] * n_img + text[5:]
        rows = torch.randn(n_img, hidden, generator=g) * 0.5 if n_img else None
        sampling = (SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True) if i < 3 else
                    SamplingParams(max_tokens=14, temperature=0.9, top_p=0.9, seed=100 + i, ignore_eos=True))
        out.append(Request(f"r{i}", ids, rows, sampling))
    return out


def generate(runner, reqs, overlap=False) -> dict[str, list[int]]:
    """Three requests first, the rest joining after two steps (in-flight batching); tokens per request."""
    engine = LLMEngine(runner, None, eos_token_id=2, image_context_token_id=92,
                       scheduler_config=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=24,
                                                        enable_prefix_caching=True, watermark=0.0,
                                                        async_scheduling=overlap))
    tokens: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    for r in reqs[:3]:
        engine.add_request(r)
    for step in range(400):
        if step == 2:
            for r in reqs[3:]:
                engine.add_request(r)
        for o in engine.step():
            tokens[o.request_id].extend(o.new_token_ids)
        if step > 2 and not engine.has_unfinished():
            break
    return tokens


@pytest.mark.parametrize("kv_cache_dtype", ["", "fp8"])
def test_two_ranks_give_the_tokens_of_one_process(checkpoint, kv_cache_dtype, capfd):
    # fp8: every rank stores its heads' K/V in e4m3, as the one process does (the workers get the option)
    config = InternVLChatConfig.from_pretrained(checkpoint)
    state_dict = load_state_dict(checkpoint, prefixes=("language_model.",), dtype=torch.float32, progress=False)
    reqs = requests(config)
    options = dict(OPTIONS, kv_cache_dtype=kv_cache_dtype)

    single = generate(ModelRunner(config, state_dict, device="cpu", dtype=torch.float32, **options), reqs)
    assert all(len(t) == 14 for t in single.values())

    group = start_workers(checkpoint, devices=["cpu", "cpu"], dtype="float32", runner_options=options,
                          host_threads=1, timeout_s=120)
    runner = None
    try:
        runner = ModelRunner(config, state_dict, device="cpu", dtype=torch.float32, tp=group.tp, **options)
        args = runner.model.local_args
        assert (args.num_attention_heads, args.num_key_value_heads) == (
            config.llm_config.num_attention_heads // 2, config.llm_config.num_key_value_heads // 2)
        assert runner.kv_cache.shape[4] == config.llm_config.num_key_value_heads // 2
        assert runner.kv_cache.dtype == (torch.float8_e4m3fn if kv_cache_dtype else torch.float32)
        # overlap scheduling asked for: the channel sends host token ids, so each step is resolved first
        assert not runner.supports_overlap
        parallel = generate(runner, reqs, overlap=True)
    finally:
        group.close(runner, timeout_s=60)
    assert [p.returncode for p in group.processes] == [0]
    assert parallel == single
    assert "tp_worker rank 1: 1 host threads" in capfd.readouterr().err  # the llm's host_threads reach it


def test_shards_split_heads_and_mlp_and_rejoin():
    args = LlamaArgs(vocab_size=10, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    g = torch.Generator().manual_seed(0)
    w = {"model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
         "model.layers.0.self_attn.o_proj.weight": torch.randn(8, 8, generator=g),
         "model.layers.0.mlp.down_proj.weight": torch.randn(8, 12, generator=g),
         "model.norm.weight": torch.randn(8, generator=g)}
    shards = [shard_state_dict(w, r, 2) for r in range(2)]
    q = "model.layers.0.self_attn.q_proj.weight"
    o = "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(torch.cat([s[q] for s in shards], 0), w[q])
    assert torch.equal(torch.cat([s[o] for s in shards], 1), w[o])
    assert torch.equal(shards[1]["model.norm.weight"], w["model.norm.weight"])  # replicated
    assert local_args(args, 2).num_key_value_heads == 1 and local_args(args, 2).intermediate_size == 6
    with pytest.raises(ValueError, match="does not divide num_key_value_heads 2"):
        check_divisible(args, 4)


def test_ranks_read_real_checkpoints_on_the_cpu_and_random_ones_on_the_device(checkpoint, tmp_path):
    from internvl_serve.engine.parallel import load_device
    from internvl_serve.random_weights import make_random_checkpoint

    assert load_device(checkpoint, "cuda:1", 2) == "cpu"        # mmapped; only the slice goes to the GPU
    assert load_device(checkpoint, "cuda:0", 1) == "cuda:0"     # one process: straight to the device
    random = make_random_checkpoint(tmp_path / "random", tokenizer_from=checkpoint)
    assert load_device(random, "cuda:1", 2) == "cuda:1"         # drawn on the device
