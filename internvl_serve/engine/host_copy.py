"""Host -> device copies of a step's inputs that do not wait for the device: the engine queues step N+1
while step N runs (overlap scheduling), so a copy from pageable memory, which may wait for the stream,
would undo that.

Owns: `to_device`, the one way the engine moves a host array or tensor to its device (page-locked first
on CUDA; torch's caching host allocator keeps the pinned buffer until the copy ran), and `page_locked`,
which does that first copy early, off the engine thread, for inputs that wait in the queue (a request's
image rows: 5 MB of float32 per image, half that in a GPU engine's bfloat16, copied on the engine thread
before every first prefill chunk otherwise), within a bound on the page-locked memory those waiting
inputs hold (`fits_page_locked`); `travel_dtype`, the dtype image rows go to the engine in; and
`serial_copy_`, the copy-and-convert of such rows on the calling thread alone.
Does not own: copies into captured graphs' static buffers (decode_graphs.py copies into them in place).
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


# Waiting requests' image rows are page-locked only while the process's page-locked memory in use stays
# under this. Without a bound a flood of queued image requests (max_pending_requests, each with up to 12
# images: 63 MB of float32 rows) would pin tens of GB, which torch's caching host allocator then keeps.
# Rows past it stay pageable: to_device pins them at their first prefill (a host copy on the engine
# thread then, ~1 ms per image).
PAGE_LOCKED_WAITING_BYTES = 2 << 30


def fits_page_locked(nbytes: int) -> bool:
    """Whether nbytes more page-locked memory keep this process's in use (torch's pinned host allocator:
    blocks handed out; where a torch reports only its pool, the pool) within PAGE_LOCKED_WAITING_BYTES.
    True where torch reports neither (or has no such stats)."""
    stats = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
    in_use = stats.get("active_bytes.current", stats.get("allocated_bytes.current"))
    return in_use is None or in_use + nbytes <= PAGE_LOCKED_WAITING_BYTES


# ATen runs a copy of more elements than this on its OpenMP threads. In a server the stubs' threads compete
# for the cores with its other processes, and a copy that waits for all of its threads can take far longer
# than one thread alone: one image's rows to bfloat16 took 8.0 ms with 2 threads against 0.34 ms with one
# on a 2-core machine busy with the test suite (0.13 ms either way when idle). So serial_copy_ copies in
# chunks that ATen runs on the calling thread.
SERIAL_COPY_ELEMENTS = 32768


def serial_copy_(into: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """into (contiguous) <- source, converted to into's dtype, in chunks of SERIAL_COPY_ELEMENTS that run
    on the calling thread alone. Returns into."""
    flat, source = into.view(-1), source.reshape(-1)
    for i in range(0, source.numel(), SERIAL_COPY_ELEMENTS):
        flat[i:i + SERIAL_COPY_ELEMENTS].copy_(source[i:i + SERIAL_COPY_ELEMENTS])
    return into


def travel_dtype(rows: torch.dtype, engine: torch.dtype) -> torch.dtype:
    """The dtype a request's image rows go to the engine in: the engine's when it is narrower (bfloat16 on
    a GPU: half of float32's bytes to send, hash, pin and copy, and the very values the engine computes
    with: the runner would convert them on the device, with the same rounding); theirs otherwise."""
    return engine if engine.is_floating_point and engine.itemsize < rows.itemsize else rows


def page_locked(t: torch.Tensor, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """t, converted to `dtype` when given, in page-locked memory when `device` is CUDA and it fits
    (fits_page_locked; then to_device copies it, and any slice of it, with no host copy first): one copy
    into the pinned buffer, converting on the way (serial_copy_). Elsewhere, past the bound, or when t
    already is both: t in `dtype` (t itself when it is in it)."""
    dtype = dtype or t.dtype
    if (torch.device(device).type == "cuda" and not (t.is_pinned() and t.dtype == dtype)
            and fits_page_locked(t.numel() * dtype.itemsize)):
        return serial_copy_(torch.empty(t.shape, dtype=dtype, pin_memory=True), t)
    return t if t.dtype == dtype else serial_copy_(torch.empty(t.shape, dtype=dtype), t)
