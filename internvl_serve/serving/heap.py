"""Host-heap setting for the model processes: mmap the large buffers, so image traffic does not fragment
the heap.

Each request moves 2-5 MiB host buffers through the preprocess and vision stubs (pixel tiles, float32
embeddings, bf16 cache entries) and the llm stub (image embeddings in). glibc serves allocations from
its mmap threshold up with their own mmap, given back when freed, but raises that threshold to the
size of the first such block freed (up to 32 MiB), after which these buffers churn through the heap
arenas of the request threads, which fragment: the H200 soak's RSS crept ~12 MiB/min, and
bench/malloc_replay.py (the vision model's buffers without a model) grows 3.4 -> 5.8 GiB over 12,800
requests with glibc's default and stays at 1.25 GiB with a fixed 1 MiB threshold.

Fixing the mmap threshold also fixes glibc's trim threshold, at its 128 KiB default: free space above
that at the top of a heap goes back to the system, so the buffers below 1 MiB (PIL's images of a tile,
numpy copies) page-fault anew too, whenever the heap's top was handed back. So the setting also keeps
up to TRIM_THRESHOLD_BYTES free at the top of each heap (bounded, no creep): the preprocess path for one
PNG went from ~1,470 to ~610 minor page faults here (tests/unit/test_imageproc.py counts them).

A fixed threshold costs an mmap, page faults and an munmap per large buffer: a fresh page costs a few
microseconds (more in a VM: the vision stub's embed() for one image took 56 ms with the setting against
27 ms without on the H100 machine, before its buffers were reused); and a model computing on the CPU
makes large temporaries at every layer (the tiny checkpoint served 40 % fewer tokens/s with it), so the
adapters set it for preprocess, and for vision and llm when they run on a GPU.

The cost is per buffer allocated, so the request paths reuse their large host buffers instead
(internvl_serve/hostbuf.py): the vision service its pixel staging, output and cache slots, the NaN
checks no temporaries the size of the tensor; and preprocess keeps a few of Pillow's image blocks for
the next image (cache_image_blocks: Pillow frees every block of a decoded or resized image by default)
and writes each request's pixel values into a reused buffer (Preprocessor's output_slot).
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
LARGE_BUFFER_BYTES = 1 << 20
TRIM_THRESHOLD_BYTES = 32 << 20


def mmap_large_allocations(threshold_bytes: int = LARGE_BUFFER_BYTES) -> bool:
    """Fix this process's malloc mmap threshold at `threshold_bytes` and its trim threshold at
    TRIM_THRESHOLD_BYTES (glibc's mallopt). True when set; False where the C library has no mallopt or
    refuses the value (nothing changes then)."""
    if threshold_bytes <= 0:
        raise ValueError(f"threshold_bytes must be > 0, got {threshold_bytes}")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return (mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)) == 1
            and mallopt(M_TRIM_THRESHOLD, max(TRIM_THRESHOLD_BYTES, int(threshold_bytes))) == 1)


IMAGE_BLOCKS_BYTES = 64 << 20


def cache_image_blocks(max_bytes: int = IMAGE_BLOCKS_BYTES) -> int:
    """Let Pillow keep up to `max_bytes` of freed image blocks (its arena's blocks_max; at least one block)
    for the next image, instead of freeing them: with the fixed threshold each freed block is an munmap
    and the next image's decode and resize fault their pages in anew (a 1024x768 JPEG: ~2,800 faults,
    ~570 with the blocks kept). Process-wide; returns the number of blocks allowed."""
    from PIL import Image

    blocks = max(1, int(max_bytes) // Image.core.get_block_size())
    Image.core.set_blocks_max(blocks)
    return blocks
