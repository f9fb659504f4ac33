"""The fused decode forward (what the CUDA graphs capture) against the eager step, on CPU: the kernels'
torch fallbacks run the same wiring (RoPE at the sequence positions, K/V written to the right slots,
attention over each sequence's context length), so a wiring mistake shows here without a GPU."""
from __future__ import annotations

import numpy as np
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from internvl_serve.engine import LLMEngine, ModelRunner, Request, SamplingParams, SchedulerConfig
from internvl_serve.engine.decode_graphs import decode_forward

EOS = 2


@torch.no_grad()
def test_decode_forward_equals_eager_step_logits():
    torch.manual_seed(0)
    cfg = HFLlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                        rms_norm_eps=1e-5, eos_token_id=EOS, pad_token_id=0)
    hf = LlamaForCausalLM(cfg).eval()
    for p in hf.parameters():
        p.normal_(0, 0.08) if p.ndim == 2 else p.uniform_(0.8, 1.2)
    runner = ModelRunner(hf.config, hf.state_dict(), device="cpu", dtype=torch.float32, block_size=4,
                         num_blocks=64, cuda_graphs=False)
    engine = LLMEngine(runner, None, eos_token_id=EOS, scheduler_config=SchedulerConfig(max_num_batched_tokens=256))
    for i, n in enumerate((5, 11, 17)):
        ids = torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(i)).tolist()
        engine.add_request(Request(f"r{i}", ids, None, SamplingParams(max_tokens=8, ignore_eos=True)))
    for _ in range(3):                                  # prefill, then two decode steps
        engine.step()
    batch = engine.scheduler.schedule()
    seqs = batch.seqs
    assert len(seqs) == 3 and all(s.num_tokens == 1 for s in seqs)
    eager = runner.compute_logits(batch)

    bs = runner.block_size
    positions = np.array([s.start for s in seqs])
    tokens = np.array([s.seq.token_ids[s.start] for s in seqs])
    tables = runner._tables.table[runner._tables.rows_for([s.seq for s in seqs])]
    slots = tables[np.arange(3), positions // bs].astype(np.int64) * bs + positions % bs
    t = lambda a, dtype=torch.long: torch.from_numpy(np.ascontiguousarray(a)).to(dtype)  # noqa: E731
    fused = decode_forward(runner.model, t(tokens), t(positions), t(slots), t(tables, torch.int32),
                           t(positions + 1, torch.int32), runner.kv_caches)
    assert torch.allclose(fused, eager, atol=1e-4, rtol=1e-4), (fused - eager).abs().max()
