"""serving/heap.py: after mmap_large_allocations() a 2 MiB block is its own mmap even after such a block
was freed, where glibc's default would have raised its threshold and served it from the heap. Each case
runs in a fresh interpreter (the setting is process-wide), counting mmapped blocks with mallinfo2(). And
a freed block below the threshold at the top of the heap stays there for the next one (no page faults),
where fixing the mmap threshold alone would fix the trim threshold at 128 KiB and hand it back.
cache_image_blocks: with that setting, decoding and resizing a new image (preprocess's Pillow calls) faults
in far fewer pages when Pillow keeps its freed blocks (minor page faults, getrusage)."""
from __future__ import annotations

import pytest

from fault_probe import run_probe
from internvl_serve.serving.heap import cache_image_blocks, mmap_large_allocations

MALLOC = """
import ctypes, sys
from internvl_serve.serving.heap import LARGE_BUFFER_BYTES, M_MMAP_THRESHOLD, mmap_large_allocations

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
if sys.argv[1] == "set":
    assert mmap_large_allocations()
elif sys.argv[1] == "mmap-threshold-only":
    assert libc.mallopt(M_MMAP_THRESHOLD, LARGE_BUFFER_BYTES) == 1
"""  # a probe's first lines: glibc's malloc through ctypes, the setting by argv[1] (else glibc's default)

PROBE = MALLOC + """
libc.free(libc.malloc(2 << 20))           # a 2 MiB block freed: glibc's default raises its threshold past it
before = libc.mallinfo2().hblks
block = libc.malloc(2 << 20)
print(libc.mallinfo2().hblks - before)    # 1: the new block is an mmap; 0: it came from the heap
libc.free(block)
"""

TOP_PROBE = MALLOC + """
block = libc.malloc(LARGE_BUFFER_BYTES // 2)  # 512 KiB: from the heap, at its top
ctypes.memset(block, 1, LARGE_BUFFER_BYTES // 2)
before = libc.mallinfo2().arena
libc.free(block)
print(before - libc.mallinfo2().arena)  # bytes handed back to the system
"""


def heap_bytes_handed_back(mode: str) -> int:
    return int(run_probe(TOP_PROBE, mode))


def test_a_freed_block_below_the_threshold_stays_in_the_heap():
    assert heap_bytes_handed_back("mmap-threshold-only") >= 256 << 10  # trimmed: its pages fault again
    assert heap_bytes_handed_back("set") == 0


def mmapped_blocks(mode: str) -> int:
    return int(run_probe(PROBE, mode))


def test_large_blocks_stay_mmapped_with_the_setting():
    assert mmapped_blocks("default") == 0   # the adaptive threshold: the second block is on the heap
    assert mmapped_blocks("set") == 1


def test_refuses_a_threshold_that_is_not_positive():
    with pytest.raises(ValueError):
        mmap_large_allocations(0)


IMAGE_PROBE = """
import io, resource, sys
from internvl_serve.serving.heap import cache_image_blocks, mmap_large_allocations
assert mmap_large_allocations()
import numpy as np
from PIL import Image
from internvl_serve.imageproc import decode_image, to_tile

if sys.argv[1] == "cache":
    assert cache_image_blocks() >= 1
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rng = np.random.default_rng(0)

def jpeg():
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()

images = [jpeg() for _ in range(4)]
for data in images[:3]:  # warm-up
    to_tile(decode_image(data))
before = faults()
to_tile(decode_image(images[3]))
print(faults() - before)
"""


def image_faults(mode: str) -> int:
    return int(run_probe(IMAGE_PROBE, mode))


def test_kept_image_blocks_spare_the_page_faults_of_a_new_images_decode_and_resize():
    freed, kept = image_faults("default"), image_faults("cache")
    assert freed > 1500 and kept < freed / 2, (freed, kept)   # 1024x768 RGBX: 768 pages decoded
