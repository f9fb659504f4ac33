"""The vision service behind the `vision` Triton model: pixel tiles -> image embeddings.

Owns: loading only the checkpoint's vision_model.* and mlp1.* weights (bfloat16 on CUDA, float32 on
CPU), running several requests' images as one batched forward (chunked to bound memory), split back
per request, and a bounded LRU cache of tile embeddings keyed by a hash of the tile's pixels, so a
multi-round chat that resends its image is not encoded again; one request's checks (request_tiles:
shape, the ensemble's tile limit, finite pixels) for clients that call the vision model directly.
A new tile allocates no fresh large host buffer (the adapter's malloc setting, serving/heap.py, makes each
one an mmap that faults in anew): its pixels go through a reused staging buffer (pinned on CUDA), the
embeddings are made float32 on the device and copied into the output, which can be a reused buffer
(embed(reuse_output=True), what the adapter uses), and cache entries live in reused slots
(internvl_serve/hostbuf.py). One embed() at a time runs the encoder (a lock around the buffers); with the
server's encoder-activity record each forward is flagged there (serving/encoder_activity.py). The
buffers grow to the largest call seen and stay: the output at most Triton's max_batch_size x the tile
limit (8 x 12 V1-1 tiles: 503 MB), the pixel and bf16 staging max_images_per_forward tiles (32: 161 MB).
Does not own: Triton (the adapter in model_repository/vision) or image decoding.
"""
from __future__ import annotations

import contextlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from internvl_serve.checkpoint import load_model
from internvl_serve.content_key import content_key
from internvl_serve.engine.quantize import validate_quantization
from internvl_serve.kernels.fp8_linear import quantize_linears_fp8_
from internvl_serve.config import InternVLChatConfig
from internvl_serve.serving.contract import IMAGE_SIZE, VISION_INPUT_DIMS, InvalidInput, ServingLimits, TensorSpec
from internvl_serve.serving.device import default_dtype, resolve_device, set_host_threads
from internvl_serve.serving.encoder_activity import EncoderActivity, device_number
from internvl_serve.hostbuf import HostBuffers, SlotPool, all_finite

VISION_QUANTIZATIONS = ("fp8",)
# the matmuls of each ViT block (model/vision.py) that `quantization: fp8` runs in e4m3; the patch
# embedding, the norms, attention itself and the projector (mlp1) stay in the model dtype
VISION_BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
DEFAULT_IMAGE_CACHE_MB = 1024.0  # ~400 tiles of V1-1 in bf16 (256 x 5120 x 2 bytes = 2.6 MB each)
# fp8: the blocks' products accumulate on the FP8 tensor cores without periodic promotion (Fp8Linear's
# fast_accum). H100: each ViT linear's error against float32 the same to 3 digits (0.0375, the e4m3
# rounding), fc1 / fc2 17 % / 15 % faster, the encoder 17.6 -> 16.4 ms per image at batch 8
# (bench/fp8_matmul_probe.py, bench/vision_variants.py; bench/results/h100-2026-12-06/937e289/). The llm's
# fp8 linears do the same by default (its fp8_fast_accum parameter, measured at 7c632a8).
VISION_FP8_FAST_ACCUM = True


def tile_key(tile: np.ndarray) -> bytes:
    """The content key (internvl_serve/content_key.py) of one preprocessed tile (3, S, S): its dtype,
    shape and bytes."""
    tile = np.ascontiguousarray(tile)
    return content_key(f"tile {tile.dtype.str}{tile.shape}", tile)


# The vision model's input as it declares it (config.pbtxt dims; Triton adds the batch dim).
VISION_PIXEL_VALUES = TensorSpec("pixel_values", "FP32", VISION_INPUT_DIMS, optional=False,
                                 doc="one request's tiles, (1, N, 3, 448, 448) with the batch dim")


def max_tiles(limits: ServingLimits) -> int:
    """Tiles one request may send to the vision model: the ensemble's limit (one tile per image or frame)."""
    return max(limits.max_images, limits.max_frames)


