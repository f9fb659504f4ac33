"""The vision service behind the `vision` Triton model: pixel tiles -> image embeddings.

Owns: loading only the checkpoint's vision_model.* and mlp1.* weights (bfloat16 on CUDA, float32 on
CPU), running several requests' images as one batched forward (chunked to bound memory), split back
per request, and a bounded LRU cache of tile embeddings keyed by a hash of the tile's pixels, so a
multi-round chat that resends its image is not encoded again; one request's checks (request_tiles:
shape, the ensemble's tile limit, finite pixels) for clients that call the vision model directly.
Does not own: Triton (the adapter in model_repository/vision) or image decoding.
"""
from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from internvl_serve.checkpoint import load_model
from internvl_serve.kernels.fp8_linear import quantize_linears_fp8_
from internvl_serve.config import InternVLChatConfig
from internvl_serve.serving.contract import IMAGE_SIZE, VISION_INPUT_DIMS, InvalidInput, ServingLimits, TensorSpec
from internvl_serve.serving.device import default_dtype, resolve_device

VISION_QUANTIZATIONS = ("fp8",)
# the matmuls of each ViT block (model/vision.py) that `quantization: fp8` runs in e4m3; the patch
# embedding, the norms, attention itself and the projector (mlp1) stay in the model dtype
VISION_BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
DEFAULT_IMAGE_CACHE_MB = 1024.0  # ~400 tiles of V1-1 in bf16 (256 x 5120 x 2 bytes = 2.6 MB each)


def tile_key(tile: np.ndarray) -> bytes:
    """A content hash of one preprocessed tile (3, S, S): its dtype, shape and bytes.

    SHA-256 rather than BLAKE2b: with the CPU's SHA instructions it hashed a 448 float32 tile (2.4 MB)
    in 1.4 ms here against 2.9 ms for BLAKE2b (hashlib releases the GIL for both)."""
    tile = np.ascontiguousarray(tile)
    h = hashlib.sha256(f"{tile.dtype.str}{tile.shape}".encode())
    h.update(tile)
    return h.digest()


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
    if not np.isfinite(tiles).all():
        raise InvalidInput("input 'pixel_values' must be finite: it holds NaN or infinity")
    return tiles


