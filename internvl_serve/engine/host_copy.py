"""Host -> device copies of a step's inputs that do not wait for the device: the engine queues step N+1
while step N runs (overlap scheduling), so a copy from pageable memory, which may wait for the stream,
would undo that.

Owns: `to_device`, the one way the engine moves a host array or tensor to its device (page-locked first
on CUDA; torch's caching host allocator keeps the pinned buffer until the copy ran), and `page_locked`,
which does that first copy early, off the engine thread, for inputs that wait in the queue (a request's
image rows: 5 MB of float32 per image, copied on the engine thread before every first prefill chunk
otherwise). Does not own: copies into captured graphs' static buffers (decode_graphs.py copies into them
in place).
"""
from __future__ import annotations

import numpy as np
import torch


def to_device(a: np.ndarray | torch.Tensor, device) -> torch.Tensor:
    """`a` on `device`: through pinned memory and non_blocking on CUDA; as is (a tensor) on the CPU."""
    t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def page_locked(t: torch.Tensor, device) -> torch.Tensor:
    """t in page-locked memory when `device` is CUDA (then to_device copies it, and any slice of it, with
    no host copy first); t itself elsewhere, or when it already is."""
    if torch.device(device).type != "cuda" or t.is_pinned():
        return t
    return t.pin_memory()
