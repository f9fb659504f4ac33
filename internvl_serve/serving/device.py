"""Where the serving models run: the config.pbtxt parameter `device` (auto | cpu | cuda[:N]) and the
dtype that goes with it (bfloat16 on CUDA, float32 on CPU); and `host_threads`, torch's CPU threads in
the vision and llm models' processes."""
from __future__ import annotations

import torch


def resolve_device(device: str = "auto") -> torch.device:
    """'auto': CUDA when torch sees a GPU, else CPU; 'cpu' / 'cuda' / 'cuda:N' as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def instance_device(model_args: dict, configured: str = "auto") -> str:
    """The device of one Triton model instance: its GPU when the instance group is KIND_GPU (one instance
    per listed GPU: data parallelism), else the `device` parameter of config.pbtxt."""
    if model_args.get("model_instance_kind") == "GPU":
        return f"cuda:{int(model_args['model_instance_device_id'])}"
    return configured


def host_threads_for(threads: int | None, device: torch.device | str) -> int | None:
    """The vision and llm models' parameter `host_threads` for a model on `device`: as given, or, where it
    is None (empty), one thread when the model runs on a GPU and torch's default (None: one per core) on
    the CPU, where the forwards compute with them. Why one on a GPU: there these processes do little CPU
    work (host copies, checks), but each torch CPU op of more than ~32K elements is spread over all the
    threads, which the server's other processes keep busy, and waits for its slowest one (one image's rows
    converted to bfloat16: 8.0 ms with 2 threads against 0.34 with one, on a 2-core machine running the
    test suite). Measured through the server (H100, fp8, 2026-12-07, two runs in opposite order): +2.8 to
    +3.2 % output tok/s at 32 streams and +4.0 to +4.2 % at 64 with one thread in the vision and llm
    processes, TTFT p95 at 32 streams 1,329-1,369 ms against 1,588-1,600 (bench/results/h100-2026-12-07)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"host_threads must be >= 1, got {threads}")
        return threads
    return 1 if torch.device(device).type == "cuda" else None


def set_host_threads(threads: int | None, device: torch.device | str) -> None:
    """torch's CPU (intra-op) threads in the calling process, for a model on `device`
    (host_threads_for); None there leaves torch's default."""
    threads = host_threads_for(threads, device)
    if threads is not None:
        torch.set_num_threads(threads)
