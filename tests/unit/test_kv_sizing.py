"""kv_cache.auto_num_blocks' arithmetic on the CPU, with CUDA's memory queries faked: the device memory in
use counts only where it exceeds this process's own plus the vision reserve (the vision model may load
before or after the llm sizes its pool), and the figures it used are reported for the load's log line.
(The same sizing on a real GPU: test_engine_gpu.py.)"""
from __future__ import annotations

import torch

from internvl_serve.engine import kv_cache
from internvl_serve.engine.llama import load_llama
from test_engine_llama import tiny_hf

GIB = 2**30


def sized(monkeypatch, *, in_use_gib: float) -> tuple[int, dict, int]:
    hf = tiny_hf(kv_heads=2)
    model = load_llama(hf.config, hf.state_dict(), device="cpu", dtype=torch.float32)
    fake = {"synchronize": lambda *a: None, "empty_cache": lambda: None, "reset_peak_memory_stats": lambda *a: None,
            "memory_allocated": lambda *a: 0, "max_memory_allocated": lambda *a: GIB // 2,
            "mem_get_info": lambda *a: (int((80 - in_use_gib) * GIB), 80 * GIB),
            "memory_reserved": lambda *a: 10 * GIB}
    for name, f in fake.items():
        monkeypatch.setattr(torch.cuda, name, f)
    report = {}
    n = kv_cache.auto_num_blocks(model, block_size=16, dtype=torch.float32, device=torch.device("cpu"),
                                 utilization=0.9, max_num_batched_tokens=32, max_num_seqs=4,
                                 reserved_bytes=13 * GIB, report=report)
    return n, report, kv_cache.bytes_per_block(model.local_args, 16, torch.float32)


def test_the_device_memory_in_use_counts_only_above_own_plus_the_vision_reserve(monkeypatch):
    own = 10 * GIB + kv_cache.CUDA_CONTEXT_BYTES
    before, report, per_block = sized(monkeypatch, in_use_gib=20)   # vision not loaded yet: own + reserve count
    assert report == {"total": 80 * GIB, "device_in_use": 20 * GIB, "own": own, "reserved": 13 * GIB,
                      "activations": GIB // 2}
    same, _, _ = sized(monkeypatch, in_use_gib=(own + 13 * GIB) / GIB)  # loaded, as large as its reserve
    after, report, _ = sized(monkeypatch, in_use_gib=30)  # loaded, 30 GiB in use: above own + reserve
    assert same == before and report["device_in_use"] == 30 * GIB
    assert abs((before - after) * per_block - (30 * GIB - own - 13 * GIB)) <= per_block
