"""The vision service's host buffers are reused (internvl_serve/hostbuf.py): with serving/heap.py's malloc setting
(every host buffer from 1 MiB up a fresh mmap, as the vision adapter sets it on a GPU) an embed() of new
tiles after a warm-up faults in almost none of the pages it moves (the H100's 27 -> 56 ms per new image
was these faults). Counted as minor page faults (getrusage) in a fresh interpreter, with the faults of the
encoder's own forward (the CPU model's temporaries, not the service's buffers) taken out by forward hooks.
The finiteness checks of request tensors (vision's pixels, the engine's image embeddings) make no
temporaries their size either (torch.isfinite did: ~1.7 faults per page checked) and still find every NaN
and infinity. Also: the reuse_output contract, and the cache's slots reused after an eviction."""
from __future__ import annotations

import numpy as np
import torch

import pytest

from fault_probe import run_probe
from internvl_serve.hostbuf import HostBuffers, SlotPool, all_finite
from internvl_serve.serving.vision import EmbeddingCache, VisionService

PROBE = """
import resource, sys
from internvl_serve.serving.heap import mmap_large_allocations
assert mmap_large_allocations()
import numpy as np, torch
np.core.multiarray._set_madvise_hugepage(False)  # 4 KiB pages: one fault per fresh page, as with THP off
torch.set_num_threads(1)
from internvl_serve.serving.vision import VisionService

faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
service = VisionService(sys.argv[1], device="cpu", max_images_per_forward=8)
inside, entered = [0], [0]
service.encoder.register_forward_pre_hook(lambda m, a: entered.__setitem__(0, faults()))
service.encoder.register_forward_hook(lambda m, a, o: inside.__setitem__(0, inside[0] + faults() - entered[0]))
rng = np.random.default_rng(0)
new_tiles = lambda: [rng.standard_normal((4, 3, 448, 448), dtype=np.float32) for _ in range(2)]
for _ in range(3):  # warm-up: the buffers are made and faulted in once
    service.embed(new_tiles(), reuse_output=True)
batches = new_tiles()
inside[0], before = 0, faults()
embeds = service.embed(batches, reuse_output=True)
host_faults = faults() - before - inside[0]
moved = sum(b.nbytes for b in batches) + sum(e.nbytes for e in embeds)
print(host_faults, moved // 4096)
"""


def test_an_embed_of_new_tiles_faults_in_almost_none_of_its_host_buffers(tiny_checkpoint):
    host_faults, pages = map(int, run_probe(PROBE, tiny_checkpoint).split())
    assert pages > 4000                 # 8 tiles: 19 MB of pixels in, 1 MB of embeddings out
    assert host_faults < pages / 10, (host_faults, pages)   # the original code: ~2 faults per page moved


FINITE_PROBE = """
import resource
from internvl_serve.serving.heap import mmap_large_allocations
assert mmap_large_allocations()
import numpy as np, torch
np.core.multiarray._set_madvise_hugepage(False)
from internvl_serve.engine.request import Request
from internvl_serve.serving.contract import ServingLimits
from internvl_serve.serving.vision import request_tiles

faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rng = np.random.default_rng(0)
embeds = torch.from_numpy(rng.standard_normal((2 * 256, 5120), dtype=np.float32))  # two V1-1 images
request = Request(request_id="r", prompt_token_ids=[1] + [7] * 512, image_embeds=embeds)
pixels = rng.standard_normal((1, 8, 3, 448, 448), dtype=np.float32)
checks = [lambda: request.validate(image_context_token_id=7, vocab_size=100, hidden_size=5120, context_window=4096),
          lambda: request_tiles(pixels, ServingLimits())]
for check in checks:
    check()
before = faults()
for check in checks:
    check()
print(faults() - before, (embeds.numel() * 4 + pixels.nbytes) // 4096)
"""


def test_the_finiteness_checks_of_request_tensors_make_no_temporaries_their_size():
    check_faults, pages = map(int, run_probe(FINITE_PROBE).split())
    assert pages > 4000 and check_faults < pages / 10, (check_faults, pages)   # torch.isfinite: ~1.7 a page


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_all_finite_finds_every_nan_and_infinity_and_passes_the_largest_values(dtype):
    big = np.full((700, 700), np.finfo(dtype).max, dtype)     # more than one chunk
    big[0, ::2] = -np.finfo(dtype).max
    assert all_finite(big) and all_finite(torch.from_numpy(big)) and all_finite(big[:, ::3])
    for bad in (np.nan, np.inf, -np.inf):
        for at in ((0, 0), (374, 355), (699, 699)):
            b = big.copy()
            b[at] = bad
            assert not all_finite(b) and not all_finite(torch.from_numpy(b)), (bad, at)
    assert not all_finite(np.array([np.inf, -np.inf], dtype))
    assert all_finite(np.zeros((0, 5), dtype)) and all_finite(np.arange(6))


def test_all_finite_on_bfloat16():
    t = torch.full((3, 70000), 3e38, dtype=torch.bfloat16)
    assert all_finite(t) and all_finite(t.t())                # contiguous (in chunks) and not
    t[2, 69999] = float("nan")
    assert not all_finite(t) and not all_finite(t.t())


