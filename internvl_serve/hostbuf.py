"""Reused host buffers for a request's hot path: with serving/heap.py's malloc setting every host buffer
from 1 MiB up is a fresh mmap, so a buffer allocated per request page-faults anew on every request (on the
H100 VM: embed() of one new image 27 -> 56 ms). The services keep their large host buffers here instead,
touched once and reused.

Owns: `all_finite`, the NaN/inf check of request tensors without temporaries their size (torch.isfinite
of one V1-1 image's float32 embeddings makes ~11 MB of them: ~1.7 page faults per page of the input);
`HostBuffers`, named flat buffers grown on demand (torch tensors, page-locked on CUDA so host<->device
copies from and to them are real async copies, or numpy arrays for a process without torch: the preprocess
stub's pixel values), handed out as views; `SlotPool`, fixed-shape tensors made in blocks (or all at once,
touched: reserve), handed out and given back (the embedding cache's entries). torch is imported only
where a torch buffer is asked for.
Does not own: what the buffers hold, locking (the callers serialize their use), the malloc setting
(serving/heap.py).
"""
from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# Elements per isfinite: temporaries under 128 KiB, glibc's trim threshold where nothing else sets it (heap.py's
# setting keeps 32 MiB), so the heap's top is not given back and faulted in again at every chunk.
# np.isfinite makes a bool temporary (64 KiB); torch.isfinite float ones too (64 KiB for float32).
_NUMPY_CHUNK = 1 << 16
_TORCH_CHUNK = 1 << 14


def all_finite(x: np.ndarray | torch.Tensor) -> bool:
    """No element of `x` is NaN or infinite, checked in chunks whose temporaries stay below the mmap
    threshold (as fast as one isfinite over a float32 tile or image here); a device tensor at once."""
    torch = sys.modules.get("torch")  # x is no tensor where torch was never imported
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach()
        if x.device.type != "cpu" or not x.is_contiguous():  # (a flat view of the latter would be a copy)
            return bool(torch.isfinite(x).all())
        if x.dtype == torch.bfloat16:  # no numpy view of it
            flat = x.reshape(-1)
            return all(bool(torch.isfinite(flat[i:i + _TORCH_CHUNK]).all())
                       for i in range(0, flat.numel(), _TORCH_CHUNK))
        x = x.numpy()
    if not np.issubdtype(x.dtype, np.inexact):
        return True
    if not x.flags.c_contiguous:  # a flat view would be a copy
        return bool(np.isfinite(x).all())
    flat = x.reshape(-1)
    return all(bool(np.isfinite(flat[i:i + _NUMPY_CHUNK]).all()) for i in range(0, flat.size, _NUMPY_CHUNK))


class HostBuffers:
    """`get(name, shape, dtype)` -> a view of the buffer `name`, grown (never shrunk) when too small: a
    torch tensor for a torch dtype (pinned when `pin`, a CUDA device's host side), a numpy array for a
    numpy one. The view is valid until the next get of the same name (one that grows the buffer leaves
    the earlier views on the old one, which they keep alive); its contents are whatever was there. Not
    thread-safe: the caller holds a lock around a use."""

    def __init__(self, pin: bool = False):
        self.pin = pin
        self._buffers: dict[str, torch.Tensor | np.ndarray] = {}
        self.grown = 0  # buffers allocated (a new name, or grown): each is fresh memory to fault in

    def get(self, name: str, shape: tuple[int, ...], dtype) -> torch.Tensor | np.ndarray:
        numel = math.prod(shape)
        torch = sys.modules.get("torch")
        is_torch = torch is not None and isinstance(dtype, torch.dtype)
        if not is_torch:
            dtype = np.dtype(dtype)
            if self.pin:
                raise ValueError(f"host buffer {name!r}: a pinned buffer needs a torch dtype, got {dtype}")
        buf = self._buffers.get(name)
        if (buf is None or isinstance(buf, np.ndarray) == is_torch or buf.dtype != dtype
                or (buf.numel() if is_torch else buf.size) < numel):
            buf = (torch.empty(max(numel, 1), dtype=dtype, pin_memory=self.pin) if is_torch
                   else np.empty(max(numel, 1), dtype=dtype))
            self._buffers[name] = buf
            self.grown += 1
        view = buf[:numel]
        return view.view(shape) if is_torch else view.reshape(shape)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._buffers.values())


class SlotPool:
    """Tensors of one shape and dtype, made `block` at a time (one allocation each block, at most `limit`
    slots in all), taken and given back: a slot freed by an eviction holds the next entry, so its pages
    are faulted in once. Not thread-safe (the cache's lock covers it)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, limit: int, block: int = 16):
        self.shape, self.dtype, self.limit, self.block = tuple(shape), dtype, limit, block
        self.made = 0
        self._free: list[torch.Tensor] = []

    def take(self) -> torch.Tensor | None:
        """A free slot, or None when `limit` slots are out."""
        if not self._free:
            n = min(self.block, self.limit - self.made)
            if n <= 0:
                return None
            import torch

            self._free = list(torch.empty((n, *self.shape), dtype=self.dtype).unbind(0))[::-1]
            self.made += n
        return self._free.pop()

    def give(self, slot: torch.Tensor) -> None:
        self._free.append(slot)

    def reserve(self) -> None:
        """Make every slot not yet made now, in one allocation whose pages are written here: no entry
        then faults in a fresh slot's pages on the request path (a new slot is one fault per 4 KiB)."""
        n = self.limit - self.made
        if n > 0:
            import torch

            self._free = list(torch.zeros((n, *self.shape), dtype=self.dtype).unbind(0))[::-1] + self._free
            self.made += n
