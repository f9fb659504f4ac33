"""The vision service's LRU cache of tile embeddings (tiny checkpoint, CPU, no server): a hit returns exactly
the embedding the forward produced, only the misses run the encoder (counted in rows), the least recently
used entry goes first and the bound holds, the disabled cache encodes everything, and the config.pbtxt
parameter parses."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from internvl_serve.serving.vision import DEFAULT_IMAGE_CACHE_MB, EmbeddingCache, NonFiniteEmbeddings, VisionOptions, \
    VisionService, tile_key

REPO = Path(__file__).resolve().parents[2] / "model_repository"
TILE_BYTES = 256 * 128 * 4  # tiny checkpoint: 256 image tokens x LLaMA hidden 128, float32 on the CPU
TILE_MB = TILE_BYTES / 2**20


def tiles(*seeds: int) -> np.ndarray:
    """(len(seeds), 3, 448, 448) float32, one random tile per seed (the same seed, the same tile)."""
    return np.stack([np.random.default_rng(s).standard_normal((3, 448, 448), dtype=np.float32) for s in seeds])


class RowCounter:
    """Rows (tiles) and calls that reach the encoder's forward."""

    def __init__(self, service: VisionService):
        self.rows, self.calls = 0, 0
        service.encoder.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.rows += int(args[0].shape[0])
        self.calls += 1


@pytest.fixture(scope="module")
def plain(tiny_checkpoint):
    """The service without a cache: what a fresh encode gives."""
    return VisionService(tiny_checkpoint, device="cpu", image_cache_mb=0)


def cached_service(checkpoint, **kw) -> VisionService:
    return VisionService(checkpoint, device="cpu", **kw)


def counters(s: VisionService) -> tuple[int, int, int]:
    return s.cache_hits, s.cache_misses, s.cache_evictions


def test_a_hit_returns_exactly_a_fresh_encode_and_skips_the_encoder(tiny_checkpoint, plain):
    service = cached_service(tiny_checkpoint)
    rows = RowCounter(service)
    batches = [tiles(1, 2), tiles(3)]
    fresh = plain.embed(batches)
    first = service.embed(batches)
    assert rows.rows == 3 and counters(service) == (0, 3, 0)
    second = service.embed(batches)                       # a second round resends the same images
    assert rows.rows == 3 and counters(service) == (3, 3, 0)
    for f, a, b in zip(fresh, first, second):
        assert a.dtype == b.dtype == np.float32 and a.shape == f.shape
        assert np.array_equal(a, f) and np.array_equal(b, f)
    assert service.cache_entries == 3 and service.cache_bytes == 3 * TILE_BYTES


def test_only_misses_run_the_encoder_batched_and_results_go_back_in_order(tiny_checkpoint, plain):
    service = cached_service(tiny_checkpoint, max_images_per_forward=8)
    rows = RowCounter(service)
    service.embed([tiles(1, 2)])
    before = rows.calls
    # requests: [2, 5], [], [1, 5, 6]: tiles 1 and 2 hit; 5 repeats inside the batch: encoded once
    got = service.embed([tiles(2, 5), tiles(9)[:0], tiles(1, 5, 6)])
    assert rows.rows == 2 + 2 and rows.calls == before + 1      # one forward over [5, 6]
    assert counters(service) == (3, 4, 0)                        # 2 + 2 misses; hits 2, 1, and 5 again
    n = service.num_image_token
    want_12 = plain.embed([tiles(1, 2)])[0]      # the first call stored 1 and 2 from one forward [1, 2]
    want_56 = plain.embed([tiles(5, 6)])[0]      # the misses ran as one forward [5, 6]
    want = {1: want_12[:n], 2: want_12[n:], 5: want_56[:n], 6: want_56[n:]}
    assert [e.shape[0] for e in got] == [2 * n, 0, 3 * n]
    for e, seeds in ((got[0], (2, 5)), (got[2], (1, 5, 6))):
        for k, s in enumerate(seeds):
            assert np.array_equal(e[k * n:(k + 1) * n], want[s]), s


