"""Reused host buffers for a request's hot path: with serving/heap.py's malloc setting every host buffer
from 1 MiB up is a fresh mmap, so a buffer allocated per request page-faults anew on every request (on the
H100 VM: embed() of one new image 27 -> 56 ms). The services keep their large host buffers here instead,
touched once and reused.

Owns: `all_finite`, the NaN/inf (and range) check of request tensors without temporaries their size;
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


def all_finite(x: np.ndarray | torch.Tensor, max_abs: float | None = None) -> bool:
    """No element of `x` is NaN or infinite, nor, with `max_abs`, larger than it in magnitude (what a cast
    to a narrower dtype would make infinite). Its min and max, which make no temporaries (isfinite makes
    ones the input's size, page-faulted in anew per request: ~1.7 faults per page of a V1-1 image's
    float32 embeddings); a NaN makes them NaN, which fails the comparison."""
    torch = sys.modules.get("torch")  # x is no tensor where torch was never imported
    if torch is not None and isinstance(x, torch.Tensor):
        if x.is_complex():  # (no order; no Triton datatype is complex)
            return bool(torch.isfinite(x).all())
        if not x.is_floating_point() or x.numel() == 0:
            return True
        lo, hi = torch.aminmax(x.detach())
        bound = torch.finfo(x.dtype).max if max_abs is None else max_abs
    else:
        if not np.issubdtype(x.dtype, np.inexact) or x.size == 0:
            return True
        if np.issubdtype(x.dtype, np.complexfloating):  # (no order; no Triton datatype is complex)
            return bool(np.isfinite(x).all())
        lo, hi = x.min(), x.max()
        bound = np.finfo(x.dtype).max if max_abs is None else max_abs
    return -bound <= float(lo) and float(hi) <= bound  # False for NaN


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
