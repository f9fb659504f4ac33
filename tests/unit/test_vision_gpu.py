"""The vision service on CUDA (skipped without a GPU): with its ViT blocks compiled (the default on CUDA)
the embeddings match the eager encoder's, for one image and for a batch (the dynamic-batch graph); its host
buffers (internvl_serve/hostbuf.py) are page-locked and reused, its cache's slots all made at load:
results through them equal the plain path's, a cache hit equals the forward exactly, and with the
adapter's malloc setting an embed() of a new tile faults in almost none of its host pages."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from internvl_serve.serving.vision import NonFiniteEmbeddings, VisionService, tile_key

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_compiled_blocks_give_the_eager_embeddings(tiny_checkpoint):
    eager = VisionService(tiny_checkpoint, device="cuda", dtype=torch.float32, compile="false", image_cache_mb=0)
    compiled = VisionService(tiny_checkpoint, device="cuda", dtype=torch.float32, image_cache_mb=0)
    assert compiled.compiled and not eager.compiled
    rng = np.random.default_rng(0)
    size = compiled.config.vision_config.image_size
    for batch in (1, 5):
        pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
        (a,), (b,) = eager.embed([pixels]), compiled.embed([pixels])
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)


def test_host_buffers_are_pinned_and_give_the_plain_results(tiny_checkpoint):
    service = VisionService(tiny_checkpoint, device="cuda", max_images_per_forward=2)   # bf16, cache on
    pool = service.cache._pools[((service.num_image_token, service.hidden_size), service.dtype)]
    assert pool.made == pool.limit > 0 and service.cache.bytes == 0      # every slot made at load, none used
    rng = np.random.default_rng(1)
    size = service.config.vision_config.image_size
    pixels = rng.standard_normal((3, 3, size, size)).astype(np.float32)
    batches = [pixels[:2], pixels[2:], pixels[:1]]          # tile 0 again: a repeat within the call
    owned = [e.copy() for e in service.embed(batches)]
    assert all(b.is_pinned() for b in service._buffers._buffers.values())
    with torch.inference_mode():
        x = torch.from_numpy(pixels).to("cuda", service.dtype)
        want = service.encoder(x).float().cpu().numpy()       # one forward over 3 tiles (the service: 2 + 1)
    reused = service.embed(batches, reuse_output=True)       # all hits now: exactly what the forwards stored
    n = service.num_image_token
    for a, b in zip(owned, reused):
        assert np.array_equal(a, b)
    assert np.array_equal(owned[2], owned[0][:n])
    assert np.abs(owned[0][:n] - want[0]).max() <= 0.05 * np.abs(want[0]).max()   # bf16, other batching
    assert service.cache_hits == 1 + 4 and service.cache_misses == 3
    assert list(service.cache._pools.values()) == [pool] and pool.made == pool.limit   # the entries used it


PROBE = """
import resource, sys
from internvl_serve.serving.heap import mmap_large_allocations
assert mmap_large_allocations()
import numpy as np, torch
np.core.multiarray._set_madvise_hugepage(False)
from internvl_serve.serving.vision import VisionService

faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
service = VisionService(sys.argv[1], device="cuda")
rng = np.random.default_rng(0)
new = lambda: [rng.standard_normal((8, 3, 448, 448), dtype=np.float32)]
for _ in range(3):
    service.embed(new(), reuse_output=True)
batches = new()
torch.cuda.synchronize()
before = faults()
embeds = service.embed(batches, reuse_output=True)
torch.cuda.synchronize()
print(faults() - before, (sum(b.nbytes for b in batches) + sum(e.nbytes for e in embeds)) // 4096)
"""


def test_an_embed_of_new_tiles_on_cuda_faults_in_almost_none_of_its_host_buffers(tiny_checkpoint):
    run = subprocess.run([sys.executable, "-c", PROBE, str(tiny_checkpoint)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    host_faults, pages = map(int, run.stdout.split())
    assert pages > 4000 and host_faults < pages / 10, (host_faults, pages)   # the original: ~2 a page


def test_pixels_that_overflow_the_encoder_are_refused_alone_on_cuda(tiny_checkpoint):
    """The finiteness flags come back through a page-locked buffer with the embeddings (one sync): the
    overflowing request alone is refused, across forwards (max_images_per_forward 2), and not cached."""
    service = VisionService(tiny_checkpoint, device="cuda", max_images_per_forward=2)   # bf16, cache on
    rng = np.random.default_rng(2)
    size = service.config.vision_config.image_size
    pixels = rng.standard_normal((4, 3, size, size)).astype(np.float32)
    pixels[2, 1, 5, 5] = 1e30
    batches = [pixels[:2], pixels[2:3], pixels[3:]]
    with pytest.raises(NonFiniteEmbeddings) as refused:
        service.embed(batches)
    assert refused.value.requests == [1]
    assert np.isfinite(refused.value.embeds[0]).all() and np.isfinite(refused.value.embeds[2]).all()
    assert tile_key(pixels[2]) not in service.cache and len(service.cache) == 3
    np.testing.assert_array_equal(service.embed([pixels[3:]])[0], refused.value.embeds[2])   # a hit: the same rows