def request_tiles(pixel_values: np.ndarray, limits: ServingLimits) -> np.ndarray:
    """One request's pixel_values (1, N, 3, S, S) -> its tiles (N, 3, S, S), refused (InvalidInput naming
    pixel_values) above the ensemble's tile limit or when not finite: the same limits as through
    preprocess, for a client that calls the vision model directly."""
    dims = (1, -1, 3, IMAGE_SIZE, IMAGE_SIZE)
    if pixel_values.ndim != 5 or any(d != -1 and d != n for d, n in zip(dims, pixel_values.shape)):
        raise InvalidInput(f"input 'pixel_values' must have shape [1,-1,3,{IMAGE_SIZE},{IMAGE_SIZE}] (one request), "
                           f"got {list(pixel_values.shape)}")
    tiles = pixel_values.reshape(pixel_values.shape[1:])
    if tiles.shape[0] > max_tiles(limits):
        raise InvalidInput(f"input 'pixel_values' holds {tiles.shape[0]} tiles; at most {max_tiles(limits)} allowed "
                           f"(one per image or video frame)")
    if not all_finite(tiles):
        raise InvalidInput("input 'pixel_values' must be finite: it holds NaN or infinity")
    return tiles


class NonFiniteEmbeddings(InvalidInput):
    """Raised by VisionService.embed when some requests' tiles gave NaN or infinity (finite pixel values
    that overflow the encoder, e.g. 1e30): `requests` are their indices in embed's batches, `embeds` every
    request's result (the others' are valid). Such tiles are never cached."""

    def __init__(self, requests: list[int], embeds: list[np.ndarray]):
        super().__init__("input 'pixel_values' gives image embeddings that are not finite (NaN or infinity): its "
                         "values lie beyond what the encoder can take (normalized pixels lie within about ±3)")
        self.requests, self.embeds = requests, embeds


