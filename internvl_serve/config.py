"""The model's configuration, read from a checkpoint's config.json.

Owns: three frozen dataclasses whose field names are the config.json keys (InternVLChatConfig at the
top, VisionConfig under "vision_config", LlamaConfig under "llm_config"), their validation
(ConfigError names the offending field) and their values derived from the stored ones (head_dim,
num_patches, image_size, num_image_token). Also writes the real format back (`to_dict`).

Does not own: serving knobs (engine config), the tokenizer, the image preprocessing.

The real config.json is a full transformers dump with ~70 generic keys per level (_commit_hash,
bad_words_ids, id2label, torchscript, ...): keys we do not use are ignored on purpose.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"
PS_VERSIONS = ("v1", "v2")
VISION_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh")
NORM_TYPES = ("rms_norm", "layer_norm")


class ConfigError(ValueError):
    """config.json is missing, unreadable, lacks a required field or holds an inconsistent value."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_type(section: str, name: str, value: Any, annotation: str) -> Any:
    """Check (and lightly normalise) one value against its field annotation; returns the value."""
    where = f"{section}.{name}" if section else name
    ann = annotation.replace(" ", "")
    optional = "None" in ann.split("|")
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: must not be null")
    base = [a for a in ann.split("|") if a != "None"][0]
    if base == "int" and not _is_int(value):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if base == "float":
        if not (_is_int(value) or isinstance(value, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        value = float(value)
    if base == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if base == "str" and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if base == "dict" and not isinstance(value, dict):
        raise ConfigError(f"{where}: expected an object, got {value!r}")
    return value


def _read_fields(cls, d: Any, section: str) -> dict[str, Any]:
    """The dataclass's own keys out of `d` (unknown keys dropped), type-checked; missing required -> error."""
    if not isinstance(d, dict):
        raise ConfigError(f"{section or 'config'}: expected an object, got {type(d).__name__}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name in ("vision_config", "llm_config"):
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name not in d:
            if required:
                where = f"{section}.{f.name}" if section else f.name
                raise ConfigError(f"{where}: required field is missing")
            continue
        kwargs[f.name] = _check_type(section, f.name, d[f.name], str(f.type))
    return kwargs


@dataclass(frozen=True)
class VisionConfig:
    """InternViT (InternVisionConfig, model_type intern_vit_6b): the keys of config.json "vision_config"."""

    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    num_hidden_layers: int
    patch_size: int
    image_size: int
    num_channels: int = 3
    qkv_bias: bool = False
    qk_normalization: bool = True
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    norm_type: str = "rms_norm"
    # Training-time values kept only so that to_dict() writes the real file; unused at inference.
    initializer_factor: float = 0.1
    initializer_range: float = 1e-10
    drop_path_rate: float = 0.0
    dropout: float = 0.0
    attention_dropout: float = 0.0
    use_flash_attn: bool = True

    def __post_init__(self):
        s = "vision_config"
        for name in ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers",
                     "patch_size", "image_size", "num_channels"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{s}.{name}: must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{s}.num_attention_heads: hidden_size {self.hidden_size} is not divisible "
                              f"by num_attention_heads {self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"{s}.image_size: {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_act not in VISION_ACTS:
            raise ConfigError(f"{s}.hidden_act: {self.hidden_act!r} is not one of {VISION_ACTS}")
        if self.norm_type not in NORM_TYPES:
            raise ConfigError(f"{s}.norm_type: {self.norm_type!r} is not one of {NORM_TYPES}")
        if self.layer_norm_eps <= 0:
            raise ConfigError(f"{s}.layer_norm_eps: must be positive, got {self.layer_norm_eps}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Patches per side at the position embedding's native resolution (32 for 448/14)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        return cls(**_read_fields(cls, d, "vision_config"))

    def to_dict(self) -> dict:
        out = {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "torch_dtype": "bfloat16"}
        out.update(dataclasses.asdict(self))
        return dict(sorted(out.items()))


@dataclass(frozen=True)
class LlamaConfig:
    """The LLaMA language model: the keys of config.json "llm_config"."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # absent in old dumps: from_dict uses num_attention_heads (transformers' rule)
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6  # transformers' default; LLaMA-2 checkpoints store 1e-5: always read it
    rope_theta: float = 10000.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None
    hidden_act: str = "silu"
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    initializer_range: float = 0.02

    def __post_init__(self):
        s = "llm_config"
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{s}.{name}: must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{s}.num_attention_heads: hidden_size {self.hidden_size} is not divisible "
                              f"by num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{s}.num_key_value_heads: num_attention_heads {self.num_attention_heads} is not "
                              f"a multiple of num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"{s}.num_attention_heads: head_dim {self.head_dim} must be even for RoPE")
        if self.hidden_act != "silu":
            raise ConfigError(f"{s}.hidden_act: only 'silu' is supported, got {self.hidden_act!r}")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"{s}.rms_norm_eps: must be positive, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            raise ConfigError(f"{s}.rope_theta: must be positive, got {self.rope_theta}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < self.vocab_size:
                raise ConfigError(f"{s}.{name}: {v} is outside the vocabulary (vocab_size {self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        if isinstance(d, dict) and "num_key_value_heads" not in d and "num_attention_heads" in d:
            d = {**d, "num_key_value_heads": d["num_attention_heads"]}
        kwargs = _read_fields(cls, d, "llm_config")
        hidden, heads = kwargs["hidden_size"], kwargs["num_attention_heads"]
        if d.get("head_dim") is not None and heads and d["head_dim"] != hidden // heads:
            raise ConfigError(f"llm_config.head_dim: {d['head_dim']} differs from hidden_size // "
                              f"num_attention_heads = {hidden // heads}; not supported")
        return cls(**kwargs)

    def to_dict(self) -> dict:
        out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
               "pretraining_tp": 1, "use_cache": True}
        out.update(dataclasses.asdict(self))
        return dict(sorted(out.items()))


@dataclass(frozen=True)
class InternVLChatConfig:
    """The whole model (model_type internvl_chat): the top level of config.json."""

    vision_config: VisionConfig
    llm_config: LlamaConfig
    # Required on purpose: the class default changed from -4 to -1 in 2024-07 and V1-1's value is
    # unconfirmed, so a config.json without it must not be guessed at.
    select_layer: int
    downsample_ratio: float = 0.5
    force_image_size: int | None = None
    ps_version: str = "v1"
    template: str = "internvl_zh"
    # None (absent from config.json): the template's own; the card reads config.system_message only
    # `if hasattr(config, 'system_message')` (Hermes-2 has a non-empty default, internvl_zh '')
    system_message: str | None = None
    dynamic_image_size: bool = False
    use_thumbnail: bool = False
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6
    use_backbone_lora: int = 0
    use_llm_lora: int = 0
    torch_dtype: str = "bfloat16"

    def __post_init__(self):
        v = self.vision_config
        if not isinstance(v, VisionConfig):
            raise ConfigError("vision_config: expected a VisionConfig")
        if not isinstance(self.llm_config, LlamaConfig):
            raise ConfigError("llm_config: expected a LlamaConfig")
        if self.ps_version not in PS_VERSIONS:
            raise ConfigError(f"ps_version: {self.ps_version!r} is not one of {PS_VERSIONS}")
        L = v.num_hidden_layers
        if not -(L + 1) <= self.select_layer <= L:
            raise ConfigError(f"select_layer: {self.select_layer} is out of range for "
                              f"vision_config.num_hidden_layers {L} (hidden states run from -{L + 1} to {L})")
        if self.force_image_size is not None and (self.force_image_size <= 0 or self.force_image_size % v.patch_size):
            raise ConfigError(f"force_image_size: {self.force_image_size} is not a positive multiple of "
                              f"vision_config.patch_size {v.patch_size}")
        r = self.downsample_ratio
        grid = self.image_size // v.patch_size
        inv = 1.0 / r if r > 0 else math.inf
        if not (0 < r <= 1 and abs(inv - round(inv)) < 1e-9 and abs(grid * r - round(grid * r)) < 1e-9):
            raise ConfigError(f"downsample_ratio: {r} does not divide the {grid}x{grid} patch grid into an integer "
                              f"grid (1/downsample_ratio and grid * downsample_ratio must be integers)")
        if self.min_dynamic_patch < 1 or self.max_dynamic_patch < self.min_dynamic_patch:
            raise ConfigError(f"max_dynamic_patch: {self.max_dynamic_patch} must be >= min_dynamic_patch "
                              f"{self.min_dynamic_patch} >= 1")

    # ---- derived values ------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        """The model's input resolution: force_image_size, else the ViT's own (448 for V1-1)."""
        return self.force_image_size or self.vision_config.image_size

    @property
    def grid_size(self) -> int:
        """ViT patches per side at image_size (32)."""
        return self.image_size // self.vision_config.patch_size

    @property
    def scale(self) -> int:
        """1 / downsample_ratio: patches merged per side by the pixel shuffle (2)."""
        return round(1.0 / self.downsample_ratio)

    @property
    def num_image_token(self) -> int:
        """Image tokens per 448 tile: (image_size // patch_size)**2 * downsample_ratio**2 (256)."""
        return (self.grid_size // self.scale) ** 2

    @property
    def projector_in_features(self) -> int:
        """Width of one pixel-shuffled token: vision hidden * (1/downsample_ratio)**2 (12800)."""
        return self.vision_config.hidden_size * self.scale ** 2

    @property
    def num_vision_blocks_used(self) -> int:
        """ViT blocks whose output feeds the projector: hidden_states[select_layer] is after this many."""
        L = self.vision_config.num_hidden_layers
        return self.select_layer if self.select_layer >= 0 else L + 1 + self.select_layer

    # ---- reading and writing -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "InternVLChatConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"config: expected an object, got {type(d).__name__}")
        for key in ("vision_config", "llm_config"):
            if key not in d:
                raise ConfigError(f"{key}: required section is missing")
        kwargs = _read_fields(cls, d, "")
        return cls(vision_config=VisionConfig.from_dict(d["vision_config"]),
                   llm_config=LlamaConfig.from_dict(d["llm_config"]), **kwargs)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "InternVLChatConfig":
        path = Path(folder) / CONFIG_NAME
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from e
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        """config.json in the real layout (the keys the official code reads; not its ~70 generic ones)."""
        out = {
            "architectures": ["InternVLChatModel"],
            "auto_map": {
                "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
            },
            "model_type": "internvl_chat",
        }
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "system_message" and value is None:
                continue  # absent, not null: the card would use None as the system message
            out[f.name] = value.to_dict() if f.name in ("vision_config", "llm_config") else value
        return dict(sorted(out.items()))

    def save_pretrained(self, folder: str | Path) -> Path:
        path = Path(folder) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path
