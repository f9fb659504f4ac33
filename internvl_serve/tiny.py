"""A tiny InternVL-Chat-V1-1 checkpoint in the real layout, for tests and demos on CPU.

Owns: the tiny dimensions (image 448, patch 14, downsample 0.5: really 256 image tokens per image;
ViT 64 wide x 6 blocks with select_layer -4; LLaMA 128 wide x 2 layers), a deterministic
initialisation and the writing of the folder: config.json (the real format), pytorch_model-0000N-of-
0000M.bin shards + index (or safetensors), preprocessor_config.json (V1-1's own) and the tokenizer
files (internvl_serve.tiny_tokenizer.make_tiny_tokenizer; vocab_size is its length).

The initialisation is chosen for testing, not realism: every weight is random (norm weights and
layer scales too, so a forgotten weight shows), the LLM's logits are widely spread (the top-1 vs
top-2 gap dwarfs fp32 rounding, so greedy decoding does not flip between batchings or between two
LLaMA implementations), and image embeddings are as large as token embeddings (different images
give different answers).

    python -m internvl_serve.tiny OUT [--safetensors] [--seed 0] [--force]

Idempotent: a folder already holding this maker's output for the same parameters is left alone
(the marker file .tiny-checkpoint.json records them), unless --force.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import zlib
from pathlib import Path

import torch

from .checkpoint import remove_weight_files, save_checkpoint
from .config import InternVLChatConfig, LlamaConfig, VisionConfig
from .model.internvl import build_model

TINY_VERSION = 1  # bump when the weights or files change, so cached folders are rebuilt
MARKER = ".tiny-checkpoint.json"
NUM_SHARDS = 4
PREPROCESSOR_CONFIG = {
    "crop_size": 448, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225], "resample": 3, "size": 448,
}

# Init scales (std multipliers on 1/sqrt(fan_in)); see the module docstring for the aims.
EMBED_STD = 2.0        # token embeddings (residual stream ~2 per channel)
IMAGE_GAIN = 2.0       # mlp1's last Linear: image embeddings (std ~1.4) comparable to token embeddings
LM_HEAD_GAIN = 8.0     # logits widely spread
QK_GAIN = 1.0          # LLM q/k projections


def tiny_config(vocab_size: int) -> InternVLChatConfig:
    vision = VisionConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=6,
                          patch_size=14, image_size=448, qkv_bias=False, qk_normalization=True,
                          layer_norm_eps=1e-6, hidden_act="gelu", norm_type="rms_norm", use_flash_attn=False)
    llm = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    return InternVLChatConfig(vision_config=vision, llm_config=llm, select_layer=-4, downsample_ratio=0.5,
                              force_image_size=448, ps_version="v1", template="internvl_zh")


def _randn(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    # One generator per key: a tensor's values depend only on (seed, key), not on the key order.
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63))
    return torch.randn(shape, generator=g, dtype=torch.float32)


def _init(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The tiny checkpoint's value for one key (fp32)."""
    z = _randn(key, shape, seed)
    leaf = key.rsplit(".", 1)[-1]
    if key.endswith(("norm1.weight", "norm2.weight", "q_norm.weight", "k_norm.weight", "layernorm.weight",
                     "norm.weight", "mlp1.0.weight")):
        return 1.0 + 0.1 * z                               # norm weights: near 1, not exactly
    if leaf in ("ls1", "ls2"):
        return 0.5 + 0.1 * z                               # layer scale
    if leaf == "bias":
        return 0.05 * z
    if key.endswith("class_embedding"):
        return z
    if key.endswith("position_embedding"):
        return 0.2 * z
    if key.endswith("embed_tokens.weight"):
        return EMBED_STD * z
    fan_in = math.prod(shape[1:])
    gain = 1.0
    if key.endswith("lm_head.weight"):
        gain = LM_HEAD_GAIN
    elif key.endswith("mlp1.3.weight"):
        gain = IMAGE_GAIN
    elif key.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
        gain = QK_GAIN
    return gain * z / math.sqrt(fan_in)


def tiny_state_dict(config: InternVLChatConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Every key of InternVLChatModel in checkpoint order, initialised as `_init`, cast to `dtype`."""
    shapes = {k: tuple(v.shape) for k, v in build_model(config).state_dict().items()}
    return {k: _init(k, s, seed).to(dtype) for k, s in shapes.items()}


def _marker(fmt: str, seed: int, files: dict[str, int] | None = None) -> dict:
    out = {"maker": "internvl_serve.tiny", "version": TINY_VERSION, "format": fmt, "seed": seed}
    if files is not None:
        out["files"] = files
    return out


def _is_complete(out: Path, fmt: str, seed: int) -> bool:
    try:
        marker = json.loads((out / MARKER).read_text())
        files = marker.pop("files")
    except (OSError, ValueError, KeyError):
        return False
    if marker != _marker(fmt, seed):
        return False
    return all((out / name).is_file() and (out / name).stat().st_size == size for name, size in files.items())


def make_tiny_checkpoint(out: str | os.PathLike, *, fmt: str = "bin", seed: int = 0, force: bool = False) -> Path:
    """Write (or keep) the tiny checkpoint in `out`; returns `out` as a Path.

    Refuses to overwrite a folder that holds a config or weights it did not make, unless force.
    """
    from .tiny_tokenizer import make_tiny_tokenizer

    if fmt not in ("bin", "safetensors"):
        raise ValueError(f"fmt must be 'bin' or 'safetensors', got {fmt!r}")
    out = Path(out)
    if not force and _is_complete(out, fmt, seed):
        return out
    if out.is_dir() and not force and not (out / MARKER).exists():
        foreign = [p.name for p in out.iterdir() if p.name == "config.json" or p.suffix in (".bin", ".safetensors")]
        if foreign:
            raise FileExistsError(f"{out} holds a checkpoint this maker did not write ({', '.join(sorted(foreign))}); "
                                  f"use --force to overwrite it")

    # Build everything in a sibling folder, then move it in: a crash never leaves a half folder
    # that looks complete (the marker is written last).
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        vocab_size = make_tiny_tokenizer(tmp)
        config = tiny_config(vocab_size)
        config.save_pretrained(tmp)
        (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
        save_checkpoint(tiny_state_dict(config, seed), tmp, format=fmt, num_shards=NUM_SHARDS)
        out.mkdir(exist_ok=True)
        (out / MARKER).unlink(missing_ok=True)
        remove_weight_files(out)
        files = {}
        for p in sorted(tmp.iterdir()):
            files[p.name] = p.stat().st_size
            os.replace(p, out / p.name)
        (out / MARKER).write_text(json.dumps(_marker(fmt, seed, files), indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m internvl_serve.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--safetensors", action="store_true", help="write model-0000N-of-0000M.safetensors shards")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rewrite even if OUT is complete")
    args = parser.parse_args(argv)
    fmt = "safetensors" if args.safetensors else "bin"
    try:
        out = make_tiny_checkpoint(args.out, fmt=fmt, seed=args.seed, force=args.force)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