def test_lru_eviction_order_and_byte_bound(tiny_checkpoint):
    service = cached_service(tiny_checkpoint, image_cache_mb=2.5 * TILE_MB)   # room for two tiles
    rows = RowCounter(service)
    service.embed([tiles(1), tiles(2)])
    assert service.cache.keys() == [tile_key(t) for t in tiles(1, 2)]
    service.embed([tiles(1)])                             # 1 is now the most recently used
    service.embed([tiles(3)])                             # evicts 2, the least recently used
    assert service.cache.keys() == [tile_key(t) for t in tiles(1, 3)]
    assert service.cache_evictions == 1 and service.cache_bytes == 2 * TILE_BYTES <= 2.5 * TILE_BYTES
    rows.rows = 0
    service.embed([tiles(1, 3)])
    assert rows.rows == 0                                 # both still held
    service.embed([tiles(2)])
    assert rows.rows == 1 and service.cache_evictions == 2    # 2 is encoded again, 1 goes
    assert service.cache.keys() == [tile_key(t) for t in tiles(3, 2)]
    assert counters(service) == (3, 4, 2)


def test_entry_bound_and_more_misses_than_room(tiny_checkpoint, plain):
    service = cached_service(tiny_checkpoint, image_cache_entries=2, max_images_per_forward=2)
    got = service.embed([tiles(1, 2, 3, 4, 5)])[0]        # 5 misses, 3 forwards, only the last 2 kept
    chunks = [plain.embed([tiles(*c)])[0] for c in ((1, 2), (3, 4), (5,))]   # the same forwards, uncached
    assert np.array_equal(got, np.concatenate(chunks))
    assert len(service.cache) == 2 and service.cache_evictions == 3
    assert service.cache.keys() == [tile_key(t) for t in tiles(4, 5)]


def test_disabled_cache_encodes_every_tile_every_time(tiny_checkpoint, plain):
    service = cached_service(tiny_checkpoint, image_cache_mb=0)
    assert not service.cache.enabled
    rows = RowCounter(service)
    a = service.embed([tiles(1, 1)])
    b = service.embed([tiles(1)])
    assert rows.rows == 3 and counters(service) == (0, 0, 0) and service.cache_entries == 0
    assert np.array_equal(a[0], np.concatenate(plain.embed([tiles(1, 1)])))
    assert np.array_equal(b[0], plain.embed([tiles(1)])[0])


def test_concurrent_calls_share_the_cache_consistently(tiny_checkpoint, plain):
    service = cached_service(tiny_checkpoint)
    seeds = [(1, 2), (2, 3), (1, 3), (4,)]
    want = {s: plain.embed([tiles(*s)])[0] for s in seeds}   # per-call batches as run alone: exact unless
    results, errors = {}, []                                 # a tile came from another call's forward

    def worker(s):
        try:
            results[s] = service.embed([tiles(*s)])[0]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for s in seeds:
        torch.testing.assert_close(torch.from_numpy(results[s]), torch.from_numpy(want[s]), rtol=1e-5, atol=1e-5)
    assert service.cache_hits + service.cache_misses == 7 and 4 <= service.cache_misses <= 7
    assert service.cache_entries == 4 and service.cache_bytes == 4 * TILE_BYTES


# ---- the cache on its own -------------------------------------------------------------------------------

