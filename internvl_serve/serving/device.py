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


def set_host_threads(threads: int | None) -> None:
    """The vision and llm models' parameter `host_threads`: torch's CPU (intra-op) threads in the calling
    process; None (empty): torch's default, one per core. Why a knob: with a model on the GPU these
    processes do little CPU work (host copies, checks), but each torch CPU op of more than ~32K elements
    is spread over all those threads, which the server's other processes keep busy: such an op waits for
    its slowest thread (one image's rows converted to bfloat16: 8.0 ms with 2 threads against 0.34 with
    one, on a 2-core machine running the test suite). A CPU-only server computes its forwards with them."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"host_threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
