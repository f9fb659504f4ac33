"""Tensor-parallel worker processes: start them (rank 0's side) and run one (`python -m ...tp_worker`).

Rank 0 (the process that runs the engine, e.g. the llm model's Triton stub) calls `start_workers`: it
picks a free TCP port on 127.0.0.1 for the rendezvous, starts ranks 1..N-1 as child processes of the
same Python (each with its own device and the same runner options), joins the group itself, and gets a
`WorkerGroup` back. Each worker loads the checkpoint's language_model.* weights, keeps its slice, builds
the same ModelRunner (which agrees on the KV-cache size and captures the same CUDA graphs across ranks)
and then runs the steps rank 0 sends (runner.serve_steps) until rank 0 sends stop.

A worker that dies takes the group down: rank 0 cannot finish a step without it. The watchdog thread
reports it (`on_failure`); the llm model then fails its requests and the server marks itself not ready.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python_executable() -> str:
    """This environment's Python (inside a Triton stub sys.executable is the stub, not python)."""
    for candidate in (Path(sys.exec_prefix) / "bin" / "python3", Path(sys.executable)):
        if candidate.is_file() and candidate.name.startswith("python"):
            return str(candidate)
    return "python3"


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


@dataclass
class WorkerGroup:
    """Rank 0's handle on the worker processes."""

    tp: object                                       # parallel.TensorParallel of rank 0
    processes: list[subprocess.Popen]
    on_failure: Callable[[str], None] | None = None
    _closing: threading.Event = field(default_factory=threading.Event)

    def watch(self) -> None:
        """Start the watchdog: a worker that exits while the group is open is reported."""
        for rank, p in enumerate(self.processes, start=1):
            threading.Thread(target=self._wait_one, args=(rank, p), daemon=True,
                             name=f"tp-worker-{rank}-watch").start()

    def _wait_one(self, rank: int, p: subprocess.Popen) -> None:
        code = p.wait()
        if not self._closing.is_set() and self.on_failure is not None:
            self.on_failure(f"tensor-parallel worker rank {rank} (pid {p.pid}) exited with code {code}")

    def close(self, runner=None, timeout_s: float = 30.0) -> None:
        """Send stop through the runner (if given), wait for the workers, kill the stragglers. Without
        a runner (rank 0 failed before building it) the workers wait in a collective forever: kill them."""
        self._closing.set()
        if runner is not None:
            try:
                runner.stop_workers()
            except Exception:
                runner = None
        if runner is None:
            timeout_s = min(timeout_s, 5.0)
        # Leave the group alongside the workers (NCCL's communicator teardown can wait for its peers),
        # in a thread, so that a peer that never arrives cannot hang the caller. Not at all when CUDA
        # graphs captured the communicator's collectives: that teardown hangs (seen on 2 H200s), and
        # the process that owns it is about to end (the Triton stub's finalize).
        leaving = None
        if runner is None or getattr(runner, "decode_graphs", None) is None:
            leaving = threading.Thread(target=self.tp.destroy, name="tp-destroy", daemon=True)
            leaving.start()
        for p in self.processes:
            try:
                p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if leaving is not None:
            leaving.join(timeout=10)


def start_workers(checkpoint: str | Path, *, devices: list[str], dtype: str, runner_options: dict,
                  host_threads: int | None = None, timeout_s: float = 900.0,
                  on_failure: Callable[[str], None] | None = None) -> WorkerGroup:
    """Start ranks 1..len(devices)-1 on devices[1:], join as rank 0; returns once the group is formed.
    runner_options: ModelRunner keywords as JSON-able values (the same on every rank; `reserved_bytes`
    only on rank 0, whose device also holds the vision model). host_threads: torch's CPU threads in each
    worker (serving/device.host_threads_for; None: one on a GPU, torch's default on the CPU)."""
    from internvl_serve.engine.parallel import TensorParallel

    world_size = len(devices)
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    worker_options = {k: v for k, v in runner_options.items() if k != "reserved_bytes"}
    processes = []
    for rank in range(1, world_size):
        cmd = [python_executable(), "-m", "internvl_serve.engine.tp_worker", "--checkpoint", str(checkpoint),
               "--rank", str(rank), "--world-size", str(world_size), "--init-method", init_method,
               "--device", devices[rank], "--dtype", dtype, "--runner-options", json.dumps(worker_options)]
        if host_threads is not None:
            cmd += ["--host-threads", str(host_threads)]
        processes.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL))
    try:
        tp = TensorParallel.initialize(rank=0, world_size=world_size, init_method=init_method,
                                       backend=backend_for(devices[0]), timeout_s=timeout_s)
    except BaseException:
        for p in processes:
            p.kill()
        raise
    group = WorkerGroup(tp, processes, on_failure)
    group.watch()
    return group


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="One tensor-parallel rank > 0 of the LLaMA runner.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--init-method", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--dtype", required=True)
    p.add_argument("--runner-options", default="{}")
    p.add_argument("--host-threads", type=int, default=None)
    args = p.parse_args(argv)

    import torch

    from internvl_serve.checkpoint import load_state_dict
    from internvl_serve.config import InternVLChatConfig
    from internvl_serve.engine.parallel import TensorParallel, load_device
    from internvl_serve.engine.runner import ModelRunner
    from internvl_serve.serving.device import set_host_threads

    set_host_threads(args.host_threads, args.device)
    print(f"tp_worker rank {args.rank}: {torch.get_num_threads()} host threads", file=sys.stderr, flush=True)
    if args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device))
    dtype = getattr(torch, args.dtype)
    tp = TensorParallel.initialize(rank=args.rank, world_size=args.world_size, init_method=args.init_method,
                                   backend=backend_for(args.device))
    config = InternVLChatConfig.from_pretrained(args.checkpoint)
    state_dict = load_state_dict(args.checkpoint, prefixes=("language_model.",), dtype=dtype,
                                 device=load_device(args.checkpoint, args.device, args.world_size),
                                 progress=False)
    runner = ModelRunner(config, state_dict, device=args.device, dtype=dtype, tp=tp,
                         **json.loads(args.runner_options))
    del state_dict
    runner.serve_steps()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        # Exit without destroying the NCCL communicator: the captured decode graphs reference it, and
        # its teardown can wait on peers; the process exit releases everything.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    tp.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