class EmbeddingCache:
    """Bounded LRU map tile_key -> embedding (num_image_token, hidden), on the CPU, in the encoder's dtype
    (so a hit returns exactly the values the forward produced). Bounded by bytes (and, if given, by
    entries); max_bytes 0 disables it. Thread-safe: every method takes one lock.

    put copies the embedding into a slot (hostbuf.SlotPool, one pool per shape and dtype): slots are made
    in blocks and an evicted entry's slot holds the next one, so a miss allocates no fresh host memory.

    Counters: hits (tiles served without a forward), misses (tiles encoded), evictions."""

    def __init__(self, max_bytes: int, max_entries: int | None = None):
        if max_bytes < 0 or (max_entries is not None and max_entries < 0):
            raise ValueError(f"cache bounds must be >= 0, got max_bytes={max_bytes}, max_entries={max_entries}")
        self.max_bytes = int(max_bytes)
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # oldest first; values are slots
        self._pools: dict[tuple, SlotPool] = {}  # (shape, dtype) -> its slots
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 and self.max_entries != 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._entries

    def get(self, key: bytes) -> torch.Tensor | None:
        """A copy of the cached embedding (now the most recently used), or None. Counts nothing: the
        caller counts hits and misses per tile (see count)."""
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                return None
            self._entries.move_to_end(key)
            return value.clone()

    def copy_to(self, key: bytes, dest: torch.Tensor) -> bool:
        """dest.copy_(the cached embedding) (now the most recently used) and True, or False when absent:
        under the lock, so the slot cannot be reused by a concurrent put meanwhile."""
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                return False
            self._entries.move_to_end(key)
            dest.copy_(value)
            return True

    def count(self, hits: int, misses: int) -> None:
        with self._lock:
            self.hits += hits
            self.misses += misses

    def _pool(self, shape: tuple[int, ...], dtype: torch.dtype) -> SlotPool:
        spec = (tuple(shape), dtype)
        if spec not in self._pools:
            size = math.prod(shape) * dtype.itemsize
            limit = self.max_bytes // size if self.max_entries is None else min(self.max_bytes // size,
                                                                                 self.max_entries)
            self._pools[spec] = SlotPool(spec[0], spec[1], limit)
        return self._pools[spec]

    def reserve(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Allocate and touch, now, every slot that entries of this shape and dtype can fill (the whole
        bound's worth): a miss then faults in no fresh memory (640 faults, ~2 ms on the H100 machine, for
        each new V1-1 image until the cache is full)."""
        with self._lock:
            if self.enabled:
                self._pool(shape, dtype).reserve()

    def _drop(self, value: torch.Tensor) -> None:
        self.bytes -= value.numel() * value.element_size()
        self._pool(value.shape, value.dtype).give(value)

    def put(self, key: bytes, value: torch.Tensor) -> None:
        """Insert (or refresh) a copy of `value`, evicting the least recently used until it fits. An entry
        larger than the whole cache is not stored."""
        size = value.numel() * value.element_size()
        if not self.enabled or size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._drop(old)
            while self._entries and (self.bytes + size > self.max_bytes or
                                     (self.max_entries is not None and len(self._entries) >= self.max_entries)):
                _, evicted = self._entries.popitem(last=False)
                self._drop(evicted)
                self.evictions += 1
            slot = self._pool(value.shape, value.dtype).take()
            if slot is None:  # the bounds leave room for one more entry of a shape once the loop is done
                return
            slot.copy_(value)
            self._entries[key] = slot
            self.bytes += size

    def keys(self) -> list[bytes]:
        """Oldest (next to evict) first."""
        with self._lock:
            return list(self._entries)


@dataclass(frozen=True)
class VisionOptions:
    """The vision model's config.pbtxt parameters (string values)."""

    device: str = "auto"
    max_images_per_forward: int = 32
    image_cache_mb: float = DEFAULT_IMAGE_CACHE_MB  # 0 disables the embedding cache
    compile: str = "auto"  # torch.compile each ViT block: auto (on CUDA) | true | false
    quantization: str = ""  # "fp8": the blocks' matmuls in e4m3 (kernels/fp8_linear.py); "": the model dtype
    host_threads: int | None = None  # torch's CPU threads in this process (device.host_threads_for); None: auto

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> "VisionOptions":
        raw = {k: str(v).strip() for k, v in parameters.items() if str(v).strip()}
        values: dict = {}
        if "device" in raw:
            values["device"] = raw["device"]
        if "compile" in raw:
            if raw["compile"].lower() not in ("auto", "true", "false"):
                raise ValueError(f"vision parameter 'compile': {raw['compile']!r} is not auto, true or false")
            values["compile"] = raw["compile"].lower()
        if "quantization" in raw:
            try:
                values["quantization"] = validate_quantization(raw["quantization"], VISION_QUANTIZATIONS)
            except ValueError as e:
                raise ValueError(f"vision parameter 'quantization': {raw['quantization']!r}: {e}") from None
        checks = {"max_images_per_forward": (int, lambda v: v >= 1, "an integer >= 1"),
                  "host_threads": (int, lambda v: v >= 1, "an integer >= 1"),
                  "image_cache_mb": (float, lambda v: math.isfinite(v) and v >= 0, "a number of MiB >= 0")}
        for name, (kind, ok, what) in checks.items():
            if name not in raw:
                continue
            try:
                values[name] = kind(raw[name])
            except ValueError:
                values[name] = None
            if values[name] is None or not ok(values[name]):
                raise ValueError(f"vision parameter {name!r}: {raw[name]!r} is not {what}")
        return cls(**values)


def quantize_vision_fp8_(encoder: torch.nn.Module) -> torch.nn.Module:
    """The vision model's `quantization: fp8`: every block's qkv, proj, fc1 and fc2 become Fp8Linears,
    in place (before the blocks are compiled). The embeddings then differ from the model dtype's by a few
    per cent (tests/unit/test_vision_fp8.py measures it), so answers can change: an opt-in for throughput."""
    layers = encoder.vision_model.encoder.layers
    replaced = quantize_linears_fp8_(layers, VISION_BLOCK_LINEARS, fast_accum=VISION_FP8_FAST_ACCUM)
    if replaced != len(VISION_BLOCK_LINEARS) * len(layers):
        raise ValueError(f"fp8: replaced {replaced} linears, expected {len(VISION_BLOCK_LINEARS)} per block x "
                         f"{len(layers)} blocks (already quantized?)")
    return encoder


class VisionService:
    """`embed([pixel_values of request 1, of request 2, ...])` -> their image embeddings, one forward
    over the tiles the cache does not hold."""

    def __init__(self, checkpoint: str | Path, *, device: str = "auto", dtype: torch.dtype | None = None,
                 max_images_per_forward: int = 32, image_cache_mb: float = DEFAULT_IMAGE_CACHE_MB,
                 image_cache_entries: int | None = None, compile: str = "auto", quantization: str = "",
                 host_threads: int | None = None, log: Callable[[str], None] | None = None,
                 activity: EncoderActivity | None = None):
        """activity: the server's encoder-activity record (serving/encoder_activity.py); every forward is
        flagged in a slot of it, so the llm engine on the same GPU holds its decode steps back meanwhile.
        host_threads: torch's CPU threads in this process (device.host_threads_for; None: one on a GPU,
        torch's default on the CPU)."""
        self.device = resolve_device(device)
        set_host_threads(host_threads, self.device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # compiled (Triton) kernels launch on the current device
        self.dtype = dtype or default_dtype(self.device)
        self.config = InternVLChatConfig.from_pretrained(checkpoint)
        self.encoder = load_model(checkpoint, dtype=self.dtype, device=self.device, parts=("vision",),
                                  trim_vision_layers=True, progress=False)
        self.max_images_per_forward = max_images_per_forward
        self.num_image_token = self.config.num_image_token
        self.hidden_size = self.config.llm_config.hidden_size
        self.cache = EmbeddingCache(int(image_cache_mb * 2**20), image_cache_entries)
        if self.device.type == "cuda":  # the cache's memory taken and touched at load, off the request path
            self.cache.reserve((self.num_image_token, self.hidden_size), self.dtype)
        self.quantization = validate_quantization(quantization, VISION_QUANTIZATIONS) or ""
        if self.quantization == "fp8":
            quantize_vision_fp8_(self.encoder)
        self._buffers = HostBuffers(pin=self.device.type == "cuda")  # staging and output, reused (hostbuf.py)
        self._lock = threading.Lock()  # one embed() at a time uses the buffers
        self.compiled = False
        if compile == "true" or (compile == "auto" and self.device.type == "cuda"):
            self.compiled = self._compile_blocks(log or (lambda message: None))
        # claimed after the warm-up forwards above, so that only requests' forwards are flagged
        self.encoder_slot = None if activity is None else activity.claim(device_number(self.device))

    @classmethod
    def from_parameters(cls, checkpoint: str | Path, parameters: Mapping[str, str],
                        log: Callable[[str], None] | None = None,
                        activity: EncoderActivity | None = None) -> "VisionService":
        o = VisionOptions.from_parameters(parameters)
        return cls(checkpoint, device=o.device, max_images_per_forward=o.max_images_per_forward,
                   image_cache_mb=o.image_cache_mb, compile=o.compile, quantization=o.quantization,
                   host_threads=o.host_threads, log=log, activity=activity)

    @torch.inference_mode()
    def _compile_blocks(self, log: Callable[[str], None]) -> bool:
        """torch.compile each ViT block (one compiled graph serves all 45: the blocks share their code)
        and compile now, for one image and for a dynamic batch, so no request waits for it. Inductor
        fuses the fp32 RMSNorms, layer scales and residuals that eager runs as separate kernels
        (H200, batch 8: 28.7 -> 22.0 ms per image; closer to fp32 than eager bf16, bench/vision_speed.py).
        Falls back to eager, with a log line, if compiling fails."""
        layers = self.encoder.vision_model.encoder.layers
        size = self.config.vision_config.image_size
        try:
            for layer in layers:
                layer.compile()
            for batch in (1, 3):
                self.encoder(torch.zeros(batch, 3, size, size, device=self.device, dtype=self.dtype))
            return True
        except Exception as e:  # noqa: BLE001 - eager is always correct
            for layer in layers:
                layer._compiled_call_impl = None
            log(f"vision: torch.compile failed, running eagerly: {type(e).__name__}: {e}")
            return False

    # the counters another module exports as metrics
    @property
    def cache_hits(self) -> int:
        return self.cache.hits

    @property
    def cache_misses(self) -> int:
        return self.cache.misses

    @property
    def cache_evictions(self) -> int:
        return self.cache.evictions

    @property
    def cache_entries(self) -> int:
        return len(self.cache)

    @property
    def cache_bytes(self) -> int:
        return self.cache.bytes

    @torch.inference_mode()
    def embed(self, batches: list[np.ndarray], *, reuse_output: bool = False) -> list[np.ndarray]:
        """Each element (N_i, 3, S, S) float32 -> (N_i * num_image_token, llm_hidden) float32.

        With the cache: each tile is looked up by its content hash; the misses (each distinct tile
        once, also when it repeats within this call) run as one batched forward and are stored; every
        result is scattered back to its tile's place.

        reuse_output: the results are views of one buffer the service reuses, valid until the next
        embed(reuse_output=True) (for one caller at a time: the Triton adapter, whose responses are
        copied out before its next execute); otherwise they own their memory (on CUDA page-locked, from
        torch's caching host allocator, so freed ones are reused)."""
        counts = [int(b.shape[0]) for b in batches]
        total = sum(counts)
        shape = (total, self.num_image_token, self.hidden_size)
        if reuse_output:
            with self._lock:
                out = self._buffers.get("output", shape, torch.float32)
        else:
            out = torch.empty(shape, dtype=torch.float32, pin_memory=self._buffers.pin)
        tiles = [tile for b in batches for tile in b]  # views of the callers' arrays: no copy
        if self.cache.enabled:
            bad = self._embed_cached(tiles, out)
        else:
            bad = self._encode(tiles, [(None, [i]) for i in range(total)], out)
        embeds, refused, start = [], [], 0
        for r, n in enumerate(counts):  # (n, tokens, H) -> (n * tokens, H), in image order
            embeds.append(out[start:start + n].reshape(n * self.num_image_token, self.hidden_size).numpy())
            if any(start <= i < start + n for i in bad):
                refused.append(r)
            start += n
        if refused:
            raise NonFiniteEmbeddings(refused, embeds)
        return embeds

    def _embed_cached(self, tiles: list[np.ndarray], out: torch.Tensor) -> set[int]:
        missing: dict[bytes, list[int]] = {}  # key -> the tiles (indices) that need it, first-seen order
        for i, tile in enumerate(tiles):
            key = tile_key(tile)
            if key in missing:
                missing[key].append(i)
            elif not self.cache.copy_to(key, out[i]):
                missing[key] = [i]
        self.cache.count(hits=len(tiles) - len(missing), misses=len(missing))  # a repeat in the call hits
        return self._encode(tiles, list(missing.items()), out) if missing else set()

    def _encode(self, tiles: list[np.ndarray], groups: list[tuple[bytes | None, list[int]]],
                out: torch.Tensor) -> set[int]:
        """Encode tiles[indices[0]] of each group, in forwards of at most max_images_per_forward, into
        out[i] (float32) for every i of its indices, and into the cache under its key (when not None) if
        finite; return the indices of the tiles whose embeddings are not (NaN or infinity).
        Host side through reused buffers: the pixels copied into a staging buffer (pinned on CUDA: async
        H2D), the embeddings made float32 on the device and copied straight into `out`, the cache's copy
        through a pinned staging buffer."""
        size = self.config.vision_config.image_size
        cuda = self.device.type == "cuda"
        running = self.encoder_slot.running() if self.encoder_slot is not None else contextlib.nullcontext()
        bad: set[int] = set()
        with self._lock, running:
            for start in range(0, len(groups), self.max_images_per_forward):
                part = groups[start:start + self.max_images_per_forward]
                pixels = self._buffers.get("pixels", (len(part), 3, size, size), torch.float32)
                staged = pixels.numpy()
                for j, (_, indices) in enumerate(part):
                    np.copyto(staged[j], tiles[indices[0]], casting="same_kind")
                # float32 to the device, converted there: a copy that also changed the dtype would convert
                # on the CPU first (ATen), into a fresh pageable buffer, and copy that synchronously
                encoded = self.encoder(pixels.to(device=self.device, non_blocking=True).to(self.dtype))
                lo, hi = torch.aminmax(encoded.flatten(1), dim=1)  # NaN -> NaN; no temporary of encoded's size
                finite = torch.isfinite(lo) & torch.isfinite(hi)
                host = encoded
                if cuda:
                    finite = self._buffers.get("finite", (len(part),), torch.bool).copy_(finite, non_blocking=True)
                    rows = encoded.float()
                    for j, (_, indices) in enumerate(part):
                        out[indices[0]].copy_(rows[j], non_blocking=True)
                    if any(key is not None for key, _ in part):
                        host = self._buffers.get("encoded", tuple(encoded.shape), encoded.dtype)
                        host.copy_(encoded, non_blocking=True)
                    torch.cuda.current_stream(self.device).synchronize()
                else:
                    for j, (_, indices) in enumerate(part):
                        out[indices[0]].copy_(host[j])
                for j, finite_j in enumerate(finite.tolist()):
                    key, indices = part[j]
                    if not finite_j:
                        bad.update(indices)
                    elif key is not None:
                        self.cache.put(key, host[j])
                    for i in indices[1:]:
                        out[i].copy_(out[indices[0]])
        return bad
