"""Checkpoint I/O on the tiny checkpoint in the real layout: .bin and safetensors give the same model,
parts read only their shards, the convert CLI, and every error names what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from internvl_serve.checkpoint import (BIN_INDEX, CheckpointError, load_model, load_state_dict, resolve_dtype,
                                       save_checkpoint)
from internvl_serve.config import InternVLChatConfig
from internvl_serve.convert import main as convert_main
from internvl_serve.model.internvl import InternVLChatModel, VisionEncoder
from internvl_serve.tiny import MARKER, tiny_state_dict


def context_id(folder: Path) -> int:
    return json.loads((folder / "added_tokens.json").read_text())["<IMG_CONTEXT>"]


def prompt_ids(folder: Path, n_images: int = 1) -> torch.Tensor:
    ctx = context_id(folder)
    ids = [1, 29, 30, 31] + [ctx - 1] + [ctx] * 256 * n_images + [ctx + 1] + [40, 41, 42, 43, 44]
    return torch.tensor([ids])


def logits(model: InternVLChatModel, folder: Path, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        ids = prompt_ids(folder, len(pixels))
        embeds = model.embed(ids, model.extract_feature(pixels), img_context_token_id=context_id(folder))
        return model.language_model(inputs_embeds=embeds).logits


def weight_map(folder: Path) -> dict[str, str]:
    return json.loads((folder / BIN_INDEX).read_text())["weight_map"]


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "ckpt"))


def edit_shard(folder: Path, name: str, edit) -> None:
    shard = torch.load(folder / name, weights_only=True)
    edit(shard)
    torch.save(shard, folder / name)


def edit_index(folder: Path, edit) -> None:
    index = json.loads((folder / BIN_INDEX).read_text())
    edit(index["weight_map"])
    (folder / BIN_INDEX).write_text(json.dumps(index))


PIXELS = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(0))


def test_bin_and_safetensors_load_the_same_model(tiny_checkpoint, tiny_checkpoint_safetensors):
    assert len(weight_map(tiny_checkpoint)) == 109 and len(set(weight_map(tiny_checkpoint).values())) == 4
    a = load_model(tiny_checkpoint, dtype=torch.float32, progress=False)
    b = load_model(tiny_checkpoint_safetensors, dtype="float32", progress=False)
    assert isinstance(a, InternVLChatModel) and not a.training
    config = InternVLChatConfig.from_pretrained(tiny_checkpoint)
    want = tiny_state_dict(config, seed=0)                     # what the maker wrote (bf16)
    got = a.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k].float()) for k in want)
    la, lb = logits(a, tiny_checkpoint, PIXELS), logits(b, tiny_checkpoint_safetensors, PIXELS)
    assert la.shape == (1, 4 + 2 + 512 + 5, config.llm_config.vocab_size)
    assert torch.equal(la, lb)


def test_load_state_dict_prefixes_and_dtype(tiny_checkpoint):
    sd = load_state_dict(tiny_checkpoint, prefixes=("mlp1.",), progress=False)
    assert sorted(sd) == ["mlp1.0.bias", "mlp1.0.weight", "mlp1.1.bias", "mlp1.1.weight", "mlp1.3.bias", "mlp1.3.weight"]
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in sd.values())
    sd16 = load_state_dict(tiny_checkpoint, prefixes=("language_model.lm_head.",), dtype="float16", progress=False)
    assert list(sd16) == ["language_model.lm_head.weight"] and sd16["language_model.lm_head.weight"].dtype == torch.float16
    assert resolve_dtype(torch.float32) is torch.float32


def test_parts_read_only_their_shards(tiny_checkpoint, tmp_path):
    folder = copy_of(tiny_checkpoint, tmp_path)
    wm = weight_map(folder)
    language_only = [f for f in set(wm.values())
                     if all(k.startswith("language_model.") for k, g in wm.items() if g == f)]
    assert language_only, "the tiny layout should have a shard holding only LLM weights"
    shard = folder / language_only[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])      # truncated

    vision = load_model(folder, parts=("vision",), dtype=torch.float32, progress=False)
    assert isinstance(vision, VisionEncoder)
    full = load_model(tiny_checkpoint, dtype=torch.float32, progress=False)
    with torch.no_grad():
        assert torch.equal(vision(PIXELS), full.extract_feature(PIXELS))
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(folder, parts=("language",), progress=False)


def test_language_part_and_trimmed_vision(tiny_checkpoint):
    full = load_model(tiny_checkpoint, dtype=torch.float32, progress=False)
    llm = load_model(tiny_checkpoint, parts=("language",), dtype=torch.float32, progress=False)
    assert isinstance(llm, transformers.LlamaForCausalLM)
    ids = torch.tensor([[1, 5, 9, 200, 300, 7]])
    with torch.no_grad():
        assert torch.equal(llm(ids).logits, full.language_model(ids).logits)
    trimmed = load_model(tiny_checkpoint, parts=("vision",), dtype=torch.float32, trim_vision_layers=True,
                         progress=False)
    assert len(trimmed.vision_model.encoder.layers) == 3                  # 6 blocks, select_layer -4
    with torch.no_grad():
        assert torch.equal(trimmed(PIXELS), full.extract_feature(PIXELS))


def test_convert_cli(tiny_checkpoint, tmp_path, capsys):
    dst = tmp_path / "st"
    assert convert_main([str(tiny_checkpoint), str(dst), "--no-progress"]) == 0
    names = sorted(p.name for p in dst.iterdir())
    assert [n for n in names if n.endswith(".safetensors")] == [f"model-0000{i}-of-00004.safetensors" for i in (1, 2, 3, 4)]
    assert not any(n.endswith(".bin") for n in names) and MARKER not in names
    for name in ("config.json", "preprocessor_config.json", "tokenizer.model", "tokenizer_config.json",
                 "special_tokens_map.json", "added_tokens.json"):
        assert (dst / name).read_bytes() == (tiny_checkpoint / name).read_bytes()
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == json.loads((tiny_checkpoint / BIN_INDEX).read_text())["metadata"]["total_size"]
    a, b = load_state_dict(tiny_checkpoint, progress=False), load_state_dict(dst, progress=False)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert convert_main([str(tiny_checkpoint), str(dst), "--no-progress"]) == 1       # refuses to overwrite
    assert "--force" in capsys.readouterr().err


@pytest.mark.parametrize("fmt, single", [("bin", "pytorch_model.bin"), ("safetensors", "model.safetensors")])
def test_save_single_file_and_stale_shards(tiny_checkpoint, tmp_path, fmt, single):
    sd = load_state_dict(tiny_checkpoint, progress=False)
    save_checkpoint(sd, tmp_path, format="bin", num_shards=3)
    assert sorted(p.name for p in tmp_path.iterdir())[-1] == BIN_INDEX
    save_checkpoint(sd, tmp_path, format=fmt, num_shards=1)             # replaces the 3 shards
    assert [p.name for p in tmp_path.iterdir()] == [single]
    back = load_state_dict(tmp_path, progress=False)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


# ---- errors ----------------------------------------------------------------------------------------
def test_truncated_shard_is_named(tiny_checkpoint, tmp_path):
    folder = copy_of(tiny_checkpoint, tmp_path)
    shard = folder / "pytorch_model-00002-of-00004.bin"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"pytorch_model-00002-of-00004\.bin.*truncated or corrupt"):
        load_model(folder, progress=False)


def test_missing_key_is_named(tiny_checkpoint, tmp_path):
    folder = copy_of(tiny_checkpoint, tmp_path)
    key = "vision_model.encoder.layers.2.attn.q_norm.weight"
    name = weight_map(folder)[key]
    edit_shard(folder, name, lambda sd: sd.pop(key))
    edit_index(folder, lambda wm: wm.pop(key))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): " + key.replace(".", r"\.")):
        load_model(folder, progress=False)


def test_unexpected_key_is_named(tiny_checkpoint, tmp_path):
    folder = copy_of(tiny_checkpoint, tmp_path)
    key = "mlp1.5.weight"
    name = weight_map(folder)["mlp1.3.weight"]
    edit_shard(folder, name, lambda sd: sd.__setitem__(key, torch.zeros(3)))
    edit_index(folder, lambda wm: wm.__setitem__(key, name))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): mlp1\.5\.weight"):
        load_model(folder, progress=False)
    assert "mlp1.5.weight" in load_state_dict(folder, prefixes=("mlp1.",), progress=False)


def test_rotary_inv_freq_keys_are_ignored(tiny_checkpoint, tmp_path):
    folder = copy_of(tiny_checkpoint, tmp_path)
    key = "language_model.model.layers.0.self_attn.rotary_emb.inv_freq"
    name = weight_map(folder)["language_model.model.norm.weight"]
    edit_shard(folder, name, lambda sd: sd.__setitem__(key, torch.ones(16)))
    edit_index(folder, lambda wm: wm.__setitem__(key, name))
    load_model(folder, parts=("language",), progress=False)
    assert key not in load_state_dict(folder, progress=False)


def test_wrong_shape_is_named(tiny_checkpoint, tmp_path):
    folder = copy_of(tiny_checkpoint, tmp_path)
    key = "mlp1.1.weight"                                              # (128, 256)
    edit_shard(folder, weight_map(folder)[key], lambda sd: sd.__setitem__(key, torch.zeros(128, 255)))
    with pytest.raises(CheckpointError, match=r"mlp1\.1\.weight: expected \[128, 256\], got \[128, 255\]"):
        load_model(folder, progress=False)


def test_index_lists_key_the_shard_lacks(tiny_checkpoint, tmp_path):
    folder = copy_of(tiny_checkpoint, tmp_path)
    key = "language_model.lm_head.weight"
    name = weight_map(folder)[key]
    edit_shard(folder, name, lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match=rf"{name}: the index lists keys this shard lacks: language_model\.lm_head"):
        load_model(folder, progress=False)


def test_unknown_dtype_is_named(tiny_checkpoint):
    with pytest.raises(CheckpointError, match=r"unknown dtype 'float8'.*bfloat16, float16, float32"):
        load_state_dict(tiny_checkpoint, dtype="float8")
    with pytest.raises(CheckpointError, match="unknown dtype torch.int8"):
        load_model(tiny_checkpoint, dtype=torch.int8)


def test_no_weights_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no weights found"):
        load_state_dict(tmp_path)
