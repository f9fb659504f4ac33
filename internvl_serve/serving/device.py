"""Where the serving models run: the config.pbtxt parameter `device` (auto | cpu | cuda[:N]) and the
dtype that goes with it (bfloat16 on CUDA, float32 on CPU)."""
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
