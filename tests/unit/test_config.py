"""config.json parsing: a real transformers dump parses (unknown keys ignored), derived values follow
from the stored ones, and missing or inconsistent fields raise ConfigError naming the field."""

from __future__ import annotations

import json

import pytest

from internvl_serve.config import ConfigError, InternVLChatConfig, LlamaConfig, VisionConfig

# transformers' generic PretrainedConfig bookkeeping, which the real dump writes at every level.
GENERIC = {
    "_commit_hash": "0123456789abcdef", "_name_or_path": "", "add_cross_attention": False, "bad_words_ids": None,
    "begin_suppress_tokens": None, "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None,
    "decoder_start_token_id": None, "diversity_penalty": 0.0, "do_sample": False, "early_stopping": False,
    "encoder_no_repeat_ngram_size": 0, "exponential_decay_length_penalty": None, "finetuning_task": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "is_decoder": False, "is_encoder_decoder": False, "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "length_penalty": 1.0, "max_length": 20, "min_length": 0, "no_repeat_ngram_size": 0, "num_beam_groups": 1,
    "num_beams": 1, "num_return_sequences": 1, "output_attentions": False, "output_hidden_states": False,
    "output_scores": False, "prefix": None, "problem_type": None, "pruned_heads": {},
    "remove_invalid_values": False, "repetition_penalty": 1.0, "return_dict": True,
    "return_dict_in_generate": False, "sep_token_id": None, "suppress_tokens": None,
    "task_specific_params": None, "temperature": 1.0, "tf_legacy_loss": False, "tie_encoder_decoder": False,
    "tokenizer_class": None, "top_k": 50, "top_p": 1.0, "torch_dtype": "bfloat16", "torchscript": False,
    "transformers_version": "4.37.2", "typical_p": 1.0, "use_bfloat16": True, "noise_rand": None,
    "use_return_dict": True, "output_past": True, "mask_token_id": None, "cls_token_id": None,
    "gradient_checkpointing": False, "xla_device": None, "max_new_tokens": None, "num_labels": 2,
    "is_composition": False, "attn_implementation": "eager", "_attn_implementation": "eager",
    "_flash_attn_2_enabled": False, "pretraining_tp": 1, "use_cache": True, "bos_token_id": None,
    "eos_token_id": None, "pad_token_id": None, "tie_word_embeddings": False,
}


def real_style_dump(d: dict) -> dict:
    """`d` padded with the generic keys at each level, as the official config's to_dict() writes them."""
    d = {**GENERIC, **d, "vision_config": {**GENERIC, **d["vision_config"]},
         "llm_config": {**GENERIC, **d["llm_config"]}}
    d.update(use_backbone_lora=0, use_llm_lora=0, pad2square=False, hidden_size=5120, llm_path="", mlp_path=None)
    return d


def test_real_dump_parses(v1_1_config_dict):
    dump = real_style_dump(v1_1_config_dict)
    for level in (dump, dump["vision_config"], dump["llm_config"]):
        assert len(level) >= 70
    cfg = InternVLChatConfig.from_dict(json.loads(json.dumps(dump)))
    v, llm = cfg.vision_config, cfg.llm_config
    assert (v.hidden_size, v.num_attention_heads, v.num_hidden_layers, v.head_dim) == (3200, 25, 48, 128)
    assert (v.num_patches, v.qk_normalization, v.qkv_bias, v.norm_type) == (1024, True, False, "rms_norm")
    assert (llm.vocab_size, llm.hidden_size, llm.num_hidden_layers, llm.head_dim) == (41840, 5120, 40, 128)
    assert (llm.rms_norm_eps, llm.rope_theta, llm.pad_token_id, llm.eos_token_id) == (1e-5, 10000.0, 0, 2)
    assert (cfg.select_layer, cfg.ps_version, cfg.template, cfg.image_size) == (-4, "v1", "internvl_zh", 448)
    assert cfg.num_image_token == 256
    assert cfg.num_vision_blocks_used == 45
    assert cfg.projector_in_features == 12800


