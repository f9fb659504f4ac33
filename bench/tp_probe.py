"""Probe of the tensor-parallel plumbing on N GPUs, stage by stage, each with a deadline: the TCP
rendezvous, an eager NCCL all-reduce, and one captured in a CUDA graph and replayed.

    python bench/tp_probe.py            # spawns rank 1.. itself
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def say(rank, msg):
    print(f"[rank {rank} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(rank: int, world: int, init: str) -> None:
    import torch
    import torch.distributed as dist

    from internvl_serve.engine.parallel import TensorParallel

    torch.cuda.set_device(rank)
    say(rank, "init_process_group")
    tp = TensorParallel.initialize(rank=rank, world_size=world, init_method=init, backend="nccl", timeout_s=60)
    say(rank, "joined; eager all_reduce")
    x = torch.full((4,), float(rank + 1), device="cuda")
    tp.all_reduce(x)
    torch.cuda.synchronize()
    say(rank, f"eager sum {x.tolist()}")
    y = torch.zeros(4, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            y.fill_(rank + 1)
            tp.all_reduce(y)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    say(rank, "capturing")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y.fill_(rank + 1)
        tp.all_reduce(y)
    say(rank, "captured; replaying")
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    say(rank, f"graph sum {y.tolist()}")
    tp.destroy()
    say(rank, "done")


def main() -> int:
    if len(sys.argv) > 1:
        run(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
        return 0
    import torch

    from internvl_serve.engine.tp_worker import _free_port

    world = torch.cuda.device_count()
    init = f"tcp://127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(world), init]) for r in range(1, world)]
    try:
        run(0, world, init)
    finally:
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("NCCL_DEBUG", "WARN")
    sys.exit(main())