def test_embedding_cache_bounds_refresh_and_oversize():
    cache = EmbeddingCache(max_bytes=100)
    cache.put(b"a", torch.zeros(10))                      # 40 bytes
    cache.put(b"a", torch.ones(10))                       # refresh: counted once
    assert cache.bytes == 40 and len(cache) == 1 and torch.equal(cache.get(b"a"), torch.ones(10))
    cache.put(b"b", torch.zeros(10))
    cache.put(b"big", torch.zeros(26))                    # 104 bytes > the whole cache: not stored
    assert cache.keys() == [b"a", b"b"] and cache.evictions == 0
    assert cache.get(b"a") is not None                    # a becomes the most recent
    cache.put(b"c", torch.zeros(10))                      # 120 > 100: b goes
    assert cache.keys() == [b"a", b"c"] and cache.evictions == 1 and cache.bytes == 80
    assert cache.get(b"b") is None
    with pytest.raises(ValueError, match="cache bounds"):
        EmbeddingCache(-1)


def test_tile_key_is_content_dtype_and_shape():
    t = tiles(7)[0]
    assert tile_key(t) == tile_key(t.copy()) and len(tile_key(t)) == 32
    u = t.copy()
    u[2, 447, 447] = np.nextafter(u[2, 447, 447], np.float32(np.inf))   # one ulp of one pixel
    assert tile_key(u) != tile_key(t)
    assert tile_key(t.view(np.int32)) != tile_key(t)                    # same bytes, other dtype
    assert tile_key(t.reshape(3, 224, 896)) != tile_key(t)              # same bytes, other shape
    assert tile_key(np.asfortranarray(t)) == tile_key(t)                # the layout does not matter


# ---- the config.pbtxt parameter ----------------------------------------------------------------------------

def test_vision_parameters_parse():
    config = text_format.Parse((REPO / "vision" / "config.pbtxt").read_text(), mc.ModelConfig())
    options = VisionOptions.from_parameters({k: v.string_value for k, v in config.parameters.items()})
    assert options == VisionOptions(device="auto", max_images_per_forward=32, image_cache_mb=1024.0, compile="auto")
    assert VisionOptions.from_parameters({"compile": " False"}).compile == "false"
    assert VisionOptions.from_parameters({}).image_cache_mb == DEFAULT_IMAGE_CACHE_MB
    assert VisionOptions.from_parameters({"image_cache_mb": " 0 "}).image_cache_mb == 0.0
    assert VisionOptions.from_parameters({"host_threads": "1"}).host_threads == 1
    assert VisionOptions.from_parameters({"host_threads": ""}).host_threads is None  # torch's default
    for key, bad in (("image_cache_mb", "-1"), ("image_cache_mb", "lots"), ("image_cache_mb", "nan"),
                     ("image_cache_mb", "inf"), ("max_images_per_forward", "0"), ("max_images_per_forward", "2.5"),
                     ("compile", "yes"), ("host_threads", "0"), ("host_threads", "two")):
        with pytest.raises(ValueError, match=f"vision parameter '{key}'"):
            VisionOptions.from_parameters({key: bad})


@pytest.mark.parametrize("image_cache_mb", [0, 64])
def test_pixels_that_overflow_the_encoder_refuse_their_request_alone_and_are_not_cached(tiny_checkpoint, plain,
                                                                                       image_cache_mb):
    """1e30 is a finite pixel value (request_tiles lets it through) but the encoder's norms overflow on it:
    that request's embeddings would be NaN. It is refused, naming pixel_values; the batch's other
    requests get exactly their own embeddings; its tile is not cached (sent again, it is refused again)."""
    service = cached_service(tiny_checkpoint, image_cache_mb=image_cache_mb)
    overflowing = tiles(9)
    overflowing[0, 0, 0, 0] = 1e30
    batches = [tiles(1), np.concatenate([tiles(2), overflowing]), tiles(3)]
    for _ in range(2):
        with pytest.raises(NonFiniteEmbeddings, match="input 'pixel_values' gives image embeddings that are not finite") \
                as refused:
            service.embed(batches)
        assert refused.value.requests == [1]
        for i in (0, 2):
            assert torch.equal(torch.from_numpy(refused.value.embeds[i]), torch.from_numpy(plain.embed([batches[i]])[0]))
        assert tile_key(overflowing[0]) not in service.cache and len(service.cache) == (3 if image_cache_mb else 0)
