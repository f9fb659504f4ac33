"""Load and save the checkpoint's real layout; every failure is a CheckpointError saying what to fix.

Owns: finding the weights in a folder (safetensors first, as transformers does):
  model.safetensors.index.json + model-0000N-of-0000M.safetensors | model.safetensors |
  pytorch_model.bin.index.json + pytorch_model-0000N-of-0000M.bin  | pytorch_model.bin
reading only the shards that hold wanted keys (the index's weight_map), one tensor at a time cast
to the target dtype and moved to the target device (never a full fp32 copy), key and shape checks
against the module, assigning the tensors into a module built on the meta device, and writing the
same layout (save_checkpoint).

.bin shards are read with torch.load(weights_only=True, mmap=True): no arbitrary unpickling. No
remote code, no downloads: a folder on disk is the only input.

Does not own: the module definitions (model/), config parsing (config.py), format conversion CLI
(convert.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import random_weights
from .config import InternVLChatConfig
from .model.internvl import PARTS, build_model, normalize_parts
from .model.language import is_ignored_key, reset_rotary_buffers

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
WEIGHT_FILE_RE = re.compile(r"^(pytorch_model(-\d{5}-of-\d{5})?\.bin|model(-\d{5}-of-\d{5})?\.safetensors|"
                            r"pytorch_model\.bin\.index\.json|model\.safetensors\.index\.json)$")

_VIT_BLOCK_RE = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")
PART_PREFIXES = {"vision": ("vision_model.", "mlp1."), "language": ("language_model.",)}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class CheckpointError(RuntimeError):
    """The checkpoint folder cannot give the module its weights (the message names keys or files)."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """"bfloat16" / "float16" / "float32" or a floating torch.dtype -> torch.dtype."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise CheckpointError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)} or a floating torch.dtype")


def is_weight_file(name: str) -> bool:
    return bool(WEIGHT_FILE_RE.match(name))


def _listing(keys: Iterable[str], limit: int = 10) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# ---- finding and reading the weights -----------------------------------------------------------
@dataclass(frozen=True)
class WeightFiles:
    """Where each tensor lives: format ("bin" | "safetensors") and key -> file name within folder."""

    folder: Path
    format: str
    weight_map: dict[str, str]

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))


def _read_index(path: Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map keys to file names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path.name}: unreadable index ({type(e).__name__}: {e})") from e
    return dict(weight_map)


def find_weights(folder: str | Path) -> WeightFiles:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    if random_weights.is_random_checkpoint(folder):      # benchmark-only: see random_weights.py
        return WeightFiles(folder, "random", {k: random_weights.MARKER for k in random_weights.real_shapes(folder)})
    if (folder / SAFE_INDEX).is_file():
        return WeightFiles(folder, "safetensors", _read_index(folder / SAFE_INDEX))
    if (folder / SAFE_SINGLE).is_file():
        return WeightFiles(folder, "safetensors", {k: SAFE_SINGLE for k in open_shard(folder / SAFE_SINGLE, "safetensors")})
    if (folder / BIN_INDEX).is_file():
        return WeightFiles(folder, "bin", _read_index(folder / BIN_INDEX))
    if (folder / BIN_SINGLE).is_file():
        return WeightFiles(folder, "bin", {k: BIN_SINGLE for k in open_shard(folder / BIN_SINGLE, "bin")})
    raise CheckpointError(f"{folder}: no weights found (expected {SAFE_INDEX}, {SAFE_SINGLE}, {BIN_INDEX} "
                          f"or {BIN_SINGLE})")


class _SafetensorsShard:
    """A dict-like view of one safetensors file: keys, shapes from the header, tensors on demand."""

    def __init__(self, path: Path):
        self._file = safe_open(str(path), framework="pt", device="cpu")
        self._keys = list(self._file.keys())
        self._key_set = set(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._key_set

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key)


def open_shard(path: Path, fmt: str):
    """A dict-like shard (key -> tensor). .bin shards are memory-mapped: nothing is read until used."""
    if not path.is_file():
        raise CheckpointError(f"{path.name}: shard listed in the index is missing from {path.parent}")
    if fmt == "random":
        return random_weights.RandomShard(path.parent)
    try:
        if fmt == "safetensors":
            return _SafetensorsShard(path)
        try:
            shard = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            shard = torch.load(path, map_location="cpu", weights_only=True)   # legacy (non-zip) format
        if not isinstance(shard, dict):
            raise TypeError(f"holds a {type(shard).__name__}, not a state dict")
        return shard
    except CheckpointError:
        raise
    except Exception as e:   # torch/zip/safetensors raise many types for truncated or corrupt files
        raise CheckpointError(f"{path.name}: cannot read shard, truncated or corrupt? "
                              f"({type(e).__name__}: {e})") from e


def _shape(shard, key: str) -> tuple[int, ...]:
    if isinstance(shard, (_SafetensorsShard, random_weights.RandomShard)):
        return tuple(shard.shape(key))
    return tuple(shard[key].shape)


def _convert(t: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    # copy=True: the result never aliases the mmap'd file, so the file may change after loading.
    if t.is_floating_point():
        return t.to(device=device, dtype=dtype, copy=True)
    return t.to(device=device, copy=True)


def _wanted_keys(files: WeightFiles, prefixes: tuple[str, ...] | None) -> list[str]:
    return [k for k in files.weight_map
            if not is_ignored_key(k) and (prefixes is None or k.startswith(prefixes))]


def _read_tensors(files: WeightFiles, keys: list[str], dtype: torch.dtype, device, progress: bool,
                  expected: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """Read `keys` shard by shard (only the shards holding them), one tensor at a time."""
    by_file: dict[str, list[str]] = {}
    for k in keys:
        by_file.setdefault(files.weight_map[k], []).append(k)
    out: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(keys), desc=f"Loading {files.folder.name}", unit="tensor", disable=not progress)
    try:
        for name in sorted(by_file):
            shard = open_shard(files.folder / name, files.format)
            shard_keys = by_file[name]
            absent = [k for k in shard_keys if k not in shard]
            if absent:
                raise CheckpointError(f"{name}: the index lists keys this shard lacks: {_listing(absent)}")
            if expected is not None:
                shapes = {k: _shape(shard, k) for k in shard_keys}
                wrong = [f"{k}: expected {list(expected[k])}, got {list(shapes[k])}"
                         for k in shard_keys if shapes[k] != tuple(expected[k])]
                if wrong:
                    more = f" ... and {len(wrong) - 10} more" if len(wrong) > 10 else ""
                    raise CheckpointError(f"{name}: mis-shaped keys (expected vs got): " + "; ".join(wrong[:10]) + more)
            for k in shard_keys:
                try:
                    if isinstance(shard, random_weights.RandomShard):
                        out[k] = shard.make(k, dtype, device)     # drawn on the device, no CPU copy
                        bar.update(1)
                        continue
                    out[k] = _convert(shard[k], dtype, device)
                except CheckpointError:
                    raise
                except Exception as e:
                    raise CheckpointError(f"{name}: cannot read {k}, truncated or corrupt? ({e})") from e
                bar.update(1)
            del shard
    finally:
        bar.close()
    return out


# ---- public API ----------------------------------------------------------------------------------
def load_state_dict(folder: str | Path, *, prefixes: tuple[str, ...] | None = None,
                    dtype: str | torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                    progress: bool = True) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors whose keys start with one of `prefixes` (all by default), full key names.

    Floating tensors are cast to `dtype`; RoPE inv_freq buffers are skipped.
    """
    dtype = resolve_dtype(dtype)
    files = find_weights(folder)
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    return _read_tensors(files, _wanted_keys(files, tuple(prefixes) if prefixes else None), dtype, device, progress)