def test_all_finite_with_a_bound_refuses_what_a_narrower_dtype_makes_infinite():
    bf16_max = torch.finfo(torch.bfloat16).max
    rows = torch.zeros(4, 5120)
    rows[1, 2] = 3.4e38                                       # finite in float32, infinite as bfloat16
    assert all_finite(rows) and torch.isinf(rows.to(torch.bfloat16)).any()
    assert not all_finite(rows, bf16_max) and not all_finite(rows.numpy(), bf16_max)
    rows[1, 2] = -3.4e38
    assert not all_finite(rows, bf16_max) and not all_finite(rows.t(), bf16_max)
    rows[1, 2] = bf16_max                                     # the largest value that stays finite
    assert all_finite(rows, bf16_max) and all_finite(rows.numpy(), bf16_max)
    rows[3, 0] = float("nan")
    assert not all_finite(rows, bf16_max) and not all_finite(rows.numpy(), bf16_max)


def tiles(*seeds: int) -> np.ndarray:
    return np.stack([np.random.default_rng(s).standard_normal((3, 448, 448), dtype=np.float32) for s in seeds])


def test_reused_output_is_valid_until_the_next_call_and_owned_output_stays(tiny_checkpoint):
    service = VisionService(tiny_checkpoint, device="cpu", image_cache_mb=0)
    owned = service.embed([tiles(1)])[0]
    first = service.embed([tiles(1)], reuse_output=True)[0]
    assert np.array_equal(first, owned)
    kept = first.copy()
    second = service.embed([tiles(2)], reuse_output=True)[0]
    assert np.shares_memory(first, second)              # the same buffer: the first result is overwritten
    assert np.array_equal(first, second) and not np.array_equal(kept, second)
    assert np.array_equal(service.embed([tiles(1)])[0], owned) and not np.shares_memory(owned, second)
    grown = service._buffers.grown
    service.embed([tiles(3)], reuse_output=True)
    assert service._buffers.grown == grown              # nothing allocated anew for a call that fits


def test_cache_slots_are_reused_after_an_eviction():
    cache = EmbeddingCache(max_bytes=3 * 40)
    for k in range(3):
        cache.put(bytes([k]), torch.full((10,), float(k)))
    pool = next(iter(cache._pools.values()))
    slots = {cache._entries[bytes([k])].data_ptr() for k in range(3)}
    for k in range(3, 40):                               # 37 more misses, each evicting the oldest
        cache.put(bytes([k]), torch.full((10,), float(k)))
    assert {v.data_ptr() for v in cache._entries.values()} == slots and pool.made == 3
    value = torch.empty(10)
    assert cache.copy_to(bytes([39]), value) and torch.equal(value, torch.full((10,), 39.0))
    assert not cache.copy_to(bytes([0]), value) and cache.evictions == 37


def test_a_reserved_cache_has_every_slot_made_at_once_and_makes_none_later():
    cache = EmbeddingCache(max_bytes=5 * 40)
    cache.reserve((10,), torch.float32)
    pool = next(iter(cache._pools.values()))
    reserved = {slot.data_ptr() for slot in pool._free}
    assert pool.made == 5 and len(reserved) == 5
    for k in range(12):                                  # 12 misses, the last 7 evicting
        cache.put(bytes([k]), torch.full((10,), float(k)))
    assert pool.made == 5 and {v.data_ptr() for v in cache._entries.values()} == reserved
    value = torch.empty(10)
    assert cache.copy_to(bytes([11]), value) and torch.equal(value, torch.full((10,), 11.0))
    assert cache.keys() == [bytes([k]) for k in range(7, 12)] and cache.evictions == 7
    disabled = EmbeddingCache(max_bytes=0)
    disabled.reserve((10,), torch.float32)
    assert not disabled._pools


def test_host_buffers_grow_only_when_too_small_and_slot_pool_limit():
    buffers = HostBuffers()
    a = buffers.get("x", (2, 3), torch.float32)
    b = buffers.get("x", (5,), torch.float32)
    assert a.data_ptr() == b.data_ptr() and buffers.grown == 1
    c = buffers.get("x", (4, 3), torch.float32)
    assert c.shape == (4, 3) and buffers.grown == 2 and buffers.nbytes == 48
    d = buffers.get("y", (2, 2), np.float32)                  # a numpy dtype: a numpy buffer (no torch needed)
    assert isinstance(d, np.ndarray) and d.shape == (2, 2) and buffers.grown == 3
    d[:] = 7
    e = buffers.get("y", (3,), np.float32)
    assert np.shares_memory(d, e) and buffers.grown == 3 and buffers.nbytes == 48 + 16
    f = buffers.get("y", (5,), np.float32)                    # grown: the earlier views keep the old buffer
    assert not np.shares_memory(d, f) and (d == 7).all() and buffers.grown == 4
    assert isinstance(buffers.get("y", (2,), torch.float32), torch.Tensor) and buffers.grown == 5
    with pytest.raises(ValueError, match="a pinned buffer needs a torch dtype"):
        HostBuffers(pin=True).get("z", (1,), np.float32)
    pool = SlotPool((2,), torch.float32, limit=3, block=2)
    taken = [pool.take() for _ in range(3)]
    assert pool.take() is None and pool.made == 3
    pool.give(taken[1])
    assert pool.take() is taken[1]