class EmbeddingCache:
    """Bounded LRU map tile_key -> embedding tensor (num_image_token, hidden), on the CPU, in the encoder's
    dtype (so a hit returns exactly the values the forward produced). Bounded by bytes (and, if given, by
    entries); max_bytes 0 disables it. Thread-safe: every method takes one lock.

    Counters: hits (tiles served without a forward), misses (tiles encoded), evictions."""

    def __init__(self, max_bytes: int, max_entries: int | None = None):
        if max_bytes < 0 or (max_entries is not None and max_entries < 0):
            raise ValueError(f"cache bounds must be >= 0, got max_bytes={max_bytes}, max_entries={max_entries}")
        self.max_bytes = int(max_bytes)
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # oldest first
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
        """The cached embedding (now the most recently used), or None. Counts nothing: the caller
        counts hits and misses per tile (see count)."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def count(self, hits: int, misses: int) -> None:
        with self._lock:
            self.hits += hits
            self.misses += misses

    def put(self, key: bytes, value: torch.Tensor) -> None:
        """Insert (or refresh) an entry, evicting the least recently used until it fits. An entry larger
        than the whole cache is not stored. `value` must own its storage (not a view of a batch)."""
        size = value.numel() * value.element_size()
        if not self.enabled or size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.numel() * old.element_size()
            while self._entries and (self.bytes + size > self.max_bytes or
                                     (self.max_entries is not None and len(self._entries) >= self.max_entries)):
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.numel() * evicted.element_size()
                self.evictions += 1
            self._entries[key] = value
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
            if raw["quantization"].lower() not in VISION_QUANTIZATIONS:
                raise ValueError(f"vision parameter 'quantization': {raw['quantization']!r} is not "
                                 f"{' or '.join(VISION_QUANTIZATIONS)} (or empty: none)")
            values["quantization"] = raw["quantization"].lower()
        checks = {"max_images_per_forward": (int, lambda v: v >= 1, "an integer >= 1"),
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
    per cent (tests/unit/test_vision.py measures it), so answers can change: an opt-in for throughput."""
    layers = encoder.vision_model.encoder.layers
    replaced = quantize_linears_fp8_(layers, VISION_BLOCK_LINEARS)
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
                 log: Callable[[str], None] | None = None):
        self.device = resolve_device(device)
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
        self.quantization = quantization or ""
        if self.quantization == "fp8":
            quantize_vision_fp8_(self.encoder)
        self.compiled = False
        if compile == "true" or (compile == "auto" and self.device.type == "cuda"):
            self.compiled = self._compile_blocks(log or (lambda message: None))

    @classmethod
    def from_parameters(cls, checkpoint: str | Path, parameters: Mapping[str, str],
                        log: Callable[[str], None] | None = None) -> "VisionService":
        o = VisionOptions.from_parameters(parameters)
        return cls(checkpoint, device=o.device, max_images_per_forward=o.max_images_per_forward,
                   image_cache_mb=o.image_cache_mb, compile=o.compile, quantization=o.quantization, log=log)

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

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) float32 on the CPU -> (n, num_image_token, hidden) on the CPU in the encoder's dtype,
        in chunks of max_images_per_forward."""
        out = torch.empty((pixels.shape[0], self.num_image_token, self.hidden_size), dtype=self.dtype)
        for start in range(0, pixels.shape[0], self.max_images_per_forward):
            chunk = pixels[start:start + self.max_images_per_forward]
            chunk = chunk.to(device=self.device, dtype=self.dtype, non_blocking=True)
            out[start:start + chunk.shape[0]] = self.encoder(chunk).cpu()
        return out

    @torch.inference_mode()
    def embed(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """Each element (N_i, 3, S, S) float32 -> (N_i * num_image_token, llm_hidden) float32.

        With the cache: each tile is looked up by its content hash; the misses (each distinct tile
        once, also when it repeats within this call) run as one batched forward and are stored; every
        result is scattered back to its tile's place."""
        counts = [int(b.shape[0]) for b in batches]
        total = sum(counts)
        out = torch.empty((total, self.num_image_token, self.hidden_size), dtype=torch.float32)
        if total:
            pixels = np.concatenate([b for b in batches if b.shape[0]], axis=0)
            if self.cache.enabled:
                self._embed_cached(pixels, out)
            else:
                out.copy_(self._encode(torch.from_numpy(pixels)))
        embeds, start = [], 0
        for n in counts:  # (n, tokens, H) -> (n * tokens, H), in image order
            embeds.append(out[start:start + n].reshape(n * self.num_image_token, self.hidden_size).numpy())
            start += n
        return embeds

    def _embed_cached(self, pixels: np.ndarray, out: torch.Tensor) -> None:
        keys = [tile_key(tile) for tile in pixels]
        missing: dict[bytes, list[int]] = {}  # key -> the tiles (indices) that need it, first-seen order
        for i, key in enumerate(keys):
            if key in missing:
                missing[key].append(i)
                continue
            cached = self.cache.get(key)
            if cached is None:
                missing[key] = [i]
            else:
                out[i].copy_(cached)
        self.cache.count(hits=len(keys) - len(missing), misses=len(missing))
        if not missing:
            return
        firsts = [indices[0] for indices in missing.values()]
        encoded = self._encode(torch.from_numpy(pixels[firsts]))  # (misses, tokens, H)
        for (key, indices), embedding in zip(missing.items(), encoded):
            self.cache.put(key, embedding.clone())  # own storage: not a view that pins the whole batch
            out[indices] = embedding.float()
