"""Random weights at a checkpoint's real shapes, made directly on the target device (benchmarks only).

Owns: the `random-weights.json` marker that turns a folder holding only config.json, tokenizer and
preprocessor files into a loadable "checkpoint", and the tensors it yields: one per real key, drawn
on the device it is loaded to (never on the CPU, never written to disk), so a benchmark can serve the
full 19B model on a GPU machine without carrying or writing 38 GB. Speed does not depend on the
values; the scales below only keep bf16 activations finite through 40 layers.

Does not own: which keys exist (the modules built on the meta device say), nor reading real files
(checkpoint.py).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

from .config import InternVLChatConfig
from .model.internvl import build_model

MARKER = "random-weights.json"

# The full-size InternVL-Chat-V1-1 config as the model sheet gives it (48 ViT blocks, select_layer -4,
# vocab 41840: the values that reproduce the official 19,113,663,360 parameters).
V1_1_SHEET_CONFIG = {
    "architectures": ["InternVLChatModel"],
    "auto_map": {
        "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
        "AutoModel": "modeling_internvl_chat.InternVLChatModel",
        "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
    },
    "downsample_ratio": 0.5,
    "dynamic_image_size": False,
    "force_image_size": 448,
    "model_type": "internvl_chat",
    "ps_version": "v1",
    "select_layer": -4,
    "system_message": "",
    "template": "internvl_zh",
    "use_thumbnail": False,
    "max_dynamic_patch": 6,
    "min_dynamic_patch": 1,
    "vision_config": {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
        "hidden_size": 3200, "num_attention_heads": 25, "intermediate_size": 12800, "num_hidden_layers": 48,
        "patch_size": 14, "image_size": 448, "num_channels": 3, "qkv_bias": False, "qk_normalization": True,
        "hidden_act": "gelu", "layer_norm_eps": 1e-6, "norm_type": "rms_norm", "initializer_factor": 0.1,
        "initializer_range": 1e-10, "drop_path_rate": 0.0, "dropout": 0.0, "attention_dropout": 0.0,
        "use_flash_attn": True,
    },
    "llm_config": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 41840, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
        "num_attention_heads": 40, "num_key_value_heads": 40, "max_position_embeddings": 4096,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
        "attention_bias": False, "initializer_range": 0.02, "max_length": 20,
    },
}


def is_random_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def write_marker(folder: str | Path, *, seed: int = 0, std: float = 0.02, tokenizer_size: int | None = None,
                 silent_ids: list[int] | None = None) -> Path:
    path = Path(folder) / MARKER
    path.write_text(json.dumps({"seed": seed, "std": std, "tokenizer_size": tokenizer_size,
                                "silent_ids": silent_ids or [], "purpose": "benchmark only: random weights"}) + "\n")
    return path


def silent_token_ids(tokenizer) -> list[int]:
    """The ids that, as the first token of an answer, give no text to send yet (engine/stopping.py's
    AnswerText, the one maker of an answer's text: special tokens, a lone space or other whitespace, an
    incomplete UTF-8 character from a byte-fallback piece). A streamed response carries text, so such a
    first token goes out only with a later one. A real model rarely starts an answer so; a random one over
    a small test vocabulary often does (151 of the tiny tokenizer's 1,009 ids), which adds decode steps to
    the TTFT a benchmark measures."""
    from .engine.sampling import SamplingParams
    from .engine.stopping import AnswerText

    return [i for i in range(len(tokenizer)) if not AnswerText(tokenizer, SamplingParams()).update([i], None)[0]]


def real_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """Every real checkpoint key and its shape, from config.json (built on the meta device)."""
    config = InternVLChatConfig.from_pretrained(folder)
    model = build_model(config, parts=("vision", "language"), device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


class RandomShard:
    """A dict-like 'shard' whose tensors are drawn on demand on the requested device."""

    def __init__(self, folder: str | Path):
        settings = json.loads((Path(folder) / MARKER).read_text())
        self.seed = int(settings.get("seed", 0))
        self.std = float(settings.get("std", 0.02))
        # A benchmark's tokenizer may be smaller than the real vocabulary: lm_head rows past it are
        # zero, so greedy decoding (whose best logit is > 0) only picks ids the tokenizer can decode;
        # the rows of its silent ids (silent_token_ids) are zero too, so answers start in words.
        self.tokenizer_size = settings.get("tokenizer_size")
        self.silent_ids = [int(i) for i in settings.get("silent_ids", [])]
        self.shapes = real_shapes(folder)

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def __iter__(self):
        return iter(self.shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]

    def make(self, key: str, dtype: torch.dtype, device) -> torch.Tensor:
        shape = self.shapes[key]
        out = torch.empty(shape, dtype=dtype, device=device)
        name = key.rsplit(".", 1)[-1]
        if key.endswith("bias"):
            return out.zero_()
        if "norm" in key or key == "mlp1.0.weight":      # RMSNorm / LayerNorm weights
            return out.fill_(1.0)
        if name in ("ls1", "ls2"):                       # InternViT layer scale
            return out.fill_(0.1)
        digest = hashlib.sha256(f"{self.seed}:{key}".encode()).digest()
        gen = torch.Generator(device=out.device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        out.normal_(0.0, self.std, generator=gen)
        if key.endswith("lm_head.weight") and self.tokenizer_size:
            out[int(self.tokenizer_size):] = 0
            if self.silent_ids:
                out[torch.tensor(self.silent_ids, device=out.device)] = 0
        return out


def make_random_checkpoint(out: str | Path, *, tokenizer_from: str | Path, seed: int = 0) -> Path:
    """A folder serving the full-size V1-1 shapes with random weights: config.json (the sheet's
    values), the tokenizer and preprocessor files of `tokenizer_from` (ids must fit the vocabulary),
    and the marker (with the tokenizer's silent ids, which the model then never picks greedily).
    Nothing of size is written."""
    from .tokenizer import load_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(tokenizer_from)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "preprocessor_config.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    vocab = V1_1_SHEET_CONFIG["llm_config"]["vocab_size"]
    tokenizer = load_tokenizer(out)
    tokenizer_size = len(tokenizer)
    if tokenizer_size > vocab:
        raise ValueError(f"tokenizer of {src} has more ids than the vocabulary ({vocab})")
    (out / "config.json").write_text(json.dumps(V1_1_SHEET_CONFIG, indent=2) + "\n")
    write_marker(out, seed=seed, tokenizer_size=tokenizer_size, silent_ids=silent_token_ids(tokenizer))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Make a full-size random-weights InternVL-Chat-V1-1 folder "
                                                 "(benchmarks only; weights are drawn on the device at load).")
    parser.add_argument("out")
    parser.add_argument("--tokenizer-from", required=True, help="a checkpoint folder whose tokenizer to copy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_random_checkpoint(args.out, tokenizer_from=args.tokenizer_from, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
