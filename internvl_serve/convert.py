"""Convert a downloaded checkpoint's pickled .bin shards into safetensors shards, shard by shard.

    python -m internvl_serve.convert SRC DST [--force]

Owns: streaming pytorch_model-0000N-of-0000M.bin (or pytorch_model.bin) into
model-0000N-of-0000M.safetensors (or model.safetensors) + model.safetensors.index.json, keeping
the dtype, and copying the other top-level files (config.json, tokenizer files,
preprocessor_config.json, ...) to DST. Memory stays bounded by one shard: each .bin is memory-mapped
(torch.load weights_only=True, mmap=True) and released before the next.

Does not own: reading or checking the weights for a model (checkpoint.py).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from tqdm.auto import tqdm

from .checkpoint import (BIN_INDEX, SAFE_INDEX, SAFE_SINGLE, CheckpointError, compact_tensor, find_weights,
                         is_weight_file, open_shard, remove_weight_files, write_index, write_shard)


def convert(src: str | Path, dst: str | Path, *, force: bool = False, progress: bool = True) -> Path:
    """Write DST: SRC's .bin weights as safetensors (same keys, shapes, dtypes) plus SRC's other files."""
    src, dst = Path(src), Path(dst)
    files = find_weights(src)
    if files.format != "bin":
        raise CheckpointError(f"{src}: holds safetensors already; nothing to convert")
    if src.resolve() == dst.resolve():
        raise CheckpointError("SRC and DST must be different folders")
    if dst.exists() and any(is_weight_file(p.name) for p in dst.iterdir()) and not force:
        raise CheckpointError(f"{dst}: already holds weights; use --force to replace them")
    dst.mkdir(parents=True, exist_ok=True)
    remove_weight_files(dst)

    shards = files.files                                   # sorted: pytorch_model-00001-of-... first
    indexed = (src / BIN_INDEX).is_file()
    keys_of = {name: [k for k, f in files.weight_map.items() if f == name] for name in shards}
    weight_map, total_size = {}, 0
    for i, name in enumerate(tqdm(shards, desc="Converting", unit="shard", disable=not progress)):
        shard = open_shard(src / name, "bin")
        absent = [k for k in keys_of[name] if k not in shard]
        if absent:
            raise CheckpointError(f"{name}: the index lists keys this shard lacks: {', '.join(absent[:10])}")
        tensors = {k: compact_tensor(shard[k]) for k in keys_of[name]}
        out_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if indexed else SAFE_SINGLE
        write_shard(tensors, dst / out_name, "safetensors")
        weight_map.update({k: out_name for k in tensors})
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        del shard, tensors
    if indexed:
        write_index(dst, "safetensors", weight_map, total_size)

    for p in sorted(src.iterdir()):
        if p.is_file() and not p.name.startswith(".") and not is_weight_file(p.name):
            shutil.copy2(p, dst / p.name)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m internvl_serve.convert",
                                     description="Convert a checkpoint's .bin shards into safetensors shards.")
    parser.add_argument("src", help="checkpoint folder with pytorch_model*.bin (+ pytorch_model.bin.index.json)")
    parser.add_argument("dst", help="folder to write model*.safetensors + model.safetensors.index.json into")
    parser.add_argument("--force", action="store_true", help="replace weights already in DST")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.dst, force=args.force, progress=not args.no_progress)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out / SAFE_INDEX if (out / SAFE_INDEX).is_file() else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