def load_model(folder: str | Path, *, dtype: str | torch.dtype = torch.bfloat16,
               device: str | torch.device = "cpu", parts: Iterable[str] = PARTS,
               attn_implementation: str = "sdpa", trim_vision_layers: bool = False,
               progress: bool = True) -> torch.nn.Module:
    """Build the module for `parts` on the meta device and assign the checkpoint's tensors to it.

    ("vision", "language") -> InternVLChatModel; ("vision",) -> VisionEncoder (reads only the
    vision_model. and mlp1. keys); ("language",) -> LlamaForCausalLM (reads only language_model.).
    trim_vision_layers drops (and never reads) the ViT blocks after those select_layer needs.
    Returns the module in eval mode without gradients.
    """
    dtype = resolve_dtype(dtype)
    parts = normalize_parts(parts)
    config = InternVLChatConfig.from_pretrained(folder)
    model = build_model(config, parts=parts, device="meta", attn_implementation=attn_implementation)
    kept_blocks = None                                     # ViT blocks to read: all
    if trim_vision_layers and "vision" in parts:
        model.vision_model.trim_unused_blocks(config.select_layer)
        kept_blocks = len(model.vision_model.encoder.layers)

    def skip(key: str) -> bool:
        m = _VIT_BLOCK_RE.match(key)
        return kept_blocks is not None and m is not None and int(m.group(1)) >= kept_blocks

    key_prefix = "language_model." if parts == ("language",) else ""
    expected = {key_prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}
    files = find_weights(folder)
    prefixes = tuple(p for part in parts for p in PART_PREFIXES[part])
    have = [k for k in _wanted_keys(files, prefixes) if not skip(k)]
    missing = sorted(set(expected) - set(have))
    unexpected = sorted(set(have) - set(expected))
    if missing or unexpected:
        msg = []
        if missing:
            msg.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        raise CheckpointError(f"{Path(folder)}: " + "; ".join(msg))

    tensors = _read_tensors(files, have, dtype, device, progress, expected=expected)
    state = {k[len(key_prefix):]: v for k, v in tensors.items()}
    model.load_state_dict(state, strict=True, assign=True)
    reset_rotary_buffers(model, device)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not still_meta, f"tensors left on the meta device: {still_meta[:5]}"
    return model.eval().requires_grad_(False)