def test_round_trip_and_real_format(v1_1_config_dict, tmp_path):
    cfg = InternVLChatConfig.from_dict(v1_1_config_dict)
    d = cfg.to_dict()
    assert d["architectures"] == ["InternVLChatModel"] and d["model_type"] == "internvl_chat"
    assert d["auto_map"]["AutoConfig"] == "configuration_internvl_chat.InternVLChatConfig"
    for key in ("template", "select_layer", "ps_version", "force_image_size", "downsample_ratio",
                "dynamic_image_size", "use_thumbnail"):
        assert key in d
    assert d["vision_config"]["model_type"] == "intern_vit_6b"
    assert d["llm_config"]["architectures"] == ["LlamaForCausalLM"] and d["llm_config"]["model_type"] == "llama"
    assert InternVLChatConfig.from_dict(d) == cfg
    cfg.save_pretrained(tmp_path)
    assert InternVLChatConfig.from_pretrained(tmp_path) == cfg


def test_derived_values_follow_the_stored_ones(v1_1_config_dict):
    d = v1_1_config_dict
    d["force_image_size"] = 224          # (224 // 14)**2 * 0.25 = 64
    assert InternVLChatConfig.from_dict(d).num_image_token == 64
    d["force_image_size"], d["downsample_ratio"] = None, 0.25       # (448 // 14)**2 / 16 = 64
    assert InternVLChatConfig.from_dict(d).num_image_token == 64
    d["select_layer"] = -1
    assert InternVLChatConfig.from_dict(d).num_vision_blocks_used == 48


def test_missing_kv_heads_defaults_to_heads(v1_1_config_dict):
    del v1_1_config_dict["llm_config"]["num_key_value_heads"]
    assert InternVLChatConfig.from_dict(v1_1_config_dict).llm_config.num_key_value_heads == 40


def _set(d: dict, path: str, value) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        d = d[p]
    if value is _DELETE:
        del d[leaf]
    else:
        d[leaf] = value


_DELETE = object()


@pytest.mark.parametrize("path, value, named", [
    ("vision_config.hidden_size", _DELETE, "vision_config.hidden_size"),
    ("vision_config.num_hidden_layers", _DELETE, "vision_config.num_hidden_layers"),
    ("llm_config.vocab_size", _DELETE, "llm_config.vocab_size"),
    ("llm_config", _DELETE, "llm_config"),
    ("select_layer", _DELETE, "select_layer"),
    ("vision_config.num_attention_heads", 24, "vision_config.num_attention_heads"),
    ("llm_config.num_attention_heads", 48, "llm_config.num_attention_heads"),
    ("llm_config.num_key_value_heads", 3, "llm_config.num_key_value_heads"),
    ("llm_config.head_dim", 64, "llm_config.head_dim"),
    ("llm_config.eos_token_id", 50000, "llm_config.eos_token_id"),
    ("llm_config.rms_norm_eps", 0.0, "llm_config.rms_norm_eps"),
    ("ps_version", "v3", "ps_version"),
    ("select_layer", -50, "select_layer"),
    ("select_layer", 49, "select_layer"),
    ("downsample_ratio", 0.3, "downsample_ratio"),
    ("downsample_ratio", 0.4, "downsample_ratio"),
    ("downsample_ratio", 0.0, "downsample_ratio"),
    ("force_image_size", 450, "force_image_size"),
    ("vision_config.image_size", 450, "vision_config.image_size"),
    ("vision_config.hidden_size", "3200", "vision_config.hidden_size"),
    ("vision_config.qk_normalization", "yes", "vision_config.qk_normalization"),
    ("vision_config.norm_type", "batch_norm", "vision_config.norm_type"),
    ("llm_config.max_position_embeddings", None, "llm_config.max_position_embeddings"),
])
def test_bad_field_is_named(v1_1_config_dict, path, value, named):
    _set(v1_1_config_dict, path, value)
    with pytest.raises(ConfigError) as e:
        InternVLChatConfig.from_dict(real_style_dump(v1_1_config_dict) if "llm_config" in v1_1_config_dict
                                     else v1_1_config_dict)
    assert named in str(e.value)


def test_select_layer_range_edges(v1_1_config_dict):
    for s in (-49, 48, 0):   # -(L+1) is the embeddings, L the last block
        v1_1_config_dict["select_layer"] = s
        InternVLChatConfig.from_dict(v1_1_config_dict)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        InternVLChatConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        InternVLChatConfig.from_pretrained(tmp_path)


def test_sections_parse_alone(v1_1_config_dict):
    assert VisionConfig.from_dict(v1_1_config_dict["vision_config"]).num_patches == 1024
    assert LlamaConfig.from_dict(v1_1_config_dict["llm_config"]).head_dim == 128
