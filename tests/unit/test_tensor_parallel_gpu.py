"""Tensor parallelism on two GPUs (NCCL; skipped with fewer): rank 1 is a real `tp_worker` process on
cuda:1. The engine over the 2-rank runner, with decode CUDA graphs that capture the all-reduces, gives
the tokens of one process on cuda:0 (fp32: same math, only the summation order of o_proj/down_proj
differs)."""
from __future__ import annotations

import pytest
import torch

from internvl_serve.checkpoint import load_state_dict
from internvl_serve.config import InternVLChatConfig
from internvl_serve.engine import ModelRunner
from internvl_serve.engine.tp_worker import start_workers
from test_tensor_parallel import OPTIONS, checkpoint, generate, requests  # noqa: F401  (checkpoint: fixture)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_two_gpus_give_the_tokens_of_one(checkpoint, graphs):  # noqa: F811
    options = dict(OPTIONS, cuda_graphs=graphs)
    config = InternVLChatConfig.from_pretrained(checkpoint)
    state_dict = load_state_dict(checkpoint, prefixes=("language_model.",), dtype=torch.float32, device="cuda:0",
                                 progress=False)
    reqs = requests(config)
    single_runner = ModelRunner(config, state_dict, device="cuda:0", dtype=torch.float32, **options)
    assert (single_runner.decode_graphs is not None) == graphs
    single = generate(single_runner, reqs)
    del single_runner
    group = start_workers(checkpoint, devices=["cuda:0", "cuda:1"], dtype="float32", runner_options=options,
                          timeout_s=300)
    runner = None
    try:
        runner = ModelRunner(config, state_dict, device="cuda:0", dtype=torch.float32, tp=group.tp, **options)
        assert (runner.decode_graphs is not None) == graphs
        parallel = generate(runner, reqs)
    finally:
        group.close(runner, timeout_s=120)
    assert [p.returncode for p in group.processes] == [0]
    agree = sum(a == b for r in single for a, b in zip(single[r], parallel[r]))
    assert parallel == single, f"{agree} of {sum(map(len, single.values()))} tokens agree"