def compact_tensor(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor owning exactly its bytes (torch.save would write a view's whole storage)."""
    t = t.detach().to("cpu").contiguous()
    if t.storage_offset() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def _shard_groups(keys: list[str], sizes: dict[str, int], num_shards: int) -> list[list[str]]:
    """Split keys, in order, into at most num_shards non-empty groups of roughly equal bytes."""
    num_shards = max(1, min(num_shards, len(keys)))
    total = sum(sizes.values())
    groups: list[list[str]] = [[]]
    done = 0
    for i, k in enumerate(keys):
        left_keys, left_groups = len(keys) - i, num_shards - len(groups)
        full = done >= total * len(groups) / num_shards
        if groups[-1] and left_groups > 0 and (full or left_keys <= left_groups):
            groups.append([])
        groups[-1].append(k)
        done += sizes[k]
    return groups


def shard_name(fmt: str, i: int, n: int) -> str:
    """File name of shard i (0-based) of n: pytorch_model-00001-of-00004.bin or model-00001-of-00004.safetensors."""
    if fmt == "bin":
        return BIN_SINGLE if n == 1 else f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
    return SAFE_SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_shard(tensors: dict[str, torch.Tensor], path: Path, fmt: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "bin":
        torch.save(tensors, tmp)
    else:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.chmod(0o644)          # safetensors creates its files owner-only; .bin shards get the umask's mode
    tmp.replace(path)


def write_index(folder: Path, fmt: str, weight_map: dict[str, str], total_size: int) -> Path:
    path = folder / (BIN_INDEX if fmt == "bin" else SAFE_INDEX)
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return path


def remove_weight_files(folder: Path) -> None:
    """Delete the weight files and indexes of both layouts, so that no stale shard is ever picked up."""
    for p in folder.iterdir():
        if p.is_file() and is_weight_file(p.name):
            p.unlink()


def save_checkpoint(state_dict: dict[str, torch.Tensor], folder: str | Path, *, format: str = "bin",
                    num_shards: int = 4) -> list[Path]:
    """Write the real layout: shards in state-dict order + index (metadata.total_size, weight_map).

    One shard writes the single-file form (pytorch_model.bin / model.safetensors) without index.
    Existing weight files of either layout in `folder` are removed first. Returns the files written.
    """
    if format not in ("bin", "safetensors"):
        raise CheckpointError(f"unknown format {format!r}: use 'bin' or 'safetensors'")
    if not state_dict:
        raise CheckpointError("empty state dict")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_weight_files(folder)
    keys = list(state_dict)
    sizes = {k: state_dict[k].numel() * state_dict[k].element_size() for k in keys}
    groups = _shard_groups(keys, sizes, num_shards)
    written, weight_map = [], {}
    for i, group in enumerate(groups):
        name = shard_name(format, i, len(groups))
        write_shard({k: compact_tensor(state_dict[k]) for k in group}, folder / name, format)
        weight_map.update({k: name for k in group})
        written.append(folder / name)
    if len(groups) > 1:
        written.append(write_index(folder, format, weight_map, sum(sizes.values())))
    return written
